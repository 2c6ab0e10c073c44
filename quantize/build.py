"""`build_quantized_model`: one float model.onnx in, one quantized model.onnx out, no gate.

A ladder of small steps: decide the settings once (the recipe, the target's traits from
gptedge.runtime.traits, the options), load the float graph and find its roles, quantize the LM head
(and let the tied embedding share its blocks), the position table, then the blocks' MatMuls (in memory
for weight-only recipes, through onnxruntime's file-to-file quantizers for dynamic / static), and
report what was done in the form gptedge.json records. quantize_bundle builds its candidates here, and
benchmarks/quantize_methods.py builds its variants here, so the two measure the same graphs.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from gptedge.errors import QuantizeError
from gptedge.quantize import ort_quant, surgery
from gptedge.quantize.calibration import calibration_feeds
from gptedge.quantize.recipes import METHODS, Method, default_block_size, head_bits
from gptedge.quantize.roles import GraphRoles, find_roles, name_nodes
from gptedge.runtime.bundle import MODEL_NAME, BundleSpec
from gptedge.runtime.traits import TRAITS


@dataclass(frozen=True)
class BuildPlan:
    """Every setting one model is built with, decided once from the recipe, the target's traits and the options."""

    recipe: Method
    head_bits: int  # bit width of the LM head's blocks (recipes.head_bits)
    block_size: int  # weights per scale of every MatMulNBits / block-quantized table
    accuracy_level: int | None  # MatMulNBits compute precision
    table_mode: str  # how quantized tables are read on the target: "gather" (GatherBlockQuantized) or "dequant"
    whole_blocks: bool  # the target's MatMulNBits needs K to be a multiple of the block size


def _plan(spec: BundleSpec, recipe: Method, block_size: int | None, accuracy_level: int | None) -> BuildPlan:
    """Look the target's MatMulNBits facts up in runtime/traits.py once, so no step below reads the target's name."""
    traits = TRAITS[spec.target]
    bits = head_bits(recipe)
    return BuildPlan(
        recipe=recipe, head_bits=bits, block_size=block_size or default_block_size(bits, spec.architecture.n_embd),
        accuracy_level=traits.matmul_nbits_accuracy if accuracy_level is None else accuracy_level,
        table_mode="gather" if traits.gather_block_quantized else "dequant",
        whole_blocks=traits.matmul_nbits_whole_blocks,
    )


def _load_float_graph(source_model: Path, spec: BundleSpec) -> tuple[onnx.ModelProto, GraphRoles]:
    """The float graph with every node named and its roles found; refuse a graph with nothing to quantize."""
    model = onnx.load(str(source_model))
    name_nodes(model)
    roles = find_roles(model, spec)
    if not roles.block_matmuls:
        raise QuantizeError(f"{source_model} has no MatMul with a constant weight to quantize; is it a gptedge export?")
    return model, roles


def _check_whole_blocks(model: onnx.ModelProto, roles: GraphRoles, spec: BundleSpec, plan: BuildPlan) -> None:
    """Some providers' MatMulNBits (DirectML's) take whole blocks along K only: refuse before building a graph
    that would load there and then fail, and say which block sizes would work."""
    if not plan.whole_blocks:
        return
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    ks = {inits[n.input[1]][0] for n in model.graph.node if n.name in roles.block_matmuls} | {spec.architecture.n_embd}
    if any(k % plan.block_size for k in ks):
        raise QuantizeError(f"{TRAITS[spec.target].ort_name}'s MatMulNBits needs the block size to divide every input "
                            f"width {sorted(ks)}; {plan.block_size} does not: choose a smaller --block-size")


def _head_embedding_mode(plan: BuildPlan, float_embeddings: bool) -> str:
    """How the tied embedding reads the quantized head: as the target reads tables, except that the standard-op
    dequantizing gather unpacks 8- and 4-bit blocks only, so other widths need GatherBlockQuantized."""
    if float_embeddings:
        return "float"
    return plan.table_mode if plan.head_bits in surgery.DEQUANT_GATHER_BITS else "gather"


def _quantize_head(model: onnx.ModelProto, roles: GraphRoles, plan: BuildPlan, float_embeddings: bool) -> str:
    """The LM head as MatMulNBits blocks of the recipe's head width; returns how the tied embedding is stored."""
    return surgery.quantize_lm_head(model, roles, bits=plan.head_bits, block_size=plan.block_size,
                                    accuracy_level=plan.accuracy_level,
                                    embedding=_head_embedding_mode(plan, float_embeddings))


def _quantize_positions(model: onnx.ModelProto, roles: GraphRoles, plan: BuildPlan) -> list[str]:
    """Position tables as INT8 blocks (a 4-bit position table saves little and costs quality); returns the converted."""
    return [g for g in roles.float_gathers
            if surgery.quantize_table(model, g, bits=8, block_size=plan.block_size, mode=plan.table_mode)]


def _save_weight_only(model: onnx.ModelProto, roles: GraphRoles, plan: BuildPlan, out_folder: Path) -> None:
    """Weight-only recipes: the blocks' MatMuls become MatMulNBits in memory, then the model is written."""
    model = ort_quant.quantize_weight_only(model, roles, bits=plan.recipe.bits, block_size=plan.block_size,
                                           accuracy_level=plan.accuracy_level)
    surgery.ensure_ms_opset(model)
    surgery.save_model(model, out_folder / MODEL_NAME)


def _float_head_gemm(model: onnx.ModelProto, roles: GraphRoles) -> onnx.NodeProto | None:
    """A copy of the float LM head when it is a Gemm: quantize_dynamic / quantize_static rewrite every Gemm, and
    surgery.restore_gemm puts this one back so the tied matrix is stored once."""
    return next((copy.deepcopy(n) for n in model.graph.node if n.name == roles.lm_head and n.op_type == "Gemm"), None)


def _quantize_file(prepared: Path, out_folder: Path, roles: GraphRoles, plan: BuildPlan,
                   float_head: onnx.NodeProto | None, spec: BundleSpec, windows: list[np.ndarray] | None,
                   on_batch: Callable[[], None] | None) -> None:
    """Dynamic / static recipes: onnxruntime's quantizers go file to file, so the result is read back, its float
    head restored and unused weights dropped before it is written as the candidate's model."""
    raw = prepared.parent / "raw" / MODEL_NAME
    raw.parent.mkdir()
    if plan.recipe.kind == "dynamic":
        ort_quant.quantize_dynamic_int8(prepared, raw, roles)
    else:
        ort_quant.quantize_static_int8(prepared, raw, roles, calibration_feeds(spec, windows or []), on_batch)
    result = onnx.load(str(raw))
    if float_head is not None:
        surgery.restore_gemm(result, float_head)
    surgery.remove_unused_initializers(result)
    surgery.save_model(result, out_folder / MODEL_NAME)


def build_quantized_model(
    source_model: Path, spec: BundleSpec, method: str, out_folder: Path, *, block_size: int | None = None,
    quantize_lm_head: bool = True, float_embeddings: bool = False, calibration_windows: list[np.ndarray] | None = None,
    accuracy_level: int | None = None, on_calibration_batch: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Write the quantized model.onnx (+ .data) of `method` into `out_folder`; return what was done.

    block_size: weights per scale of blockwise weights (default: recipes.DEFAULT_BLOCK_SIZE for the head's bits).
    accuracy_level: MatMulNBits compute precision (default: the target's matmul_nbits_accuracy in runtime/traits.py).
    """
    plan = _plan(spec, METHODS[method], block_size, accuracy_level)
    out_folder.mkdir(parents=True, exist_ok=True)
    model, roles = _load_float_graph(source_model, spec)
    _check_whole_blocks(model, roles, spec, plan)
    head_q = bool(quantize_lm_head and roles.lm_head)
    embedding = _quantize_head(model, roles, plan, float_embeddings) if head_q else "float"
    positions = [] if float_embeddings else _quantize_positions(model, roles, plan)
    if plan.recipe.kind == "weight":
        _save_weight_only(model, roles, plan, out_folder)
    else:
        surgery.ensure_ms_opset(model)
        float_head = _float_head_gemm(model, roles)
        with tempfile.TemporaryDirectory(prefix="prep-", dir=out_folder.parent) as prep:
            prepared = Path(prep) / MODEL_NAME
            surgery.save_model(model, prepared)
            del model  # onnxruntime's quantizer loads its own copy: free this one first
            _quantize_file(prepared, out_folder, roles, plan, float_head, spec, calibration_windows,
                           on_calibration_batch)
    return _details(plan, roles, head_q, embedding, positions)


def _details(plan: BuildPlan, roles: GraphRoles, head_q: bool, embedding: str, positions: list[str]) -> dict[str, Any]:
    """What was done, as gptedge.json records it: `kind` is what the runtime checks a provider's kernels against."""
    recipe = plan.recipe
    blockwise = recipe.kind == "weight" or head_q  # block size / accuracy level apply to MatMulNBits weights only
    float_nodes = [*roles.other_matmuls, *(g for g in roles.float_gathers if g not in positions)]
    float_nodes += [roles.lm_head] if roles.lm_head and not head_q else []
    float_nodes += [roles.embedding] if roles.embedding and embedding == "float" else []
    readers = {"gather": "GatherBlockQuantized", "dequant": "standard-op dequantizing Gather"}
    return {
        "method": recipe.name,
        "kind": recipe.kind,
        "bits": recipe.bits,
        "block_size": plan.block_size if blockwise else None,
        "symmetric": True,
        "accuracy_level": plan.accuracy_level if blockwise else None,
        "quantized_nodes": roles.block_matmuls,
        "float_nodes": float_nodes,
        "lm_head": {"node": roles.lm_head, "quantized": head_q, "bits": plan.head_bits if head_q else None,
                    "format": "MatMulNBits" if head_q else "float"},
        "embedding": {"node": roles.embedding, "tied_to_lm_head": roles.tied,
                      "storage": f"shares the LM head's int{plan.head_bits} blocks ({readers[embedding]})"
                      if embedding in readers else "float table"},
        "position_embedding": {"nodes": roles.float_gathers,
                               "storage": f"int8 blocks ({readers[plan.table_mode]})" if positions else "float table"},
    }


__all__ = ["build_quantized_model", "BuildPlan"]
