"""Helper of scripts/gpu_check.sh: export an fp16 CUDA bundle on the spot and benchmark it.

    python scripts/gpu_check.py OUT_DIR [--size small|tiny]

Builds a random-init GPT (GPT-2-124M shaped by default, fixed seed) as a gptedge checkpoint, exports
it with `export_bundle(target="cuda")` (fp16, in-place GroupQueryAttention KV cache), then runs the
same measurements as `gptedge bench` on CUDA (and, for comparison, the CPU fp32 bundle is not built:
the CPU numbers come from benchmarks/decode_position.py). Writes OUT_DIR/bench_cuda.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    "small": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024),  # GPT-2 124M
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, vocab_size=512, block_size=256),
}


def synthetic_tokenizer(vocab_size: int):
    spec = importlib.util.spec_from_file_location("decode_position", ROOT / "benchmarks" / "decode_position.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.synthetic_tokenizer(vocab_size)


def export_cuda_bundle(out: Path, size: str) -> Path:
    import torch

    from gptedge.export.exporter import export_bundle
    from gptedge.train.checkpoint import save_checkpoint
    from gptedge.train.model import GPT, GPTConfig

    config = SIZES[size]
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(Path(tmp) / "ckpt", model, {}, synthetic_tokenizer(config["vocab_size"]).to_str(), None)
        return export_bundle(ckpt, out, target="cuda", force=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for bench_cuda.json and the bundle")
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="model shape to export")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bundle = export_cuda_bundle(args.out / f"bundle-cuda-{args.size}", args.size)
    export_s = time.perf_counter() - start
    from gptedge.runtime.bench import format_bench, run_bench

    context = SIZES[args.size]["block_size"]
    result = run_bench(bundle, "cuda", None, prompt_tokens=128, new_tokens=128, late_position=min(900, context - 128),
                       runs=3)
    result["export_s"] = export_s
    result["size"] = args.size
    print(format_bench(result))
    (args.out / "bench_cuda.json").write_text(json.dumps(result, indent=2) + "\n")
    if result["provider"] != "cuda":
        print(f"CUDA bench ran on {result['provider']}, not CUDA", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
