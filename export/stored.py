"""Export a quantized source (a GGUF file) as the quantized model it is: its blocks kept, then checked twice.

The float graph is exported and verified against PyTorch first, as for every source. Then:
  1. its projections take the file's own blocks (gptedge.quantize.blocks); what cannot be kept is rounded again
     by gptedge's blockwise quantizer, and said so;
  2. with full-precision arithmetic (MatMulNBits accuracy_level 0) the kept graph must match PyTorch running
     the *dequantized* weights within the float tolerance: the blocks hold exactly the file's values;
  3. with the target's fast arithmetic (accuracy_level 4 on CPU: activations rounded to int8 per block of 32,
     as llama.cpp's own Q8_0 / Q4_0 / Q4_1 dot products round them) perplexity on held-out text may rise at most
     `max_ppl_increase` against the float graph, the gate every quantized bundle passes.
Both numbers go into gptedge.json. A failure raises ExportError, and nothing is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from gptedge.errors import ExportError
from gptedge.export.source import Source
from gptedge.runtime.bundle import MODEL_NAME, BundleSpec
from gptedge.runtime.traits import TRAITS

# Kept blocks compute the file's model: what remains is the activation rounding of the fast kernels, measured on
# SmolLM2-135M's GGUF well under this limit (row gptedge-kept-q4_1 in benchmarks/results/real-smollm2.json).
# Re-rounded weights get the quantize command's own default limit.
KEPT_MAX_PPL_INCREASE = 0.5
REQUANTIZED_MAX_PPL_INCREASE = 2.0
EVAL_TOKENS = 4096
# Kept blocks hold the dequantized values exactly; MatMulNBits dequantizes then multiplies (and Q4_1's remainder
# is rounded once), so logits differ from PyTorch's product on the same floats in the last bits (each export
# records the difference in gptedge.json). A wrong block (order, zero point, scale) is off by whole units, so a
# bound ten times the float export's keeps the check sharp.
BLOCKS_TOLERANCE = (1e-3, "1e-3 absolute (blocks dequantized, then multiplied in fp32)")


def _gate(float_model: Path, kept_model: Path, spec: BundleSpec, tokenizer, eval_text, limit: float):
    """Perplexity and greedy agreement of the kept graph against the float graph, on held-out text."""
    from gptedge.quantize import gate
    from gptedge.quantize.quantizer import _engine
    from gptedge.quantize.texts import builtin_text, load_texts

    if eval_text is None:
        text, note = builtin_text()
        ids = tokenizer.encode(text, add_special_tokens=False).ids[:EVAL_TOKENS]
        note = f"held-out text: {note}"
    else:
        texts = load_texts(tokenizer, None, eval_text, False, EVAL_TOKENS)
        ids, note = texts.eval_ids, texts.note
    data = gate.make_eval_set(ids, spec.architecture.context_length)
    data.window = min(spec.architecture.context_length, 1024)
    reference = gate.measure(_engine(float_model, spec), data)
    measured = gate.measure(_engine(kept_model, spec), data, reference=reference)
    return gate.compare(reference, measured, data, limit), note, data


def keep_stored_quantization(tmp: Path, spec: BundleSpec, src: Source, verify_ids: list[int], *,
                             eval_text: Any = None, max_ppl_increase: float | None = None
                             ) -> tuple[dict[str, Any], str]:
    """Replace tmp/model.onnx (the verified float graph) with the kept one; return gptedge.json's quantization
    record and a one-line summary for the export's output."""
    import onnx

    from gptedge.export.verify import verify
    from gptedge.quantize import blocks, surgery
    from gptedge.quantize.roles import find_roles, name_nodes

    traits = TRAITS[spec.target]
    model = onnx.load(str(tmp / MODEL_NAME))
    name_nodes(model)
    roles = find_roles(model, spec)
    report = blocks.apply_blocks(model, roles, src.stored.blocks, src.stored.requantize_bits, None,
                                      "gather" if traits.gather_block_quantized else "dequant")
    work = tmp / ".kept"
    work.mkdir()
    surgery.save_model(model, work / MODEL_NAME)
    exact = None
    if report.exact:
        try:
            exact = verify(src.model, work / MODEL_NAME, spec, token_ids=verify_ids, tolerance=BLOCKS_TOLERANCE)
        except ExportError as exc:
            raise ExportError(f"the file's blocks did not reproduce its dequantized weights ({exc})") from None
    del model  # saving moved its weights to model.onnx.data: set the fast arithmetic on the graph file alone
    graph = onnx.load(str(work / MODEL_NAME), load_external_data=False)
    blocks.set_accuracy_level(graph, traits.matmul_nbits_accuracy)
    onnx.save(graph, str(work / MODEL_NAME))
    limit = max_ppl_increase if max_ppl_increase is not None else (
        KEPT_MAX_PPL_INCREASE if report.exact else REQUANTIZED_MAX_PPL_INCREASE)
    quality, note, data = _gate(tmp / MODEL_NAME, work / MODEL_NAME, spec, src.tokenizer, eval_text, limit)
    if not quality.passed:
        raise ExportError(
            f"the quantized bundle failed its gate: perplexity rose {quality.ppl_increase_pct:+.2f}% against the "
            f"dequantized float model (limit {limit:g}%); nothing was written. Pass --dequantize for a float bundle"
            + ("" if report.exact else ", or quantize that one with gptedge quantize"))
    for name in (MODEL_NAME, MODEL_NAME + ".data"):
        (tmp / name).unlink(missing_ok=True)
        shutil.move(str(work / name), tmp / name)
    shutil.rmtree(work)
    kept_types = sorted(report.kept)
    bits = sorted({8 if t == "Q8_0" else 4 for t in kept_types} | set(report.requantized))
    record = {
        "method": "gguf-kept" if report.exact else "gguf-kept+requantized",
        "kind": "weight",
        "bits": bits[0] if len(bits) == 1 else bits,
        "block_size": 32,
        "accuracy_level": traits.matmul_nbits_accuracy,
        "gguf": report.to_dict(),
        "blocks_match_dequantized": None if exact is None else {
            "max_abs_diff_prefill": exact["max_abs_diff_prefill"], "max_abs_diff_decode": exact["max_abs_diff_decode"],
            "tolerance_rule": exact["tolerance_rule"], "accuracy_level": 0,
            "greedy_agreement": exact["greedy_agreement"]},
        "quality": quality.to_dict(),
        "eval": {"note": note, "tokens": int(len(data.token_ids)), "window": data.window,
                 "reference": "the dequantized float graph (verified against PyTorch)"},
    }
    summary = (f"kept {', '.join(f'{len(v)} {t}' for t, v in report.kept.items()) or 'no'} weights"
               + (f", rounded again {', '.join(f'{len(v)} to int{b}' for b, v in report.requantized.items())} "
                  "(their stored types cannot be kept)" if report.requantized else "")
               + f"; perplexity {quality.ppl_increase_pct:+.2f}% against the dequantized model (limit {limit:g}%)")
    return record, summary
