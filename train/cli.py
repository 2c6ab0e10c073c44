"""`gptedge train`: train a tokenizer and a GPT, resume a run, or fine-tune from a checkpoint.

Also runnable as `python -m gptedge.train.cli ARGS` so that torchrun can start
it once per process:  torchrun --nproc_per_node 2 -m gptedge.train.cli --out run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gptedge.train.trainer import TrainConfig


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    # Options not given stay absent (SUPPRESS), so the preset or the resumed checkpoint decides, and the
    # help text says so instead of printing "(default: None)".
    parser.argument_default = argparse.SUPPRESS
    parser.add_argument("data", nargs="*", metavar="DATA",
                        help="text files, folders (recursive), globs, or .jsonl files of {\"prompt\", \"completion\"} "
                             "(loss on completions only); none: the Python standard library's source")
    parser.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to write")
    parser.add_argument("--preset", metavar="NAME",
                        help="model size with matching training settings: tiny (seconds, for tests), small (minutes on "
                             "a laptop CPU; default), gpt2 (124M, for GPUs); tiny-llama and small-llama are the same "
                             "sizes as Llama-style models (rotary positions, RMSNorm, SwiGLU, grouped KV heads)")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="optimizer steps of the whole run (default: the preset's)")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help="windows per forward pass on each process (default: the preset's)")
    parser.add_argument("--grad-accum", type=int, metavar="N",
                        help="micro-batches accumulated into one step (default: the preset's)")
    parser.add_argument("--block-size", type=int, metavar="N",
                        help="context length in tokens (default: the preset's); when fine-tuning, the training window "
                             "(at most the model's context; default: the checkpoint's context, 256 for an imported "
                             "model)")
    parser.add_argument("--vocab-size", type=int, metavar="N",
                        help="tokenizer vocabulary to train (default: the preset's)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the preset's; smaller when fine-tuning)")
    parser.add_argument("--warmup", type=int, metavar="N",
                        help="linear warmup steps before the cosine decay (default: the preset's)")
    parser.add_argument("--dropout", type=float, help="dropout while training (default: 0)")
    parser.add_argument("--eval-every", type=int, metavar="N",
                        help="validation loss and a checkpoint every N steps; 0: only at the end "
                             "(default: the preset's)")
    parser.add_argument("--eval-batches", type=int, metavar="N", help="batches per validation (default: the preset's)")
    parser.add_argument("--resume", metavar="CKPT",
                        help="continue this checkpoint's run exactly (use a larger --steps to extend it)")
    parser.add_argument("--init-from", metavar="MODEL",
                        help="fine-tune: start from this model's weights and tokenizer (a gptedge checkpoint, a local "
                             "Hugging Face folder or a GGUF file), fresh optimizer, step 0; its chat template, special "
                             "tokens and generation defaults travel on to the exported bundle")
    parser.add_argument("--lora-rank", type=int, metavar="R",
                        help="train LoRA adapters of rank R on the frozen model instead of every weight (export merges "
                             "them; RUN/adapter.safetensors holds them alone)")
    parser.add_argument("--lora-alpha", type=float, help="scale of the adapters' update: alpha / rank (default: 16)")
    parser.add_argument("--lora-targets", choices=["attention", "mlp", "all"],
                        help="projections that get adapters (default: all)")
    parser.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default: 0)")
    parser.add_argument("--adapter", metavar="FILE",
                        help="put these adapters (a LoRA run's adapter.safetensors) on the --init-from model and train "
                             "them further")
    parser.add_argument("--stop-after", type=int, metavar="N",
                        help="stop with a checkpoint after N steps of a longer schedule (continue later with --resume)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="auto: CUDA (bf16 autocast) if present, else MPS, else CPU")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for PyTorch (default: one per physical core; 1 per process under torchrun)")
    parser.add_argument("--seed", type=int, help="seed for weights, batches and every RNG (default: 1337)")
    parser.add_argument("--max-corpus-bytes", type=int, metavar="N",
                        help="read at most N bytes of input (default: the preset's cap for the stdlib corpus, "
                             "none for your data)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="tokenizer and token-id cache (default: $GPTEDGE_CACHE or ~/.cache/gptedge)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the parsed arguments describe (None where not given)."""
    from gptedge.train.trainer import TrainConfig

    given = vars(args)
    names = ("preset", "steps", "batch_size", "grad_accum", "block_size", "vocab_size", "lr", "warmup", "dropout",
             "eval_every", "eval_batches", "resume", "init_from", "stop_after", "seed", "max_corpus_bytes", "cache_dir",
             "threads", "lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "adapter")
    return TrainConfig(
        out=args.out, data=list(given.get("data", [])), device=given.get("device", "auto"),
        progress=not given.get("no_progress", False), force=given.get("force", False),
        **{name: given.get(name) for name in names},
    )


def summary(folder: Path) -> str:
    """What a finished run reached, from its config.json."""
    info = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    lines = [f"steps: {info['step']} ({info['tokens_seen']:,} tokens seen)"]
    if info.get("tokens_per_s"):
        lines.append(f"speed: {info['tokens_per_s']:,.0f} tokens/s ({info['train_seconds']:.1f} s training this run)")
    lines.append(f"train loss: {info['train_loss']:.4f}   val loss: {info['val_loss']:.4f} nats/token")
    base = info["unigram_entropy"]
    gap = base - info["val_loss"]
    lines.append(f"unigram baseline (entropy of the validation tokens): {base:.4f} nats; "
                 f"val loss is {abs(gap):.4f} {'below' if gap >= 0 else 'above'} it")
    lines.append(f"checkpoint: {folder}")
    return "\n".join(lines)


def run(args: argparse.Namespace, command: str) -> int:
    from gptedge.train.trainer import train

    config = config_from_args(args)
    try:
        folder = train(config)
    except KeyboardInterrupt:
        print(f"gptedge train: interrupted; {kept(Path(config.out))}", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary(folder))
    return 0


def kept(out: Path) -> str:
    """What an interrupted run leaves: the last checkpoint written (at an eval step), or none."""
    try:
        step = json.loads((out / "config.json").read_text(encoding="utf-8"))["step"]
    except (OSError, ValueError, KeyError):
        return f"no checkpoint was written to {out} yet"
    return f"the checkpoint in {out} is from step {step}; continue with --resume {out}"


if __name__ == "__main__":  # torchrun entry: the arguments of `gptedge train`
    from gptedge.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
