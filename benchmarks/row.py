"""One benchmark row, measured in this fresh process: `python benchmarks/row.py SYSTEM ARTIFACT [options]`.

import -> load (timed) -> warm-up generation (its TTFT is the cold TTFT) -> measured
generation of PROMPT_LEN + NEW_TOKENS -> a decode near LONG_POSITION -> one JSON line.
Systems: gptedge, naive-ort, pytorch, optimum, genai, llamacpp.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Iterable

from common import (
    LONG_NEW_TOKENS,
    LONG_POSITION,
    NEW_TOKENS,
    PROMPT_LEN,
    THREADS,
    Timed,
    context_of,
    emit,
    peak_rss_mb,
    pin_threads,
    prompt_ids,
    rss_mb,
    timed,
)

Stream = Callable[[list[int], int], Iterable[int]]  # (prompt ids, new tokens) -> token ids as they come


def ort_session_options():
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return so


def load_gptedge(artifact: Path, spin: bool | None = None, threads: int = THREADS) -> tuple[Stream, int, int]:
    from gptedge.runtime import Model

    # Every generation here is a cold prompt (the workload measures prefill): no stored prompt prefixes
    model = Model.load(artifact, provider="cpu", threads=threads, spin=spin, prefix_cache_mb=0)

    def stream(ids: list[int], n: int) -> Iterable[int]:
        # Token ids with the time each was chosen (text pieces may hold back bytes of a character).
        stamped: list[_Stamped] = []
        for _ in model.stream(ids, max_new_tokens=n, temperature=0.0, stop_token_ids=(),
                              on_token=lambda t: stamped.append(_Stamped(t, time.perf_counter()))):
            pass
        yield from stamped

    arch = model.spec.architecture
    return stream, arch.vocab_size, arch.context_length


def load_naive_ort(artifact: Path) -> tuple[Stream, int, int]:
    """A hand-written numpy loop over an Optimum export: the floor any ONNX runtime should beat."""
    import json

    import numpy as np
    import onnxruntime as ort

    model_file = artifact if artifact.suffix == ".onnx" else artifact / "model.onnx"
    cfg = json.loads((model_file.parent / "config.json").read_text())
    sess = ort.InferenceSession(str(model_file), ort_session_options(), providers=["CPUExecutionProvider"])
    past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    out_names = ["logits"] + [n.replace("past_key_values", "present") for n in past_names]
    n_head = cfg.get("n_head") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or (cfg.get("n_embd") or cfg["hidden_size"]) // n_head
    n_head = cfg.get("num_key_value_heads", n_head)  # the cache holds the KV heads

    def stream(ids: list[int], n: int) -> Iterable[int]:
        past = {name: np.zeros((1, n_head, 0, head_dim), np.float32) for name in past_names}
        tokens = np.array([ids], np.int64)
        total = len(ids)
        for _ in range(n):
            p = total - tokens.shape[1]
            feed = {"input_ids": tokens, "attention_mask": np.ones((1, total), np.int64),
                    "position_ids": np.arange(p, total, dtype=np.int64)[None, :], **past}
            outputs = sess.run(out_names, feed)
            nxt = int(outputs[0][0, -1].argmax())
            yield nxt
            past = dict(zip(past_names, outputs[1:]))
            tokens = np.array([[nxt]], np.int64)
            total += 1

    return stream, cfg["vocab_size"], cfg.get("n_positions") or cfg["max_position_embeddings"]


def load_pytorch(artifact: Path) -> tuple[Stream, int, int]:
    """PyTorch eager (transformers GPT-2, SDPA attention) with its KV cache, greedy, one token per step."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(1)
    model = AutoModelForCausalLM.from_pretrained(artifact, torch_dtype=torch.float32).eval()

    def stream(ids: list[int], n: int) -> Iterable[int]:
        with torch.inference_mode():
            out = model(torch.tensor([ids]), use_cache=True)
            for _ in range(n):
                nxt = int(out.logits[0, -1].argmax())
                yield nxt
                out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)

    return stream, model.config.vocab_size, context_of(model.config)


def load_optimum(artifact: Path, file_name: str) -> tuple[Stream, int, int]:
    """Optimum's ORTModelForCausalLM with HF generate, as its users run it (CPU default: no IO binding)."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    model = ORTModelForCausalLM.from_pretrained(
        artifact, file_name=file_name, provider="CPUExecutionProvider", session_options=ort_session_options(),
        use_io_binding=False, use_cache=True,
    )

    class Collect(BaseStreamer):
        def __init__(self) -> None:
            self.items: list[tuple[int, float]] = []
            self.first = True

        def put(self, value):
            if self.first:  # generate() first hands over the prompt
                self.first = False
                return
            self.items.append((int(value.reshape(-1)[0]), time.perf_counter()))

        def end(self):
            pass

    def stream(ids: list[int], n: int) -> Iterable[int]:
        # HF generate is not an iterator; replay its timestamps so `timed` sees the real arrival times.
        collect = Collect()
        model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, num_beams=1, use_cache=True,
                       pad_token_id=model.config.eos_token_id, streamer=collect)
        for token, stamp in collect.items:
            yield _Stamped(token, stamp)

    return stream, model.config.vocab_size, context_of(model.config)


def load_genai(artifact: Path) -> tuple[Stream, int, int]:
    import json

    import onnxruntime_genai as og

    model = og.Model(str(artifact))
    cfg = json.loads((artifact / "genai_config.json").read_text())["model"]

    def stream(ids: list[int], n: int) -> Iterable[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + n, min_length=len(ids) + n)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
            yield int(gen.get_next_tokens()[0])

    return stream, cfg["vocab_size"], cfg["context_length"]


def load_llamacpp(artifact: Path) -> tuple[Stream, int, int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(artifact), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=THREADS,
                n_threads_batch=THREADS, seed=0, verbose=False)

    def stream(ids: list[int], n: int) -> Iterable[int]:
        llm.reset()
        for i, token in enumerate(llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)):
            yield token
            if i + 1 >= n:
                break

    # The learned position table ends at the trained context; a longer n_ctx would index past it.
    arch = llm.metadata.get("general.architecture", "gpt2")
    trained = int(llm.metadata.get(f"{arch}.context_length", llm.n_ctx()))
    return stream, llm.n_vocab(), min(trained, llm.n_ctx())


class _Stamped(int):
    """A token id carrying the time it really arrived (for peers whose API is not an iterator)."""

    def __new__(cls, value: int, stamp: float):
        obj = super().__new__(cls, value)
        obj.stamp = stamp
        return obj


def _timed(stream: Stream, ids: list[int], n: int) -> Timed:
    return timed(lambda: stream(ids, n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("system", choices=["gptedge", "naive-ort", "pytorch", "optimum", "genai", "llamacpp"])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--file-name", default="model.onnx", help="optimum: which ONNX file in the folder")
    parser.add_argument("--long-position", type=int, default=LONG_POSITION)
    parser.add_argument("--spin", action=argparse.BooleanOptionalAction, default=None,
                        help="gptedge: Model.load's spin (default: its own, the brief spin)")
    parser.add_argument("--threads", type=int, default=THREADS, help="gptedge: intra-op threads")
    args = parser.parse_args()
    pin_threads()
    rss_start = rss_mb()  # before the row imports its libraries
    t0 = time.perf_counter()
    if args.system == "optimum":
        stream, vocab, context = load_optimum(args.artifact, args.file_name)
    elif args.system == "gptedge":
        stream, vocab, context = load_gptedge(args.artifact, args.spin, args.threads)
    else:
        stream, vocab, context = {"gptedge": load_gptedge, "naive-ort": load_naive_ort, "pytorch": load_pytorch,
                                  "genai": load_genai, "llamacpp": load_llamacpp}[args.system](args.artifact)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(PROMPT_LEN, vocab)
    cold = _timed(stream, ids, NEW_TOKENS)
    warm = _timed(stream, ids, NEW_TOKENS)
    long_prompt = min(args.long_position, context - LONG_NEW_TOKENS - 1)
    late = _timed(stream, prompt_ids(long_prompt, vocab, seed=1), LONG_NEW_TOKENS)
    emit({
        "system": args.system, "load_s": load_s, "ttft_ms": warm.ttft_ms, "cold_ttft_ms": cold.ttft_ms,
        "decode_tps": warm.decode_tps, "late_position": long_prompt, "late_decode_tps": late.decode_tps,
        "peak_rss_mb": peak_rss_mb(), "rss_start_mb": rss_start, "tokens": warm.tokens,
        "curve": {"positions": list(range(PROMPT_LEN + 1, PROMPT_LEN + len(warm.times))), "tps": warm.per_token_tps(),
                  "late_positions": list(range(long_prompt + 1, long_prompt + len(late.times))),
                  "late_tps": late.per_token_tps()},
    })


if __name__ == "__main__":
    main()
