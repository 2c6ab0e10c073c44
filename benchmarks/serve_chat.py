"""The chat scenario of benchmarks/serve.py: a 10-turn conversation behind a long system prompt, prefix reuse on
and off, gptedge serve beside llama-server on the same real weights.

    python benchmarks/serve.py --scenario chat      (after benchmarks/real_model.py has prepared its cache)

The model is the real SmolLM2-135M-Instruct: gptedge's int8 bundle and llama.cpp's Q8_0 GGUF, both made from the
same weights by benchmarks/real_model.py. The system prompt is about 1,000 tokens of the built-in English text;
each turn adds a short question, streams a greedy answer of at most 32 tokens and appends it to the history,
so turn n's prompt holds turns 1..n-1. Each server runs the conversation twice in a fresh process: with its
prompt cache (the default) and with `cache_prompt: false` on every request (cold). Measured per turn: time to
first token (request sent to the first content delta); per run: the answers (a warm answer must equal the cold
one), and the server's resident memory at the end.

Writes benchmarks/results/serve-chat-smollm2.{md,json}.
"""

from __future__ import annotations

import http.client
import json
import statistics
import time
from pathlib import Path

import psutil

from common import HERE, THREADS, machine

RESULTS = HERE / "results"
REAL = HERE / ".cache" / "smollm2-real"
QUESTIONS = ["What is this text about?", "Name one module it mentions.", "What does 'import' do?",
             "Give a one-line summary.", "What is a keyword?", "Is Python compiled?", "What is a string?",
             "How do I write a loop?", "What is a class?", "Thank you. Anything else?"]
ANSWER_TOKENS = 32
SYSTEM_CHARS = 4200  # about 1,000 SmolLM2 tokens of the built-in text


def system_prompt() -> str:
    from gptedge.quantize.texts import builtin_text

    return "Answer questions about this text.\n\n" + builtin_text()[0][:SYSTEM_CHARS]


def ask(url: str, messages: list[dict], cache_prompt: bool) -> dict:
    """One streamed chat completion; time to the first content delta, the whole answer, prompt tokens."""
    host, port = url.split("//")[1].split(":")
    body = json.dumps({"model": "model", "messages": messages, "max_tokens": ANSWER_TOKENS, "temperature": 0,
                       "stream": True, "cache_prompt": cache_prompt, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{url}: HTTP {response.status}: {response.read()[:300]!r}")
    first, text, usage, buffer = None, "", None, b""
    while True:
        data = response.read1(65536)
        if not data:
            break
        buffer += data
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: {"):
                continue
            chunk = json.loads(event[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text += piece
    conn.close()
    return {"ttft_s": (first or time.perf_counter()) - sent, "text": text,
            "prompt_tokens": (usage or {}).get("prompt_tokens")}


def conversation(url: str, cache_prompt: bool) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt()}]
    turns = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        turn = ask(url, messages, cache_prompt)
        messages.append({"role": "assistant", "content": turn["text"]})
        turns.append(turn)
    return turns


def run_chat(start, stop) -> None:
    """`start(system, artifact, clients, context)` and `stop(proc)` are serve.py's server handling."""
    systems = {"gptedge": REAL / "gptedge-int8", "llama-server": REAL / "smollm2-q8_0.gguf"}
    missing = [str(p) for p in systems.values() if not p.exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run benchmarks/real_model.py first")
    runs = []
    for system, artifact in systems.items():
        for cache_prompt in (True, False):
            proc, url = start(system, artifact, 1, 8192)
            try:
                ask(url, [{"role": "user", "content": "Hello"}], False)  # warm-up (sessions, first allocations)
                turns = conversation(url, cache_prompt)
                rss = psutil.Process(proc.pid).memory_info().rss / 2**20
            finally:
                stop(proc)
            mode = "reuse" if cache_prompt else "cold"
            print(f"[chat] {system} {mode}: TTFT " + " ".join(f"{t['ttft_s'] * 1000:.0f}" for t in turns) + " ms",
                  flush=True)
            runs.append({"system": system, "mode": mode, "turns": turns, "rss_mb": round(rss, 1)})
    by = {(r["system"], r["mode"]): r for r in runs}

    def later(run: dict) -> float:  # turns 2-10: the ones a shared prefix can speed up
        return statistics.median(t["ttft_s"] for t in run["turns"][1:])

    summary = {}
    for system in systems:
        warm, cold = by[(system, "reuse")], by[(system, "cold")]
        summary[f"{system}: cold / reuse, median TTFT of turns 2-10"] = round(later(cold) / later(warm), 2)
        summary[f"{system}: answers with reuse equal cold answers"] = (
            [t["text"] for t in warm["turns"]] == [t["text"] for t in cold["turns"]])
    summary["llama-server / gptedge, median TTFT of turns 2-10 with reuse"] = round(
        later(by[("llama-server", "reuse")]) / later(by[("gptedge", "reuse")]), 2)
    meta = {"model": "SmolLM2-135M-Instruct (real): gptedge int8 bundle, llama.cpp Q8_0 GGUF", **machine(),
            "threads": THREADS, "answer_tokens": ANSWER_TOKENS, "turns": len(QUESTIONS),
            "system_prompt_tokens": by[("gptedge", "cold")]["turns"][0]["prompt_tokens"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / "serve-chat-smollm2"
    table = markdown(runs, meta, summary)
    Path(f"{stem}.md").write_text(table)
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "runs": runs, "summary": summary}, indent=1))
    print(table)


def markdown(runs: list[dict], meta: dict, summary: dict) -> str:
    header = "| server | prompt cache | " + " | ".join(f"turn {i + 1}" for i in range(len(QUESTIONS))) + " | RSS MB |"
    lines = [f"Time to first token (ms) per turn of a {meta['turns']}-turn chat behind a "
             f"{meta['system_prompt_tokens']}-token system prompt ({meta['model']}; {meta['threads']} threads; "
             f"greedy answers of at most {meta['answer_tokens']} tokens)", "", header,
             "|---|---|" + "---:|" * (len(QUESTIONS) + 1)]
    for run in runs:
        cells = " | ".join(f"{t['ttft_s'] * 1000:.0f}" for t in run["turns"])
        lines.append(f"| {run['system']} | {run['mode']} | {cells} | {run['rss_mb']:.0f} |")
    lines += ["", *[f"- {k}: {v}" for k, v in summary.items()], "",
              f"Machine: {meta['machine']}; {meta['time']}."]
    return "\n".join(lines) + "\n"
