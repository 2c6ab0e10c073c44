"""Decode speed early vs late in the context: proof that a step does not copy the KV cache.

With an in-place KV cache a decode step costs the weights (fixed) plus attention over the positions
so far (grows slowly); a runtime that copies or concatenates the cache per step slows down roughly
in proportion to the position. The target: tokens/s at position ~900 >= 80% of tokens/s at ~50.

Model: GPT-2-124M shaped (12 layers, 12 heads, n_embd 768, vocab 50257, context 1024), random init
with a fixed seed, exported by `gptedge.export` (fp32, target cpu) and cached under
benchmarks/.cache. Prompts are random token ids; greedy decoding with stop tokens off, through
`Model.generate` (sampling and detokenization included, as a user sees it).

    python benchmarks/decode_position.py [--threads 2] [--tokens 64] [--runs 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
CONFIG = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)


def synthetic_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with exactly `vocab_size` ids (bytes, <|endoftext|>, then filler tokens).

    The benchmark feeds token ids, but generated ids are decoded for streaming, so every id must exist.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    i = 0
    while len(vocab) < vocab_size:
        vocab[f"t{i}"] = len(vocab)
        i += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def build_bundle(folder: Path) -> Path:
    """Random GPT-2-124M-shaped checkpoint -> verified bundle (minutes, once; then cached)."""
    if (folder / "gptedge.json").is_file():
        return folder
    import torch

    from gptedge.export.exporter import export_bundle
    from gptedge.train.checkpoint import save_checkpoint
    from gptedge.train.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(Path(tmp) / "ckpt", model, {}, synthetic_tokenizer(CONFIG["vocab_size"]).to_str(), None)
        export_bundle(ckpt, folder, target="cpu", force=True)
    return folder


def measure(bundle: Path, threads: int, positions: list[int], tokens: int, runs: int) -> dict:
    import numpy as np

    from gptedge.runtime import Model

    with tempfile.TemporaryDirectory() as graph_cache:
        os.environ["GPTEDGE_CACHE"] = graph_cache  # a cold cache, so "first load" is really the first
        start = time.perf_counter()
        first = Model.load(bundle, provider="cpu", threads=threads)
        load_first = time.perf_counter() - start
        del first
        start = time.perf_counter()
        model = Model.load(bundle, provider="cpu", threads=threads)
        load_second = time.perf_counter() - start
        cache_status = model.session_info.cache
    ids = np.random.default_rng(0).integers(0, CONFIG["vocab_size"] - 1, 1024).tolist()
    greedy = dict(temperature=0.0, stop_token_ids=(), max_new_tokens=tokens)
    model.generate(ids[:16], **{**greedy, "max_new_tokens": 8})  # warm-up
    ttft = [model.generate(ids[:128], **{**greedy, "max_new_tokens": 2}).timings.ttft_s for _ in range(runs)]
    rows = []
    for position in positions:
        if position + tokens > model.context_length:
            raise SystemExit(f"position {position} + {tokens} tokens exceed the context {model.context_length}")
        rates = [model.generate(ids[:position], **greedy).timings.decode_tokens_per_s for _ in range(runs)]
        rows.append({"position": position, "tokens": tokens, "tokens_per_s": statistics.median(rates), "runs": rates})
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["relative"] = row["tokens_per_s"] / base
    return {
        "model": CONFIG, "threads": threads, "load_first_s": load_first, "load_second_s": load_second,
        "second_load_graph_cache": cache_status, "ttft_128_ms": statistics.median(ttft) * 1000,
        "decode": rows, "target": "tokens/s at the last position >= 0.8 x at the first",
        "target_met": rows[-1]["relative"] >= 0.8,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--positions", type=int, nargs="+", default=[50, 900], help="positions where decoding starts")
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per measurement")
    parser.add_argument("--runs", type=int, default=3, help="repetitions; the median is reported")
    parser.add_argument("--bundle", type=Path, default=CACHE / "gpt2-124m-random-fp32",
                        help="bundle folder (built if missing)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "decode_position.json",
                        help="where to write the results")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    bundle = build_bundle(args.bundle)
    r = measure(bundle, args.threads, args.positions, args.tokens, args.runs)
    print(f"GPT-2-124M shape, fp32, CPU, {args.threads} threads; load {r['load_first_s']:.2f} s cold, "
          f"{r['load_second_s']:.2f} s with the optimized-graph cache ({r['second_load_graph_cache']}); "
          f"TTFT (128-token prompt) {r['ttft_128_ms']:.1f} ms")
    print("| decode from position | tokens | tokens/s | vs first |")
    print("|---|---|---|---|")
    for row in r["decode"]:
        print(f"| {row['position']} | {row['tokens']} | {row['tokens_per_s']:.1f} | {row['relative']:.0%} |")
    print(f"target (>= 80% at the last position): {'met' if r['target_met'] else 'NOT met'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0 if r["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
