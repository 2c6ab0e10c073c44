"""`gptedge quantize BUNDLE OUT_DIR --method METHOD ...`: the command-line face of `quantize_bundle`."""

from __future__ import annotations

import argparse
from pathlib import Path

from gptedge.quantize.recipes import METHODS, targets_of


def method_help() -> str:
    """--method's help, written from the recipe table and the provider table, so a new row shows up by itself."""
    rows = [f"{m.name}: {m.summary}, runs on {', '.join(targets_of(m))}" for m in METHODS.values()]
    return "; ".join(["auto: the fastest INT8 recipe for the bundle's target (printed with the reason)", *rows])


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """`gptedge quantize`'s options; each mirrors a quantize_bundle argument of the same name."""
    parser.add_argument("bundle", type=Path, help="float bundle folder written by `gptedge export`")
    parser.add_argument("out_dir", type=Path, help="folder to write the quantized bundle to (written atomically)")
    parser.add_argument("--method", default="auto", metavar="METHOD", help=method_help())
    parser.add_argument("--calibration", nargs="+", metavar="TEXT_OR_FILES",
                        help="text, files, folders or globs that int8, int4 and int8-static calibrate on (use text "
                             "like the model's work: fine-tuning data, your documents); without --eval-text the "
                             "quality gate measures on its last quarter")
    parser.add_argument("--eval-text", nargs="+", metavar="TEXT_OR_FILES",
                        help="held-out text (files, folders, globs or literal text) for the quality gate: text the "
                             "model was not trained on, from the domain it will serve (after fine-tuning: held-out "
                             "fine-tuning data); without it and --calibration, English prose built into Python; the "
                             "gate says when the text is too short to tell pass from fail")
    parser.add_argument("--max-ppl-increase", type=float, default=None, metavar="PCT",
                        help="fail, writing nothing, when held-out perplexity rises more than PCT percent "
                             "(default: the method's, 2 for INT8 and 5 for int4)")
    parser.add_argument("--quantize-lm-head", action=argparse.BooleanOptionalAction, default=None,
                        help="quantize the (tied) LM head too, or keep it float; default: build and measure both, keep "
                             "the quantized head when it passes the gate")
    parser.add_argument("--float-embeddings", action="store_true",
                        help="keep the token and position embedding tables float (larger file, embeddings exactly as "
                             "trained); by default the token embedding reads the quantized LM head's blocks and "
                             "positions are INT8 blocks")
    parser.add_argument("--block-size", type=int, default=None, metavar="N",
                        help="weights per scale for blockwise (MatMulNBits) weights, a power of two >= 16 "
                             "(default: 128 for INT8, 32 for INT4; halved until it divides the model width)")
    parser.add_argument("--max-eval-tokens", type=int, default=4096, metavar="N",
                        help="held-out tokens scored per model by the quality gate")
    parser.add_argument("--genai", action=argparse.BooleanOptionalAction, default=None,
                        help="write the onnxruntime-genai graph and config too (default: when the source bundle has "
                             "them, as `gptedge export --genai` writes)")
    parser.add_argument("--kv-cache", choices=("int8",), default=None,
                        help="store the KV cache as int8 with per-channel scales calibrated on the calibration text "
                             "(a quarter of the cache memory, faster at long positions; CPU bundles); the quality "
                             "gate measures the model with it. Default: the source's cache dtype")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def run(args: argparse.Namespace, command: str) -> int:
    """Run `gptedge quantize` with the parsed options; its errors reach the top-level CLI, which prints them."""
    from gptedge.quantize.quantizer import quantize_bundle

    quantize_bundle(
        args.bundle, args.out_dir, args.method, calibration=args.calibration, eval_text=args.eval_text,
        max_ppl_increase=args.max_ppl_increase, quantize_lm_head=args.quantize_lm_head,
        float_embeddings=args.float_embeddings, block_size=args.block_size, max_eval_tokens=args.max_eval_tokens,
        genai=args.genai, kv_cache=args.kv_cache, force=args.force, progress=args.progress,
        log=lambda line: print(line, flush=True),
    )
    return 0
