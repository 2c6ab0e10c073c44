"""The measurements behind the runtime's defaults: `python benchmarks/runtime_choices.py`.

On the GPT-2-124M-shape INT8 bundle (2 threads), each in a fresh process:
- prefill chunking: peak RSS and time of a 900-token prompt prefilled in one run vs in runs of
  PREFILL_CHUNK tokens (runtime/generator.py);
- thread spinning (runtime/providers.py BRIEF_SPIN_US): decode tokens/s on the real SmolLM2-135M INT8 and INT4
  bundles with onnxruntime's intra-op threads sleeping at once, spinning a few microseconds, or spinning until the
  next step, beside llama-bench on the same weights, on an otherwise idle machine and next to one busy process;
- the tokenizer's vocabulary size lookup that the detokenizer caches (runtime/detokenizer.py);
- the default thread count by model size: decode tokens/s with 1 and THREADS intra-op threads (the default
  spin policy) on the trained demo model's INT8 bundle and the GPT-2-124M-shape one (runtime/providers.py
  `default_threads`);
- the sampler's cost per token (`sample_next`, runtime/sampling.py) for common filter settings over a
  2,048- and a 50,257-entry vocabulary, and what one pass of the nucleus's threshold search costs next to
  the np.partition it replaced.
`--part threads`, `--part sampling` or `--part spin` re-measures only that part and keeps the rest of the file.
Writes benchmarks/results/runtime-choices.json; the code comments cite it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import HERE, THREADS, machine, make_random_gpt2
from gptedge.runtime.providers import BRIEF_SPIN_US
from peers import CACHE, prepare_gptedge

PREFILL = """
import json, sys, time
import numpy as np
from gptedge.runtime import Model
from gptedge.runtime.generator import prefill
from common import peak_rss_mb, prompt_ids
m = Model.load(sys.argv[1], provider="cpu", threads=int(sys.argv[3]))
chunk = int(sys.argv[2])
ids = prompt_ids(900, 50257, seed=0)
cache = m.engine.new_cache(1, 960)
before = peak_rss_mb()
t = time.perf_counter()
prefill(m.engine, cache, ids, chunk=chunk)
print(json.dumps({"chunk": chunk, "seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb(),
                  "peak_rss_before_mb": before}))
"""

SPIN = """
import json, sys
from gptedge.runtime import providers
from gptedge.runtime.model import Model
from common import THREADS, prompt_ids
policy = sys.argv[2]
spin = {"off": False, "on": True, "1 thread": False}.get(policy)
if spin is None:
    providers.BRIEF_SPIN_US = int(policy)  # read when the session options are built
threads = 1 if policy == "1 thread" else THREADS
m = Model.load(sys.argv[1], provider="cpu", threads=threads, spin=spin, cache=False, prefix_cache_mb=0)
ids = prompt_ids(128, m.spec.architecture.vocab_size, seed=0)
m.generate(ids, temperature=0, max_new_tokens=8, stop_token_ids=())
rates = [m.generate(ids, temperature=0, max_new_tokens=128, stop_token_ids=()).timings.decode_tokens_per_s
         for _ in range(3)]
print(json.dumps({"decode_tokens_per_s": sorted(rates)[1]}))
"""

THREADED = """
import json, sys
from gptedge.runtime.model import Model
from common import prompt_ids
m = Model.load(sys.argv[1], provider="cpu", threads=int(sys.argv[2]), cache=False)
ids = prompt_ids(128, m.spec.architecture.vocab_size, seed=0)[: m.context_length // 2]
m.generate(ids, temperature=0, max_new_tokens=8, stop_token_ids=())
rates = [m.generate(ids, temperature=0, max_new_tokens=96, stop_token_ids=()).timings.decode_tokens_per_s
         for _ in range(3)]
print(json.dumps({"decode_tokens_per_s": sorted(rates)[1]}))
"""

SAMPLING_SETTINGS = {
    "temperature 0.8": dict(temperature=0.8),
    "temperature 0.8, top-p 0.95": dict(temperature=0.8, top_p=0.95),
    "temperature 0.8, top-k 50": dict(temperature=0.8, top_k=50),
    "temperature 0.7, top-k 40, top-p 0.9, min-p 0.05": dict(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05),
    "temperature 1.3, top-k 1000": dict(temperature=1.3, top_k=1000),
}


def sampling_costs(repeats: int = 7) -> dict:
    """Microseconds per `sample_next` call (median of `repeats` timed loops) on rows of standard-normal logits x 2.5
    with five tokens 12 above the rest (a peaked head over a long tail), and the cost of one threshold pass of
    `_nucleus` next to an np.partition over the same 50,257-entry row of probabilities."""
    import numpy as np

    from gptedge.runtime.sampling import SamplingParams, sample_next

    def per_call(fn, n: int) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            times.append((time.perf_counter() - t) / n)
        return 1e6 * statistics.median(times)

    rng = np.random.default_rng(0)
    out: dict = {"logits": "standard normal x 2.5, five tokens +12, float32", "us_per_token": {}}
    for vocab in (2048, 50257):
        row = (np.random.default_rng(1).standard_normal(vocab) * 2.5).astype(np.float32)
        row[:5] += 12
        n = 2000 if vocab < 10_000 else 100
        params = {"greedy": SamplingParams(temperature=0.0),
                  **{name: SamplingParams(**kw) for name, kw in SAMPLING_SETTINGS.items()}}
        out["us_per_token"][f"vocab {vocab}"] = {
            name: per_call(lambda q=q: sample_next(row, q, rng), n) for name, q in params.items()}
    probs = np.exp(np.random.default_rng(1).standard_normal(50257) * 2.5)
    probs /= probs.sum()
    thr = probs.max() / 16
    out["vocab 50257 one pass"] = {
        "threshold: compare + masked sum, us": per_call(lambda: np.sum(probs, where=probs >= thr), 200),
        "np.partition at the 64th largest, us": per_call(lambda: np.partition(probs, probs.size - 64), 200)}
    return out


BUSY = "import time\nend = time.time() + 3600\nwhile time.time() < end:\n    pass\n"  # killed when its phase ends


def run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=HERE, check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def spin_policies(runs: int = 3) -> dict:
    """Decode tokens/s (128 tokens after a 128-token prompt, batch 1, THREADS threads) on the real SmolLM2-135M
    INT8 and INT4 bundles (benchmarks/real_model.py prepares them) for each spin policy: sleep at once ("off"),
    spin N microseconds then sleep (N), spin until the next step ("on"), and one thread (no pool to wake: "1 thread");
    beside them llama.cpp's own llama-bench
    (tg128 at depth 128; its threads spin) on Q8_0 and Q4_K_M of the same weights. Idle, then next to one busy
    process; each policy a fresh process per round, rounds interleaved, medians."""
    from peers import LLAMA_BUILD, Row, run_llama_bench

    real = CACHE / "smollm2-real"
    bundles = {k: real / f"gptedge-{k}" for k in ("int8", "int4") if (real / f"gptedge-{k}" / "gptedge.json").exists()}
    if not bundles:
        raise SystemExit(f"no real-model bundles in {real}: run benchmarks/real_model.py first")
    ggufs = {k: real / f"smollm2-{k}.gguf" for k in ("q8_0", "q4_k_m")}
    has_bench = (LLAMA_BUILD / "bin" / "llama-bench").exists()
    policies = ("off", "2", "5", "10", "20", "on", "1 thread")
    out: dict = {"policies": list(policies), "runs": runs, "tokens_per_s": {}}
    for load in ("idle", "one busy process"):
        busy = subprocess.Popen([sys.executable, "-c", BUSY]) if load != "idle" else None
        try:
            samples: dict[str, list[float]] = {}
            for _ in range(runs):
                for name, bundle in bundles.items():
                    for policy in policies:
                        samples.setdefault(f"gptedge {name}, spin {policy}", []).append(
                            run(SPIN, str(bundle), policy)["decode_tokens_per_s"])
                for kind, path in ggufs.items():
                    if has_bench and path.exists():
                        samples.setdefault(f"llama-bench {kind}", []).append(
                            run_llama_bench(Row(kind, "llama-bench", path, [path]))["decode_tps"])
        finally:
            if busy is not None:
                busy.kill()
        out["tokens_per_s"][load] = {k: statistics.median(v) for k, v in samples.items()}
        out.setdefault("samples", {})[load] = samples
    return out


def spin_markdown(spin: dict, meta: dict) -> str:
    """The spin table: one row per policy and bundle, idle and busy side by side, llama-bench below."""
    idle, busy = spin["tokens_per_s"]["idle"], spin["tokens_per_s"]["one busy process"]
    lines = ["| decode tok/s @128 | idle | next to one busy process |", "|---|---:|---:|"]
    label = {"off": "sleep at once", "on": "spin until the next step", "1 thread": "one thread (no pool)"}
    for name in idle:
        kind, _, policy = name.partition(", spin ")
        shown = f"{kind}, {label.get(policy, f'spin {policy} us, then sleep')}" if policy else name
        if policy == str(BRIEF_SPIN_US):
            shown += " (**default**)"
        lines.append(f"| {shown} | {idle[name]:.1f} | {busy[name]:.1f} |")
    lines += ["", f"Real SmolLM2-135M-Instruct bundles (benchmarks/real_model.py), batch 1, 128-token prompt, "
              f"128 greedy tokens, {THREADS} threads unless said; llama-bench tg128 at depth 128 (its threads "
              f"spin); medians of {spin['runs']} fresh-process rounds. Busy process: one Python loop on one core. "
              f"Machine: {meta['machine']}; {meta['time']}."]
    return "\n".join(lines) + "\n"


def thread_counts(bundles: dict[str, str], runs: int = 3) -> dict[str, dict]:
    """Per bundle: its weight bytes, and decode tokens/s (median of `runs` fresh processes) by thread count."""
    out = {}
    for name, bundle in bundles.items():
        weights = sum(p.stat().st_size for p in Path(bundle).glob("model.onnx*"))
        out[name] = {"model_bytes": weights, **{
            f"threads={n}": statistics.median(run(THREADED, bundle, str(n))["decode_tokens_per_s"] for _ in range(runs))
            for n in (1, THREADS)}}
    return out


def main() -> None:
    import argparse

    from tokenizers import Tokenizer

    from gptedge.runtime.generator import PREFILL_CHUNK

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "threads", "sampling", "spin", "spin-table"), default="all",
                        help="re-measure one part only; spin-table rewrites results/spin-policy.md from the JSON "
                             "(after BRIEF_SPIN_US changes: the table marks the default)")
    args = parser.parse_args()
    root = CACHE / "gpt2-124m"
    bundle = str(prepare_gptedge(make_random_gpt2(root / "hf"), root, ["int8-weight"], None)["int8-weight"])
    bundles = {"gpt2-124m int8-weight": bundle}
    demo = CACHE / "demo" / "gptedge-int8-weight"  # written by `peers.py --model demo`
    if (demo / "gptedge.json").exists():
        bundles = {"demo int8-weight": str(demo), **bundles}
    path = HERE / "results" / "runtime-choices.json"
    if args.part == "spin-table":
        result = json.loads(path.read_text())
        (HERE / "results" / "spin-policy.md").write_text(spin_markdown(result["spin"], result["spin_machine"]))
        return
    if args.part != "all":
        key, value = {"threads": lambda: ("decode_by_threads", thread_counts(bundles)),
                      "sampling": lambda: ("sampling", sampling_costs()),
                      "spin": lambda: ("spin", spin_policies())}[args.part]()
        result = {**json.loads(path.read_text()), f"{args.part}_machine": machine(), key: value}
        path.write_text(json.dumps(result, indent=1))
        if key == "spin":
            (HERE / "results" / "spin-policy.md").write_text(spin_markdown(value, result["spin_machine"]))
        print(json.dumps(result[key], indent=1))
        return
    prefill = {f"chunk_{c}": [run(PREFILL, bundle, str(c), str(THREADS)) for _ in range(2)]
               for c in (900, PREFILL_CHUNK)}
    prefill_summary = {name: {"peak_rss_mb": min(r["peak_rss_mb"] for r in rows),
                              "seconds": min(r["seconds"] for r in rows)} for name, rows in prefill.items()}
    tok = Tokenizer.from_file(str(Path(bundle) / "tokenizer.json"))
    times = []
    for _ in range(20):
        t = time.perf_counter()
        tok.get_vocab_size(with_added_tokens=True)
        times.append(time.perf_counter() - t)
    result = {
        **machine(), "bundle": "gpt2-124m int8-weight",
        "prefill_900_tokens": prefill_summary, "prefill_runs": prefill,
        "spin": spin_policies(),
        "get_vocab_size_ms": 1000 * statistics.median(times), "vocab": tok.get_vocab_size(with_added_tokens=True),
        "decode_by_threads": thread_counts(bundles), "sampling": sampling_costs(),
    }
    path.write_text(json.dumps(result, indent=1))
    (HERE / "results" / "spin-policy.md").write_text(spin_markdown(result["spin"], result))
    print(json.dumps({k: v for k, v in result.items() if k != "prefill_runs"}, indent=1))


if __name__ == "__main__":
    main()
