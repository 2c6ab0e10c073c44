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
from onnx import numpy_helper

from gptedge.errors import QuantizeError
from gptedge.quantize import activations, blocks, ort_quant, rounding, surgery
from gptedge.quantize.activations import Hessians
from gptedge.quantize.blocks import weight_name
from gptedge.quantize.calibration import calibration_feeds
from gptedge.quantize.ggml_blocks import BlockWeight
from gptedge.quantize.recipes import METHODS, Method, default_block_size, head_bits
from gptedge.quantize.roles import GraphRoles, find_roles, initializers, name_nodes
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
        recipe=recipe, head_bits=bits,
        block_size=block_size or default_block_size(bits, spec.architecture.n_embd, recipe),
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


def collect_hessians(source_model: Path, spec: BundleSpec, windows: list[np.ndarray],
                     on_window: Callable[[], None] | None = None) -> Hessians:
    """The rounding recipes' calibration statistics for the float graph `source_model` (quantize.activations)."""
    model, roles = _load_float_graph(source_model, spec)
    return activations.collect(model, roles, source_model.parent, spec, windows, on_window)


def round_weights(model: onnx.ModelProto, roles: GraphRoles, plan: BuildPlan, hessians: Hessians,
                  sensitive_int8: float = 0.0) -> dict[str, BlockWeight]:
    """The blocks of every projection by the recipe's rounding (quantize.rounding), keyed by weight name.

    "gptq": GPTQ with act-order on each MatMul's input Hessian; "searched": scales searched against the
    input channels' mean square activations. INT8 is symmetric (Q8_0's form), INT4 has integer zero points.
    `sensitive_int8`: that fraction of the projections, those whose rounding moves their outputs most on the
    calibration text (relative squared error), is rounded at INT8 instead.
    """
    recipe, block = plan.recipe, plan.block_size
    inits = initializers(model)
    out: dict[str, BlockWeight] = {}
    moved: dict[str, float] = {}
    for node in model.graph.node:
        if node.name not in roles.block_matmuls:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).T  # [N, K]
        h = hessians.get(node.input[0])
        if recipe.rounding == "gptq" and h is not None and w.shape[1] % block == 0:
            weight = rounding.gptq(w, h, recipe.bits, block, symmetric=recipe.bits == 8, act_order=True)
        else:
            weight = rounding.searched(w, recipe.bits, block, symmetric=recipe.bits == 8,
                                       importance=None if h is None else hessians.importance(node.input[0]))
        out[weight_name(node)] = weight
        if sensitive_int8 and h is not None:
            moved[node.name] = (rounding.output_error(w, weight, h), node)
    count = int(round(sensitive_int8 * len(moved)))
    for _, node in sorted(moved.values(), key=lambda item: -item[0])[:count]:
        w = numpy_helper.to_array(inits[node.input[1]]).T
        out[weight_name(node)] = rounding.searched(w, 8, block, symmetric=True,
                                                   importance=hessians.importance(node.input[0]))
    return out


def _save_rounded(model: onnx.ModelProto, roles: GraphRoles, plan: BuildPlan, out_folder: Path,
                  weights: dict[str, BlockWeight], head_q: bool, float_embeddings: bool) -> str:
    """Rounding recipes: the computed blocks go into the graph (quantize.blocks), the head's with them; returns how
    the embedding is stored."""
    if head_q:
        w = numpy_helper.to_array(initializers(model)[roles.lm_head_weight])
        weights = {**weights, roles.lm_head_weight: rounding.searched(w if roles.lm_head_vc else w.T, plan.head_bits,
                                                                      plan.block_size, symmetric=True)}
    report = blocks.apply_blocks(model, roles, weights.get, lambda name: None, plan.accuracy_level,
                                 _head_embedding_mode(plan, float_embeddings))
    surgery.save_model(model, out_folder / MODEL_NAME)
    return report.embedding


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
    hessians: Hessians | None = None, sensitive_int8: float = 0.0,
) -> dict[str, Any]:
    """Write the quantized model.onnx (+ .data) of `method` into `out_folder`; return what was done.

    block_size: weights per scale of blockwise weights (default: recipes.DEFAULT_BLOCK_SIZE for the head's bits).
    accuracy_level: MatMulNBits compute precision (default: the target's matmul_nbits_accuracy in runtime/traits.py).
    hessians: the rounding recipes' calibration statistics (quantize.activations.collect), when already collected
    (a ladder's rungs share them); else collected here on `calibration_windows`.
    sensitive_int8: the rounding recipes' fraction of projections kept at INT8 (recipes.Rung).
    """
    plan = _plan(spec, METHODS[method], block_size, accuracy_level)
    out_folder.mkdir(parents=True, exist_ok=True)
    model, roles = _load_float_graph(source_model, spec)
    _check_whole_blocks(model, roles, spec, plan)
    head_q = bool(quantize_lm_head and roles.lm_head)
    positions = [] if float_embeddings else _quantize_positions(model, roles, plan)
    if plan.recipe.rounding:
        if hessians is None:
            hessians = activations.collect(model, roles, source_model.parent, spec, calibration_windows or [],
                                           on_calibration_batch)
        weights = round_weights(model, roles, plan, hessians, sensitive_int8)
        embedding = _save_rounded(model, roles, plan, out_folder, weights, head_q, float_embeddings)
        return _details(plan, roles, head_q, "float" if embedding == "float table" else plan.table_mode, positions,
                        hessians, sensitive_int8)
    embedding = _quantize_head(model, roles, plan, float_embeddings) if head_q else "float"
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


def _details(plan: BuildPlan, roles: GraphRoles, head_q: bool, embedding: str, positions: list[str],
             hessians: Hessians | None = None, sensitive_int8: float = 0.0) -> dict[str, Any]:
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
        "symmetric": recipe.rounding is None or recipe.bits == 8,
        **({"rounding": {"method": "GPTQ with act-order" if recipe.rounding == "gptq" else
                         "scales searched against mean square activations",
                         "calibration_positions": hessians.rows, "sensitive_at_int8": sensitive_int8}}
           if hessians is not None else {}),
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
