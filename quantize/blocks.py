"""A float graph whose projections take given MatMulNBits blocks: a GGUF file's own, or gptedge's rounding.

Every weight MatMul of the blocks (and the LM head, with the tied embedding reading the same bytes, as
gptedge.quantize.surgery does) becomes MatMulNBits over the blocks it is handed: a quantized source's own
(Q8_0 / Q4_0 / Q4_1, gptedge.quantize.ggml_blocks: the graph computes the model the file holds) or the ones
a rounding recipe computed (gptedge.quantize.rounding). Weights a source stored in a form MatMulNBits cannot
hold as it is (k-quants, i-quants) are rounded again by onnxruntime's blockwise quantizer at the nearest
width (8 bits for 5 bits a weight or more, else 4), and reported as such; weights handed no blocks stay float.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gptedge.quantize import surgery
from gptedge.quantize.ggml_blocks import BLOCK, BlockWeight
from gptedge.quantize.roles import GraphRoles, initializers

MATMUL_WEIGHT_SUFFIX = "_t"  # gptedge's export names a MatMul's [in, out] weight "<module>.weight_t"


def weight_name(node: onnx.NodeProto) -> str:
    """The model weight a MatMul multiplies by ("<module>.weight"), the name blocks are looked up by."""
    return node.input[1].removesuffix(MATMUL_WEIGHT_SUFFIX)


@dataclass
class KeptReport:
    """What each weight became: kept blocks (by stored type), re-rounded (by width), or float."""

    kept: dict[str, list[str]] = field(default_factory=dict)  # stored type -> our weight names
    requantized: dict[int, list[str]] = field(default_factory=dict)  # bits -> weight names
    float: list[str] = field(default_factory=list)
    embedding: str = "float table"

    def to_dict(self) -> dict:
        return {"kept": {t: len(v) for t, v in self.kept.items()},
                "requantized": {f"int{b}": len(v) for b, v in self.requantized.items()},
                "float": self.float, "embedding": self.embedding}

    @property
    def exact(self) -> bool:
        """Every quantized weight carries the source's own blocks (nothing was rounded again)."""
        return not self.requantized


def _matmul_nbits(node: onnx.NodeProto, weight: BlockWeight, prefix: str, graph: onnx.GraphProto,
                  accuracy_level: int | None, block_sums: dict[str, str]) -> list[onnx.NodeProto]:
    """The nodes computing `node`'s product with `weight`: MatMulNBits, plus the offsets' term when it has them."""
    n, k = weight.shape
    inputs = [node.input[0], f"{prefix}_Q{weight.bits}", f"{prefix}_scales"]
    graph.initializer.extend([numpy_helper.from_array(weight.packed, inputs[1]),
                              numpy_helper.from_array(weight.scales, inputs[2])])
    zero = weight.zero_points()
    if zero is not None:
        inputs.append(f"{prefix}_zero_points")
        graph.initializer.append(numpy_helper.from_array(zero, inputs[3]))
    attrs = dict(K=k, N=n, bits=weight.bits, block_size=weight.block_size)
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    out = node.output[0]
    product = out if weight.offsets is None else f"{prefix}/integer_part"
    nodes = [helper.make_node("MatMulNBits", inputs, [product], name=f"{node.name}_Q{weight.bits}",
                              domain=surgery.MS_DOMAIN, **attrs)]
    if weight.offsets is None:
        return nodes
    # offsets: + s(x) @ M^T, s(x) [.., K/32] the block sums of x (one product with a 0/1 matrix, shared per input)
    x = node.input[0]
    if x not in block_sums:
        ones = f"block_sums_{k}_{weight.block_size}"
        if not any(t.name == ones for t in graph.initializer):
            graph.initializer.append(numpy_helper.from_array(
                np.kron(np.eye(k // weight.block_size, dtype=np.float32),
                        np.ones((weight.block_size, 1), np.float32)), ones))  # [K, K / block]
        block_sums[x] = f"{prefix}/block_sums"
        nodes.insert(0, helper.make_node("MatMul", [x, ones], [block_sums[x]], name=f"{node.name}_BlockSums"))
    offsets = f"{prefix}_offsets"
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.offsets.T), offsets))  # [K/32, N]
    nodes += [helper.make_node("MatMul", [block_sums[x], offsets], [f"{prefix}/offset_part"],
                               name=f"{node.name}_Offsets"),
              helper.make_node("Add", [product, f"{prefix}/offset_part"], [out], name=f"{node.name}_AddOffsets")]
    return nodes


def _rounded(weight_kn: np.ndarray, bits: int) -> BlockWeight:
    packed, scales = surgery._block_quantize(weight_kn, bits, BLOCK)
    return BlockWeight(f"int{bits}", bits, packed, np.asarray(scales, np.float32).reshape(packed.shape[:2]))


def apply_blocks(model: onnx.ModelProto, roles: GraphRoles, stored: Callable[[str], BlockWeight | None],
                        requantize_bits: Callable[[str], int | None], accuracy_level: int | None,
                        embedding_mode: str) -> KeptReport:
    """Rewrite `model` in place. `stored(name)`: the source's blocks for our weight `name` (None: not kept);
    `requantize_bits(name)`: the width to round a weight the source held quantized but not keepable (None: it
    was float). embedding_mode: how a tied embedding reads the head's blocks ("gather" or "dequant")."""
    graph = model.graph
    inits = initializers(model)
    report = KeptReport()
    replaced: dict[str, list[onnx.NodeProto]] = {}
    block_sums: dict[str, str] = {}
    for node in graph.node:
        if node.name not in roles.block_matmuls:
            continue
        name = weight_name(node)
        k, n = inits[node.input[1]].dims
        weight = stored(name)
        if weight is not None and weight.shape == (n, k):
            report.kept.setdefault(weight.ggml_type, []).append(name)
        elif (bits := requantize_bits(name)) is not None and k % BLOCK == 0:
            weight = _rounded(numpy_helper.to_array(inits[node.input[1]]), bits)
            report.requantized.setdefault(bits, []).append(name)
        else:
            report.float.append(name)
            continue
        replaced[node.name] = _matmul_nbits(node, weight, name, graph, accuracy_level, block_sums)
    nodes = [new for n in graph.node for new in replaced.get(n.name, [n])]
    graph.ClearField("node")
    graph.node.extend(nodes)
    if roles.lm_head:
        _head(model, roles, stored, requantize_bits, accuracy_level, embedding_mode, report)
    surgery.remove_unused_initializers(model)
    surgery.ensure_ms_opset(model)
    return report


def _head(model: onnx.ModelProto, roles: GraphRoles, stored: Callable[[str], BlockWeight | None],
          requantize_bits: Callable[[str], int | None], accuracy_level: int | None, embedding_mode: str,
          report: KeptReport) -> None:
    """The LM head (and the tied embedding reading its blocks): kept, rounded again, or float as the source says.
    A head with offsets (Q4_1) stays float: the embedding could not share its blocks."""
    name = roles.lm_head_weight
    source = name if stored(name) is not None or not roles.tied else "transformer.wte.weight"
    weight = stored(source)
    bits = None if weight is not None else requantize_bits(source)
    if weight is not None and weight.offsets is None:
        report.kept.setdefault(weight.ggml_type, []).append(name)
        bits = weight.bits
    elif bits is not None and int(initializers(model)[name].dims[1 if roles.lm_head_vc else 0]) % BLOCK == 0:
        weight = None
        report.requantized.setdefault(bits, []).append(name)
    else:
        report.float.append(name)
        return
    block = weight.block_size if weight is not None else BLOCK
    shared = surgery.quantize_lm_head(model, roles, bits=bits, block_size=block, accuracy_level=accuracy_level,
                                      embedding=embedding_mode, stored=weight)
    readers = {"gather": "GatherBlockQuantized", "dequant": "standard-op dequantizing Gather"}
    what = weight.ggml_type if weight is not None else f"int{bits}"
    report.embedding = f"shares the LM head's {what} blocks ({readers[shared]})" if shared in readers else "float table"


def set_accuracy_level(model: onnx.ModelProto, level: int | None) -> None:
    """Set every MatMulNBits node's compute precision (the blocks are unchanged)."""
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend(kept)
        if level:
            node.attribute.append(helper.make_attribute("accuracy_level", level))
