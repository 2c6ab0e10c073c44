"""Where the resident memory goes: `python benchmarks/memory.py`.

On the GPT-2-124M-shape INT8 bundle with the int8 KV cache (the peers benchmark's gptedge-int8-weight-kv8, built
there and reused from benchmarks/.cache) and llama.cpp's Q8_0 GGUF of the same weights, each case in a fresh
process: resident memory after the imports, after loading, and after a 128-token prompt and 128 greedy tokens
(the peers workload), then after a 900-token prompt and 32 tokens (its late-position run), split into
anonymous memory (heap: prepacked weights, arena, KV cache) and file-backed pages
(libraries, mapped weights), with the process's peak. The onnxruntime cases run the bundle's graph through the
runtime's Engine with one session setting changed each:
- defaults (the session options `Model.load` sets);
- the CPU memory arena off;
- weight prepacking off (MatMulNBits then reads the stored blocks as they are);
- the embedding stored apart from the tied LM head: the same bytes twice in the weight file, so that the head's
  stored copy is released once prepacked and the embedding's is only paged in where a lookup reads it.
Two more cases bridge to the peers benchmark's rows: the whole runtime (`Model.load` and `generate`, tokenizer and
optimized-graph cache included), and the tokenizer alone (tokenizers' `Tokenizer.from_file`, after the same imports).
Writes benchmarks/results/memory-gpt2-124m.json and .md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from common import HERE, LONG_NEW_TOKENS, LONG_POSITION, NEW_TOKENS, PROMPT_LEN, THREADS, machine, make_random_gpt2
from peers import CACHE, LLAMA_BUILD, prepare_gptedge

CHILD = r"""
import json, re, sys
case, path = sys.argv[1], sys.argv[2]
threads, prompt, new, long, long_new = (int(x) for x in sys.argv[3:8])

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024
    return out

def mapped_mb(part):
    # Resident MB of this process's mappings of files whose path contains `part`.
    total, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                current = part in line
            elif current and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total / 1024

stages = {"start": status()}
ids = list(range(1, prompt + 1))
if case == "llamacpp":
    from llama_cpp import Llama
    stages["imported"] = status()
    llm = Llama(model_path=path, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, seed=0, verbose=False)
    stages["loaded"] = status()
    mapped = mapped_mb(".gguf")
    def run(prompt_ids, n):
        llm.reset()
        for i, _ in enumerate(llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)):
            if i + 1 >= n:
                break
elif case == "Model.load":
    from gptedge.runtime import Model
    stages["imported"] = status()
    model = Model.load(path, provider="cpu", threads=threads)
    stages["loaded"] = status()
    mapped = mapped_mb("model.onnx.data")
    def run(prompt_ids, n):
        model.generate(prompt_ids, max_new_tokens=n, temperature=0.0, stop_token_ids=())
elif case == "tokenizer":
    import numpy, onnxruntime
    from tokenizers import Tokenizer
    stages["imported"] = status()
    tokenizer = Tokenizer.from_file(path + "/tokenizer.json")
    stages["loaded"] = status()
    mapped = 0.0
    def run(prompt_ids, n):
        tokenizer.decode(prompt_ids + prompt_ids[:n])
else:
    from pathlib import Path
    import numpy as np
    import onnxruntime as ort
    from gptedge.runtime.bundle import read_spec
    from gptedge.runtime.engine import Engine
    from gptedge.runtime.providers import choose_provider, session_options
    stages["imported"] = status()
    bundle = Path(path)
    spec = read_spec(bundle)
    so = session_options(choose_provider("cpu", spec), threads)
    if case == "arena off":
        so.enable_cpu_mem_arena = False
    if case == "prepacking off":
        so.add_session_config_entry("session.disable_prepacking", "1")
    engine = Engine(ort.InferenceSession(str(bundle / "model.onnx"), so, providers=["CPUExecutionProvider"]), spec)
    stages["loaded"] = status()
    mapped = mapped_mb("model.onnx.data")
    from gptedge.runtime.generator import decode_step, prefill
    def run(prompt_ids, n):
        cache = engine.new_cache(1, len(prompt_ids) + n)
        row = prefill(engine, cache, prompt_ids)
        for _ in range(n - 1):
            row = decode_step(engine, cache, int(np.argmax(row)))
        engine.release(cache)
run(ids, new)
stages["generated"] = status()
run(list(range(1, long + 1)), long_new)  # the peers benchmark's late-position run
stages["long prompt"] = status()
print(json.dumps({"stages": stages, "weights_mapped_after_load_mb": mapped}))
"""

CASES = ("defaults", "arena off", "prepacking off", "embedding stored apart", "Model.load", "tokenizer")


def untied_copy(bundle: Path, out: Path) -> Path:
    """The bundle's graph with the embedding lookup reading its own copy of the tied head's quantized table."""
    import shutil

    import onnx

    from gptedge.runtime.bundle import checksum_files

    if (out / "model.onnx").exists():
        return out
    model = onnx.load(str(bundle / "model.onnx"))
    tables = {n.input[0] for n in model.graph.node if n.op_type == "GatherBlockQuantized"}
    heads = {n.input[1] for n in model.graph.node if n.op_type == "MatMulNBits"}
    tied = tables & heads
    if not tied:
        raise SystemExit(f"{bundle}: the embedding and the head share no table; nothing to store apart")
    for initializer in list(model.graph.initializer):
        if initializer.name in tied:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializer)
            copy.name = initializer.name + ".embedding"
            model.graph.initializer.append(copy)
    for node in model.graph.node:
        if node.op_type == "GatherBlockQuantized" and node.input[0] in tied:
            node.input[0] += ".embedding"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    onnx.save(model, str(tmp / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=1024)
    shutil.copy(bundle / "tokenizer.json", tmp / "tokenizer.json")
    spec = json.loads((bundle / "gptedge.json").read_text())
    spec["files"] = checksum_files(tmp)  # the runtime checks every file against these
    (tmp / "gptedge.json").write_text(json.dumps(spec, indent=1))
    tmp.rename(out)
    return out


def measure(case: str, path: Path) -> dict:
    kind = "llamacpp" if case == "llama.cpp Q8_0" else case
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    if kind == "llamacpp":
        env["LLAMA_CPP_LIB_PATH"] = str(LLAMA_BUILD / "bin")
    out = subprocess.run([sys.executable, "-c", CHILD, "defaults" if kind == "embedding stored apart" else kind,
                          str(path), str(THREADS), str(PROMPT_LEN), str(NEW_TOKENS), str(LONG_POSITION),
                          str(LONG_NEW_TOKENS)],
                         cwd=HERE, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{case} failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def weight_mb(path: Path) -> float:
    """Size of what a case loads from disk: the GGUF, the bundle's model.onnx and its data file, or a tokenizer."""
    files = [path] if path.is_file() else list(path.glob("model.onnx*"))
    return sum(f.stat().st_size for f in files) / 1e6


def table(results: dict) -> str:
    lines = ["| case | imports MB | load adds: anon / file MB | weights mapped after load MB | "
             "128 + 128 tokens add MB | peak then MB | long prompt adds MB | peak RSS MB | files loaded MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case, r in results.items():
        s = r["stages"]
        anon = s["loaded"]["RssAnon"] - s["imported"]["RssAnon"]
        file = s["loaded"]["RssFile"] - s["imported"]["RssFile"]
        generation = s["generated"]["VmRSS"] - s["loaded"]["VmRSS"]
        long = s["long prompt"]["VmRSS"] - s["generated"]["VmRSS"]
        lines.append(f"| {case} | {s['imported']['VmRSS']:.0f} | {anon:.0f} / {file:.0f} | "
                     f"{r['weights_mapped_after_load_mb']:.0f} | {generation:.0f} | "
                     f"{s['generated']['VmHWM']:.0f} | {long:.0f} | "
                     f"{s['long prompt']['VmHWM']:.0f} | {r['weight_file_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    root = CACHE / "gpt2-124m"
    bundle = prepare_gptedge(make_random_gpt2(root / "hf"), root, ["int8-weight+kv8"], None)["int8-weight-kv8"]
    paths = {case: bundle for case in CASES}
    paths["embedding stored apart"] = untied_copy(bundle, root / "memory-embedding-apart")
    gguf = root / "model-q8_0.gguf"
    if gguf.exists() and (LLAMA_BUILD / "bin").exists():
        paths["llama.cpp Q8_0"] = gguf
    results = {case: {**measure(case, path),
                      "weight_file_mb": weight_mb(path / "tokenizer.json" if case == "tokenizer" else path)}
               for case, path in paths.items()}
    meta = {**machine(), "bundle": "gpt2-124m int8-weight-kv8", "prompt_tokens": PROMPT_LEN, "new_tokens": NEW_TOKENS,
            "long_prompt_tokens": LONG_POSITION, "long_new_tokens": LONG_NEW_TOKENS}
    out = HERE / "results" / "memory-gpt2-124m"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "cases": results}, indent=1))
    text = (f"{table(results)}\n\nGPT-2-124M shape, INT8 weights and KV cache ({meta['bundle']}); "
            f"{PROMPT_LEN}-token prompt and {NEW_TOKENS} greedy tokens, then a {LONG_POSITION}-token prompt and "
            f"{LONG_NEW_TOKENS} tokens (the peers benchmark's workload), {THREADS} threads; one fresh process a case; "
            f"machine: {meta['machine']}; {meta['time']}.\n")
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
