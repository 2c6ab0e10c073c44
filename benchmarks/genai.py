"""gptedge's runtime and onnxruntime-genai on the very same bundle: `python benchmarks/genai.py`.

For the GPT-2-124M-shape bundles (random weights, fp32 / INT8 / INT4 weight-only) with the genai files that
`gptedge export --genai` writes (gptedge.quantize.genai), each row in a fresh process, rounds interleaved:

- decode tok/s and time to first token for a 128-token prompt and 128 greedy tokens, both runtimes, 2 threads;
- greedy ids of the two runtimes over those 128 tokens (they run the same nodes: they must agree);
- why genai gets a graph of its own: gptedge's prefill with logits for the last position only (its contract)
  against logits for every position (genai's, which preallocates [B, S, V]), the same model.onnx;
- genai's own tokenizer (onnxruntime-extensions) against `tokenizers` on lines of standard-library text.

Writes benchmarks/results/genai-gpt2-124m.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import HERE, NEW_TOKENS, PROMPT_LEN, THREADS, emit, machine, make_random_gpt2, peak_rss_mb, pin_threads
from common import prompt_ids as random_ids
from peers import CACHE, prepare_gptedge

RESULTS = HERE / "results"
KINDS = {"fp32": "fp32", "int8": "int8-weight", "int4": "int4-weight"}
# genai's onnxruntime threads spin between steps (onnxruntime's default); gptedge's spin briefly unless asked (--spin).
RUNTIMES = ("gptedge", "gptedge --spin", "onnxruntime-genai")


def with_genai(bundle: Path, dest: Path) -> Path:
    """A copy of `bundle` with the genai files, written and checked as `export --genai` does. (A copy, not hard
    links: onnx refuses external data with several links, and quantizing the source would then fail.)"""
    from gptedge.quantize.genai import add_genai, has_genai
    from gptedge.runtime.bundle import read_spec, write_spec

    if has_genai(dest):
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in bundle.iterdir():
        shutil.copy2(f, tmp / f.name)
    spec = read_spec(tmp)
    add_genai(tmp, spec, random_ids(64, spec.architecture.vocab_size))
    write_spec(tmp, spec)
    tmp.rename(dest)
    return dest


def row_gptedge(bundle: Path, spin: bool | None = None) -> dict:
    from gptedge.runtime import Model

    start = time.perf_counter()
    # Every generation here is a cold prompt, as genai's are: no stored prompt prefixes (gptedge.runtime.prefix)
    model = Model.load(bundle, provider="cpu", threads=THREADS, spin=spin, prefix_cache_mb=0)
    load_s = time.perf_counter() - start
    ids = random_ids(PROMPT_LEN, model.spec.architecture.vocab_size)
    model.generate(ids, max_new_tokens=8, temperature=0.0, stop_token_ids=())  # warm-up
    r = model.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=())
    return {"load_s": load_s, "ttft_ms": 1000 * r.timings.ttft_s, "decode_tps": r.timings.decode_tokens_per_s,
            "tokens": r.token_ids, "peak_rss_mb": peak_rss_mb(), **prefill_logits_cost(bundle, ids)}


def prefill_logits_cost(bundle: Path, ids: list[int], reps: int = 5) -> dict:
    """model.onnx's 128-token prefill with logits for the last position (gptedge) and for all (genai's contract)."""
    import numpy as np
    import onnxruntime as ort

    from gptedge.runtime.bundle import read_spec

    spec = read_spec(bundle, verify_checksums=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"])
    a, io, S = spec.architecture, spec.io, len(ids)
    base = {io.input_ids: np.array([ids], np.int64), io.position_ids: np.arange(S)[None, :],
            io.seqlens_k: np.array([S - 1], np.int32), io.total_sequence_length: np.array(S, np.int32),
            **{n: np.zeros((1, a.n_kv_head, S, a.head_dim), np.float32) for n in io.past_names(a.n_layer)}}
    out = {}
    for label, index in (("prefill_last_logits_ms", [[S - 1]]), ("prefill_all_logits_ms", [list(range(S))])):
        feed = {**base, io.logits_index: np.array(index, np.int64)}
        session.run(None, feed)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            session.run(None, feed)
            times.append(1000 * (time.perf_counter() - t))
        out[label] = statistics.median(times)
    return out


def row_genai(bundle: Path) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    start = time.perf_counter()
    config = og.Config(str(bundle))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": THREADS}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - start
    vocab = json.loads((bundle / "genai_config.json").read_text())["model"]["vocab_size"]
    ids = random_ids(PROMPT_LEN, vocab)

    def run(new: int) -> tuple[list[int], list[float], float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=PROMPT_LEN + new, min_length=PROMPT_LEN + new, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(np.array(ids, np.int32))
        tokens, stamps = [], []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            stamps.append(time.perf_counter())
        return tokens, stamps, start

    run(8)  # warm-up
    tokens, stamps, start = run(NEW_TOKENS)
    return {"load_s": load_s, "ttft_ms": 1000 * (stamps[0] - start),
            "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "tokens": tokens,
            "peak_rss_mb": peak_rss_mb(), **tokenizer_agreement(model, bundle)}


def tokenizer_agreement(model, bundle: Path) -> dict:
    """Lines of standard-library text on which genai's tokenizer gives the ids `tokenizers` gives: the bundle's own
    (GPT-2-style byte-level BPE) and one `gptedge train` would write (byte-level BPE after a CJK split)."""
    import tempfile

    import onnxruntime_genai as og
    from tokenizers import Tokenizer

    from gptedge.demo import heldout_text
    from gptedge.train.tokenizer import train_tokenizer

    text = heldout_text(60_000)
    lines = [line for line in text.splitlines() if line.strip()]

    def equal(theirs, ours) -> int:
        return sum([int(t) for t in theirs.encode(line)] == ours.encode(line).ids for line in lines)

    out = {"tokenizer_lines": len(lines),
           "tokenizer_lines_equal": equal(og.Tokenizer(model), Tokenizer.from_file(str(bundle / "tokenizer.json")))}
    with tempfile.TemporaryDirectory() as tmp:  # the same bundle, with a gptedge-trained tokenizer beside it
        for f in bundle.iterdir():
            (Path(tmp) / f.name).symlink_to(f.resolve())
        (Path(tmp) / "tokenizer.json").unlink()
        trained = train_tokenizer([text], 2048)
        trained.save(str(Path(tmp) / "tokenizer.json"))
        out["trained_tokenizer_lines_equal"] = equal(og.Tokenizer(og.Model(tmp)), trained)
    return out


def run_row(runtime: str, bundle: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--row", runtime, "--bundle", str(bundle)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = next((x for x in out.stdout.splitlines() if x.startswith("ROW ")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"{runtime} row failed on {bundle.name}: {out.stderr[-2000:]}")
    return json.loads(line[4:])


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["| bundle | runtime | decode tok/s | TTFT ms (128 tokens) | load s | peak RSS MB | greedy ids = gptedge |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['runtime']} | **{r['decode_tps']:.1f}** | {r['ttft_ms']:.0f} | "
                     f"{r['load_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['same_ids']} |")
    lines += ["", "Why genai has its own graph: model.onnx's 128-token prefill, logits for the last position "
              "(gptedge's contract) vs every position (genai's):", ""]
    for r in rows:
        if r["runtime"] == "gptedge" and "prefill_last_logits_ms" in r:
            lines.append(f"- {r['kind']}: {r['prefill_last_logits_ms']:.0f} ms vs {r['prefill_all_logits_ms']:.0f} ms")
    t = next(r for r in rows if r["runtime"] == "onnxruntime-genai")
    lines += ["", f"genai's tokenizer gave `tokenizers`' ids on {t['tokenizer_lines_equal']:.0f} of "
              f"{t['tokenizer_lines']:.0f} lines of standard-library text with the bundles' GPT-2-style tokenizer, "
              f"and on {t['trained_tokenizer_lines_equal']:.0f} of them with a tokenizer `gptedge train` writes "
              "(2,048 entries, CJK split before the byte-level BPE).", "",
              f"GPT-2-124M shape, random weights; {meta['threads']} threads; {PROMPT_LEN}-token prompt, {NEW_TOKENS} "
              f"greedy tokens; medians of {meta['rounds']} interleaved fresh-process rounds (min-max in the JSON); "
              f"machine: {meta['machine']} ({' '.join(meta['cpu_flags'])}); onnxruntime "
              f"{meta['versions'].get('onnxruntime')}, onnxruntime-genai {meta['versions'].get('onnxruntime-genai')}; "
              f"{meta['time']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kinds", nargs="*", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--row", choices=RUNTIMES, help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    pin_threads()
    if args.row:
        emit({"gptedge": row_gptedge, "gptedge --spin": lambda b: row_gptedge(b, spin=True),
              "onnxruntime-genai": row_genai}[args.row](args.bundle))
        return
    root = CACHE / "gpt2-124m"
    methods = [KINDS[k] for k in args.kinds if k != "fp32"]
    sources = prepare_gptedge(make_random_gpt2(root / "hf"), root, methods, None)
    bundles = {k: with_genai(sources[KINDS[k]], root / f"genai-{KINDS[k]}") for k in args.kinds}
    raw: dict[tuple[str, str], list[dict]] = {}
    for n in range(args.rounds):
        for kind, bundle in bundles.items():
            for runtime in RUNTIMES:
                print(f"round {n + 1}/{args.rounds}: {kind} {runtime}", file=sys.stderr, flush=True)
                raw.setdefault((kind, runtime), []).append(run_row(runtime, bundle))
    rows = []
    for (kind, runtime), runs in raw.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
        spread = {k: [min(r[k] for r in runs), max(r[k] for r in runs)] for k in ("decode_tps", "ttft_ms")}
        ours = raw[(kind, "gptedge")][0]["tokens"]
        same = sum(a == b for a, b in zip(runs[0]["tokens"], ours))
        rows.append({"kind": kind, "runtime": runtime, **med, "min_max": spread,
                     "same_ids": f"{same}/{len(ours)}" if runtime != "gptedge" else "-"})
    meta = {**machine(), "rounds": args.rounds, "shape": "GPT-2-124M (random weights, make_random_gpt2)"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "genai-gpt2-124m.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows, meta)
    (RESULTS / "genai-gpt2-124m.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
