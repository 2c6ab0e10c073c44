"""Which quantization recipe decodes fastest on this machine? The evidence behind `--method auto`.

    python benchmarks/quantize_methods.py [--work DIR] [--out DIR] [--rounds 6] [--steps 32] [--only LABEL ...]

One GPT-2-124M-shaped random bundle (benchmarks/common.py's make_random_gpt2, exported by
gptedge.export), quantized by every recipe and by the variants that decide the defaults
(LM head float or INT8, embedding sharing the head's blocks or not, MatMulNBits compute
precision, block size), all run through the runtime's Engine (in-place KV cache, argmax in numpy,
2 threads), so the rows differ only in the graph.

Speed is measured with every variant loaded in one process, alternating between them for
`--rounds` rounds (a 128-token prefill and `--steps` decode steps each): on a shared 2-core
machine, background load then hits every row alike, where fresh-process runs one after another
gave min-max spreads of 3x. Load time and peak RSS come from one fresh process per variant
(`--child`: load, then a 128 + 128 generation).

Results: benchmarks/results/quantize-methods.json and .md (the machine's CPU model, core count and
library versions recorded with the rows). The comments and `--method auto` rationale in
gptedge.quantize cite that file instead of repeating its numbers. A run with --only measures a subset
and writes to the work folder unless --out is given, so it never replaces the full committed table.

Random weights make quality meaningless here (near-flat logits); quality is measured by
`gptedge quantize`'s gate on a trained model. This script measures speed and size only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

# run as a script: its folder is on the path
from common import NEW_TOKENS, PROMPT_LEN, THREADS, emit, machine, peak_rss_mb, pin_threads, prompt_ids

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RESULT_STEM = "quantize-methods"  # benchmarks/results/quantize-methods.{json,md}: cited by gptedge.quantize

# label -> (method, build options). "int8-weight" is the default build (block 128 at this width); the
# block rows are the evidence for recipes.DEFAULT_BLOCK_SIZE.
VARIANTS: dict[str, tuple[str, dict]] = {
    "int8-weight": ("int8-weight", {}),
    "int8-weight, LM head fp32": ("int8-weight", {"quantize_lm_head": False}),
    "int8-weight, float embeddings": ("int8-weight", {"float_embeddings": True}),
    "int8-weight, block 64": ("int8-weight", {"block_size": 64}),
    "int8-weight, block 32": ("int8-weight", {"block_size": 32}),
    "int8-dynamic": ("int8-dynamic", {}),
    "int8-static": ("int8-static", {}),
    "int4-weight": ("int4-weight", {}),
}
# Measured on request only (--only): minutes per row on 2 cores.
SLOW_VARIANTS: dict[str, tuple[str, dict]] = {
    "int8-weight, fp32 compute (accuracy_level 0)": ("int8-weight", {"accuracy_level": 0}),
}


def _log(message: str) -> None:
    print(f"[quantize_methods] {message}", file=sys.stderr, flush=True)


def prepare(work: Path, only: list[str] | None) -> dict[str, Path]:
    """The fp32 bundle and one bundle per variant (built once, reused by later runs)."""
    from common import make_random_gpt2
    from gptedge.export.exporter import export_bundle
    from gptedge.quantize.quantizer import build_quantized_model
    from gptedge.runtime.bundle import MODEL_NAME, TOKENIZER_NAME, read_spec, write_spec

    hf = make_random_gpt2(work / "hf-gpt2-random")
    fp32 = work / "fp32"
    if not fp32.exists():
        _log("exporting the fp32 bundle")
        export_bundle(hf, fp32, target="cpu", dtype="fp32", progress=False)
    spec = read_spec(fp32)
    bundles = {"fp32": fp32}
    windows = [np.asarray(prompt_ids(128, spec.architecture.vocab_size, seed=s), np.int64) for s in range(8)]
    for label, (method, options) in {**VARIANTS, **SLOW_VARIANTS}.items():
        if (only and label not in only) or (not only and label in SLOW_VARIANTS):
            continue
        out = work / label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        if not out.exists():
            _log(f"building {label}")
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            details = build_quantized_model(fp32 / MODEL_NAME, spec, method, tmp, calibration_windows=windows,
                                            **options)
            shutil.copy2(fp32 / TOKENIZER_NAME, tmp / TOKENIZER_NAME)
            write_spec(tmp, replace(spec, quantization={**details, "benchmark_only": True}, files={}))
            tmp.rename(out)
        bundles[label] = out
    return bundles


def _engine(bundle: Path):
    from gptedge.runtime.bundle import MODEL_NAME, read_spec
    from gptedge.runtime.model import make_engine
    from gptedge.runtime.providers import choose_provider, create_session

    spec = read_spec(bundle, verify_checksums=False)
    choice = choose_provider("cpu", spec)
    session, info = create_session(bundle / MODEL_NAME, choice, THREADS, None)
    return make_engine(session, spec, info.choice)


def child(bundle: Path) -> None:
    """Fresh process: load time and peak RSS after one 128 + 128 generation (one JSON line)."""
    pin_threads()
    start = time.perf_counter()
    engine = _engine(bundle)
    load_s = time.perf_counter() - start
    ids = np.array([prompt_ids(PROMPT_LEN, engine.arch.vocab_size)])
    cache = engine.new_cache(1, PROMPT_LEN + NEW_TOKENS)
    logits = engine.forward(cache, ids)
    for _ in range(NEW_TOKENS - 1):
        logits = engine.forward(cache, logits[:, -1].argmax(-1).reshape(1, 1))
    emit({"load_s": load_s, "peak_rss_mb": peak_rss_mb()})


def interleaved(bundles: dict[str, Path], rounds: int, steps: int) -> dict[str, dict]:
    """Every variant loaded in this process; rounds alternate between them so machine noise hits all alike.

    Per round and variant: one 128-token prefill (from an empty cache) and `steps` single-token decode
    steps after it, each timed. Returns per variant the median prefill time, median and 25th-percentile
    decode step time, and the greedy tokens of the last round.
    """
    pin_threads()
    engines = {label: _engine(b) for label, b in bundles.items()}
    prompt = np.array([prompt_ids(PROMPT_LEN, next(iter(engines.values())).arch.vocab_size)])
    prefill: dict[str, list[float]] = {k: [] for k in engines}
    step: dict[str, list[float]] = {k: [] for k in engines}
    tokens: dict[str, list[int]] = {}
    for r in range(rounds + 1):  # round 0 warms every session up and is not counted
        for label, engine in engines.items():
            cache = engine.new_cache(1, PROMPT_LEN + steps + 1)
            t = time.perf_counter()
            logits = engine.forward(cache, prompt)
            if r:
                prefill[label].append(time.perf_counter() - t)
            out = []
            for _ in range(steps):
                out.append(int(logits[0, -1].argmax()))
                t = time.perf_counter()
                logits = engine.forward(cache, np.array([[out[-1]]]))
                if r:
                    step[label].append(time.perf_counter() - t)
            tokens[label] = out
            engine.release(cache)
        _log(f"round {r}/{rounds} done")
    return {label: {"prefill_ms": 1e3 * float(np.median(prefill[label])),
                    "step_ms": 1e3 * float(np.median(step[label])),
                    "step_ms_p25": 1e3 * float(np.percentile(step[label], 25)), "tokens": tokens[label]}
            for label in engines}


def run_child(bundle: Path, env: dict) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(bundle)], capture_output=True,
                          text=True, cwd=HERE, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{bundle.name} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return json.loads(lines[-1][4:])


def model_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx")) / 1e6


def machine_meta(args: argparse.Namespace) -> dict:
    """Where and how the rows were measured: CPU, cores, library versions, workload."""
    return {**machine(), "rounds": args.rounds, "steps": args.steps, "prompt_tokens": PROMPT_LEN,
            "shape": "GPT-2-124M (random weights, benchmarks/common.py make_random_gpt2)"}


def markdown(rows: list[dict], meta: dict, steps: int) -> str:
    """The results as a table, with the machine line under it."""
    lines = ["| variant | block | decode tok/s (median step) | decode tok/s (p25 step) | prefill 128 tok ms | load s | "
             "peak RSS MB | model MB | greedy = fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['block_size'] or '-'} | **{r['decode_tps']:.1f}** | "
                     f"{r['decode_tps_p25_step']:.1f} | {r['prefill_128_ms']:.0f} | {r['load_s']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['model_mb']:.1f} | first {r['tokens_vs_fp32']}/{steps} |")
    lines += ["", f"{meta['shape']}; {meta['threads']} threads, interleaved, medians of {meta['rounds']} rounds; "
                  f"machine: {meta['machine']}; onnxruntime {meta['versions']['onnxruntime']}; {meta['time']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "gptedge-quantize-bench",
                        help="folder for the bundles (reused between runs)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for {RESULT_STEM}.json and .md (default: {RESULTS}; with --only: the work "
                             "folder)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds over all variants (medians reported)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per round and variant")
    parser.add_argument("--only", nargs="+", help="measure only these variant labels (plus fp32)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    args.work.mkdir(parents=True, exist_ok=True)
    bundles = prepare(args.work, args.only)
    env = {**os.environ, "GPTEDGE_CACHE": str(args.work / "graph-cache")}
    fresh = {label: run_child(b, env) for label, b in bundles.items()}
    speed = interleaved(bundles, args.rounds, args.steps)
    reference = speed["fp32"]["tokens"]
    rows = []
    for label in bundles:
        s, f = speed[label], fresh[label]
        same = next((k for k, (a, b) in enumerate(zip(s["tokens"], reference)) if a != b), len(reference))
        quantization = json.loads((bundles[label] / "gptedge.json").read_text()).get("quantization") or {}
        rows.append({"variant": label, "method": quantization.get("method", "fp32"), "kind": quantization.get("kind"),
                     "block_size": quantization.get("block_size"), "decode_tps": 1e3 / s["step_ms"],
                     "decode_tps_p25_step": 1e3 / s["step_ms_p25"], "step_ms": s["step_ms"],
                     "prefill_128_ms": s["prefill_ms"], "load_s": f["load_s"], "peak_rss_mb": f["peak_rss_mb"],
                     "model_mb": model_mb(bundles[label]), "tokens_vs_fp32": same})
    meta = machine_meta(args)
    out = args.out or (args.work if args.only else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, meta, len(reference))
    (out / f"{RESULT_STEM}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / f"{RESULT_STEM}.md").write_text(table)
    print(table)
    _log(f"wrote {out / RESULT_STEM}.json and .md")


if __name__ == "__main__":
    main()
