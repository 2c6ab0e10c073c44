"""What prompt-lookup speculative decoding buys: `python benchmarks/speculative.py`.

The trained model's context is 256 tokens: prompts are a few hundred characters (cut from the left if
longer). Two things are measured:
1. The price of a verify step: one engine step of k new tokens against k = 1 (GPT-2-124M-shape INT8
   bundle, position ~200, 2 threads), which bounds what accepted proposals can save.
2. Plain greedy against `speculative="lookup"` on a trained model (the `small` preset trained on the
   standard library's source, exported and quantized to INT8 here, reused from benchmarks/.cache),
   on input-grounded prompts (code to continue after the same code) and open-ended ones (a function
   to write); each pair must give identical tokens.
Writes benchmarks/results/speculative.json.
"""

from __future__ import annotations

import inspect
import json
import statistics
import time
from pathlib import Path

import numpy as np

from common import HERE, THREADS, machine, make_random_gpt2, pin_threads
from peers import CACHE, prepare_gptedge

NEW_TOKENS = 96


def verify_costs(bundle: Path) -> dict[str, float]:
    from gptedge.runtime import Model

    model = Model.load(bundle, provider="cpu", threads=THREADS)
    engine = model.engine
    out = {}
    for k in (1, 2, 4, 8):
        times = []
        for _ in range(5):
            cache = engine.new_cache(1, 256)
            engine.forward(cache, np.arange(200, dtype=np.int64)[None, :] % 1000)
            t = time.perf_counter()
            for _ in range(8):
                engine.forward(cache, np.full((1, k), 7, np.int64), logits_index=np.arange(k)[None, :])
                cache.lengths -= k - 1  # stay near position 200
            times.append((time.perf_counter() - t) / 8)
            engine.release(cache)
        out[f"k={k}"] = 1000 * statistics.median(times)
    return out


def trained_bundle() -> Path:
    from gptedge.demo import heldout_text
    from gptedge.export.exporter import export_bundle
    from gptedge.quantize.quantizer import quantize_bundle
    from gptedge.train.checkpoint import is_checkpoint
    from gptedge.train.trainer import TrainConfig, train

    root = CACHE / "small-trained"
    ckpt, fp32, int8 = root / "ckpt", root / "fp32", root / "int8"
    if not is_checkpoint(ckpt):
        train(TrainConfig(out=str(ckpt), preset="small", force=True, progress=False))
    if not (fp32 / "gptedge.json").exists():
        export_bundle(ckpt, fp32, force=True, progress=False)
    if not (int8 / "gptedge.json").exists():
        quantize_bundle(fp32, int8, method="int8-weight", eval_text=heldout_text(60_000), force=True, progress=False)
    return int8


def workloads() -> dict[str, list[str]]:
    import json as json_module
    import textwrap as textwrap_module

    sources = [inspect.getsource(m) for m in (json_module.decoder, textwrap_module)]
    grounded = []
    for src in sources:
        for start in (0, 2000, 5000, 8000):
            chunk = src[start:start + 300]
            grounded.append(chunk + "\n\n" + chunk[:120])  # continue code that is already in the prompt
    open_ended = ["def read_config(path):\n", "class Cache:\n    def __init__(self", "import os\n\n\ndef main(",
                  "for i in range(", "def parse_args(argv):\n    "]
    return {"input-grounded": grounded, "open-ended": open_ended}


def compare(bundle: Path) -> dict[str, dict]:
    from gptedge.runtime import Model

    model = Model.load(bundle, provider="cpu", threads=THREADS)
    kw = dict(temperature=0.0, max_new_tokens=NEW_TOKENS, stop_token_ids=(), truncate="left")  # context 256
    model.generate("def f():", **kw)
    out = {}
    for name, prompts in workloads().items():
        plain_s, fast_s, tokens, proposed, accepted, identical = 0.0, 0.0, 0, 0, 0, 0
        for prompt in prompts:
            t = time.perf_counter()
            plain = model.generate(prompt, **kw)
            plain_s += time.perf_counter() - t
            t = time.perf_counter()
            fast = model.generate(prompt, speculative="lookup", **kw)
            fast_s += time.perf_counter() - t
            identical += fast.token_ids == plain.token_ids
            tokens += len(plain.token_ids)
            proposed += fast.timings.proposed
            accepted += fast.timings.accepted
        out[name] = {"prompts": len(prompts), "tokens": tokens, "plain_tokens_per_s": tokens / plain_s,
                     "lookup_tokens_per_s": tokens / fast_s, "speedup": plain_s / fast_s, "proposed": proposed,
                     "accepted": accepted, "identical_outputs": f"{identical}/{len(prompts)}"}
    return out


def main() -> None:
    pin_threads()
    root = CACHE / "gpt2-124m"
    shape_bundle = prepare_gptedge(make_random_gpt2(root / "hf"), root, ["int8-weight"], None)["int8-weight"]
    result = {
        **machine(), "new_tokens": NEW_TOKENS,
        "verify_step_ms_gpt2_124m_int8": verify_costs(shape_bundle),
        "small_trained_int8": compare(trained_bundle()),
    }
    (HERE / "results" / "speculative.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
