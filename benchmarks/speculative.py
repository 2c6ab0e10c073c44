"""What speculative decoding buys: `python benchmarks/speculative.py` (`--smoke`: a seconds-long check that it runs).

The trained model's context is 256 tokens: prompts are a few hundred characters (cut from the left if
longer). Measured:
1. The price of a verify step: one engine step of k new tokens against k = 1 (GPT-2-124M-shape INT8
   bundle, position ~200, 2 threads), which bounds what accepted proposals can save.
2. On a trained model (the `small` preset trained on the standard library's source, exported and
   quantized to INT8 here, reused from benchmarks/.cache), on input-grounded prompts (code to continue
   after the same code) and open-ended ones (a function to write):
   - greedy: plain against `speculative="lookup"` and against a draft model (the `small` recipe at
     DRAFT_SHAPE, the same tokenizer, fp32, trained here once, in a fraction of the model's training time);
     each pair must give identical tokens;
   - sampling (SAMPLING, unseeded, so the draft's pacing may use measured times): plain against lookup
     and the draft. The texts differ run to run; what is compared is tokens per second and acceptance
     (the distribution is the same: tests/test_speculative_draft.py).
   The cost of one decode step of the model and of the draft is reported with them. Both load with the
   runtime's default thread count (one thread for models this small), which is recorded. Every prompt runs in
   every mode in each of ROUNDS rounds; speedups are medians over rounds, of whole generations (`speedup`) and
   of the decoding after the first token (`decode_speedup`, what speculation changes; the prefill is the same).
Writes benchmarks/results/speculative.json (not in --smoke mode).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from pathlib import Path

import numpy as np

from common import HERE, THREADS, machine, make_random_gpt2, pin_threads
from peers import CACHE, prepare_gptedge

NEW_TOKENS = 96
DRAFT_SHAPE = dict(n_layer=1, n_head=2, n_embd=64)  # ~1/4 of the `small` model's layers and 1/2 its width
SAMPLING = dict(temperature=0.8, top_p=0.95)
ROUNDS = 5  # every prompt in every mode, this many times: the machine's noise is wide, medians over rounds are not


def verify_costs(bundle: Path, rounds: int = 9) -> dict[str, float]:
    """Milliseconds of one engine step of k new tokens near position 200, logits at every position (a verify step),
    for k = 1, 2, 4, 8: each round measures every k once, and each is the median over rounds, so a slow spell of the
    machine lands on all of them; `ratio` holds the medians over rounds of each k's time over k = 1's in the same
    round."""
    from gptedge.runtime import Model

    model = Model.load(bundle, provider="cpu", threads=THREADS)
    engine = model.engine
    ks = (1, 2, 4, 8)
    times: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(rounds):
        for k in ks:
            cache = engine.new_cache(1, 256)
            engine.forward(cache, np.arange(200, dtype=np.int64)[None, :] % 1000)
            t = time.perf_counter()
            for _ in range(8):
                engine.forward(cache, np.full((1, k), 7, np.int64), every_position=True)  # as verify steps run
                cache.lengths -= k - 1  # stay near position 200
            times[k].append((time.perf_counter() - t) / 8)
            engine.release(cache)
    out = {f"k={k}": 1000 * statistics.median(times[k]) for k in ks}
    out["ratio"] = {f"k={k}": statistics.median(a / b for a, b in zip(times[k], times[1])) for k in ks}
    return out


def step_ms(model, position: int = 100) -> float:
    """Median milliseconds of one one-token decode step around `position` (at most half the context)."""
    engine = model.engine
    position = min(position, model.context_length // 2)
    cache = engine.new_cache(1, position + 1)
    engine.forward(cache, np.arange(position, dtype=np.int64)[None, :] % 100)
    times = []
    for _ in range(32):
        t = time.perf_counter()
        engine.forward(cache, np.array([[7]], np.int64))
        times.append(time.perf_counter() - t)
        cache.lengths -= 1
    engine.release(cache)
    return 1000 * statistics.median(times)


def trained_bundles(root: Path, preset: str, steps: int | None, quantize: bool) -> tuple[Path, Path]:
    """(the model, its draft): checkpoints trained with the same tokenizer (the same corpus and vocabulary
    size give the same cached tokenizer), exported; the model quantized to INT8 when `quantize`."""
    from gptedge.demo import heldout_text
    from gptedge.export.exporter import export_bundle
    from gptedge.quantize.quantizer import quantize_bundle
    from gptedge.train.checkpoint import TOKENIZER, is_checkpoint
    from gptedge.train.trainer import TrainConfig, train

    model_ckpt, draft_ckpt = root / "ckpt", root / "draft-ckpt"
    if not is_checkpoint(model_ckpt):
        train(TrainConfig(out=str(model_ckpt), preset=preset, steps=steps, force=True, progress=False))
    if not is_checkpoint(draft_ckpt):
        train(TrainConfig(out=str(draft_ckpt), preset=preset, steps=steps, force=True, progress=False, **DRAFT_SHAPE))
    if (model_ckpt / TOKENIZER).read_text() != (draft_ckpt / TOKENIZER).read_text():
        raise SystemExit(f"{draft_ckpt} was trained with another tokenizer than {model_ckpt}; delete both and rerun")
    bundles = {}
    for name, ckpt in (("fp32", model_ckpt), ("draft-fp32", draft_ckpt)):
        bundles[name] = root / name
        if not (bundles[name] / "gptedge.json").exists():
            export_bundle(ckpt, bundles[name], force=True, progress=False)
    model = bundles["fp32"]
    if quantize:
        model = root / "int8"
        if not (model / "gptedge.json").exists():
            quantize_bundle(bundles["fp32"], model, method="int8-weight", eval_text=heldout_text(60_000), force=True,
                            progress=False)
    return model, bundles["draft-fp32"]


def workloads(per_kind: int | None = None) -> dict[str, list[str]]:
    import json as json_module
    import textwrap as textwrap_module

    sources = [inspect.getsource(m) for m in (json_module.decoder, textwrap_module)]
    grounded = []
    for src in sources:
        for start in (0, 2000, 5000, 8000):
            chunk = src[start:start + 300]
            grounded.append(chunk + "\n\n" + chunk[:120])  # continue code that is already in the prompt
    open_ended = ["def read_config(path):\n", "class Cache:\n    def __init__(self", "import os\n\n\ndef main(",
                  "for i in range(", "def parse_args(argv):\n    "]
    return {"input-grounded": grounded[:per_kind], "open-ended": open_ended[:per_kind]}


def compare(model, draft, sampling: dict, new_tokens: int, per_kind: int | None, rounds: int = ROUNDS) -> dict:
    """Plain decoding against each speculative mode over the workloads, with `sampling`'s settings.

    Each round runs every prompt once in every mode, one after another, so a slow spell of the machine lands on
    all modes alike; a mode's speedup is the median over rounds of plain's time over its own. `speedup` counts
    whole generations (prefill included), `decode_speedup` the decoding alone (after the first token: what
    speculation changes), from each result's timings.
    """
    kw = dict(max_new_tokens=new_tokens, stop_token_ids=(), truncate="left", **sampling)  # context 256
    modes = {"plain": None, "lookup": "lookup", "draft": draft}
    out = {}
    for name, prompts in workloads(per_kind).items():
        totals = {mode: [] for mode in modes}  # per round: (seconds, decode seconds, tokens)
        counts = {mode: dict(proposed=0, accepted=0, identical=0) for mode in modes}
        for _ in range(rounds):
            rows = {mode: [0.0, 0.0, 0] for mode in modes}
            for prompt in prompts:
                plain_ids = None
                for mode, how in modes.items():
                    t = time.perf_counter()
                    result = model.generate(prompt, speculative=how, **kw)
                    row = rows[mode]
                    row[0] += time.perf_counter() - t
                    row[1] += result.timings.decode_s
                    row[2] += len(result.token_ids)
                    plain_ids = result.token_ids if how is None else plain_ids
                    counts[mode]["identical"] += result.token_ids == plain_ids
                    counts[mode]["proposed"] += result.timings.proposed
                    counts[mode]["accepted"] += result.timings.accepted
            for mode in modes:
                totals[mode].append(rows[mode])
        plain = totals["plain"]
        tokens = plain[0][2]
        out[name] = {"prompts": len(prompts), "rounds": rounds, "tokens": tokens,
                     "plain_tokens_per_s": tokens / statistics.median(r[0] for r in plain),
                     "plain_decode_tokens_per_s": (tokens - len(prompts)) / statistics.median(r[1] for r in plain)}
        for mode in ("lookup", "draft"):
            mine, c = totals[mode], counts[mode]
            out[name][mode] = {
                "tokens_per_s": tokens / statistics.median(r[0] for r in mine),
                "speedup": statistics.median(p[0] / m[0] for p, m in zip(plain, mine)),
                "decode_speedup": statistics.median(p[1] / m[1] for p, m in zip(plain, mine)),
                "proposed": c["proposed"] // rounds, "accepted": c["accepted"] // rounds}
            if sampling.get("temperature", 1.0) == 0:
                out[name][mode]["identical_outputs"] = f"{c['identical']}/{len(prompts) * rounds}"
    return out


def trained_rows(model_path: Path, draft_path: Path, new_tokens: int, per_kind: int | None,
                 rounds: int = ROUNDS) -> dict:
    from gptedge.runtime import Model

    model = Model.load(model_path, provider="cpu")  # the thread count a user gets (runtime default_threads)
    draft = Model.load(draft_path, provider="cpu")
    model.generate("def f():", max_new_tokens=8, speculative=draft)  # warm both sessions
    return {
        "threads": {name: m.engine.session.get_session_options().intra_op_num_threads
                    for name, m in (("model", model), ("draft", draft))},
        "step_ms": {"model": step_ms(model), "draft": step_ms(draft)},
        "draft_shape": DRAFT_SHAPE,
        "greedy": compare(model, draft, dict(temperature=0.0), new_tokens, per_kind, rounds),
        "sampling": {"settings": SAMPLING, **compare(model, draft, SAMPLING, new_tokens, per_kind, rounds)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models trained for a few steps, two prompts a workload, nothing written: "
                             "checks that the script runs")
    args = parser.parse_args()
    pin_threads()
    if args.smoke:
        model, draft = trained_bundles(CACHE / "speculative-smoke", "tiny", 3, quantize=False)
        print(json.dumps(trained_rows(model, draft, 12, 2, rounds=1), indent=1))
        return
    root = CACHE / "gpt2-124m"
    shape_bundle = prepare_gptedge(make_random_gpt2(root / "hf"), root, ["int8-weight"], None)["int8-weight"]
    model, draft = trained_bundles(CACHE / "small-trained", "small", None, quantize=True)
    result = {
        **machine(), "new_tokens": NEW_TOKENS,
        "verify_step_ms_gpt2_124m_int8": verify_costs(shape_bundle),
        "small_trained_int8": trained_rows(model, draft, NEW_TOKENS, None),
    }
    (HERE / "results" / "speculative.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
