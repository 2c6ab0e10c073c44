"""`gptedge export SOURCE OUT_DIR`: checkpoint, local Hugging Face model folder or GGUF file -> verified bundle.

Imports stay light here (argparse, pathlib); torch and onnx load inside `run`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gptedge.runtime.traits import PROVIDER_NAMES


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("source", type=Path, metavar="SOURCE",
                        help="a gptedge checkpoint folder, a local Hugging Face model folder "
                             "(model_type gpt2, llama, mistral, qwen2, qwen3 or phi3: config.json + weights + "
                             "tokenizer files), or a GGUF file (architectures llama, qwen2, qwen3, phi3, gpt2); "
                             "nothing is downloaded")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR",
                        help="bundle folder to write (model.onnx, model.onnx.data, tokenizer.json, gptedge.json)")
    parser.add_argument("--target", choices=PROVIDER_NAMES, default="cpu",
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
    parser.add_argument("--dequantize", action="store_true",
                        help="GGUF sources: write the float (dequantized) model instead of keeping the file's "
                             "Q8_0 / Q4_0 / Q4_1 blocks")
    parser.add_argument("--eval-text", nargs="+", default=None, metavar="TEXT",
                        help="GGUF sources: held-out text (files, folders, globs) the kept bundle's perplexity is "
                             "checked on against the dequantized model (default: built-in English prose)")
    parser.add_argument("--embeddings", action=argparse.BooleanOptionalAction, default=None,
                        help="write an embedding bundle (one pooled vector per text, for retrieval) instead of a "
                             "text-generation one (default: when the folder carries sentence-transformers' "
                             "modules.json)")
    parser.add_argument("--pooling", choices=("last", "mean", "first"), default=None,
                        help="embedding bundles: pool the last real token (Qwen3-Embedding), the mean over real "
                             "tokens, or the first token (default: what the folder's 1_Pooling/config.json says, "
                             "else last)")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="embedding bundles: L2-normalise the vectors (default: when the folder lists a "
                             "Normalize module; yes without sentence-transformers files)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace, command: str) -> int:
    from gptedge.export.exporter import export_bundle

    out = export_bundle(
        args.source, args.out_dir, target=args.target, dtype=args.dtype, max_context=args.max_context,
        kv=args.kv, genai=args.genai, dequantize=args.dequantize, eval_text=args.eval_text, force=args.force,
        embeddings=args.embeddings, pooling=args.pooling, normalize=args.normalize, progress=not args.quiet,
    )
    print(out)
    return 0
