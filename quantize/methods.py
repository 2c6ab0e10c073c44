"""The quantization recipes, and the graph surgery they share.

Four recipes, each a function from a float ONNX model to a quantized one:

    int8-weight    weight-only INT8 blocks (com.microsoft MatMulNBits, bits=8); int8 compute on CPU
                   (accuracy_level 4); runs on CPU, CUDA and DirectML
    int4-weight    the same at 4 bits
    int8-dynamic   per-channel INT8 weights, activations quantized on the fly per call
                   (MatMulInteger, fused to DynamicQuantizeMatMul by ONNX Runtime's CPU provider); CPU only
    int8-static    QDQ INT8 weights and activations, activation ranges calibrated on text; CPU only

What is quantized: the transformer blocks' weight MatMuls (attention in/out projections, MLP). What
stays float: attention itself (GroupQueryAttention computes the score and value products inside),
LayerNorm, GELU, biases, and any MatMul without a constant weight. Embedding tables are read one row
per token, so storing them as INT8 blocks costs no speed and a rounding error per row far below the
blocks' own; the position table is stored that way unless the user keeps embeddings float.

The LM head is tied to the token embedding: one [V, C] matrix that the embedding Gather reads by row
and the head multiplies by (`Gemm(h, wte, transB=1)` in gptedge's export). When the head is quantized
it becomes MatMulNBits blocks, whose layout [V, C/block, block] is the embedding's own row layout, so
the embedding reads the *same* quantized bytes (GatherBlockQuantized, or a standard-op dequantizing
Gather on DirectML) and the float matrix leaves the file: for a small-vocabulary model this is the
difference between a bundle at ~55% and one under 30% of the float size. The head is blockwise INT8
(or INT4 for int4-weight) in every recipe, so the shared storage exists for all of them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gptedge.errors import QuantizeError
from gptedge.runtime.bundle import BundleSpec

MS_DOMAIN = "com.microsoft"
# Weights per scale of MatMulNBits blocks, by bit width. INT8: 128, measured by
# benchmarks/quantize_methods.py (GPT-2-124M shape, 2 AVX2 cores): decode 110 tok/s at 128 vs 92 at 32,
# prefill 145 vs 196 ms, scales 3% instead of 12.5% of the weight bytes, and on the trained "small" demo
# model the same held-out perplexity (+-0.01%) and top-1 agreement (99.1% vs 99.2%). INT4 keeps 32:
# at 4 bits a block's single scale is what limits quality.
DEFAULT_BLOCK_SIZE = {8: 128, 4: 32, 2: 32}


def default_block_size(bits: int, n_embd: int) -> int:
    """The default block for `bits`, halved until it divides the model width (tiny test models)."""
    block = DEFAULT_BLOCK_SIZE.get(bits, 32)
    while block > 16 and n_embd % block:
        block //= 2
    return block


@dataclass(frozen=True)
class Method:
    name: str
    bits: int
    kind: str  # "weight" | "dynamic" | "static"
    targets: tuple[str, ...]  # bundle targets whose provider runs the result
    summary: str


METHODS: dict[str, Method] = {
    "int8-weight": Method("int8-weight", 8, "weight", ("cpu", "cuda", "dml"),
                          "weight-only INT8 blocks (MatMulNBits bits=8; int8 compute on CPU)"),
    "int8-dynamic": Method("int8-dynamic", 8, "dynamic", ("cpu",),
                           "per-channel INT8 weights, activations quantized per call (DynamicQuantizeMatMul)"),
    "int8-static": Method("int8-static", 8, "static", ("cpu",),
                          "QDQ INT8 weights and activations, activation ranges calibrated on text"),
    "int4-weight": Method("int4-weight", 4, "weight", ("cpu", "cuda", "dml"),
                          "weight-only INT4 blocks (MatMulNBits bits=4; int8 compute on CPU)"),
}

# Why a recipe cannot run on a target (shown verbatim in the error).
_UNSUPPORTED = {
    ("int8-dynamic", "cuda"): "ONNX Runtime's CUDA provider has no DynamicQuantizeLinear/DynamicQuantizeMatMul kernels "
                              "(the model would fall back to the CPU op by op) and the recipe needs an fp32 graph",
    ("int8-dynamic", "dml"): "the recipe quantizes fp32 graphs for ONNX Runtime's CPU kernels; DirectML bundles are not supported",
    ("int8-static", "cuda"): "QDQ INT8 runs unfused (dequantize + float MatMul) on CUDA and the recipe needs an fp32 graph",
    ("int8-static", "dml"): "DirectML's support for QDQ INT8 graphs is unverified and the recipe needs an fp32 graph",
}


def get_method(name: str, target: str) -> Method:
    """The recipe `name` for a bundle of `target`; QuantizeError if unknown or not runnable there."""
    if name not in METHODS:
        raise QuantizeError(f"unknown method {name!r}; choose one of: auto, {', '.join(METHODS)}")
    method = METHODS[name]
    if target not in method.targets:
        runnable = ", ".join(m for m, r in METHODS.items() if target in r.targets)
        raise QuantizeError(f"{name} cannot run on a {target} bundle: {_UNSUPPORTED.get((name, target), 'unsupported')}; "
                            f"use one of: {runnable}")
    return method


def check_block_size(block_size: int) -> int:
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise QuantizeError(f"block size must be a power of two >= 16 (MatMulNBits' rule), got {block_size!r}")
    return block_size


# ---------------------------------------------------------------------------------------------
# Reading the graph


@dataclass
class GraphRoles:
    """Which node does what, found by structure (not by name) so any conforming export works."""

    block_matmuls: list[str]  # MatMuls with a constant 2-D weight: the quantizable projections
    other_matmuls: list[str]  # MatMuls without a constant weight: always float
    lm_head: str | None  # the node that produces the logits (Gemm or MatMul), None if not found
    lm_head_weight: str | None  # its weight initializer
    lm_head_vc: bool  # weight stored [V, C] (Gemm transB=1) rather than [C, V]
    embedding: str | None  # the Gather that reads input_ids
    embedding_weight: str | None
    tied: bool  # embedding and head read the same matrix
    float_gathers: list[str] = field(default_factory=list)  # position tables: constant Gathers added to the embedding


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name, so nodes can be listed, excluded and reported."""
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def _initializers(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def find_roles(model: onnx.ModelProto, spec: BundleSpec) -> GraphRoles:
    inits = _initializers(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    V, C = spec.architecture.vocab_size, spec.architecture.n_embd

    head = producers.get(spec.io.logits)
    while head is not None and head.op_type in ("Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze"):
        head = producers.get(head.input[0])
    lm_head = weight = None
    vc = False
    if head is not None and head.op_type in ("Gemm", "MatMul") and head.input[1] in inits:
        dims = list(inits[head.input[1]].dims)
        if head.op_type == "Gemm":
            plain = _attr(head, "alpha", 1.0) == 1.0 and not _attr(head, "transA", 0)
            vc = bool(_attr(head, "transB", 0))
            if plain and dims == ([V, C] if vc else [C, V]):
                lm_head, weight = head.name, head.input[1]
        elif dims == [C, V]:
            lm_head, weight = head.name, head.input[1]

    embedding = emb_weight = None
    table_gathers = []
    blocks, others = [], []
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in inits:
            if node.input[1] == spec.io.input_ids and list(inits[node.input[0]].dims) == [V, C]:
                embedding, emb_weight = node.name, node.input[0]
            else:
                table_gathers.append(node)
        elif node.op_type == "MatMul" and node.name != lm_head:
            const = node.input[1] in inits and len(inits[node.input[1]].dims) == 2
            (blocks if const else others).append(node.name)
    # A position table is a constant [rows, C] Gather whose rows are added to the token embedding's. Other
    # constant Gathers (the rotary cos/sin tables of a concat graph) are arithmetic, not embeddings: never quantized.
    emb_out = next((n.output[0] for n in model.graph.node if n.name == embedding), None)
    adds = [n for n in model.graph.node if n.op_type == "Add" and emb_out in n.input]
    float_gathers = [g.name for g in table_gathers if list(inits[g.input[0]].dims)[-1:] == [C]
                     and any(g.output[0] in a.input for a in adds)]
    tied = embedding is not None and lm_head is not None and vc and emb_weight == weight
    if embedding is not None and lm_head is not None and not tied and weight is not None:
        head_w = numpy_helper.to_array(inits[weight])
        tied = np.array_equal(numpy_helper.to_array(inits[emb_weight]), head_w if vc else head_w.T)
    return GraphRoles(blocks, others, lm_head, weight, vc, embedding, emb_weight, tied, float_gathers)


# ---------------------------------------------------------------------------------------------
# The LM head (and the embedding that shares it)


def _block_quantize(weight_kn: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blockwise quantization of a [K, N] weight in MatMulNBits' layout: ([N, K/block, blob], [N, K/block])."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits)
    packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(weight_kn))
    return packed, scales


def quantize_lm_head(model: onnx.ModelProto, roles: GraphRoles, *, bits: int, block_size: int,
                     accuracy_level: int | None, embedding: str) -> str:
    """Replace the LM head with MatMulNBits; let the tied embedding read the same blocks.

    embedding: "gather" (GatherBlockQuantized: CPU, CUDA), "dequant" (standard ops: any provider) or
    "float" (keep the float table for the embedding). Returns how the embedding ended up.
    """
    graph = model.graph
    inits = _initializers(model)
    node = next(n for n in graph.node if n.name == roles.lm_head)
    w = numpy_helper.to_array(inits[roles.lm_head_weight])
    w_vc = w if roles.lm_head_vc else w.T  # [V, C]
    V, C = w_vc.shape
    packed, scales = _block_quantize(w_vc.T, bits, block_size)  # packed [V, C/block, blob], scales [V, C/block]
    base = roles.lm_head_weight
    q_name, s_name = f"{base}_Q{bits}", f"{base}_scales"
    graph.initializer.extend([numpy_helper.from_array(packed, q_name), numpy_helper.from_array(scales, s_name)])
    attrs = dict(K=C, N=V, bits=bits, block_size=block_size)
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    out = node.output[0]
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    mm_out = out + "_nobias" if bias else out
    new_nodes = [helper.make_node("MatMulNBits", [node.input[0], q_name, s_name], [mm_out], name=f"{node.name}_Q{bits}", domain=MS_DOMAIN, **attrs)]
    if bias:
        beta = _attr(node, "beta", 1.0)
        if beta != 1.0:
            raise QuantizeError(f"LM head {node.name} is a Gemm with beta={beta}; re-export the bundle with gptedge export")
        new_nodes.append(helper.make_node("Add", [mm_out, bias], [out], name=f"{node.name}_bias"))
    _replace_node(graph, node, new_nodes)

    shared = "float"
    if roles.tied and embedding != "float" and C % block_size == 0:
        gather = next(n for n in graph.node if n.name == roles.embedding)
        dtype = inits[roles.lm_head_weight].data_type
        builder = _gather_block_quantized if embedding == "gather" else _dequant_gather
        _replace_node(graph, gather, builder(gather, q_name, s_name, bits, block_size, packed.shape, dtype, graph))
        shared = embedding
    remove_unused_initializers(model)
    return shared


def quantize_table(model: onnx.ModelProto, gather_name: str, *, bits: int, block_size: int, mode: str) -> bool:
    """Store a constant table read by a Gather (the position embedding) as symmetric blocks, row by row.

    mode: "gather" (GatherBlockQuantized) or "dequant" (standard ops). Returns False, changing nothing,
    when the row width is not a whole number of blocks.
    """
    graph = model.graph
    inits = _initializers(model)
    gather = next(n for n in graph.node if n.name == gather_name)
    table = numpy_helper.to_array(inits[gather.input[0]])  # [rows, C]
    if table.ndim != 2 or table.shape[1] % block_size or _attr(gather, "axis", 0) != 0:
        return False
    packed, scales = _block_quantize(table.T, bits, block_size)  # [rows, C/block, blob], [rows, C/block]
    q_name, s_name = f"{gather.input[0]}_Q{bits}", f"{gather.input[0]}_scales"
    graph.initializer.extend([numpy_helper.from_array(packed, q_name), numpy_helper.from_array(scales, s_name)])
    builder = _gather_block_quantized if mode == "gather" else _dequant_gather
    _replace_node(graph, gather, builder(gather, q_name, s_name, bits, block_size, packed.shape, inits[gather.input[0]].data_type, graph))
    remove_unused_initializers(model)
    return True


def _const(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _gather_block_quantized(gather, q_name, s_name, bits, block_size, packed_shape, dtype, graph) -> list[onnx.NodeProto]:
    """Embedding = GatherBlockQuantized over the head's [V, C/block, blob] blocks, reshaped to [B, S, C]."""
    V, kb, _ = packed_shape
    prefix = gather.name
    s3 = f"{prefix}/scales_3d"
    rows = f"{prefix}/rows"
    return [
        helper.make_node("Reshape", [s_name, _const(graph, f"{prefix}/scales_shape", np.array([V, kb, 1], np.int64))], [s3], name=f"{prefix}/ScalesReshape"),
        helper.make_node("GatherBlockQuantized", [q_name, gather.input[1], s3], [rows], name=f"{prefix}/GatherBlockQuantized",
                         domain=MS_DOMAIN, gather_axis=0, quantize_axis=2, block_size=block_size, bits=bits),
        helper.make_node("Reshape", [rows, _const(graph, f"{prefix}/out_shape", np.array([0, 0, -1], np.int64))], [gather.output[0]], name=f"{prefix}/Reshape"),
    ]


def _dequant_gather(gather, q_name, s_name, bits, block_size, packed_shape, dtype, graph) -> list[onnx.NodeProto]:
    """Embedding with standard ops only: gather uint8 rows and their scales, unpack, (q - zero) * scale."""
    p = gather.name
    float_type = TensorProto.FLOAT16 if dtype == TensorProto.FLOAT16 else TensorProto.FLOAT
    np_float = np.float16 if float_type == TensorProto.FLOAT16 else np.float32
    ids = gather.input[1]
    nodes = [helper.make_node("Gather", [q_name, ids], [f"{p}/q"], name=f"{p}/GatherQ", axis=0)]  # [B, S, kb, blob] uint8
    q = f"{p}/q"
    if bits == 4:  # two values per byte, low nibble first (MatMulNBits' packing)
        nodes += [
            helper.make_node("BitwiseAnd", [q, _const(graph, f"{p}/mask", np.array(15, np.uint8))], [f"{p}/lo"], name=f"{p}/Lo"),
            helper.make_node("BitShift", [q, _const(graph, f"{p}/four", np.array(4, np.uint8))], [f"{p}/hi"], name=f"{p}/Hi", direction="RIGHT"),
            helper.make_node("Unsqueeze", [f"{p}/lo", _const(graph, f"{p}/last", np.array([-1], np.int64))], [f"{p}/lo1"], name=f"{p}/LoU"),
            helper.make_node("Unsqueeze", [f"{p}/hi", f"{p}/last"], [f"{p}/hi1"], name=f"{p}/HiU"),
            helper.make_node("Concat", [f"{p}/lo1", f"{p}/hi1"], [f"{p}/pairs"], name=f"{p}/Pairs", axis=-1),
            helper.make_node("Reshape", [f"{p}/pairs", _const(graph, f"{p}/block_shape", np.array([0, 0, 0, -1], np.int64))], [f"{p}/q4"], name=f"{p}/Unpack"),
        ]
        q = f"{p}/q4"
    zero = float(1 << (bits - 1))  # symmetric MatMulNBits blocks store q + 2^(bits-1)
    nodes += [
        helper.make_node("Cast", [q], [f"{p}/qf"], name=f"{p}/Cast", to=float_type),
        helper.make_node("Sub", [f"{p}/qf", _const(graph, f"{p}/zero", np.array(zero, np_float))], [f"{p}/centered"], name=f"{p}/Sub"),
        helper.make_node("Gather", [s_name, ids], [f"{p}/s"], name=f"{p}/GatherScales", axis=0),  # [B, S, kb]
        helper.make_node("Unsqueeze", [f"{p}/s", _const(graph, f"{p}/axis", np.array([-1], np.int64))], [f"{p}/s1"], name=f"{p}/ScalesU"),
        helper.make_node("Mul", [f"{p}/centered", f"{p}/s1"], [f"{p}/rows"], name=f"{p}/Scale"),
        helper.make_node("Reshape", [f"{p}/rows", _const(graph, f"{p}/out_shape", np.array([0, 0, -1], np.int64))], [gather.output[0]], name=f"{p}/Reshape"),
    ]
    return nodes


def _replace_node(graph: onnx.GraphProto, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
    """Put `new` where `old` was (keeps the topological order)."""
    nodes = list(graph.node)
    i = next(k for k, n in enumerate(nodes) if n.name == old.name)
    graph.ClearField("node")
    graph.node.extend(nodes[:i] + new + nodes[i + 1:])


def restore_gemm(model: onnx.ModelProto, original: onnx.NodeProto) -> None:
    """Undo quantize_dynamic's rewrite of a float Gemm(transB=1) into MatMul on a transposed *copy* of its
    weight (it rewrites every Gemm, quantized or not): for the tied head that copy doubles the float matrix."""
    rewritten = {f"{original.name}_MatMul", f"{original.name}_Add"}
    nodes = list(model.graph.node)
    spots = [i for i, n in enumerate(nodes) if n.name in rewritten]
    if not spots:
        return
    kept = [n for n in nodes if n.name not in rewritten]
    kept.insert(spots[0], original)
    model.graph.ClearField("node")
    model.graph.node.extend(kept)
    remove_unused_initializers(model)


def remove_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        model.graph.ClearField("initializer")
        model.graph.initializer.extend(keep)


def ensure_ms_opset(model: onnx.ModelProto) -> None:
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


# ---------------------------------------------------------------------------------------------
# The recipes


def quantize_weight_only(model: onnx.ModelProto, roles: GraphRoles, *, bits: int, block_size: int,
                         accuracy_level: int | None) -> onnx.ModelProto:
    """Blocks' weight MatMuls -> MatMulNBits (symmetric, `block_size` weights per scale)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with _quiet_ort_logs():
        quantizer = MatMulNBitsQuantizer(
            model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
            nodes_to_include=roles.block_matmuls, op_types_to_quantize=("MatMul",),
            nodes_to_exclude=[*roles.other_matmuls, *([roles.lm_head] if roles.lm_head else [])],
        )
        quantizer.process()
    result = quantizer.model.model
    remove_unused_initializers(result)
    return result


def quantize_dynamic_int8(model_path: Path, out_path: Path, roles: GraphRoles) -> None:
    """Blocks' weight MatMuls -> per-channel INT8 (MatMulInteger + DynamicQuantizeLinear)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_ort_logs():
        quantize_dynamic(
            model_path, out_path, op_types_to_quantize=["MatMul"], nodes_to_quantize=roles.block_matmuls,
            per_channel=True, reduce_range=False, weight_type=QuantType.QInt8, use_external_data_format=True,
            extra_options={"MatMulConstBOnly": True},
        )


def quantize_static_int8(model_path: Path, out_path: Path, roles: GraphRoles, feeds: Iterable[dict],
                         on_batch: Callable[[], None] | None = None) -> None:
    """Blocks' weight MatMuls -> QDQ INT8 (per-channel weights, MinMax activation ranges from `feeds`)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self):
            feed = next(self._it, None)
            if feed is not None and on_batch is not None:
                on_batch()
            return feed

    with _quiet_ort_logs():
        quantize_static(
            model_path, out_path, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
            nodes_to_quantize=roles.block_matmuls, per_channel=True, reduce_range=False,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, use_external_data_format=True,
            calibrate_method=CalibrationMethod.MinMax, calibration_providers=["CPUExecutionProvider"],
            extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True, "ActivationSymmetric": False},
        )


def calibration_feeds(spec: BundleSpec, windows: list[np.ndarray]) -> Iterable[dict[str, np.ndarray]]:
    """The graph's full input set for prefilling each window from an empty cache.

    "inplace" graphs get zero KV buffers of exactly the window's length with seqlens_k / total_sequence_length
    saying the cache holds just this window (GroupQueryAttention treats it as a first prompt and writes
    the keys into the buffer); "concat" graphs get empty pasts and an all-ones mask. Logits are
    requested for every position so the head's input range covers the whole window.
    """
    a, io = spec.architecture, spec.io
    kv_dtype = np.float16 if spec.kv_cache.dtype == "fp16" else np.float32
    for ids in windows:
        S = len(ids)
        feed = {io.input_ids: ids[None, :].astype(np.int64), io.position_ids: np.arange(S, dtype=np.int64)[None, :]}
        if io.logits_index:
            feed[io.logits_index] = np.arange(S, dtype=np.int64)[None, :]
        if spec.kv_cache.update == "inplace":
            feed[io.seqlens_k] = np.array([S - 1], np.int32)
            feed[io.total_sequence_length] = np.array(S, np.int32)
            past = np.zeros((1, a.n_kv_head, S, a.head_dim), kv_dtype)
        else:
            feed[io.attention_mask] = np.ones((1, S), np.int64)
            past = np.zeros((1, a.n_kv_head, 0, a.head_dim), kv_dtype)
        for name in io.past_names(a.n_layer):
            feed[name] = past
        yield feed


class _quiet_ort_logs:
    """ORT's quantization tools log every node at INFO and nag about pre-processing; keep the terminal readable."""

    def __enter__(self):
        self._levels = [(lg, lg.level) for lg in (logging.getLogger(), logging.getLogger("onnxruntime"))]
        for lg, _ in self._levels:
            lg.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc) -> None:
        for lg, level in self._levels:
            lg.setLevel(level)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """model.onnx + model.onnx.data (weights external, as every bundle stores them)."""
    data = path.name + ".data"
    if (path.parent / data).exists():
        os.unlink(path.parent / data)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024)
