"""How each way of rounding weights keeps a real model's quality: `python benchmarks/quantize_recipes.py`.

The choices the int8 and int4 recipes are made of (gptedge.quantize.rounding), measured one at a time on
(a) the real SmolLM2-135M (benchmarks/.cache/smollm2-real/gptedge-fp32, prepared by real_model.py; its weights
come from a Q4_1 file, so they sit on an asymmetric 4-bit grid in blocks of 32: rows with blocks of 64 show a
method where the grids do not coincide) and (b) a Llama trained here on the standard library's source
(benchmarks/.cache/trained/llama-4x192, trained by this script when missing; weights never quantized), scored on
standard-library packages after the ones its 3 MB of training text reached (http, json, urllib).

Every row quantizes every projection the same way, the LM head (tied to the embedding) as named, through the
same graph surgery the quantizer uses, and is scored by the quality gate's own measurement: perplexity on held-out
text against the float bundle. Calibration (input Hessians) comes from the first three quarters of the text, the
score from the rest. Writes benchmarks/results/quantize-recipes.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np

from common import HERE, machine, pin_threads

RESULTS = HERE / "results"
TRAINED = HERE / ".cache" / "trained" / "llama-4x192"
# name -> (body rounding, bits, block, head bits, fraction of projections kept at INT8)
VARIANTS = {
    "int4 round-to-nearest symmetric, int4 head (int4-weight)": ("rtn-sym", 4, 32, 4, 0.0),
    "int4 round-to-nearest symmetric, int8 head": ("rtn-sym", 4, 32, 8, 0.0),
    "int4 round-to-nearest, zero points": ("rtn", 4, 32, 8, 0.0),
    "int4 searched scales, zero points": ("searched", 4, 32, 8, 0.0),
    "int4 searched, importance-weighted": ("weighted", 4, 32, 8, 0.0),
    "int4 GPTQ": ("gptq", 4, 32, 8, 0.0),
    "int4 GPTQ act-order (int4)": ("gptq-act", 4, 32, 8, 0.0),
    "int4 GPTQ act-order, int4 head": ("gptq-act", 4, 32, 4, 0.0),
    "int4 GPTQ act-order, 10% at int8": ("gptq-act", 4, 32, 8, 0.1),
    "int4 GPTQ act-order, blocks of 64": ("gptq-act", 4, 64, 8, 0.0),
    "int4 round-to-nearest, zero points, blocks of 64": ("rtn", 4, 64, 8, 0.0),
    "int8 round-to-nearest, blocks of 32": ("rtn-sym", 8, 32, 8, 0.0),
    "int8 round-to-nearest, blocks of 64": ("rtn-sym", 8, 64, 8, 0.0),
    "int8 round-to-nearest, blocks of 128": ("rtn-sym", 8, 128, 8, 0.0),
    "int8 searched, importance-weighted, blocks of 64 (int8)": ("weighted-sym", 8, 64, 8, 0.0),
}


def train_model() -> Path:
    """A small Llama trained on the standard library (about 15 minutes on 2 cores), once."""
    from gptedge.train.trainer import TrainConfig, train

    if not (TRAINED / "model.safetensors").exists():
        arch = dict(positions="rope", rope_theta=10000.0, norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1,
                    intermediate_size=512, layer_norm_epsilon=1e-5)
        train(TrainConfig(out=str(TRAINED), preset="small-llama", n_layer=4, n_head=3, n_embd=192, architecture=arch,
                          block_size=256, vocab_size=2048, steps=900, batch_size=16, lr=2e-3, warmup=50,
                          eval_every=300, force=True, progress=False))
    return TRAINED


def _blocks(kind: str, bits: int, block: int, w: np.ndarray, h: np.ndarray, importance: np.ndarray):
    from gptedge.quantize import rounding as R

    if kind == "rtn-sym":
        return R.round_to_nearest(w, bits, block)
    if kind == "rtn":
        return R.round_to_nearest(w, bits, block, symmetric=False)
    if kind == "searched":
        return R.searched(w, bits, block)
    if kind == "weighted":
        return R.searched(w, bits, block, importance=importance)
    if kind == "weighted-sym":
        return R.searched(w, bits, block, symmetric=True, importance=importance)
    return R.gptq(w, h, bits, block, act_order=kind == "gptq-act")


def measure(bundle: Path, text: str, names: list[str], work: Path) -> dict:
    from onnx import numpy_helper
    from tokenizers import Tokenizer

    from gptedge.quantize import blocks, gate, surgery
    from gptedge.quantize import rounding as R
    from gptedge.quantize.build import _load_float_graph
    from gptedge.quantize.quantizer import _calibration_windows, _engine
    from gptedge.quantize.roles import initializers
    from gptedge.runtime.bundle import MODEL_NAME, read_spec

    spec = read_spec(bundle)
    ids = np.array(Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(text, add_special_tokens=False).ids)
    cut = int(len(ids) * 0.75)
    context = spec.architecture.context_length
    data = gate.make_eval_set(ids[cut:][:4096], context)
    reference = gate.measure(_engine(bundle / MODEL_NAME, spec), data)
    model, roles = _load_float_graph(bundle / MODEL_NAME, spec)
    from gptedge.quantize.activations import collect

    started = time.perf_counter()
    hessians = collect(model, roles, bundle, spec, _calibration_windows(ids[:cut], context, 128, 256))
    calibration_s = time.perf_counter() - started
    inits = initializers(model)
    nodes = [n for n in model.graph.node if n.name in roles.block_matmuls]
    head = numpy_helper.to_array(inits[roles.lm_head_weight])
    head = head if roles.lm_head_vc else head.T
    rows = []
    for name in names:
        kind, bits, block, head_bits, sensitive = VARIANTS[name]
        started = time.perf_counter()
        weights, moved = {}, []
        for node in nodes:
            w = numpy_helper.to_array(inits[node.input[1]]).T
            h = hessians[node.input[0]]
            weights[blocks.weight_name(node)] = q = _blocks(kind, bits, block, w, h,
                                                            hessians.importance(node.input[0]))
            moved.append((R.output_error(w, q, h), node, w))
        for _, node, w in sorted(moved, key=lambda m: -m[0])[:int(round(sensitive * len(moved)))]:
            weights[blocks.weight_name(node)] = R.searched(w, 8, block, symmetric=True,
                                                           importance=hessians.importance(node.input[0]))
        weights[roles.lm_head_weight] = R.searched(head, head_bits, block, symmetric=True)
        candidate = copy.deepcopy(model)
        blocks.apply_blocks(candidate, roles, weights.get, lambda _: None, 4, "gather")
        folder = work / "candidate"
        folder.mkdir(parents=True, exist_ok=True)
        surgery.save_model(candidate, folder / MODEL_NAME)
        del candidate
        build_s = time.perf_counter() - started
        size = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
        report = gate.compare(reference, gate.measure(_engine(folder / MODEL_NAME, spec), data, reference=reference),
                              data, 100.0)
        rows.append({"variant": name, "model_mb": round(size, 2), "ppl": report.quantized_ppl,
                     "ppl_change_pct": report.ppl_increase_pct, "ci_pct": list(report.ppl_increase_ci_pct),
                     "top1_agreement": report.top1_agreement, "build_s": round(build_s, 1)})
        print(f"  {name:58s} {size:7.1f} MB  {report.ppl_increase_pct:+6.2f}%  ({build_s:.0f} s)", flush=True)
        for f in folder.iterdir():
            f.unlink()
    return {"bundle": str(bundle.relative_to(HERE)) if bundle.is_relative_to(HERE) else str(bundle),
            "float_ppl": reference.ppl, "eval_tokens": int(len(data.token_ids)), "calibration_positions": hessians.rows,
            "calibration_s": round(calibration_s, 1), "rows": rows}


def markdown(models: dict[str, dict], meta: dict) -> str:
    lines = []
    for label, m in models.items():
        lines += [f"### {label}: fp32 perplexity {m['float_ppl']:.4f} on {m['eval_tokens']:,} held-out tokens", "",
                  "| rounding | model MB | perplexity change (95% interval) | top-1 agreement |",
                  "|---|---:|---:|---:|"]
        for r in m["rows"]:
            lines.append(f"| {r['variant']} | {r['model_mb']:.1f} | {r['ppl_change_pct']:+.2f}% "
                         f"({r['ci_pct'][0]:+.2f} to {r['ci_pct'][1]:+.2f}) | {100 * r['top1_agreement']:.1f}% |")
        lines.append("")
    lines.append(f"Calibration: 128 windows of 256 tokens from the first three quarters of each text; the head is "
                 f"tied to the embedding (one matrix). Machine: {meta['machine']}; {meta['time']}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="rows to measure (default: all)")
    args = parser.parse_args()
    pin_threads()
    import sysconfig
    import tempfile

    from gptedge.export.exporter import export_bundle
    from gptedge.quantize.texts import builtin_text

    real = HERE / ".cache" / "smollm2-real" / "gptedge-fp32"
    if not real.exists():
        raise SystemExit("run benchmarks/real_model.py first: it prepares the real model's fp32 bundle")
    trained = HERE / ".cache" / "trained" / "llama-4x192-fp32"
    if not trained.exists():
        export_bundle(train_model(), trained)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = "\n\n".join((stdlib / name).read_text(encoding="utf-8") for pkg in ("http", "json", "urllib")
                       for name in sorted(p.relative_to(stdlib).as_posix() for p in (stdlib / pkg).glob("*.py")))
    models = {}
    with tempfile.TemporaryDirectory(dir=HERE / ".cache") as work:
        print("SmolLM2-135M-Instruct (real), on the built-in English text", flush=True)
        models["SmolLM2-135M-Instruct"] = measure(real, builtin_text()[0], args.variants, Path(work))
        print("Llama 4x192 trained here, on standard-library code it did not train on", flush=True)
        models["Llama 4x192 trained here"] = measure(trained, code, args.variants, Path(work))
    meta = machine()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantize-recipes.json").write_text(json.dumps({"meta": meta, "models": models}, indent=1) + "\n")
    (RESULTS / "quantize-recipes.md").write_text(markdown(models, meta))
    print(markdown(models, meta))


if __name__ == "__main__":
    main()
