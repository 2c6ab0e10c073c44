"""Graph surgery the recipes share: blockwise quantization of the LM head and embedding tables, node rewrites.

The LM head is tied to the token embedding: one [V, C] matrix that the embedding Gather reads by row
and the head multiplies by (`Gemm(h, wte, transB=1)` in gptedge's export). When the head is quantized
it becomes MatMulNBits blocks, whose layout [V, C/block, block] is the embedding's own row layout, so
the embedding reads the *same* quantized bytes (GatherBlockQuantized, or a standard-op dequantizing
Gather where the provider has no GatherBlockQuantized kernel) and the float matrix leaves the file: for
a small model it is a large share of the bytes (model bytes per bundle: benchmarks/results/peers-demo.md).
The head is blockwise in every recipe (recipes.head_bits), so the shared storage exists for all.

Embedding tables are read one row per token, so storing them as INT8 blocks costs no speed and a
rounding error per row far below the blocks' own; the position table is stored that way unless the
user keeps embeddings float.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gptedge.errors import QuantizeError
from gptedge.quantize.ggml_blocks import BlockWeight
from gptedge.quantize.roles import GraphRoles, attr, initializers

MS_DOMAIN = "com.microsoft"
# Bit widths the standard-op dequantizing gather unpacks (8: one value per byte, 4: two per byte).
DEQUANT_GATHER_BITS = (4, 8)


def _block_quantize(weight_kn: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blockwise quantization of a [K, N] weight in MatMulNBits' layout.

    Returns (packed [N, K/block, blob] uint8, scales [N, K/block]).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits)
    packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(weight_kn))
    return packed, scales


def quantize_lm_head(model: onnx.ModelProto, roles: GraphRoles, *, bits: int, block_size: int,
                     accuracy_level: int | None, embedding: str, stored: BlockWeight | None = None) -> str:
    """Replace the LM head with MatMulNBits; let the tied embedding read the same blocks.

    embedding: "gather" (GatherBlockQuantized, a com.microsoft kernel), "dequant" (standard ops: any
    provider) or "float" (keep the float table for the embedding). Returns how the embedding ended up:
    the float table also stays when the head is untied, C is not a whole number of blocks, or the blocks
    carry their own zero points. `stored`: blocks to use as they are (a GGUF file's) instead of rounding.
    """
    graph = model.graph
    inits = initializers(model)
    node = next(n for n in graph.node if n.name == roles.lm_head)
    if stored is None:
        w = numpy_helper.to_array(inits[roles.lm_head_weight])
        w_vc = w if roles.lm_head_vc else w.T  # [V, C]
        packed, scales = _block_quantize(w_vc.T, bits, block_size)  # packed [V, C/block, blob], scales [V, C/block]
        zero, (V, C) = None, w_vc.shape
    else:  # zero-point blocks only: offsets need the block-sum term of gptedge.quantize.blocks
        packed, scales, zero = stored.packed, stored.scales, stored.zero_points()
        bits, block_size, (V, C) = stored.bits, stored.block_size, stored.shape
    base = roles.lm_head_weight
    q_name, s_name = f"{base}_Q{bits}", f"{base}_scales"
    graph.initializer.extend([numpy_helper.from_array(packed, q_name), numpy_helper.from_array(scales, s_name)])
    inputs = [node.input[0], q_name, s_name]
    if zero is not None:
        inputs.append(_const(graph, f"{base}_zero_points", zero))
    attrs = dict(K=C, N=V, bits=bits, block_size=block_size)
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    out = node.output[0]
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    mm_out = out + "_nobias" if bias else out
    new_nodes = [helper.make_node("MatMulNBits", inputs, [mm_out], name=f"{node.name}_Q{bits}", domain=MS_DOMAIN,
                                  **attrs)]
    if bias:
        beta = attr(node, "beta", 1.0)
        if beta != 1.0:
            raise QuantizeError(f"LM head {node.name} is a Gemm with beta={beta}; "
                                "re-export the bundle with gptedge export")
        new_nodes.append(helper.make_node("Add", [mm_out, bias], [out], name=f"{node.name}_bias"))
    _replace_node(graph, node, new_nodes)

    shared = "float"
    if roles.tied and embedding != "float" and C % block_size == 0 and zero is None:
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
    inits = initializers(model)
    gather = next(n for n in graph.node if n.name == gather_name)
    table = numpy_helper.to_array(inits[gather.input[0]])  # [rows, C]
    if table.ndim != 2 or table.shape[1] % block_size or attr(gather, "axis", 0) != 0:
        return False
    packed, scales = _block_quantize(table.T, bits, block_size)  # [rows, C/block, blob], [rows, C/block]
    q_name, s_name = f"{gather.input[0]}_Q{bits}", f"{gather.input[0]}_scales"
    graph.initializer.extend([numpy_helper.from_array(packed, q_name), numpy_helper.from_array(scales, s_name)])
    builder = _gather_block_quantized if mode == "gather" else _dequant_gather
    dtype = inits[gather.input[0]].data_type
    _replace_node(graph, gather, builder(gather, q_name, s_name, bits, block_size, packed.shape, dtype, graph))
    remove_unused_initializers(model)
    return True


def _const(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _gather_block_quantized(gather, q_name, s_name, bits, block_size, packed_shape, dtype,
                            graph) -> list[onnx.NodeProto]:
    """Embedding = GatherBlockQuantized over the head's [V, C/block, blob] blocks, reshaped to [B, S, C]."""
    V, kb, _ = packed_shape
    prefix = gather.name
    s3 = f"{prefix}/scales_3d"
    rows = f"{prefix}/rows"
    scales_shape = _const(graph, f"{prefix}/scales_shape", np.array([V, kb, 1], np.int64))
    out_shape = _const(graph, f"{prefix}/out_shape", np.array([0, 0, -1], np.int64))
    return [
        helper.make_node("Reshape", [s_name, scales_shape], [s3], name=f"{prefix}/ScalesReshape"),
        helper.make_node("GatherBlockQuantized", [q_name, gather.input[1], s3], [rows],
                         name=f"{prefix}/GatherBlockQuantized", domain=MS_DOMAIN, gather_axis=0, quantize_axis=2,
                         block_size=block_size, bits=bits),
        helper.make_node("Reshape", [rows, out_shape], [gather.output[0]], name=f"{prefix}/Reshape"),
    ]


def _dequant_gather(gather, q_name, s_name, bits, block_size, packed_shape, dtype, graph) -> list[onnx.NodeProto]:
    """Embedding with standard ops only: gather uint8 rows and their scales, unpack, (q - zero) * scale."""
    p = gather.name
    float_type = TensorProto.FLOAT16 if dtype == TensorProto.FLOAT16 else TensorProto.FLOAT
    np_float = np.float16 if float_type == TensorProto.FLOAT16 else np.float32
    ids = gather.input[1]
    # [B, S, kb, blob] uint8
    nodes = [helper.make_node("Gather", [q_name, ids], [f"{p}/q"], name=f"{p}/GatherQ", axis=0)]
    q = f"{p}/q"
    if bits == 4:  # two values per byte, low nibble first (MatMulNBits' packing)
        mask = _const(graph, f"{p}/mask", np.array(15, np.uint8))
        four = _const(graph, f"{p}/four", np.array(4, np.uint8))
        last = _const(graph, f"{p}/last", np.array([-1], np.int64))
        block_shape = _const(graph, f"{p}/block_shape", np.array([0, 0, 0, -1], np.int64))
        nodes += [
            helper.make_node("BitwiseAnd", [q, mask], [f"{p}/lo"], name=f"{p}/Lo"),
            helper.make_node("BitShift", [q, four], [f"{p}/hi"], name=f"{p}/Hi", direction="RIGHT"),
            helper.make_node("Unsqueeze", [f"{p}/lo", last], [f"{p}/lo1"], name=f"{p}/LoU"),
            helper.make_node("Unsqueeze", [f"{p}/hi", last], [f"{p}/hi1"], name=f"{p}/HiU"),
            helper.make_node("Concat", [f"{p}/lo1", f"{p}/hi1"], [f"{p}/pairs"], name=f"{p}/Pairs", axis=-1),
            helper.make_node("Reshape", [f"{p}/pairs", block_shape], [f"{p}/q4"], name=f"{p}/Unpack"),
        ]
        q = f"{p}/q4"
    zero = float(1 << (bits - 1))  # symmetric MatMulNBits blocks store q + 2^(bits-1)
    zero_value = _const(graph, f"{p}/zero", np.array(zero, np_float))
    axis = _const(graph, f"{p}/axis", np.array([-1], np.int64))
    out_shape = _const(graph, f"{p}/out_shape", np.array([0, 0, -1], np.int64))
    nodes += [
        helper.make_node("Cast", [q], [f"{p}/qf"], name=f"{p}/Cast", to=float_type),
        helper.make_node("Sub", [f"{p}/qf", zero_value], [f"{p}/centered"], name=f"{p}/Sub"),
        helper.make_node("Gather", [s_name, ids], [f"{p}/s"], name=f"{p}/GatherScales", axis=0),  # [B, S, kb]
        helper.make_node("Unsqueeze", [f"{p}/s", axis], [f"{p}/s1"], name=f"{p}/ScalesU"),
        helper.make_node("Mul", [f"{p}/centered", f"{p}/s1"], [f"{p}/rows"], name=f"{p}/Scale"),
        helper.make_node("Reshape", [f"{p}/rows", out_shape], [gather.output[0]], name=f"{p}/Reshape"),
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
    """Drop constants no node reads any more: a replaced float weight must not stay in the file."""
    used = {name for node in model.graph.node for name in node.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        model.graph.ClearField("initializer")
        model.graph.initializer.extend(keep)


def ensure_ms_opset(model: onnx.ModelProto) -> None:
    """Declare the com.microsoft domain the quantized ops (MatMulNBits, GatherBlockQuantized) belong to."""
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """model.onnx + model.onnx.data (weights external, as every bundle stores them)."""
    data = path.name + ".data"
    if (path.parent / data).exists():
        os.unlink(path.parent / data)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)
