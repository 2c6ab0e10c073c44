"""gptedge against its peers, same weights, one run: `python benchmarks/peers.py [--model NAME]`.

Models: gpt2-124m (random GPT-2 small), demo (a trained gptedge checkpoint), llama-124m and
smollm2-135m (random Llama-family weights: GPT-2-124M-sized, and SmolLM2-135M's shape).

Prepares every artefact once (under benchmarks/.cache/), then measures each row in a
fresh process, rows one after another and round-robin over `--runs` passes, and
reports medians as a markdown table, JSON, and a PNG of decode tokens/s against
position. Rows whose peer is not installed (optimum-onnx, onnxruntime-genai and its model builder,
llama-cpp-python, llama.cpp's own llama-bench) are listed as skipped, never faked.

llama.cpp runs twice over the same GGUF files: through llama-cpp-python's generate() and through
its own C++ loop (`llama-bench`, pp128 from empty and tg128 at depth 128, the positions every row decodes
at), built from the source vendored in the
llama-cpp-python sdist. Point LLAMA_CPP_BUILD at that build folder (its bin/ holds llama-bench,
llama-quantize and the shared libraries; llama-cpp-python then loads those via LLAMA_CPP_LIB_PATH).
onnxruntime-genai's model builder needs a newer transformers than the tests pin: install one with
`pip install --target benchmarks/.cache/genai-builder-site transformers` (used by the builder only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    HERE,
    LLAMA_SHAPES,
    LONG_POSITION,
    NEW_TOKENS,
    PROMPT_LEN,
    THREADS,
    files_mb,
    machine,
    make_random_gpt2,
    make_random_llama,
)

CACHE = HERE / ".cache"
RESULTS = HERE / "results"
BUILDER_SITE = CACHE / "genai-builder-site"
LLAMA_BUILD = Path(os.environ.get("LLAMA_CPP_BUILD",
                                  CACHE / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "build"))


@dataclass
class Row:
    name: str
    system: str
    artifact: Path
    files: list[Path]
    extra: list[str] = field(default_factory=list)
    note: str = ""


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


# -- artefacts ------------------------------------------------------------------------------------

def prepare_gptedge(hf_dir: Path, root: Path, methods: list[str], eval_text: str | None) -> dict[str, Path]:
    from gptedge.demo import heldout_text
    from gptedge.export.exporter import export_bundle
    from gptedge.quantize.quantizer import quantize_bundle

    bundles = {"fp32": root / "gptedge-fp32"}
    if not bundles["fp32"].exists():
        _log("exporting the gptedge fp32 bundle")
        export_bundle(hf_dir, bundles["fp32"], target="cpu", dtype="fp32")
    for method in methods:  # "RECIPE+kv8": the recipe with the int8 KV cache (quantize --kv-cache int8)
        recipe, _, kv = method.partition("+")
        out = root / f"gptedge-{method.replace('+', '-')}"
        if not out.exists():
            _log(f"quantizing: {method}")
            # Random weights have no meaningful perplexity: the gate still runs on standard-library text and is
            # reported, with a threshold that cannot trip, so speed rows exist for every recipe.
            quantize_bundle(bundles["fp32"], out, method=recipe, eval_text=eval_text or heldout_text(60_000),
                            max_ppl_increase=2.0 if eval_text else 1e9, kv_cache={"kv8": "int8"}.get(kv))
        bundles[method.replace("+", "-")] = out
    return bundles


def prepare_optimum(hf_dir: Path, root: Path) -> dict[str, Path]:
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    fp32, int8 = root / "optimum-fp32", root / "optimum-int8"
    if not (fp32 / "model.onnx").exists():
        _log("exporting with optimum")
        main_export(str(hf_dir), output=str(fp32), task="text-generation-with-past", device="cpu", do_validation=False)
    if not (int8 / "model_quantized.onnx").exists():
        _log("quantizing with optimum (avx2 dynamic int8, as its users do)")
        ORTQuantizer.from_pretrained(fp32, file_name="model.onnx").quantize(
            save_dir=int8, quantization_config=AutoQuantizationConfig.avx2(is_static=False, per_channel=False))
    return {"fp32": fp32, "int8": int8}


def prepare_genai(optimum_dirs: dict[str, Path], hf_dir: Path, root: Path) -> dict[str, Path]:
    """onnxruntime-genai has no GPT-2 builder: a hand-written genai_config over Optimum's files (type llama)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    out = {}
    for kind, src in optimum_dirs.items():
        folder = root / f"genai-{kind}"
        folder.mkdir(parents=True, exist_ok=True)
        model_file = "model.onnx" if kind == "fp32" else "model_quantized.onnx"
        for f in src.iterdir():
            link = folder / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
        n_layer = cfg["n_layer"]
        genai = {"model": {
            "type": "llama", "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
            "pad_token_id": cfg["eos_token_id"], "vocab_size": cfg["vocab_size"], "context_length": cfg["n_positions"],
            "decoder": {
                "filename": model_file, "head_size": cfg["n_embd"] // cfg["n_head"], "hidden_size": cfg["n_embd"],
                "num_attention_heads": cfg["n_head"], "num_key_value_heads": cfg["n_head"],
                "num_hidden_layers": n_layer,
                "session_options": {"intra_op_num_threads": THREADS, "inter_op_num_threads": 1, "provider_options": []},
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            }},
            "search": {"do_sample": False, "max_length": cfg["n_positions"], "min_length": 0, "num_beams": 1,
                       "num_return_sequences": 1, "past_present_share_buffer": False, "top_k": 1, "top_p": 1.0,
                       "temperature": 1.0, "repetition_penalty": 1.0, "early_stopping": True, "length_penalty": 1.0,
                       "no_repeat_ngram_size": 0}}
        (folder / "genai_config.json").write_text(json.dumps(genai, indent=2))
        out[kind] = folder
    return out


def prepare_genai_builder(hf_dir: Path, root: Path,
                          precisions: tuple[str, ...] = ("fp32", "int8", "int4")) -> dict[str, Path]:
    """onnxruntime-genai's own model builder (python -m onnxruntime_genai.models.builder), CPU, its default options."""
    out = {}
    for precision in precisions:
        folder = root / f"genai-builder-{precision}"
        if not (folder / "genai_config.json").exists():
            _log(f"building with onnxruntime-genai's model builder: {precision}")
            env = {**os.environ, "PYTHONPATH": str(BUILDER_SITE)}
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
                            "-o", str(folder), "-p", precision, "-e", "cpu", "-c", str(root / "builder-cache")],
                           check=True, env=env, stdout=subprocess.DEVNULL)
        out[precision] = folder
    return out


def prepare_gguf(hf_dir: Path, root: Path) -> dict[str, Path]:
    """GGUF Q8_0 and Q4_0 through llama.cpp's own converter (vendored in the llama-cpp-python sdist)."""
    import glob

    converters = sorted(glob.glob(str(CACHE / "llama.cpp" / "convert_hf_to_gguf.py"))
                        + glob.glob(str(LLAMA_BUILD.parent / "convert_hf_to_gguf.py")))
    if not converters:
        raise RuntimeError(f"no converter: extract vendor/llama.cpp/{{convert_hf_to_gguf.py,gguf-py,conversion}} "
                           f"from the llama-cpp-python sdist into {CACHE / 'llama.cpp'}")
    out = {}
    f32 = root / "model-f32.gguf"
    for outtype in ("f32", "q8_0"):
        target = root / f"model-{outtype}.gguf"
        if not target.exists():
            _log(f"converting to GGUF {outtype}")
            folder = Path(converters[0]).parent
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(folder / "gguf-py")]),
                   "NO_LOCAL_GGUF": "1"}
            subprocess.run([sys.executable, str(HERE / "gguf_convert.py"), converters[0], str(hf_dir), outtype,
                            str(target)], check=True, env=env)
        out[outtype] = target
    q4 = root / "model-q4_0.gguf"
    if not q4.exists() and (LLAMA_BUILD / "bin" / "llama-quantize").exists():
        subprocess.run([str(LLAMA_BUILD / "bin" / "llama-quantize"), str(f32), str(q4), "Q4_0", str(THREADS)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not q4.exists():
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.nthread = THREADS
        llama_cpp.llama_model_quantize(str(f32).encode(), str(q4).encode(), params)
    out["q4_0"] = q4
    return out


def build_rows(args) -> tuple[list[Row], list[str], str | None]:
    root = CACHE / args.model
    skipped: list[str] = []
    eval_text = None
    llama = args.model in LLAMA_SHAPES
    if args.model == "gpt2-124m":
        hf_dir = make_random_gpt2(root / "hf")
    elif llama:
        hf_dir = make_random_llama(root / "hf", LLAMA_SHAPES[args.model])
    else:
        from common import gptedge_checkpoint_to_hf

        hf_dir = gptedge_checkpoint_to_hf(Path(args.checkpoint), root / "hf")
        eval_text = Path(args.eval_text).read_text(encoding="utf-8") if args.eval_text else None
    rows: list[Row] = []
    bundles = prepare_gptedge(hf_dir, root, args.methods, eval_text)
    for kind, path in bundles.items():
        rows.append(Row(f"gptedge-{kind}", "gptedge", path, sorted(path.glob("model.onnx*"))))
    for kind, path in bundles.items():  # llama.cpp's threads busy-wait between tokens: the same, opted into
        if kind != "fp32":
            rows.append(Row(f"gptedge-{kind}-spin", "gptedge", path, sorted(path.glob("model.onnx*")),
                            extra=["--spin"], note="Model.load(spin=True)"))
    if args.model == "demo":  # a tiny model's step is mostly per-operator overhead: one thread can beat two
        for kind in ("int8-weight", "int4-weight"):
            rows.append(Row(f"gptedge-{kind}-t1", "gptedge", bundles[kind], sorted(bundles[kind].glob("model.onnx*")),
                            extra=["--threads", "1"], note="threads=1"))
    rows.append(Row("pytorch-fp32", "pytorch", hf_dir, sorted(hf_dir.glob("*.safetensors"))))
    if _have("optimum.onnxruntime"):
        opt = prepare_optimum(hf_dir, root)
        rows.append(Row("naive-ort-fp32", "naive-ort", opt["fp32"] / "model.onnx",
                        sorted(opt["fp32"].glob("model.onnx*"))))
        rows.append(Row("optimum-fp32", "optimum", opt["fp32"], sorted(opt["fp32"].glob("model.onnx*"))))
        rows.append(Row("naive-ort-int8", "naive-ort", opt["int8"] / "model_quantized.onnx",
                        sorted(opt["int8"].glob("model_quantized.onnx*"))))
        rows.append(Row("optimum-int8", "optimum", opt["int8"], sorted(opt["int8"].glob("model_quantized.onnx*")),
                        extra=["--file-name", "model_quantized.onnx"]))
        if _have("onnxruntime_genai") and not llama:
            for kind, path in prepare_genai(opt, hf_dir, root).items():
                rows.append(Row(f"genai-on-optimum-{kind}", "genai", path, [],
                                note="hand-written genai_config, type llama"))
    else:
        skipped.append("optimum rows (optimum-onnx not installed)")
    if not _have("onnxruntime_genai"):
        skipped.append("onnxruntime-genai (not installed)")
    elif llama and not BUILDER_SITE.exists():
        skipped.append(f"genai builder rows (no newer transformers in {BUILDER_SITE})")
    elif llama:
        for kind, path in prepare_genai_builder(hf_dir, root).items():
            rows.append(Row(f"genai-builder-{kind}", "genai", path, [], note="onnxruntime-genai's model builder"))
    try:
        ggufs = prepare_gguf(hf_dir, root)
    except (RuntimeError, subprocess.CalledProcessError, ImportError) as exc:
        ggufs = {}
        skipped.append(f"llama.cpp rows ({exc})")
    if ggufs and (_have("llama_cpp") or (LLAMA_BUILD / "bin").exists()):
        for kind, path in ggufs.items():
            rows.append(Row(f"llamacpp-{kind}", "llamacpp", path, [path], note="llama-cpp-python"))
    elif ggufs:
        skipped.append("llama-cpp-python rows (not installed)")
    bench = LLAMA_BUILD / "bin" / "llama-bench"
    if ggufs and bench.exists():
        for kind in ("q8_0", "q4_0"):
            rows.append(Row(f"llama-bench-{kind}", "llama-bench", ggufs[kind], [ggufs[kind]],
                            note="llama.cpp's own C++ loop"))
            if args.model == "demo":  # the same chance for llama.cpp
                rows.append(Row(f"llama-bench-{kind}-t1", "llama-bench", ggufs[kind], [ggufs[kind]],
                                extra=["-t", "1"], note="llama.cpp's own C++ loop, 1 thread"))
    elif ggufs:
        skipped.append(f"llama-bench rows (no {bench})")
    if args.rows:
        rows = [r for r in rows if any(r.name.startswith(p) for p in args.rows)]
    return rows, skipped, eval_text


def run_llama_bench(row: Row) -> dict:
    """llama.cpp's own benchmark on the same GGUF, same threads: pp128 from an empty cache (prefill tok/s) and tg128
    at depth 128 (decode tok/s at positions 128-255, where every other row decodes: after the 128-token prompt)."""
    cmd = [str(LLAMA_BUILD / "bin" / "llama-bench"), "-m", str(row.artifact), "-p", str(PROMPT_LEN), "-n",
           str(NEW_TOKENS), "-d", f"0,{PROMPT_LEN}", "-t", str(THREADS), "-r", "1", "-o", "json",
           *row.extra]  # a later -t wins
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{row.name} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    tests = json.loads(proc.stdout)

    def rate(n_prompt: int, n_gen: int, depth: int) -> float:
        return next(t["avg_ts"] for t in tests
                    if (t["n_prompt"], t["n_gen"], t.get("n_depth", 0)) == (n_prompt, n_gen, depth))

    pp, tg = rate(PROMPT_LEN, 0, 0), rate(0, NEW_TOKENS, PROMPT_LEN)
    return {"load_s": None, "ttft_ms": 1000 * PROMPT_LEN / pp, "cold_ttft_ms": None, "decode_tps": tg,
            "late_position": None, "late_decode_tps": None, "peak_rss_mb": None, "tokens": None, "prefill_tps": pp,
            "curve": {"positions": [], "tps": [], "late_positions": [], "late_tps": []}}


# -- measuring ------------------------------------------------------------------------------------

def run_row(row: Row, long_position: int) -> dict:
    if row.system == "llama-bench":
        return run_llama_bench(row)
    cmd = [sys.executable, str(HERE / "row.py"), row.system, str(row.artifact), "--long-position", str(long_position),
           *row.extra]
    env = dict(os.environ)
    if row.system == "llamacpp" and (LLAMA_BUILD / "bin" / "libllama.so").exists():
        env["LLAMA_CPP_LIB_PATH"] = str(LLAMA_BUILD / "bin")  # the same build as llama-bench's
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{row.name} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:] }")
    return json.loads(lines[-1][4:])


def summarize(name: str, runs: list[dict], row: Row, reference: list[int] | None) -> dict:
    def med(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    tps = [r["decode_tps"] for r in runs]
    tokens = runs[-1]["tokens"]
    if tokens is None:
        agree = "-"
    elif reference is None:
        agree = "reference"
    else:
        same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(tokens))
        agree = f"{same}/{len(reference)}" if same == len(reference) else f"first {same}"
    artifact_mb = files_mb(row.files) if row.files else files_mb(
        p for p in row.artifact.iterdir() if p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data"))
    return {
        "row": name, "note": row.note, "prefill_tps": med("prefill_tps"), "load_s": med("load_s"),
        "ttft_ms": med("ttft_ms"), "cold_ttft_ms": med("cold_ttft_ms"),
        "decode_tps": med("decode_tps"), "decode_tps_min": min(tps), "decode_tps_max": max(tps),
        "late_position": runs[-1]["late_position"], "late_decode_tps": med("late_decode_tps"),
        "peak_rss_mb": med("peak_rss_mb"), "model_mb": artifact_mb,
        "tokens_vs_pytorch": agree, "n": len(runs), "curve": runs[-1]["curve"],
    }


def markdown(results: list[dict], skipped: list[str], meta: dict) -> str:
    late = next((r["late_position"] for r in results if r.get("late_position")), LONG_POSITION)
    head = (f"| row | load s | TTFT ms | cold TTFT ms | decode tok/s (min-max) | decode tok/s @ ~{late} | "
            "peak RSS MB | model MB | ppl | tokens vs PyTorch | n |")
    lines = [head, "|" + "---|" * 11]

    def f(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in results:
        ppl = f"{r['ppl']:.3f}" if r.get("ppl") else "-"
        ttft = f(r["ttft_ms"], ".0f") + (" (pp)" if r.get("prefill_tps") else "")
        lines.append(
            f"| {r['row']} | {f(r['load_s'], '.2f')} | {ttft} | {f(r['cold_ttft_ms'], '.0f')} | "
            f"**{r['decode_tps']:.1f}** ({r['decode_tps_min']:.1f}-{r['decode_tps_max']:.1f}) | "
            f"{f(r['late_decode_tps'], '.1f')} | {f(r['peak_rss_mb'], '.0f')} | {r['model_mb']:.0f} | {ppl} | "
            f"{r['tokens_vs_pytorch']} | {r['n']} |")
    lines.append("")
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    flags = " ".join(meta.get("cpu_flags", []))
    lines.append(f"Model: {meta['model']}; batch 1, {PROMPT_LEN}-token prompt, {NEW_TOKENS} new greedy tokens, "
                 f"{THREADS} threads, medians of {meta['runs']} fresh-process runs; machine: {meta['machine']}"
                 f"{f' ({flags})' if flags else ''}; {versions}; {meta.get('time', '')}. `-spin` rows: "
                 "Model.load(spin=True), onnxruntime's threads busy-wait between tokens as llama.cpp's do.")
    if any(r["row"].endswith("-t1") for r in results):
        lines.append("`-t1` rows: one thread (gptedge `threads=1`, llama-bench `-t 1`), the other rows "
                     f"{THREADS}: with a model this small a step is mostly per-operator overhead.")
    if any(r.get("prefill_tps") for r in results):
        lines.append(f"llama-bench rows: decode is tg{NEW_TOKENS} at depth {PROMPT_LEN} (`-d`: positions "
                     f"{PROMPT_LEN}-{PROMPT_LEN + NEW_TOKENS - 1}, those the other rows decode at); TTFT (pp) is "
                     f"{PROMPT_LEN} / pp{PROMPT_LEN} tok/s from an empty cache, prefill alone (no sampling, no first "
                     "decode step); llama-bench reports neither load time nor RSS.")
    if skipped:
        lines.append("Skipped: " + "; ".join(skipped) + ".")
    return "\n".join(lines) + "\n"


def targets(results: list[dict], model: str) -> str:
    """The targets, computed from this run's rows (the README copies this table; nothing is typed). The demo model
    is small enough that per-step overhead decides: its target is INT8 level with llama.cpp's Q8_0."""
    rows = {r["row"]: r for r in results}
    small = model == "demo"

    def best(*names: str) -> tuple[str, float] | None:
        found = [(n, rows[n]["decode_tps"]) for n in names if n in rows]
        return max(found, key=lambda x: x[1]) if found else None

    lines = ["| target | gptedge row | measured | result |", "|---|---|---|---|"]

    def ratio(label: str, ours: list[str], peer: tuple[str, float] | None, goal: float) -> None:
        if peer is None:
            return
        for name in ours:
            if name in rows:
                x = rows[name]["decode_tps"] / peer[1]
                lines.append(f"| {label} | {name} | {rows[name]['decode_tps']:.1f} vs {peer[1]:.1f} tok/s ({peer[0]}) "
                             f"= {x:.2f}x | {'met' if x >= goal else '**missed**'} |")

    int8, int4 = ([f"gptedge-{m}-weight{kv}{spin}" for kv in ("", "-kv8") for spin in ("", "-spin", "-t1")]
                  for m in ("int8", "int4"))
    ratio("INT8 decode >= 2x Optimum INT8", int8[:1], best("optimum-int8"), 2.0)
    goal = 1.0 if small else 1.2
    q8, q4 = (best(f"llamacpp-{q}", f"llama-bench-{q}", f"llama-bench-{q}-t1") for q in ("q8_0", "q4_0"))
    ratio(f"INT8 decode >= {goal}x llama.cpp Q8_0", int8, q8, goal)
    if not small:
        ratio("INT4 decode >= 1.1x llama.cpp Q4_0", int4, q4, 1.1)
    peer = rows.get("llamacpp-q8_0")
    for name in (n for n in int8 if n in rows and peer and peer.get("peak_rss_mb")):
        mine, theirs = rows[name]["peak_rss_mb"], peer["peak_rss_mb"]
        lines.append(f"| peak RSS <= llama.cpp Q8_0's | {name} | {mine:.0f} vs {theirs:.0f} MB | "
                     f"{'met' if mine <= theirs else '**missed**'} |")
    for name in (n for n in int8 + int4 if n in rows and rows[n].get("late_decode_tps")):
        r = rows[name]
        x = r["late_decode_tps"] / r["decode_tps"]
        lines.append(f"| decode at ~{r['late_position']} >= 85% of early speed | {name} | {r['late_decode_tps']:.1f} "
                     f"vs {r['decode_tps']:.1f} tok/s = {x:.0%} | {'met' if x >= 0.85 else '**missed**'} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def plot(results: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib not installed: no PNG (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(10, 5.5))
    colors = plt.cm.tab20.colors  # one distinct colour per row (the default cycle repeats after 10)
    for i, r in enumerate(results):
        c = r["curve"]
        if not c["positions"]:
            continue
        xs = c["positions"] + c["late_positions"]
        ys = c["tps"] + c["late_tps"]
        window = 8  # per-token times are noisy; a short moving median shows the trend
        smooth = [statistics.median(ys[max(0, i - window):i + 1]) for i in range(len(ys))]
        ax.plot(xs, smooth, "o" if r["row"].startswith("gptedge") else ".",
                markersize=3 if r["row"].startswith("gptedge") else 2, color=colors[i % len(colors)], label=r["row"])
    ax.set_xlabel("position (tokens in context)")
    ax.set_ylabel("decode tokens/s (moving median of 8)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def quality_table(rows: list[Row]) -> str:
    """The quality gate's measurements stored in each quantized gptedge bundle (gptedge.json)."""
    lines = ["| bundle | perplexity | vs fp32 | top-1 agreement | greedy agreement (identical prefix) | "
             "model bytes vs fp32 |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if row.system != "gptedge" or row.extra:  # -spin / -t1 rows run the same bundle
            continue
        q = json.loads((row.artifact / "gptedge.json").read_text())["quantization"]
        if not q:
            continue
        g = q["quality"]
        lines.append(f"| {row.name} | {g['quantized_ppl']:.3f} (fp32 {g['float_ppl']:.3f}) | "
                     f"{g['ppl_increase_pct']:+.2f}% | {g['top1_agreement']:.1%} | {g['greedy_agreement']:.1%} "
                     f"({g['greedy_prefix']:.1%}) | {q['model_bytes'] / q['source_model_bytes']:.1%} |")
    return "\n".join(lines) + "\n"


def add_perplexity(results: list[dict], rows: list[Row], eval_text: str | None) -> None:
    """Perplexity of the gptedge rows on held-out text (meaningful for the trained model only)."""
    if not eval_text:
        return
    from gptedge.runtime import Model

    for r, row in zip(results, rows):
        if row.system == "gptedge":
            r["ppl"] = Model.load(row.artifact, provider="cpu", threads=THREADS).perplexity(eval_text)


def tables(results: list[dict], skipped: list[str], meta: dict) -> str:
    """The rows' table, then the targets computed from them."""
    table = markdown(results, skipped, meta)
    goals = targets(results, meta["model"])
    return table + (f"\nTargets, this run, against the faster of llama.cpp's two loops:\n\n{goals}" if goals else "")


def retable(stem: Path) -> None:
    """The .md of a finished run, written again from its .json by this version's `markdown` and `targets` (the
    quality table, which reads the bundles, is kept from the old .md)."""
    data = json.loads(Path(f"{stem}.json").read_text())
    old = Path(f"{stem}.md").read_text()
    quality = old[old.index("\nQuality gate"):] if "\nQuality gate" in old else ""
    table = tables(data["rows"], data["skipped"], data["meta"])
    Path(f"{stem}.md").write_text(table + quality)
    print(table + quality)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["gpt2-124m", "demo", *LLAMA_SHAPES], default="gpt2-124m",
                        help="gpt2-124m: random-init GPT-2 small shape; demo: a trained gptedge checkpoint "
                             "(--checkpoint); llama-124m / smollm2-135m: random-init Llama-family shapes")
    parser.add_argument("--checkpoint", help="gptedge checkpoint folder for --model demo")
    parser.add_argument("--eval-text", help="held-out text file for perplexity (demo model)")
    parser.add_argument("--methods", nargs="*", default=None,
                        help="gptedge quantization recipes to include; RECIPE+kv8 adds the int8 KV cache "
                             "(quantize --kv-cache int8)")
    parser.add_argument("--rows", nargs="*", help="only rows whose name starts with one of these")
    parser.add_argument("--runs", type=int, default=3, help="fresh-process runs per row (medians reported)")
    parser.add_argument("--long-position", type=int, default=LONG_POSITION,
                        help="position of the late decode measurement")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md, .json and .png results")
    parser.add_argument("--retable", action="store_true",
                        help="rewrite the .md tables from the .json of the last run (measures nothing)")
    args = parser.parse_args()
    if args.retable:
        retable(args.out / f"peers-{args.model}")
        return
    if args.model == "demo" and not args.checkpoint:
        parser.error("--model demo needs --checkpoint")
    if args.methods is None:  # int8-dynamic is a GPT-2-benchmark row; the Llama tables compare the weight-only recipes
        args.methods = ["int8-weight", "int4-weight"] if args.model in LLAMA_SHAPES else [
            "int8-weight", "int8-dynamic", "int4-weight"]
        if args.model == "gpt2-124m":  # the int8 KV cache, where long positions and RSS are measured
            args.methods += ["int8-weight+kv8", "int4-weight+kv8"]
    rows, skipped, eval_text = build_rows(args)
    raw: dict[str, list[dict]] = {r.name: [] for r in rows}
    failed: dict[str, str] = {}
    for run in range(args.runs):
        for row in rows:
            if row.name in failed:
                continue
            _log(f"run {run + 1}/{args.runs}: {row.name}")
            try:
                raw[row.name].append(run_row(row, args.long_position))
            except RuntimeError as exc:
                failed[row.name] = str(exc)
                _log(str(exc))
    kept = [r for r in rows if raw[r.name] and r.name not in failed]
    reference = raw["pytorch-fp32"][-1]["tokens"] if raw.get("pytorch-fp32") else None
    results = [summarize(r.name, raw[r.name], r, None if r.name == "pytorch-fp32" else reference) for r in kept]
    add_perplexity(results, kept, eval_text)
    skipped += [f"{name} (failed: {why})" for name, why in failed.items()]
    meta = {"model": args.model, "runs": args.runs, **machine()}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"peers-{args.model}"
    table = tables(results, skipped, meta)
    if eval_text:
        table += "\nQuality gate of each gptedge bundle (stored in its gptedge.json):\n\n" + quality_table(kept)
    Path(f"{stem}.md").write_text(table)
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": results, "skipped": skipped}, indent=1))
    plot(results, Path(f"{stem}.png"), f"decode speed vs position ({args.model}, {THREADS} threads)")
    print(table)


if __name__ == "__main__":
    main()
