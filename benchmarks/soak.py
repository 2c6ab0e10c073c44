"""Soak: does one loaded model hold up over a long session, under threads, and through cancellations?

Three measurements on one `Model` in one process, the way a desktop app embeds gptedge:
  1. 1,000 generations in a row (greedy, seeded sampling with filters and penalties, stop strings;
     prompts of several lengths, so KV buffers of several sizes are pooled and reused). RSS is sampled
     after a warm-up and every 100 generations; growth from warm-up to the end must stay below 5%.
     Every repeat of a greedy or seeded request must give the tokens of its first run.
  2. 8 threads x 50 generations at once, compared token for token with the same requests run
     sequentially, with both wall times.
  3. 100 generations cancelled mid-stream (closed, cancelled with a CancelToken, or dropped): the
     engine's KV pool must stay bounded, no KV cache may outlive its generation, RSS must not grow.

The model is a random-init GPT of the "small" preset's shape (4 layers, 4 heads, width 128,
context 256) with a byte-level BPE tokenizer trained on standard-library source, exported by
`gptedge.export` (fp32, in-place KV) and cached in benchmarks/.cache/soak-bundle; or pass --bundle.

    python benchmarks/soak.py [--bundle DIR] [--generations 1000] [--threads 2] [--json benchmarks/results/soak.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=256)
PROMPTS = [
    "def read_config(path):\n    ",
    "import os\nimport sys\n\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "for i in range(",
    "# Compute the greatest common divisor of two integers.\ndef gcd(a, b):\n" * 3,
    "x = {'a': 1, 'b': [1, 2, 3]}\nprint(",
    "你好，世界 😀 ",
    "while True:\n",
]
MAX_GROWTH_PCT = 5.0
POOL_LIMIT = 4


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# -- the model ---------------------------------------------------------------------------------------------
def build_bundle(folder: Path) -> Path:
    """Random-init GPT ("small" preset shape) + a tokenizer trained on stdlib source, exported once and cached."""
    if (folder / "gptedge.json").is_file():
        return folder
    import torch

    from gptedge.export.exporter import export_bundle
    from gptedge.train.checkpoint import save_checkpoint
    from gptedge.train.data import read_sources, stdlib_files
    from gptedge.train.model import GPT, GPTConfig
    from gptedge.train.tokenizer import train_tokenizer

    texts = read_sources(stdlib_files()[:200], max_bytes=1_000_000).training_texts()
    tok = train_tokenizer(texts, 2048)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), **SHAPE)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.06)  # larger than the usual init, so greedy output varies with the prompt
    ckpt = save_checkpoint(CACHE / "soak-checkpoint", model, {}, tok.to_str(), None, force=True)
    return export_bundle(ckpt, folder, force=True, progress=False)


def request(i: int) -> tuple[str, dict]:
    """The i-th request of the soak: a prompt and the sampling options, varied but repeatable."""
    prompt = PROMPTS[i % len(PROMPTS)]
    kind = (i // len(PROMPTS)) % 4
    if kind == 0:
        return prompt, dict(temperature=0.0, max_new_tokens=32, stop_token_ids=())
    if kind == 1:
        return prompt, dict(temperature=0.8, top_k=50, top_p=0.95, min_p=0.02, seed=i % 13, max_new_tokens=32,
                            stop_token_ids=())
    if kind == 2:
        return prompt, dict(temperature=0.7, repetition_penalty=1.3, frequency_penalty=0.2, seed=i % 7,
                            max_new_tokens=24, stop_token_ids=())
    return prompt, dict(temperature=0.0, max_new_tokens=48, stop_strings=("\n\n",), stop_token_ids=())


def key(prompt: str, options: dict) -> str:
    return json.dumps([prompt, options], sort_keys=True)


# -- 1. soak -------------------------------------------------------------------------------------------------
def soak(model, generations: int, warmup: int = 50, every: int = 100) -> dict:
    first: dict[str, list[int]] = {}
    for i in range(warmup):
        prompt, options = request(i)
        first[key(prompt, options)] = model.generate(prompt, **options).token_ids
    gc.collect()
    rss_warm = rss_mb()
    samples = [(0, rss_warm)]
    mismatches = tokens = 0
    start = time.perf_counter()
    for i in range(generations):
        prompt, options = request(i)
        result = model.generate(prompt, **options)
        tokens += len(result.token_ids)
        expected = first.setdefault(key(prompt, options), result.token_ids)
        mismatches += expected != result.token_ids
        if (i + 1) % every == 0:
            gc.collect()
            samples.append((i + 1, rss_mb()))
    seconds = time.perf_counter() - start
    rss_end = samples[-1][1]
    growth = 100 * (rss_end - rss_warm) / rss_warm
    return {
        "generations": generations, "tokens": tokens, "seconds": round(seconds, 2),
        "generations_per_s": round(generations / seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
        "rss_after_warmup_mb": round(rss_warm, 1), "rss_end_mb": round(rss_end, 1), "rss_growth_pct": round(growth, 2),
        "rss_samples_mb": [(n, round(r, 1)) for n, r in samples], "repeat_mismatches": mismatches,
        "distinct_requests": len(first), "passed": growth < MAX_GROWTH_PCT and mismatches == 0,
    }


# -- 2. threads ------------------------------------------------------------------------------------------------
def threaded(model, threads: int = 8, per_thread: int = 50, deadline_s: float = 600.0) -> dict:
    jobs = [[request(t * per_thread + i) for i in range(per_thread)] for t in range(threads)]
    start = time.perf_counter()
    expected = [[model.generate(p, **o).token_ids for p, o in thread] for thread in jobs]
    sequential_s = time.perf_counter() - start
    barrier = threading.Barrier(threads)

    def worker(thread_jobs):
        barrier.wait()
        return [model.generate(p, **o).token_ids for p, o in thread_jobs]

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(worker, j) for j in jobs]
        done, not_done = wait(futures, timeout=deadline_s)
    threaded_s = time.perf_counter() - start
    got = [f.result() for f in futures] if not not_done else []
    mismatches = sum(a != b for exp, out in zip(expected, got) for a, b in zip(exp, out))
    tokens = sum(len(t) for thread in expected for t in thread)
    return {
        "threads": threads, "generations": threads * per_thread, "tokens": tokens,
        "sequential_s": round(sequential_s, 2), "threaded_s": round(threaded_s, 2),
        "threaded_tokens_per_s": round(tokens / threaded_s, 1), "mismatches": mismatches,
        "deadlocked_threads": len(not_done), "passed": not not_done and mismatches == 0,
    }


# -- 3. cancellations --------------------------------------------------------------------------------------------
def _unpooled_caches(model) -> int:
    from gptedge.runtime.engine import KVCache

    gc.collect()
    return sum(type(o) is KVCache for o in gc.get_objects()) - sum(len(v) for v in model.engine._pool.values())


def _cancel_one(model, i: int) -> str:
    from gptedge.runtime import CancelToken

    prompt, _ = request(i)
    token = CancelToken() if i % 3 == 1 else None
    stream = model.stream(prompt, temperature=1.0, seed=i, max_new_tokens=128, stop_token_ids=(), cancel=token)
    for _ in zip(range(3), stream):
        pass
    if i % 3 == 0:
        stream.close()
    elif i % 3 == 1:
        token.cancel()
        for _ in stream:
            pass
    else:
        out = stream._out
        del stream  # dropped: the generator is finalized when its last reference goes
        return out[0].finish_reason
    return stream.result.finish_reason


def cancellations(model, n: int = 100, workers: int = 4) -> dict:
    for i in range(12):
        _cancel_one(model, i)
    rss_before, unpooled_before = rss_mb(), _unpooled_caches(model)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(lambda i: _cancel_one(model, i), range(n)))
    seconds = time.perf_counter() - start
    pool_sizes = {f"{b}x{c}": len(v) for (b, c), v in model.engine._pool.items()}
    leaked = _unpooled_caches(model) - unpooled_before
    rss_after = rss_mb()
    return {
        "cancelled": reasons.count("cancelled"), "of": n, "seconds": round(seconds, 2), "pool_sizes": pool_sizes,
        "leaked_kv_caches": leaked, "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_after, 1),
        "passed": reasons.count("cancelled") == n and leaked <= 0 and all(v <= POOL_LIMIT for v in pool_sizes.values())
                  and rss_after - rss_before < 8,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None,
                        help="bundle to soak (default: build the cached random 'small' bundle)")
    parser.add_argument("--generations", type=int, default=1000, help="generations in the soak")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "soak.json", help="where to write the results")
    args = parser.parse_args()

    from gptedge.runtime import Model

    bundle = args.bundle or build_bundle(CACHE / "soak-bundle")
    model = Model.load(bundle, provider="cpu", threads=args.threads)
    a = model.spec.architecture
    print(f"soak: {bundle} ({a.n_layer} layers, width {a.n_embd}, vocab {a.vocab_size}, context {a.context_length}), "
          f"{args.threads} intra-op threads, {platform.processor() or platform.machine()}", flush=True)
    results = {"bundle": str(bundle), "architecture": vars(a), "intra_op_threads": args.threads,
               "soak": soak(model, args.generations)}
    results["threaded"] = threaded(model)
    results["cancellations"] = cancellations(model)
    s, t, c = results["soak"], results["threaded"], results["cancellations"]
    rows = [
        ("soak",
         f"{s['generations']} generations, {s['tokens']} tokens in {s['seconds']} s ({s['tokens_per_s']} tok/s)",
         f"RSS {s['rss_after_warmup_mb']} -> {s['rss_end_mb']} MB "
         f"({s['rss_growth_pct']:+.2f}%, limit {MAX_GROWTH_PCT}%); repeat mismatches {s['repeat_mismatches']}",
         s["passed"]),
        ("threads", f"{t['threads']} x {t['generations'] // t['threads']} generations: {t['threaded_s']} s threaded, "
                    f"{t['sequential_s']} s sequential",
         f"mismatches {t['mismatches']}, deadlocked threads {t['deadlocked_threads']}", t["passed"]),
        ("cancel", f"{c['cancelled']}/{c['of']} cancelled mid-stream in {c['seconds']} s",
         f"pool {c['pool_sizes']}, leaked KV caches {c['leaked_kv_caches']}, "
         f"RSS {c['rss_before_mb']} -> {c['rss_after_mb']} MB", c["passed"]),
    ]
    width = max(len(r[1]) for r in rows)
    print(f"{'check':<8}  {'work'.ljust(width)}  {'result':<70}  ok")
    for name, work, result, ok in rows:
        print(f"{name:<8}  {work.ljust(width)}  {result:<70}  {'yes' if ok else 'NO'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
