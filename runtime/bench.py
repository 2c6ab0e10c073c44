"""`gptedge bench`'s measurement: load time (cold, then from the graph cache), time to first token, decode tokens/s.

A library function so that scripts (scripts/gpu_check.py) and apps measure exactly what the command prints.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from gptedge.errors import UsageError
from gptedge.runtime.model import Model


def run_bench(bundle: Path, provider: str, threads: int | None, prompt_tokens: int, new_tokens: int,
              late_position: int | None, runs: int) -> dict[str, Any]:
    """Load twice (cold, then with the optimized-graph cache), then time greedy generation of random token prompts.

    Decode tokens/s counts the tokens after the first over the time they took, sampling included
    (what a user sees); stop tokens are disabled so every run decodes exactly `new_tokens`.
    """
    start = time.perf_counter()
    first = Model.load(bundle, provider=provider, threads=threads)
    load_s = time.perf_counter() - start
    cache_first = first.session_info.cache
    del first
    start = time.perf_counter()
    model = Model.load(bundle, provider=provider, threads=threads)
    reload_s = time.perf_counter() - start
    context = model.context_length
    if prompt_tokens + new_tokens > context:
        raise UsageError(f"--prompt-tokens + --new-tokens ({prompt_tokens + new_tokens}) "
                         f"exceed the context ({context})")
    late = min(900, context - new_tokens) if late_position is None else late_position
    if late + new_tokens > context or late < 1:
        raise UsageError(f"--late-position {late} + --new-tokens {new_tokens} must fit in the context ({context})")
    ids = np.random.default_rng(0).integers(0, model.spec.architecture.vocab_size, size=context).tolist()
    greedy = dict(temperature=0.0, stop_token_ids=(), max_new_tokens=new_tokens)
    model.generate(ids[:8], **{**greedy, "max_new_tokens": 4})  # warm-up: first-run allocations
    short = [model.generate(ids[:prompt_tokens], **greedy).timings for _ in range(runs)]
    result: dict[str, Any] = {
        "bundle": str(bundle), "provider": model.provider,
        "threads": model.engine.session.get_session_options().intra_op_num_threads or "onnxruntime's default",
        "load_s": load_s, "graph_cache": cache_first, "reload_s": reload_s,
        "reload_graph_cache": model.session_info.cache,
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "runs": runs,
        "ttft_ms": statistics.median(t.ttft_s for t in short) * 1000,
        "prefill_tokens_per_s": statistics.median(t.prefill_tokens_per_s for t in short),
        "decode_tokens_per_s": statistics.median(t.decode_tokens_per_s for t in short),
        "late_position": None,
    }
    if late > prompt_tokens:
        long = [model.generate(ids[:late], **greedy).timings for _ in range(runs)]
        result["late_position"] = late
        result["late_decode_tokens_per_s"] = statistics.median(t.decode_tokens_per_s for t in long)
    return result


def format_bench(r: dict[str, Any]) -> str:
    rows = [
        ("bundle", r["bundle"]), ("provider", r["provider"]), ("threads", r["threads"]),
        ("load (first in this process)", f"{r['load_s']:.3f} s (graph cache {r['graph_cache']})"),
        ("load (again)", f"{r['reload_s']:.3f} s (graph cache {r['reload_graph_cache']})"),
        (f"time to first token, {r['prompt_tokens']}-token prompt", f"{r['ttft_ms']:.1f} ms"),
        ("prefill", f"{r['prefill_tokens_per_s']:.0f} tokens/s"),
        (f"decode at position {r['prompt_tokens']}, {r['new_tokens']} tokens",
         f"{r['decode_tokens_per_s']:.1f} tokens/s"),
    ]
    if r.get("late_position") is not None:
        rows.append((f"decode at position {r['late_position']}, {r['new_tokens']} tokens",
                     f"{r['late_decode_tokens_per_s']:.1f} tokens/s"))
    else:
        rows.append(("decode late in the context", "not measured: the context leaves no later position than the "
                     "first measurement (see --late-position)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"| {'measure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
                     + [f"| {k.ljust(width)} | {v} |" for k, v in rows])
