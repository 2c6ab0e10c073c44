"""Embeddings per second: gptedge embedding bundles beside llama-server --embeddings and PyTorch, same weights.

    python benchmarks/embeddings.py      (after benchmarks/real_model.py has prepared its cache)

The weights are the real SmolLM2-135M (benchmarks/.cache/smollm2-real): not an embedding model, but a real
decoder of the size apps embed with, pooled by its last token and normalised as Qwen3-Embedding is. Systems:
gptedge's fp32 and int8-weight embedding bundles, llama-server (`--embeddings --pooling last`, built from the
vendored llama.cpp source) on the Q8_0 and F32 GGUFs of the same weights, and transformers on PyTorch (what
sentence-transformers runs underneath). Every system embeds the same 64 passages of exactly 128 tokens (ids, so
no tokenizer differs), at batch 1 and batch 32, 2 threads, each system in its own process (peak resident memory
is that process's). Rates are passages per second over the whole set, the best of 3 rounds after a warm-up.

Writes benchmarks/results/embeddings-smollm2.{md,json}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import HERE, THREADS, machine, peak_rss_mb, pin_threads

RESULTS = HERE / "results"
REAL = HERE / ".cache" / "smollm2-real"
WORK = HERE / ".cache" / "embeddings"
PASSAGES, LENGTH, ROUNDS, BATCHES = 64, 128, 3, (1, 32)


def passages() -> list[list[int]]:
    from tokenizers import Tokenizer

    from gptedge.quantize.texts import builtin_text

    tok = Tokenizer.from_file(str(REAL / "gptedge-fp32" / "tokenizer.json"))
    ids = tok.encode(builtin_text()[0], add_special_tokens=False).ids
    return [ids[i * LENGTH:(i + 1) * LENGTH] for i in range(PASSAGES)]


def rate(embed, texts: list[list[int]], batch: int) -> tuple[float, np.ndarray]:
    """Passages per second, best of ROUNDS after a warm-up, and the vectors."""
    embed(texts[:batch], batch)
    best, vectors = 0.0, None
    for _ in range(ROUNDS):
        start = time.perf_counter()
        out = [embed(texts[i:i + batch], batch) for i in range(0, len(texts), batch)]
        best = max(best, len(texts) / (time.perf_counter() - start))
        vectors = np.concatenate(out)
    return best, vectors


def child(system: str, path: str) -> None:
    """One system's rates, measured in this process; prints a JSON line."""
    pin_threads()
    texts = passages()
    if system.startswith("gptedge"):
        from gptedge.runtime import Model

        model = Model.load(path, provider="cpu", threads=THREADS)
        embed = lambda t, b: model.embed(t, batch_size=b)  # noqa: E731
    else:
        import torch
        import transformers

        torch.set_num_threads(THREADS)
        hf = transformers.AutoModel.from_pretrained(path).eval()

        def embed(t, b):
            with torch.no_grad():
                hidden = hf(torch.tensor(t)).last_hidden_state[:, -1]
                return torch.nn.functional.normalize(hidden, dim=-1).numpy()
    rows = {}
    for batch in BATCHES:
        per_s, vectors = rate(embed, texts, batch)
        rows[batch] = per_s
        np.save(WORK / f"{system}-b{batch}.npy", vectors)
    print("ROW " + json.dumps({"system": system, "rates": rows, "peak_rss_mb": round(peak_rss_mb())}), flush=True)


def llama_server(gguf: Path, name: str) -> dict:
    import httpx

    from peers import LLAMA_BUILD
    from serve import free_port, stop, wait_health

    port = free_port()
    proc = subprocess.Popen([str(LLAMA_BUILD / "bin" / "llama-server"), "-m", str(gguf), "--port", str(port),
                             "--host", "127.0.0.1", "-t", str(THREADS), "-tb", str(THREADS), "--embeddings",
                             "--pooling", "last", "-c", str(LENGTH * 32), "-b", str(LENGTH * 32), "-ub",
                             str(LENGTH * 32), "-np", "1", "--no-warmup"],
                            env={**os.environ, "LD_LIBRARY_PATH": str(LLAMA_BUILD / "bin")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, proc)
        texts = passages()

        def embed(t, b):
            reply = httpx.post(url + "/v1/embeddings", json={"input": t, "model": "m"}, timeout=600).json()
            return np.array([d["embedding"] for d in sorted(reply["data"], key=lambda d: d["index"])])

        rows = {}
        for batch in BATCHES:
            rows[batch], vectors = rate(embed, texts, batch)
            np.save(WORK / f"{name}-b{batch}.npy", vectors)
        rss = int(open(f"/proc/{proc.pid}/status").read().split("VmHWM:")[1].split()[0]) / 1024
    finally:
        stop(proc)
    return {"system": name, "rates": rows, "peak_rss_mb": round(rss)}


def main() -> None:
    if len(sys.argv) == 3:
        return child(sys.argv[1], sys.argv[2])
    from gptedge.export.exporter import export_bundle
    from gptedge.quantize import quantize_bundle
    from peers import LLAMA_BUILD

    WORK.mkdir(parents=True, exist_ok=True)
    fp32, int8 = WORK / "gptedge-fp32", WORK / "gptedge-int8"
    if not fp32.exists():
        export_bundle(REAL / "hf", fp32, embeddings=True, pooling="last", normalize=True, max_context=1024)
    if not int8.exists():
        quantize_bundle(fp32, int8, "int8-weight")
    rows = []
    for system, path in (("gptedge fp32", fp32), ("gptedge int8-weight", int8), ("transformers fp32", REAL / "hf")):
        out = subprocess.run([sys.executable, __file__, system, str(path)], capture_output=True, text=True,
                             check=True, cwd=HERE).stdout
        rows.append(json.loads(out.split("ROW ", 1)[1]))
        print(rows[-1], flush=True)
    f32 = WORK / "smollm2-f32.gguf"
    if not f32.exists() and (LLAMA_BUILD / "bin" / "llama-quantize").exists():
        subprocess.run([str(LLAMA_BUILD / "bin" / "llama-quantize"), "--allow-requantize",
                        str(REAL / "smollm2-q8_0.gguf"), str(f32), "F32"], capture_output=True)  # skipped if refused
    for name, gguf in (("llama-server Q8_0", REAL / "smollm2-q8_0.gguf"), ("llama-server F32", f32)):
        if gguf.exists() and (LLAMA_BUILD / "bin" / "llama-server").exists():
            rows.append(llama_server(gguf, name))
            print(rows[-1], flush=True)
    reference = np.load(WORK / "transformers fp32-b32.npy")
    for row in rows:
        vectors = np.load(WORK / f"{row['system']}-b32.npy")
        row["min_cosine_to_transformers"] = float((vectors * reference).sum(1).min())
    meta = {"model": "SmolLM2-135M (real weights), last-token pooling, normalised", **machine(),
            "passages": PASSAGES, "tokens_per_passage": LENGTH}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "embeddings-smollm2.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = markdown(rows, meta)
    (RESULTS / "embeddings-smollm2.md").write_text(md)
    print(md)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Passages of {meta['tokens_per_passage']} tokens embedded per second ({meta['model']}; "
             f"{meta['threads']} threads; best of {ROUNDS} rounds over {meta['passages']} passages)", "",
             "| system | batch 1 | batch 32 | peak RSS MB | min cosine to transformers |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        rates = {int(k): v for k, v in r["rates"].items()}
        lines.append(f"| {r['system']} | {rates[1]:.1f} | {rates[32]:.1f} | {r['peak_rss_mb']:,} | "
                     f"{r['min_cosine_to_transformers']:.5f} |")
    lines += ["", f"Machine: {meta['machine']}; {meta['time']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
