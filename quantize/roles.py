"""Reading the graph: which node does what, found by structure (not by name) so any conforming export works.

What is quantized: the transformer blocks' weight MatMuls (attention in/out projections, MLP). What
stays float: attention itself (GroupQueryAttention computes the score and value products inside),
LayerNorm, GELU, biases, and any MatMul without a constant weight. The LM head, the token embedding
(tied to it or not) and position tables are found here so the surgery can treat them on their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gptedge.runtime.bundle import BundleSpec

# Ops between the LM head and the logits output that change neither values nor which node is the head.
_PASS_THROUGH = ("Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze")


@dataclass
class GraphRoles:
    """Which node does what in one float graph."""

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


def initializers(model: onnx.ModelProto) -> dict[str, TensorProto]:
    """The graph's constants by name: a weight is "constant" exactly when its input names one of these."""
    return {t.name: t for t in model.graph.initializer}


def attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """An attribute's value, or ONNX's default for it when the node leaves it out."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _find_lm_head(model: onnx.ModelProto, spec: BundleSpec,
                  inits: dict[str, TensorProto]) -> tuple[str | None, str | None, bool]:
    """(node, weight, weight is [V, C]) of the plain Gemm / MatMul whose output becomes the logits.

    Only a plain product with a [C, V] or [V, C] constant qualifies: anything else (scaled, transposed A)
    stays float rather than being rewritten into something that computes a different function.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    V, C = spec.architecture.vocab_size, spec.architecture.n_embd
    head = producers.get(spec.io.logits)
    while head is not None and head.op_type in _PASS_THROUGH:
        head = producers.get(head.input[0])
    if head is None or head.op_type not in ("Gemm", "MatMul") or head.input[1] not in inits:
        return None, None, False
    dims = list(inits[head.input[1]].dims)
    if head.op_type == "MatMul":
        return (head.name, head.input[1], False) if dims == [C, V] else (None, None, False)
    plain = attr(head, "alpha", 1.0) == 1.0 and not attr(head, "transA", 0)
    vc = bool(attr(head, "transB", 0))
    if plain and dims == ([V, C] if vc else [C, V]):
        return head.name, head.input[1], vc
    return None, None, False


def find_roles(model: onnx.ModelProto, spec: BundleSpec) -> GraphRoles:
    """Every role the recipes need, read off the graph's structure and the bundle's declared I/O names."""
    inits = initializers(model)
    V, C = spec.architecture.vocab_size, spec.architecture.n_embd
    lm_head, weight, vc = _find_lm_head(model, spec, inits)

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
