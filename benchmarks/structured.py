"""What structured output costs per token: `python benchmarks/structured.py`.

Generates JSON for a schema with the GPT-2-124M-shape INT8 bundle (50,257-token vocabulary), once
free and once constrained by llguidance (gptedge.runtime.structured), and reports the decode time
per token of each and the mask's own time per token (computing the allowed set and applying it to
the logits). Engines compared on the same vocabulary and schema where installed: llguidance (used by
gptedge, llama.cpp and onnxruntime-genai) and outlines-core (its Index over the schema's regex).
Writes benchmarks/results/structured.json.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np

from common import HERE, THREADS, machine, make_random_gpt2, pin_threads
from peers import CACHE, prepare_gptedge

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "active"],
    "additionalProperties": False,
}
RUNS = 5


def timed_generation(model, constraint_factory, seed: int) -> dict:
    from gptedge.runtime.decoding import Decoding
    from gptedge.runtime.generator import stream_tokens

    params = model.sampling_params(temperature=1.0, seed=seed, max_new_tokens=120, stop_token_ids=model.stop_ids)
    constraint = constraint_factory() if constraint_factory else None
    mask_s = [0.0]
    if constraint is not None:
        mask = constraint.mask

        def timed_mask(logits):
            t = time.perf_counter()
            out = mask(logits)
            mask_s[0] += time.perf_counter() - t
            return out

        constraint.mask = timed_mask
    seq = Decoding(model.tokenizer, model.prompt_ids("Person as JSON:"), params, constraint=constraint)
    text = "".join(stream_tokens(model.engine, seq))
    r = seq.result
    steps = max(1, len(r.token_ids))
    return {"tokens": len(r.token_ids), "finish": r.finish_reason, "ms_per_token": 1000 * r.timings.decode_s / steps,
            "mask_ms_per_token": 1000 * mask_s[0] / steps, "text": text}


def outlines_mask_cost(tokenizer) -> dict | None:
    """outlines-core: build the Index for the schema's regex, then time allowed-token lookups along a random path.

    The vocabulary is given as the tokenizer's raw entries (byte-level spellings): this measures cost, not output.
    """
    try:
        from outlines_core import Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        return None
    start = time.perf_counter()
    vocab = {}
    for token, i in tokenizer.get_vocab().items():
        vocab.setdefault(token, []).append(i)
    eos = tokenizer.token_to_id("<|endoftext|>")
    vocab.pop("<|endoftext|>", None)
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), Vocabulary(eos, vocab))
    build_s = time.perf_counter() - start
    state, lookups, spent = index.get_initial_state(), 0, 0.0
    rng = np.random.default_rng(0)
    for _ in range(60):
        t = time.perf_counter()
        allowed = index.get_allowed_tokens(state)
        spent += time.perf_counter() - t
        lookups += 1
        choice = int(allowed[int(rng.integers(len(allowed)))]) if allowed else None
        if choice is None or choice == eos:
            break
        state = index.get_next_state(state, choice)
        if state is None:
            break
    return {"index_build_s": build_s, "lookup_ms_per_token": 1000 * spent / lookups}


def main() -> None:
    pin_threads()
    from gptedge.runtime import Model
    from gptedge.runtime.structured import GrammarFactory

    root = CACHE / "gpt2-124m"
    bundle = prepare_gptedge(make_random_gpt2(root / "hf"), root, ["int8-weight"], None)["int8-weight"]
    model = Model.load(bundle, provider="cpu", threads=THREADS)
    factory = GrammarFactory(model.tokenizer, model.stop_ids)
    start = time.perf_counter()
    factory.json_schema(SCHEMA)
    first_compile_s = time.perf_counter() - start
    timed_generation(model, None, 0)  # warm-up
    free = [timed_generation(model, None, s) for s in range(RUNS)]
    constrained = [timed_generation(model, lambda: factory.json_schema(SCHEMA), s) for s in range(RUNS)]
    valid = sum(1 for r in constrained if r["finish"] == "eos" and _parses(r["text"]))
    med = statistics.median
    result = {
        **machine(), "vocab": 50257, "runs": RUNS,
        "free_ms_per_token": med(r["ms_per_token"] for r in free),
        "llguidance": {"first_compile_s": first_compile_s,
                       "ms_per_token": med(r["ms_per_token"] for r in constrained),
                       "mask_ms_per_token": med(r["mask_ms_per_token"] for r in constrained),
                       "valid_json": f"{valid}/{RUNS}"},
        "outlines_core": outlines_mask_cost(model.tokenizer),
    }
    (HERE / "results" / "structured.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
