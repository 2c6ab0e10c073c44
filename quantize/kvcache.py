"""An int8 KV cache: GroupQueryAttention stores keys and values as int8 with calibrated per-channel scales.

Why: at long positions a decode step reads the whole cache, and an fp32 cache is also most of the memory a
generation adds (12 layers x 2 x 12 heads x 64 x 4 bytes = 72 KB a position for the GPT-2-124M shape).
onnxruntime's CPU GroupQueryAttention takes an int8 cache in place (`k_quant_type` / `v_quant_type`,
`kv_cache_bit_width` 8, static `k_scale` / `v_scale` inputs): it quantizes each new key as
round(x / scale), saturating, and attends over the dequantized cache, in prefill too, so the quality
gate's perplexity measures the cache as generation uses it (the op's schema in onnxruntime's ContribOperators.md).
It is a quarter of the memory and, at position 900, faster than fp32 (same file).

Scales are per channel (one per kv head x head dim, what PER_CHANNEL takes) and static, so they are
calibrated: the model prefills the calibration windows with an fp32 cache and the scale of a channel is
the largest magnitude stored there, divided by 127. Rotary models store keys after the rotation, which
moves a value between the two channels of a rotary pair as the position grows; calibration windows start
at position 0, so a channel's own maximum would miss what it holds at position 900. The key scale of a
rotary pair is therefore the largest norm of the pair, which no rotation changes. The graph rewrite is
onnx-only: the scales become initializers, the cache inputs and outputs int8; weights are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gptedge.errors import QuantizeError
from gptedge.quantize.roles import attr
from gptedge.quantize.rotary import table_width
from gptedge.runtime.bundle import DTYPES, KV_DTYPES, BundleSpec

# What `quantize --kv-cache` can store besides the float dtypes (the bundle format's list, less the float ones).
QUANTIZED_KV_DTYPES = tuple(d for d in KV_DTYPES if d not in DTYPES)
GQA = "GroupQueryAttention"
QMAX = 127.0  # symmetric int8: round(x / scale) in [-127, 127]; the kernel saturates anything beyond
K_SCALE_INPUT, V_SCALE_INPUT = 12, 13  # GroupQueryAttention's k_scale / v_scale input slots (com.microsoft, v1)
ROTARY_COS_INPUT = 7
TINY = 1e-8  # a channel that stayed zero in calibration still needs a positive scale


@dataclass
class KVScales:
    """Per layer, the key and value scales [n_kv_head * head_dim] GroupQueryAttention multiplies the int8 cache by."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    windows: int
    tokens: int


def attention_nodes(model: onnx.ModelProto, spec: BundleSpec) -> list[onnx.NodeProto]:
    """The GroupQueryAttention node of each layer, in layer order (matched by the past-key input it reads)."""
    past = spec.io.past_names(spec.architecture.n_layer)[0::2]
    by_past = {n.input[3]: n for n in model.graph.node if n.op_type == GQA and len(n.input) > 3}
    missing = [name for name in past if name not in by_past]
    if missing:
        raise QuantizeError(f"an int8 KV cache needs a GroupQueryAttention node per layer; none reads {missing[0]!r} "
                            "(re-export the bundle with the in-place KV cache, the default)")
    return [by_past[name] for name in past]


def rotary_half(model: onnx.ModelProto, node: onnx.NodeProto, spec: BundleSpec) -> int:
    """Half the rotary width of the keys a node stores (0 for models without rotary positions).

    Non-interleaved rotation pairs channel i with channel i + rotary_dim / 2 of each head. A node that
    rotates inside the kernel reads a cos table [positions, rotary_dim / 2]; a model whose head size the
    kernel cannot rotate is rotated in the graph before it, over whole heads (gptedge.export.graph).
    """
    if not attr(node, "do_rotary", 0):
        return spec.architecture.head_dim // 2 if spec.architecture.details.get("positions") == "rope" else 0
    if attr(node, "rotary_interleaved", 0):
        raise QuantizeError("an int8 KV cache with interleaved rotary embeddings is not supported")
    name = node.input[ROTARY_COS_INPUT]
    width = table_width(model, name)
    if width is None:
        raise QuantizeError(f"the rotary table {name!r} of {node.name!r} is neither stored nor computed from "
                            "stored frequencies; re-export the bundle")
    return width


def _pair_norm(keys: np.ndarray, half: int) -> np.ndarray:
    """[..., head_dim] magnitudes with each rotary pair's channels replaced by the pair's norm (shared by both)."""
    out = np.abs(keys)
    if half:
        norm = np.sqrt(keys[..., :half] ** 2 + keys[..., half:2 * half] ** 2)
        out[..., :half] = norm
        out[..., half:2 * half] = norm
    return out


def calibrate(engine, windows: list[np.ndarray], halves: list[int],
              on_window: Callable[[], None] | None = None) -> KVScales:
    """Prefill each window with the model's fp32 cache and keep each channel's largest stored magnitude."""
    a = engine.arch
    n = a.n_layer
    peak = [np.zeros((a.n_kv_head, a.head_dim), np.float64) for _ in range(2 * n)]  # interleaved k0, v0, k1, ...
    tokens = 0
    for ids in windows:
        length = len(ids)
        cache = engine.new_cache(1, length)
        try:
            engine.prefill(cache, np.asarray(ids, np.int64)[None, :])
            for i, value in enumerate(cache.values):
                stored = np.asarray(value.numpy()[0, :, :length, :], np.float64)  # [n_kv_head, length, head_dim]
                magnitude = _pair_norm(stored, halves[i // 2]) if i % 2 == 0 else np.abs(stored)
                np.maximum(peak[i], magnitude.max(axis=1), out=peak[i])
        finally:
            cache.release()
        tokens += length
        if on_window is not None:
            on_window()
    scales = [np.maximum(p.reshape(-1) / QMAX, TINY).astype(np.float32) for p in peak]
    return KVScales(keys=scales[0::2], values=scales[1::2], windows=len(windows), tokens=tokens)


def apply_int8_cache(model: onnx.ModelProto, spec: BundleSpec, scales: KVScales) -> None:
    """Rewrite the graph in place: int8 cache inputs / outputs, each attention node reading its layer's scales."""
    nodes = attention_nodes(model, spec)
    names = spec.io.past_names(spec.architecture.n_layer) + spec.io.present_names(spec.architecture.n_layer)
    for layer, node in enumerate(nodes):
        k_name, v_name = f"kv_cache.{layer}.k_scale", f"kv_cache.{layer}.v_scale"
        model.graph.initializer.extend([numpy_helper.from_array(scales.keys[layer], k_name),
                                        numpy_helper.from_array(scales.values[layer], v_name)])
        while len(node.input) < K_SCALE_INPUT:
            node.input.append("")  # the optional inputs between the rotary tables and the scales stay empty
        del node.input[K_SCALE_INPUT:]
        node.input.extend([k_name, v_name])
        kept = [a for a in node.attribute if a.name not in ("k_quant_type", "v_quant_type", "kv_cache_bit_width")]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                                      helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                                      helper.make_attribute("kv_cache_bit_width", 8)])
    wanted = set(names)
    for value in [*model.graph.input, *model.graph.output]:
        if value.name in wanted:
            value.type.tensor_type.elem_type = TensorProto.INT8
            wanted.discard(value.name)
    if wanted:
        raise QuantizeError(f"the graph does not declare the cache tensors {sorted(wanted)[:2]}; re-export the bundle")


def quantize_kv_cache(model_path: Path, spec: BundleSpec, windows: list[np.ndarray], engine,
                      on_window: Callable[[], None] | None = None) -> dict[str, Any]:
    """Calibrate on `windows` with `engine` (this model, fp32 cache) and rewrite `model_path` for an int8 cache.

    Only model.onnx is rewritten; its external weight file stays as it is. Returns what gptedge.json records.
    """
    model = onnx.load(str(model_path), load_external_data=False)
    halves = [rotary_half(model, node, spec) for node in attention_nodes(model, spec)]
    scales = calibrate(engine, windows, halves, on_window)
    apply_int8_cache(model, spec, scales)
    onnx.save(model, str(model_path))
    return {
        "dtype": "int8", "granularity": "per_channel", "symmetric": True,
        "scale": "largest stored magnitude / 127 (keys of rotary models: the rotary pair's norm)",
        "calibration": {"windows": scales.windows, "tokens": scales.tokens},
        "max_abs": {"keys": [round(float(s.max() * QMAX), 4) for s in scales.keys],
                    "values": [round(float(s.max() * QMAX), 4) for s in scales.values]},
    }


__all__ = ["QUANTIZED_KV_DTYPES", "KVScales", "apply_int8_cache", "calibrate", "quantize_kv_cache"]
