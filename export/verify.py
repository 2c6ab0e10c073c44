"""Check an exported graph against PyTorch before the bundle is written.

The graph runs in ONNX Runtime (CPUExecutionProvider) through the same
`gptedge.runtime.engine.Engine` the runtime uses, so what is verified is what
users will run: IO binding, the shared in-place KV buffer, right padding.

The schedule:
  1. a batch of two prompts of different lengths, right-padded, prefilled in one
     call with logits for every position (logits_index K = S);
  2. `steps` single-token greedy decode steps for both rows (rows at different
     lengths), each row feeding back its own argmax: free-running ONNX greedy decoding;
  3. the first row alone: prefill, then its first CHUNK generated tokens in one call
     on the non-empty cache (the bottom-right causal mask, K > 1). Batch 1 because
     ONNX Runtime's CPU GroupQueryAttention refuses S > 1 with a past for batch > 1.
The reference is `GPT.forward` in fp32 over each whole row (prompt + ONNX's tokens)
in one pass without a cache: independent of the export wrappers and of any KV cache
code, and one forward per row instead of one per step. Both sides therefore see
identical inputs at every position; PyTorch's argmax equals ONNX's token at every
step exactly when PyTorch's own greedy decoding produces the same tokens.

Tolerances:
  fp32 bundles: max |logit difference| <= max(1e-4, FP32_REL_TOL x max |reference logit|) and every greedy
    token identical. Both sides compute in fp32, but sum in other orders: the difference grows with the size of
    the logits and the depth (a real model with logits of magnitude ~30 and 30 layers, SmolLM2-135M with Q8_0's
    weights, differs by more than 1e-4), while a wrong graph is off by whole units.
  fp16 bundles (compared with the same fp32 reference): max |difference| <=
    FP16_REL_TOL * max(1, max |reference logit|) (fp16 keeps ~3 significant digits,
    so the bound scales with the logits), and greedy tokens identical except at
    near-ties, where the two tokens' reference logits differ by less than that bound.
    Agreement is reported as a fraction.
"""

from __future__ import annotations

import numpy as np
import torch

from gptedge.errors import ExportError
from gptedge.runtime.bundle import BundleSpec
from gptedge.runtime.evaluate import greedy_decode
from gptedge.train.model import GPT

FP32_TOL = 1e-4
FP32_REL_TOL = 1e-5
FP16_REL_TOL = 1e-2  # measured: 124M-shape random GPT-2 2.3e-3 (scale 3.6), trained 4-layer 3.8e-3 (scale 9.1)
DEFAULT_STEPS = 32
CHUNK = 3  # tokens in the multi-token continuation step


def session(onnx_path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def make_prompts(vocab_size: int, context: int, steps: int, token_ids: list[int] | None = None,
                 seed: int = 0) -> tuple[list[list[int]], int]:
    """Two prompts of different lengths that, followed by `steps` generated tokens, fit the context."""
    long_len = max(2, min(9, context - steps))
    steps = max(0, min(steps, context - long_len))
    lengths = [long_len, max(1, long_len - 4)]
    rng = np.random.default_rng(seed)
    source = [t for t in (token_ids or []) if 0 <= t < vocab_size]
    while len(source) < long_len:
        source.append(int(rng.integers(0, vocab_size)))
    prompts = [source[: lengths[0]], [int(t) for t in rng.integers(0, vocab_size, lengths[1])]]
    return prompts, steps


def run_chunk(engine, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """Batch 1: prefill `prompt`, then all of `tokens` in one call; their logits [len(tokens), V]."""
    cache = engine.new_cache(1, len(prompt) + len(tokens))
    engine.prefill(cache, np.array([prompt], np.int64))
    logits = engine.step(cache, np.array([tokens], np.int64), None, np.arange(len(tokens), dtype=np.int64)[None])
    cache.release()
    return logits[0].astype(np.float32)


@torch.no_grad()
def reference_logits(model: GPT, sequences: list[list[int]]) -> list[np.ndarray]:
    """fp32 logits [T, V] of each whole sequence from `GPT.forward`, no cache."""
    if next(model.parameters()).dtype != torch.float32:
        raise ExportError("verification needs the fp32 PyTorch model as its reference")
    model.eval()
    return [model(torch.tensor([seq]))[0][0].numpy().astype(np.float32) for seq in sequences]


def compare(prompts: list[list[int]], ref: list[np.ndarray], rows: list[np.ndarray], chunk: np.ndarray,
            dtype: str, tolerance: tuple[float, str] | None = None) -> dict:
    """Measured differences and greedy agreement; `passed` says whether they are within tolerance.

    tolerance: (absolute bound, its rule in words) instead of the dtype's own.
    """
    scale = max(1.0, max(float(np.abs(r).max()) for r in ref))
    tol = max(FP32_TOL, FP32_REL_TOL * scale) if dtype == "fp32" else FP16_REL_TOL * scale
    rule = (f"max({FP32_TOL}, {FP32_REL_TOL} x max |reference logit|)" if dtype == "fp32"
            else f"{FP16_REL_TOL} x max(1, max |reference logit|)")
    if tolerance is not None:
        tol, rule = tolerance
    prefill_diff = decode_diff = 0.0
    agree = total = hard = 0
    for b, prompt in enumerate(prompts):
        diff = np.abs(rows[b] - ref[b]).max(axis=-1)  # [T]
        L = len(prompt)
        prefill_diff = max(prefill_diff, float(diff[:L].max()))
        if len(diff) > L:
            decode_diff = max(decode_diff, float(diff[L:].max()))
    L = len(prompts[0])
    if len(chunk):
        decode_diff = max(decode_diff, float(np.abs(chunk - ref[0][L : L + len(chunk)]).max()))
    # Every position whose argmax is a generated token: the prompt's last one and each decode step (+ the chunk).
    pairs = [(rows[b][t], ref[b][t]) for b, p in enumerate(prompts) for t in range(len(p) - 1, len(rows[b]))]
    pairs += [(chunk[i], ref[0][L + i]) for i in range(len(chunk))]
    for got, want in pairs:
        mine, theirs = int(got.argmax()), int(want.argmax())
        total += 1
        if mine == theirs:
            agree += 1
        elif dtype == "fp32" or want[theirs] - want[mine] > tol:
            hard += 1  # fp16 may flip a near-tie; anything else is a wrong token
    passed = max(prefill_diff, decode_diff) <= tol and hard == 0
    return {
        "passed": passed,
        "provider": "CPUExecutionProvider",
        "reference": "PyTorch fp32 GPT.forward over each whole sequence, no cache",
        "batch": len(prompts),
        "prompt_lengths": [len(p) for p in prompts],
        "steps": len(rows[0]) - len(prompts[0]),
        "chunk_tokens": len(chunk),
        "max_abs_diff_prefill": prefill_diff,
        "max_abs_diff_decode": decode_diff,
        "max_abs_logit": scale,
        "tolerance": tol,
        "tolerance_rule": rule,
        "greedy_match": agree == total,
        "greedy_agreement": agree / max(total, 1),
        "greedy_compared": total,
        "greedy_mismatches_beyond_tolerance": hard,
    }


def verify(model: GPT, onnx_path, spec: BundleSpec, *, steps: int = DEFAULT_STEPS,
           token_ids: list[int] | None = None, tolerance: tuple[float, str] | None = None) -> dict:
    """Run the schedule through ONNX Runtime and PyTorch; raise ExportError when they disagree.

    tolerance: (absolute bound, its rule in words) replacing the dtype's own (gptedge.export.stored's check of
    kept blocks, whose dequantize-then-multiply order rounds differently from PyTorch's product).
    """
    from gptedge.runtime.engine import Engine

    prompts, steps = make_prompts(spec.architecture.vocab_size, spec.architecture.context_length, steps, token_ids)
    try:
        engine = Engine(session(onnx_path), spec)
        streams, rows = greedy_decode(engine, prompts, steps, keep_logits=True)
        chunk = (run_chunk(engine, prompts[0], streams[0][:CHUNK]) if len(streams[0]) >= 1
                 else np.zeros((0, 1), np.float32))
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidArgument, ...)
        raise ExportError(f"the exported graph failed to run in ONNX Runtime ({type(exc).__name__}: {exc}); "
                          "nothing was written") from exc
    ref = reference_logits(model, [p + s for p, s in zip(prompts, streams)])
    result = compare(prompts, ref, rows, chunk, spec.dtype, tolerance)
    if not result.pop("passed"):
        raise ExportError(
            "verification failed: ONNX Runtime and PyTorch disagree (max |diff| prefill "
            f"{result['max_abs_diff_prefill']:.3g}, decode {result['max_abs_diff_decode']:.3g}, tolerance "
            f"{result['tolerance']:.3g}; greedy agreement {result['greedy_agreement']:.0%}); "
            "nothing was written. Report this with the source model's config"
        )
    return result
