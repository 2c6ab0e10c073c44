"""`gptedge demo`: the whole journey on the embedded default corpus, into one folder you keep.

    OUT/checkpoint     a small GPT trained on the Python standard library's own source
    OUT/bundle-fp32    its verified ONNX export
    OUT/bundle-int8    the INT8 bundle that passed the quality gate
    OUT/heldout.txt    standard-library source the model never trained on (for the gate and `gptedge eval`)

Each stage is skipped when its output already exists (outputs are written atomically, so an
existing folder is complete); `--fresh` redoes everything. Afterwards:
`gptedge generate OUT/bundle-int8 "def "`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELDOUT_BYTES = 120_000
PROMPT = "def read_config(path):\n    "
NEXT_PROMPT = "for i in range("


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--out", default="gptedge-demo", metavar="DIR",
                        help="folder for every output (kept; reused on re-runs)")
    parser.add_argument("--preset", default="small", metavar="NAME",
                        help="model size to train (tiny: seconds; small: minutes)")
    parser.add_argument("--steps", type=int, metavar="N", help="training steps (default: the preset's)")
    parser.add_argument("--method", default="auto", metavar="METHOD",
                        help="quantization recipe (auto picks the fastest INT8 recipe for CPU)")
    parser.add_argument("--prompt", default=PROMPT, help="Python prompt whose completion is streamed")
    parser.add_argument("--max-new-tokens", type=int, default=96, metavar="N",
                        help="tokens to generate for the completion")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed of the streamed completion (same seed, same text)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for inference (default: 1 for a model under 16 MB, else physical cores)")
    parser.add_argument("--fresh", action="store_true", help="redo every stage even where its output exists")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _stage(title: str) -> None:
    print(f"\n== {title}", flush=True)


def heldout_text(max_bytes: int = HELDOUT_BYTES) -> str:
    """Standard-library files from the end of the sorted list: training reads from the start and stops at its cap."""
    from gptedge.train.data import stdlib_files

    parts: list[str] = []
    size = 0
    for path in reversed(stdlib_files()):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text.encode())
        if size >= max_bytes:
            break
    return "\n".join(parts)


def _speed_row(label: str, model, prompt_ids: list[int], new_tokens: int) -> str:
    model.generate(prompt_ids, max_new_tokens=8, temperature=0.0, stop_token_ids=())  # warm-up
    result = model.generate(prompt_ids, max_new_tokens=new_tokens, temperature=0.0, stop_token_ids=())
    t = result.timings
    return f"| {label} | {model.load_seconds:.2f} | {t.ttft_s * 1000:.0f} | {t.decode_tokens_per_s:.1f} |"


def run(args: argparse.Namespace, command: str) -> int:
    from gptedge.export.exporter import export_bundle
    from gptedge.quantize.quantizer import quantize_bundle
    from gptedge.runtime import Model
    from gptedge.train.checkpoint import is_checkpoint
    from gptedge.train.cli import summary
    from gptedge.train.trainer import TrainConfig, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    checkpoint, fp32, int8, heldout = out / "checkpoint", out / "bundle-fp32", out / "bundle-int8", out / "heldout.txt"
    started = time.perf_counter()

    _stage(f"1/5 train ({args.preset} preset, Python standard library source)")
    if is_checkpoint(checkpoint) and not args.fresh:
        print(f"reusing {checkpoint} (pass --fresh to retrain)")
    else:
        train(TrainConfig(out=str(checkpoint), preset=args.preset, steps=args.steps, force=True, progress=progress))
    print(summary(checkpoint))

    _stage("2/5 export to ONNX (verified against PyTorch)")
    if (fp32 / "gptedge.json").exists() and not args.fresh:
        print(f"reusing {fp32}")
    else:
        export_bundle(checkpoint, fp32, target="cpu", force=True, progress=progress)
    if not heldout.exists() or args.fresh:
        heldout.write_text(heldout_text(), encoding="utf-8")

    _stage("3/5 quantize to INT8 (gated on held-out perplexity)")
    reuse = (int8 / "gptedge.json").exists() and not args.fresh
    if reuse:
        print(f"reusing {int8}")
    else:  # quantize_bundle prints its own table of what it measured
        quantize_bundle(fp32, int8, method=args.method, eval_text=str(heldout), force=True, progress=progress)
    model = Model.load(int8, provider="cpu", threads=args.threads)
    if reuse:
        print(quality_table(model.spec.quantization or {}))

    _stage("4/5 stream a completion (INT8)")
    print(args.prompt, end="", flush=True)
    # A small model left to greedy decoding loops; light sampling with a repetition penalty reads better.
    for piece in model.stream(args.prompt, max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=0.95,
                              repetition_penalty=1.15, seed=args.seed):
        print(piece, end="", flush=True)
    print()
    print(f"\nnext-token table after {NEXT_PROMPT!r}:")
    print(next_table(model.next_tokens(NEXT_PROMPT, 5)))

    _stage("5/5 speed, fp32 against INT8 (CPU)")
    float_model = Model.load(fp32, provider="cpu", threads=args.threads)
    ids = model.encode(heldout.read_text(encoding="utf-8"))[:128]
    new = min(128, model.context_length - len(ids))
    print("| bundle | load s | time to first token ms | decode tokens/s |\n|---|---|---|---|")
    print(_speed_row("fp32", float_model, ids, new))
    print(_speed_row("int8", model, ids, new))
    print(f"\ndone in {time.perf_counter() - started:.0f} s. Everything is in {out}/; try:\n"
          f"  gptedge generate {int8} \"import os\\n\"\n  gptedge next {int8} \"class \"\n"
          f"  gptedge eval {int8} {heldout}")
    return 0


def quality_table(quantization: dict) -> str:
    """The gate's measurements as stored in the bundle's gptedge.json."""
    q = quantization.get("quality", {})
    if not q:
        return "(this bundle records no quality report)"
    size = quantization.get("model_bytes", 0) / max(quantization.get("source_model_bytes", 1), 1)
    return "\n".join([
        "| bundle | perplexity | change | top-1 agreement | greedy agreement | model size |",
        "|---|---|---|---|---|---|",
        f"| fp32 | {q['float_ppl']:.3f} | - | - | - | 100% |",
        f"| {quantization.get('method', '?')} | {q['quantized_ppl']:.3f} | {q['ppl_increase_pct']:+.2f}% | "
        f"{q['top1_agreement']:.1%} | {q['greedy_agreement']:.1%} | {size:.0%} |",
    ])


def next_table(rows: list[tuple[str, int, float]]) -> str:
    lines = ["| rank | token | id | probability |", "|---|---|---|---|"]
    lines += [f"| {i} | {text!r} | {tid} | {p:.3f} |" for i, (text, tid, p) in enumerate(rows, 1)]
    return "\n".join(lines)

