"""gptedge serve against llama.cpp's own server, same weights, one run: `python benchmarks/serve.py`
(`--scenario chat`: the multi-turn prompt-reuse benchmark of serve_chat.py).

For 1, 4 and 8 concurrent streaming clients, each round sends every client one /v1/completions
request at once (a 128-token prompt of random ids, exactly 128 greedy new tokens, end-of-text
ignored) and measures aggregate decode tokens/s (all completion tokens / the round's wall time)
and each client's time to first token. Both servers get the same threads and as many parallel
sequences as clients: `gptedge serve --parallel N` on the INT8 bundle, `llama-server -np N` on the
Q8_0 GGUF of the same weights (built from the llama.cpp source vendored in the llama-cpp-python
sdist; see peers.py). Servers run one after another, each in a fresh process, with a warm-up
request first. The Python API's own rate on the same bundle is measured too (the server's
single-client overhead is against it).

Writes benchmarks/results/serve-MODEL.{md,json}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from common import (
    HERE,
    LLAMA_SHAPES,
    NEW_TOKENS,
    PROMPT_LEN,
    THREADS,
    machine,
    make_random_gpt2,
    make_random_llama,
    prompt_ids,
)
from peers import CACHE, LLAMA_BUILD, prepare_gguf, prepare_gptedge

RESULTS = HERE / "results"
CLIENTS = (1, 4, 8)


def _log(msg: str) -> None:
    print(f"[serve] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} was not healthy after {timeout} s")


def start(system: str, artifact: Path, clients: int, context: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    if system == "gptedge":
        cmd = [sys.executable, "-m", "gptedge.cli", "serve", f"model={artifact}", "--port", str(port),
               "--threads", str(THREADS), "--parallel", str(clients), "--provider", "cpu"]
    else:
        cmd = [str(LLAMA_BUILD / "bin" / "llama-server"), "-m", str(artifact), "--port", str(port), "--host",
               "127.0.0.1", "-t", str(THREADS), "-tb", str(THREADS), "-np", str(clients), "-c", str(context * clients),
               "--no-warmup", "-a", "model"]
        env["LD_LIBRARY_PATH"] = str(LLAMA_BUILD / "bin")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_health(url, proc)
    return proc, url


def one_request(url: str, prompt: list[int], out: list, start_at: float) -> None:
    """One streamed completion through a lean client (http.client, no per-event JSON): the client shares the cores
    with the server, so a heavy one would slow the server it measures."""
    host, port = url.split("//")[1].split(":")
    body = json.dumps({"model": "model", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{url}: HTTP {response.status}: {response.read()[:200]!r}")
    first, tail = None, b""
    while True:
        data = response.read1(65536)
        if not data:
            break
        if first is None and b'"text":"' in data.replace(b'": "', b'":"').replace(b'"text":""', b""):
            first = time.perf_counter()
        tail = (tail + data)[-4096:]
    done = time.perf_counter()
    conn.close()
    events = [e[6:] for e in tail.decode("utf-8", "replace").split("\n\n") if e.startswith("data: {")]
    usage = next(json.loads(e)["usage"] for e in reversed(events) if '"usage":{' in e.replace(" ", ""))
    out.append({"ttft_s": (first or done) - start_at, "end_s": done - start_at, "tokens": usage["completion_tokens"]})


def run_round(url: str, prompts: list[list[int]]) -> dict:
    out: list[dict] = []
    start_at = time.perf_counter()
    threads = [threading.Thread(target=one_request, args=(url, p, out, start_at)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(out) != len(prompts):
        raise RuntimeError(f"{url}: {len(prompts) - len(out)} request(s) failed")
    wall = max(r["end_s"] for r in out)
    decode_window = wall - min(r["ttft_s"] for r in out)
    return {"wall_s": wall, "tokens": sum(r["tokens"] for r in out), "ttft_s": [r["ttft_s"] for r in out],
            "decode_tokens": sum(r["tokens"] - 1 for r in out), "decode_s": decode_window}


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


API_WORKER = f"""
import json, sys, time
from common import prompt_ids
from gptedge.runtime import Model
m = Model.load(sys.argv[1], provider="cpu", threads={THREADS})
vocab = int(sys.argv[2])
print("ready", flush=True)
for line in sys.stdin:
    t = time.perf_counter()
    out = m.generate(prompt_ids({PROMPT_LEN}, vocab, seed=int(line)), temperature=0, max_new_tokens={NEW_TOKENS},
                     stop_token_ids=())
    print(json.dumps({{"tokens": len(out.token_ids), "wall_s": time.perf_counter() - t, "ttft_s": out.timings.ttft_s}}),
          flush=True)
"""


class ApiWorker:
    """The same request through Model.generate in its own process: what the server's overhead is measured against."""

    def __init__(self, bundle: Path, vocab: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", API_WORKER, str(bundle), str(vocab)], cwd=HERE, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the Python API worker did not start")

    def round(self, seed: int) -> dict:
        self.proc.stdin.write(f"{seed}\n")
        self.proc.stdin.flush()
        r = json.loads(self.proc.stdout.readline())
        return {"wall_s": r["wall_s"], "tokens": r["tokens"], "ttft_s": [r["ttft_s"]], "decode_tokens": r["tokens"] - 1,
                "decode_s": r["wall_s"] - r["ttft_s"]}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def summarize(system: str, clients: int, results: list[dict]) -> dict:
    """aggregate_tps: every completion token / the round's wall time (prefills included);
    decode_tps: tokens after each client's first / from the first first token to the last token."""
    rates = [r["tokens"] / r["wall_s"] for r in results]
    decode = [r["decode_tokens"] / r["decode_s"] for r in results]
    ttfts = sorted(t for r in results for t in r["ttft_s"])
    return {"system": system, "clients": clients, "rounds": len(results), "aggregate_tps": statistics.median(rates),
            "aggregate_tps_min": min(rates), "aggregate_tps_max": max(rates), "decode_tps": statistics.median(decode),
            "decode_tps_min": min(decode), "decode_tps_max": max(decode),
            "ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2],
            "ttft_p95_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
            "tokens_per_round": results[0]["tokens"]}


def measure(systems: dict[str, Path], clients: int, context: int, vocab: int, rounds: int,
            api: ApiWorker | None) -> list[dict]:
    """Every server started (an idle one costs nothing), then rounds taken in turn, so drift hits all alike."""
    servers = {name: start(name, artifact, clients, context) for name, artifact in systems.items()}
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    if api is not None:
        runs["python-api"] = []
    try:
        for _, url in servers.values():
            run_round(url, [prompt_ids(PROMPT_LEN, vocab, seed=99)])  # warm-up: graph, allocator, caches
        for r in range(rounds):
            prompts = [prompt_ids(PROMPT_LEN, vocab, seed=r * 100 + c) for c in range(clients)]
            for name, (_, url) in servers.items():
                runs[name].append(run_round(url, prompts))
            if api is not None:
                runs["python-api"].append(api.round(r * 100))
    finally:
        for proc, _ in servers.values():
            stop(proc)
    return [summarize(name, clients, results) for name, results in runs.items()]


def markdown(rows: list[dict], meta: dict, summary: dict) -> str:
    lines = [f"# gptedge serve vs llama-server ({meta['model']}, {meta['threads']} threads)", "",
             f"{meta['machine']}; {meta['time']}; {PROMPT_LEN}-token prompts, {NEW_TOKENS} greedy tokens per request, "
             "every client streaming; medians over rounds (min-max). Aggregate decode: tokens after each client's "
             "first, over the time from the first first token to the last token; all tokens / wall: prefills included.",
             "", "| server | clients | aggregate decode tok/s | all tokens / wall, tok/s | TTFT p50 ms | TTFT p95 ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        decode = f"{r['decode_tps']:.1f} ({r['decode_tps_min']:.1f}-{r['decode_tps_max']:.1f})"
        spread = f"{r['aggregate_tps']:.1f} ({r['aggregate_tps_min']:.1f}-{r['aggregate_tps_max']:.1f})"
        lines.append(f"| {r['system']} | {r['clients']} | {decode} | {spread} | {r['ttft_p50_ms']:.0f} | "
                     f"{r['ttft_p95_ms']:.0f} |")
    lines += ["", *(f"- {k}: {v}" for k, v in summary.items()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["gpt2-124m", *LLAMA_SHAPES], default="gpt2-124m")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per (server, clients)")
    parser.add_argument("--clients", type=int, nargs="*", default=list(CLIENTS))
    parser.add_argument("--scenario", choices=["throughput", "chat"], default="throughput",
                        help="throughput: the concurrent-clients table above; chat: a 10-turn conversation behind a "
                             "long system prompt on the real SmolLM2, prompt cache on and off (serve_chat.py)")
    args = parser.parse_args()
    if args.scenario == "chat":
        from serve_chat import run_chat

        run_chat(start, stop)
        return
    root = CACHE / args.model
    if args.model == "gpt2-124m":
        hf_dir, vocab, context = make_random_gpt2(root / "hf"), 50257, 1024
    else:
        shape = LLAMA_SHAPES[args.model]
        hf_dir, vocab, context = (make_random_llama(root / "hf", shape), shape["vocab_size"],
                                  shape["max_position_embeddings"])
    bundle = prepare_gptedge(hf_dir, root, ["int8-weight"], None)["int8-weight"]
    gguf = prepare_gguf(hf_dir, root)["q8_0"] if (LLAMA_BUILD / "bin" / "llama-server").exists() else None
    systems = {"gptedge": bundle, **({"llama-server": gguf} if gguf else {})}
    skipped = [] if gguf else [f"llama-server (not built in {LLAMA_BUILD / 'bin'})"]
    api = ApiWorker(bundle, vocab)
    rows: list[dict] = []
    try:
        for clients in args.clients:
            _log(f"{', '.join(systems)}: {clients} client(s)")
            rows += measure(systems, clients, context, vocab, args.rounds, api if clients == 1 else None)
    finally:
        api.close()
    by = {(r["system"], r["clients"]): r for r in rows}

    def ratio(a: tuple, b: tuple, key: str) -> float | None:
        return round(by[a][key] / by[b][key], 3) if a in by and b in by else None

    summary = {
        "gptedge decode, 4 clients / 1 client": ratio(("gptedge", 4), ("gptedge", 1), "decode_tps"),
        "gptedge all tokens / wall, 4 clients / 1 client": ratio(("gptedge", 4), ("gptedge", 1), "aggregate_tps"),
        "gptedge 1 client / Python API (all tokens / wall)": ratio(("gptedge", 1), ("python-api", 1), "aggregate_tps"),
    }
    for clients in args.clients:
        summary[f"gptedge / llama-server decode, {clients} client(s)"] = ratio(("gptedge", clients),
                                                                             ("llama-server", clients), "decode_tps")
    meta = {"model": args.model, **machine(), "bundle": "int8-weight",
            "gguf": "q8_0", "skipped": skipped}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"serve-{args.model}"
    table = markdown(rows, meta, summary)
    Path(f"{stem}.md").write_text(table)
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1))
    print(table)


if __name__ == "__main__":
    main()
