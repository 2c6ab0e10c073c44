"""How one weight matrix is rounded to MatMulNBits blocks: the choices the INT4 recipes are made of.

A weight W [N, K] (one row per output) is cut into blocks of `block` values along K; each block stores
integers q in [0, 2^bits) and a scale d, and the kernel computes d * (q - z) with an integer zero point z
(the bit width's midpoint when symmetric; a uint8 per block when asymmetric: onnxruntime's CPU kernel runs
integer zero points on its fast path, float ones on a slow one, benchmarks/results/gguf-blocks.json).

- `round_to_nearest`: d from the block's range (max |w| when symmetric, max - min when not), round, clip.
- `searched`: llama.cpp's k-quant idea (make_qkx) for integer zero points: try a grid of scales around the
  range's, round, refit d by least squares for the integers chosen, keep the best; the error is weighted by
  `importance` per input channel when given (the mean square activation each weight multiplies, as
  llama.cpp's imatrix weights it), so the weights that matter most are rounded most carefully.
- `gptq`: rounds the columns of W one at a time (blocks of 32 along K, scales from `searched` on the
  block as it stands) and pushes each column's rounding error onto the columns not yet rounded, through the
  inverse of the input Hessian H = X^T X from calibration text (Frantar et al., GPTQ), so the layer's output
  rather than its weights stays close.

numpy only. Every function returns a BlockWeight (quantize.ggml_blocks), the form the graph surgery writes.
"""

from __future__ import annotations

import numpy as np

from gptedge.quantize.ggml_blocks import BlockWeight, pack

SEARCH_STEPS = 20  # scales tried per block: range / (levels + delta), delta in [-1, 1]
REFITS = 2  # least-squares refits of the scale for the integers chosen
DAMP = 0.01  # GPTQ: the Hessian's diagonal is raised by this fraction of its mean (numerical safety)


def _levels(bits: int) -> int:
    return (1 << bits) - 1


def _blocks(w_nk: np.ndarray, block: int) -> np.ndarray:
    """[N, K] -> [N, ceil(K / block), block]; a last partial block is padded with zeros (as MatMulNBits pads)."""
    n, k = w_nk.shape
    w = np.asarray(w_nk, np.float32)
    if k % block:
        w = np.pad(w, ((0, 0), (0, block - k % block)))
    return w.reshape(n, -1, block)


def _fit(x: np.ndarray, a: np.ndarray, bits: int, symmetric: bool, d: np.ndarray
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For blocks x [..., B] and scales d [...]: integers, zero points, refit scales, weighted squared error."""
    top = _levels(bits)
    safe = np.where(d > 0, d, 1.0)
    if symmetric:
        z = np.full(d.shape, float(1 << (bits - 1)), np.float32)
    else:
        z = np.clip(np.round(-x.min(axis=-1) / safe), 0, top)
    q = np.clip(np.round(x / safe[..., None] + z[..., None]), 0, top)
    centred = q - z[..., None]
    for _ in range(REFITS):  # the best scale for these integers, then the best integers for that scale
        den = (a * centred * centred).sum(-1)
        d = np.where(den > 0, (a * x * centred).sum(-1) / np.where(den > 0, den, 1.0), d)
        safe = np.where(d > 0, d, 1.0)
        if not symmetric:
            z = np.clip(np.round(((a * (q - x / safe[..., None])).sum(-1)) / a.sum(-1)), 0, top)
        q = np.clip(np.round(x / safe[..., None] + z[..., None]), 0, top)
        centred = q - z[..., None]
    err = (a * (centred * d[..., None] - x) ** 2).sum(-1)
    return q, z, d, err


def _range_scale(x: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    if symmetric:
        return np.abs(x).max(axis=-1) / (1 << (bits - 1))
    return (x.max(axis=-1) - x.min(axis=-1)) / _levels(bits)


def _quantize_blocks(x: np.ndarray, a: np.ndarray, bits: int, symmetric: bool, search: bool
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks x [..., B] with importance a (broadcast to x) -> integers, zero points, scales."""
    base = _range_scale(x, bits, symmetric)
    if not search:
        safe = np.where(base > 0, base, 1.0)
        top = _levels(bits)
        z = (np.full(base.shape, float(1 << (bits - 1))) if symmetric
             else np.clip(np.round(-x.min(axis=-1) / safe), 0, top))
        q = np.clip(np.round(x / safe[..., None] + z[..., None]), 0, top)
        return q, z, base
    levels = (1 << (bits - 1)) if symmetric else _levels(bits)
    best = None
    for delta in np.linspace(-1.0, 1.0, SEARCH_STEPS + 1):
        d = base * levels / (levels + delta)
        q, z, d, err = _fit(x, a, bits, symmetric, d)
        if best is None:
            best = [q, z, d, err]
            continue
        better = err < best[3]
        best = [np.where(better[..., None], q, best[0]), np.where(better, z, best[1]), np.where(better, d, best[2]),
                np.where(better, err, best[3])]
    return best[0], best[1], best[2]


def _block_weight(q: np.ndarray, z: np.ndarray, d: np.ndarray, bits: int, symmetric: bool, label: str, k: int
                  ) -> BlockWeight:
    zeros = None if symmetric else z.astype(np.uint8)
    columns = None if k == q.shape[1] * q.shape[2] else k
    return BlockWeight(label, bits, pack(q.astype(np.uint8), bits), d.astype(np.float32), zeros, columns=columns)


def round_to_nearest(w_nk: np.ndarray, bits: int, block: int = 32, symmetric: bool = True) -> BlockWeight:
    x = _blocks(w_nk, block)
    q, z, d = _quantize_blocks(x, np.ones_like(x), bits, symmetric, search=False)
    return _block_weight(q, z, d, bits, symmetric, f"int{bits}", w_nk.shape[1])


def searched(w_nk: np.ndarray, bits: int, block: int = 32, symmetric: bool = False,
             importance: np.ndarray | None = None) -> BlockWeight:
    """Scales (and zero points) searched per block to minimise the (importance-weighted) squared error."""
    x = _blocks(w_nk, block)
    if importance is None:
        a = np.ones_like(x)
    else:  # padded columns weigh nothing
        a = _blocks(np.asarray(importance, np.float32)[None, :], block)
        a = np.broadcast_to(np.where(a > 0, a, 0.0), x.shape)
    q, z, d = _quantize_blocks(x, a, bits, symmetric, search=True)
    return _block_weight(q, z, d, bits, symmetric, f"int{bits}", w_nk.shape[1])


def gptq(w_nk: np.ndarray, hessian: np.ndarray, bits: int, block: int = 32, symmetric: bool = False,
         act_order: bool = False) -> BlockWeight:
    """GPTQ with blocks of `block` along K.

    act_order False: columns in order, each block's scales searched on the block as updated so far.
    act_order True: columns in order of decreasing input energy (diag H), the most important rounded first
    while the most error can still be pushed onto the rest; scales are then fixed per block from the
    original weights (the blocks are no longer rounded in order).
    """
    w = np.array(w_nk, np.float64)
    n, k = w.shape
    if k % block:
        raise ValueError(f"GPTQ needs rows of whole blocks: {k} values, blocks of {block}")
    h = np.array(hessian, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += DAMP * np.mean(np.diag(h))
    top = _levels(bits)
    groups = k // block
    z_all = np.zeros((n, groups), np.float32)
    d_all = np.zeros((n, groups), np.float32)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    if act_order:  # static scales: every block's from the original weights
        x = w.astype(np.float32).reshape(n, groups, block)
        _, z_all, d_all = _quantize_blocks(x, np.broadcast_to(np.diag(h).astype(np.float32).reshape(1, groups, block),
                                                              x.shape), bits, symmetric, search=True)
    w, h = w[:, order], h[np.ix_(order, order)]
    inverse = np.linalg.cholesky(np.linalg.inv(h)).T  # upper triangular: rows are the update directions
    q_all = np.zeros((n, k), np.float32)
    for start in range(0, k, block):
        stop = start + block
        if not act_order:  # the block's scales, searched on its columns as updated so far
            x = w[:, start:stop].astype(np.float32)[:, None, :]
            importance = np.broadcast_to(np.diag(h)[start:stop].astype(np.float32), x.shape)
            _, z, d = _quantize_blocks(x, importance, bits, symmetric, search=True)
            z_all[:, start // block], d_all[:, start // block] = z[:, 0], d[:, 0]
        errors = np.empty((n, block))
        for j in range(block):
            col = start + j
            g = order[col] // block
            z, d = z_all[:, g], d_all[:, g]
            q = np.clip(np.round(w[:, col] / np.where(d > 0, d, 1.0) + z), 0, top)
            q_all[:, order[col]] = q
            errors[:, j] = (w[:, col] - (q - z) * d) / inverse[col, col]
            w[:, col + 1:stop] -= np.outer(errors[:, j], inverse[col, col + 1:stop])
        w[:, stop:] -= errors @ inverse[start:stop, stop:]
    q = q_all.reshape(n, groups, block)
    return _block_weight(q, z_all, d_all, bits, symmetric, f"int{bits}", k)


def output_error(w_nk: np.ndarray, quantized: BlockWeight, hessian: np.ndarray) -> float:
    """The layer output's relative squared error on the calibration inputs: tr(dW H dW^T) / tr(W H W^T)."""
    w = np.asarray(w_nk, np.float64)
    delta = quantized.dequantize().astype(np.float64) - w
    return float(np.einsum("nk,kj,nj->", delta, hessian, delta) / max(np.einsum("nk,kj,nj->", w, hessian, w), 1e-30))
