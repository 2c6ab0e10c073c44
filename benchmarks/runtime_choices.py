"""The measurements behind the runtime's defaults: `python benchmarks/runtime_choices.py`.

On the GPT-2-124M-shape INT8 bundle (2 threads), each in a fresh process:
- prefill chunking: peak RSS and time of a 900-token prompt prefilled in one run vs in runs of
  PREFILL_CHUNK tokens (runtime/generator.py);
- thread spinning: decode tokens/s with onnxruntime's intra-op spinning off (the default,
  runtime/providers.py) and on, on an otherwise idle machine and next to one busy process;
- the tokenizer's vocabulary size lookup that the detokenizer caches (runtime/detokenizer.py);
- the default thread count by model size: decode tokens/s with 1 and THREADS intra-op threads (spinning
  off) on the trained demo model's INT8 bundle and the GPT-2-124M-shape one (runtime/providers.py
  `default_threads`; `--part threads` re-measures only this and keeps the rest of the file).
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

DECODE = """
import json, sys
import onnxruntime as ort
from gptedge.runtime import providers
from gptedge.runtime.model import Model
from common import prompt_ids
spin = sys.argv[2]
original = providers.session_options
def options(choice, threads):
    so = original(choice, threads)
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    return so
providers.session_options = options
m = Model.load(sys.argv[1], provider="cpu", threads=int(sys.argv[3]), cache=False)
ids = prompt_ids(128, 50257, seed=0)
m.generate(ids, temperature=0, max_new_tokens=8, stop_token_ids=())
rates = [m.generate(ids, temperature=0, max_new_tokens=128, stop_token_ids=()).timings.decode_tokens_per_s
         for _ in range(3)]
print(json.dumps({"spinning": spin == "1", "decode_tokens_per_s": sorted(rates)[1]}))
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

BUSY = "import time\nend = time.time() + 600\nwhile time.time() < end:\n    pass\n"


def run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=HERE, check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    parser.add_argument("--part", choices=("all", "threads"), default="all")
    args = parser.parse_args()
    root = CACHE / "gpt2-124m"
    bundle = str(prepare_gptedge(make_random_gpt2(root / "hf"), root, ["int8-weight"], None)["int8-weight"])
    bundles = {"gpt2-124m int8-weight": bundle}
    demo = CACHE / "demo" / "gptedge-int8-weight"  # written by `peers.py --model demo`
    if (demo / "gptedge.json").exists():
        bundles = {"demo int8-weight": str(demo), **bundles}
    path = HERE / "results" / "runtime-choices.json"
    if args.part == "threads":
        result = {**json.loads(path.read_text()), "threads_machine": machine(),
                  "decode_by_threads": thread_counts(bundles)}
        path.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["decode_by_threads"], indent=1))
        return
    prefill = {f"chunk_{c}": [run(PREFILL, bundle, str(c), str(THREADS)) for _ in range(2)]
               for c in (900, PREFILL_CHUNK)}
    prefill_summary = {name: {"peak_rss_mb": min(r["peak_rss_mb"] for r in rows),
                              "seconds": min(r["seconds"] for r in rows)} for name, rows in prefill.items()}
    spinning = {}
    for load in ("idle", "one busy process"):
        busy = subprocess.Popen([sys.executable, "-c", BUSY]) if load != "idle" else None
        try:
            for spin in ("0", "1"):
                spinning[f"{load}, spinning {'on' if spin == '1' else 'off'}"] = run(DECODE, bundle, spin, str(THREADS))
        finally:
            if busy is not None:
                busy.kill()
    tok = Tokenizer.from_file(str(Path(bundle) / "tokenizer.json"))
    times = []
    for _ in range(20):
        t = time.perf_counter()
        tok.get_vocab_size(with_added_tokens=True)
        times.append(time.perf_counter() - t)
    result = {
        **machine(), "bundle": "gpt2-124m int8-weight",
        "prefill_900_tokens": prefill_summary, "prefill_runs": prefill,
        "decode_tokens_per_s": {k: v["decode_tokens_per_s"] for k, v in spinning.items()},
        "get_vocab_size_ms": 1000 * statistics.median(times), "vocab": tok.get_vocab_size(with_added_tokens=True),
        "decode_by_threads": thread_counts(bundles),
    }
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "prefill_runs"}, indent=1))


if __name__ == "__main__":
    main()
