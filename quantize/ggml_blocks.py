"""llama.cpp's Q8_0, Q4_0 and Q4_1 blocks as MatMulNBits weights, integer for integer: no second rounding.

All three store blocks of 32 weights along a row's input axis, exactly MatMulNBits' blocks of 32:

    Q8_0   fp16 d, 32 x int8 q           w = d * q          -> 8 bits, uint8 q + 128, the default zero point 128
    Q4_0   fp16 d, 16 bytes of nibbles   w = d * (q - 8)    -> 4 bits, the default zero point 8
    Q4_1   fp16 d, fp16 m, 16 bytes      w = d * q + m      -> 4 bits, integer zero points and offsets (below)

ggml packs a 4-bit block as q[j] | q[j + 16] << 4 (byte j holds values j and j + 16); MatMulNBits packs
consecutive values (byte i holds values 2i and 2i + 1), so the nibbles are reordered, never recomputed.
Scales are d, widened from fp16 (exact). Q4_1's offset m is not a whole number of steps d, so no integer
zero point holds it, and onnxruntime's CPU kernel runs float zero points on a slow path (measured in
benchmarks/results/gguf-blocks.json). So a Q4_1 block keeps its integers q and scale d with the integer zero
point z nearest -m / d, and the remainder r = m + z d (at most d / 2) as an offset: W x = W' x + R s(x), where
W' = d (q - z) runs on the fast integer kernel, R [N, K / 32] holds the remainders and s(x) the sums of x over
each block of 32, a product 32 times smaller than the weight's (gptedge.quantize.blocks builds it). Centring the
integer part on the weights keeps the int8 activation rounding of the fast kernel as small as for Q4_0.

numpy only: the quantize layer reads these arrays, export/gguf.py produces them from a file's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32
# ggml type name -> (bits, bytes per block)
KEPT = {"Q8_0": (8, 34), "Q4_0": (4, 18), "Q4_1": (4, 20)}


@dataclass
class BlockWeight:
    """One [N, K] weight as MatMulNBits inputs (blocks along K, one row per output)."""

    ggml_type: str
    bits: int
    packed: np.ndarray  # [N, K / 32, 32 * bits / 8] uint8
    scales: np.ndarray  # [N, K / 32] float32
    zeros: np.ndarray | None = None  # [N, K / 32] uint8 zero point per block; None: the bit width's default
    offsets: np.ndarray | None = None  # [N, K / 32] float32 added to every weight of the block (Q4_1's remainder)
    columns: int | None = None  # K when the last block is padded (a width that is not whole blocks); None: whole

    @property
    def block_size(self) -> int:
        return self.packed.shape[2] * 8 // self.bits

    @property
    def shape(self) -> tuple[int, int]:
        n, blocks, _ = self.packed.shape
        return n, self.columns or blocks * self.block_size

    def zero_points(self) -> np.ndarray | None:
        """MatMulNBits' zero_points input ([N, ceil(K / 32 * bits / 8)] uint8, packed as the values are), None for
        the default."""
        if self.zeros is None:
            return None
        if self.bits == 8:
            return self.zeros
        z = self.zeros if self.zeros.shape[1] % 2 == 0 else np.pad(self.zeros, ((0, 0), (0, 1)))
        return _pack4(z)

    def dequantize(self) -> np.ndarray:
        """[N, K] float32: (q - zero point) * scale (+ offset)."""
        q = unpack(self.packed, self.bits).astype(np.float32)  # [N, K/32, 32]
        zero = np.float32(1 << (self.bits - 1)) if self.zeros is None else self.zeros[..., None].astype(np.float32)
        w = (q - zero) * self.scales[..., None]
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        n, k = self.shape
        return w.reshape(n, -1)[:, :k]


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits blobs [..., 32 * bits / 8] -> values [..., 32] uint8 (low nibble first at 4 bits)."""
    if bits == 8:
        return packed
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Values [..., 32] (uint8, below 2^bits) -> MatMulNBits blobs [..., 32 * bits / 8]."""
    return np.ascontiguousarray(values, np.uint8) if bits == 8 else _pack4(values)


def _pack4(values: np.ndarray) -> np.ndarray:
    """[..., 32] values 0..15 -> [..., 16] bytes, value 2i in the low nibble of byte i."""
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _ggml_nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's [..., 16] nibble bytes -> [..., 32] values in order (byte j holds values j and j + 16)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def from_ggml(raw: np.ndarray, ggml_type: str) -> BlockWeight:
    """A ggml tensor's rows of blocks (uint8 [N, K / 32 * bytes per block]) as a BlockWeight of the same values."""
    bits, size = KEPT[ggml_type]
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, -1, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
    if ggml_type == "Q8_0":
        q = blocks[..., 2:].copy().view(np.int8)
        return BlockWeight(ggml_type, 8, (q.astype(np.int16) + 128).astype(np.uint8), d)
    if ggml_type == "Q4_0":
        return BlockWeight(ggml_type, 4, _pack4(_ggml_nibbles(blocks[..., 2:])), d)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    # The integer zero point nearest -m / d leaves an offset of at most d / 2 (the integer part carries the weight)
    with np.errstate(divide="ignore", invalid="ignore"):
        zeros = np.clip(np.round(np.where(d != 0, -m / d, 0.0)), 0, 15).astype(np.uint8)
    offsets = (m + zeros.astype(np.float32) * d).astype(np.float32)
    return BlockWeight(ggml_type, 4, _pack4(_ggml_nibbles(blocks[..., 4:])), d, zeros, offsets)


def concat_rows(parts: list[BlockWeight]) -> BlockWeight:
    """Weights stacked along N (q, k, v into one packed projection): same type required."""
    first = parts[0]
    def stack(field: str) -> np.ndarray | None:
        return None if getattr(first, field) is None else np.concatenate([getattr(p, field) for p in parts])

    return BlockWeight(first.ggml_type, first.bits, stack("packed"), stack("scales"), stack("zeros"), stack("offsets"),
                       first.columns)


def permute_rows(weight: BlockWeight, order: np.ndarray) -> BlockWeight:
    """The same weight with its output rows reordered (undoing a converter's rotary row order)."""
    def take(value: np.ndarray | None) -> np.ndarray | None:
        return None if value is None else value[order]

    return BlockWeight(weight.ggml_type, weight.bits, weight.packed[order], weight.scales[order], take(weight.zeros),
                       take(weight.offsets), weight.columns)
