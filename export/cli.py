"""`gptedge export SOURCE OUT_DIR`: checkpoint or local Hugging Face model folder -> verified bundle.

Imports stay light here (argparse, pathlib); torch and onnx load inside `run`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("source", type=Path, metavar="SOURCE",
                        help="a gptedge checkpoint folder, or a local Hugging Face model folder "
                             "(model_type gpt2, llama, mistral, qwen2, qwen3 or phi3) "
                             "(config.json + model.safetensors or pytorch_model.bin + tokenizer files); "
                             "nothing is downloaded")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR",
                        help="bundle folder to write (model.onnx, model.onnx.data, tokenizer.json, gptedge.json)")
    parser.add_argument("--target", choices=("cpu", "cuda", "dml"), default="cpu",
                        help="where the bundle will run: cpu, cuda (NVIDIA) or dml (DirectML on Windows GPUs)")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default=None,
                        help="weight and activation precision (default: fp32 for cpu, fp16 for cuda and dml; "
                             "CUDA's GroupQueryAttention needs fp16)%(default).0s")
    parser.add_argument("--max-context", type=int, default=None, metavar="N",
                        help="longest sequence the bundle serves, at most the model's block size "
                             "(default: the block size)%(default).0s")
    parser.add_argument("--kv", choices=("inplace", "concat"), default="inplace",
                        help="KV cache: inplace (GroupQueryAttention writes into one fixed buffer, O(1) per token) "
                             "or concat (standard ONNX ops only, portable, copies the cache each token)")
    parser.add_argument("--genai", action="store_true",
                        help="also write genai_model.onnx + genai_config.json so onnxruntime-genai (C#, C++, Java, "
                             "Python) runs the bundle; the weights are shared, not copied")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace, command: str) -> int:
    from gptedge.export.exporter import export_bundle

    out = export_bundle(
        args.source, args.out_dir, target=args.target, dtype=args.dtype, max_context=args.max_context,
        kv=args.kv, genai=args.genai, force=args.force, progress=not args.quiet,
    )
    print(out)
    return 0
