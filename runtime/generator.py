"""The decode ladder: prefill -> (sample -> check stop -> decode step)*, one request or a batch.

Each rung is a small function over an `Engine` and its `KVCache`; `stream_tokens` strings them
together for one request and `generate_rows` for a right-padded batch. Nothing here touches
onnxruntime directly, and nothing here knows about files or providers (that is `model.py`).

Text is built from tokens by a `StreamingDetokenizer` (never half a UTF-8 character) and passed
through a `StopStringMatcher` (stop strings matched across token boundaries and never output), so
the pieces a stream yields, joined, are exactly `GenerationResult.text`.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from gptedge.errors import ContextLengthError, UsageError
from gptedge.runtime.detokenizer import StreamingDetokenizer, token_count
from gptedge.runtime.engine import Engine, KVCache
from gptedge.runtime.sampling import SamplingParams, sample_next
from gptedge.runtime.stopping import StopStringMatcher

FINISH_REASONS = ("eos", "stop_string", "length", "cancelled", "context")
PREFILL_CHUNK = 256  # prompt tokens per run when prefilling (bounds activation memory)
KV_ROUNDING = 64  # KV buffers come in multiples of this, so requests of similar size share pooled buffers


class CancelToken:
    """Set from any thread to stop a generation at its next token; the partial result says "cancelled".

    A plain `threading.Event` works too: anything with `is_set()`.
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    cancelled = property(is_set)


@dataclass
class Timings:
    prompt_tokens: int
    generated_tokens: int = 0
    ttft_s: float = 0.0  # request start -> first new token sampled (prefill + one sample)
    decode_s: float = 0.0  # first token -> last token
    total_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first divided by the time they took (the prefill is not in it)."""
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else math.nan

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else math.nan


@dataclass
class GenerationResult:
    """What a generation produced.

    `token_ids` are the sampled tokens, without a final stop token id (eos) but including the tokens
    of a matched stop string; `text` is their decoded text cut before the stop string.
    `finish_reason`: "eos" (a stop token id), "stop_string", "length" (max_new_tokens),
    "cancelled", or "context" (the model's context is full; only when max_new_tokens was not given).
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    timings: Timings = field(repr=False)

    def __str__(self) -> str:
        return self.text  # print(model.generate(...)) prints the completion


# -- rungs ---------------------------------------------------------------------------------------------
def kv_capacity(needed: int, context: int, multiple: int = KV_ROUNDING) -> int:
    """KV positions to allocate: what the request needs, rounded up to `multiple`, capped at the context."""
    return min(context, -(-needed // multiple) * multiple)


def prefill(engine: Engine, cache: KVCache, prompt_ids: Sequence[int], chunk: int = PREFILL_CHUNK) -> np.ndarray:
    """Run the prompt in runs of at most `chunk` tokens; logits row [V] for the next token.

    One run per chunk keeps the activations of a long prompt bounded (a 900-token prompt in one run
    lifted a GPT-2-124M INT8 process from 287 to 421 MB peak) at no measurable cost in speed: each
    chunk is still a large matrix product. Batch 1 only: GroupQueryAttention refuses several new
    tokens per row on a non-empty cache when batch > 1.
    """
    ids = np.asarray(prompt_ids, np.int64)[None, :]
    n = ids.shape[1]
    last = (n - 1) % chunk + 1  # the final run holds 1..chunk tokens; the ones before are full chunks
    for start in range(0, n - last, chunk):
        engine.forward(cache, ids[:, start:start + chunk])
    return engine.forward(cache, ids[:, n - last:])[0, -1]


def decode_step(engine: Engine, cache: KVCache, token_id: int) -> np.ndarray:
    """Append one token; logits row [V] for the one after it."""
    return engine.forward(cache, np.array([[token_id]], np.int64))[0, -1]


def text_logits(logits: np.ndarray, tokenizer) -> np.ndarray:
    """Only the ids the tokenizer can spell: checkpoints often pad the embedding past the vocabulary
    (to a multiple of 64 or 128), and a sampled pad id would have no text. A view, no copy."""
    return logits[..., : token_count(tokenizer)]


def is_stop_token(token_id: int, params: SamplingParams) -> bool:
    return token_id in params.stop_token_ids


def _cancelled(cancel) -> bool:
    return cancel is not None and cancel.is_set()


@dataclass
class _TextPipe:
    """tokens -> UTF-8-safe text -> stop-string filter; `held` text is released only by `finish`."""

    detok: StreamingDetokenizer
    matcher: StopStringMatcher | None

    def add(self, token_id: int) -> tuple[str, bool]:
        piece = self.detok.add(token_id)
        if self.matcher is None:
            return piece, False
        return self.matcher.feed(piece)

    def finish(self) -> str:
        """Everything still held back (incomplete bytes, a possible stop-string prefix)."""
        tail = self.detok.flush()
        if self.matcher is None:
            return tail
        text, stopped = self.matcher.feed(tail)
        return text if stopped else text + self.matcher.flush()


def _pipe(tokenizer, params: SamplingParams) -> _TextPipe:
    return _TextPipe(StreamingDetokenizer(tokenizer), StopStringMatcher(params.stop_strings) if params.stop_strings else None)


# -- one request -------------------------------------------------------------------------------------------
def stream_tokens(
    engine: Engine,
    tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    out: list,
    *,
    length_reason: str = "length",
    cancel=None,
    on_token: Callable[[int], None] | None = None,
) -> Iterator[str]:
    """Yield text pieces of one generation; when it ends, append its GenerationResult to `out`.

    `on_token(id)` is called with each sampled token id as soon as it is chosen (stop ids included),
    for callers that need ids or per-token timing rather than text.

    Closing the iterator early (or setting `cancel`) ends the generation with finish_reason
    "cancelled"; the KV buffers go back to the engine's pool as soon as decoding stops, before the
    last pieces are yielded.
    """
    start = time.perf_counter()
    timings = Timings(prompt_tokens=len(prompt_ids))
    tokens: list[int] = []
    text: list[str] = []
    reason = "cancelled"
    cache = engine.new_cache(1, kv_capacity(len(prompt_ids) + params.max_new_tokens, engine.arch.context_length))
    pipe = _pipe(tokenizer, params)
    rng = params.make_rng()
    history = list(prompt_ids)
    try:
        try:
            logits = prefill(engine, cache, prompt_ids)
            first = None
            for step in range(params.max_new_tokens):
                if _cancelled(cancel):
                    break
                token = sample_next(text_logits(logits, tokenizer), params, rng, history)
                if on_token is not None:
                    on_token(token)
                if first is None:
                    first = time.perf_counter()
                    timings.ttft_s = first - start
                if is_stop_token(token, params):
                    reason = "eos"
                    break
                tokens.append(token)
                history.append(token)
                timings.generated_tokens = len(tokens)
                timings.decode_s = time.perf_counter() - first
                piece, stopped = pipe.add(token)
                if piece:
                    text.append(piece)
                    yield piece
                if stopped:
                    reason = "stop_string"
                    break
                if step + 1 == params.max_new_tokens:
                    reason = length_reason
                    break
                logits = decode_step(engine, cache, token)
        finally:
            engine.release(cache)
        if reason != "stop_string":
            tail = pipe.finish()
            if tail:
                text.append(tail)
                yield tail
    finally:
        timings.total_s = time.perf_counter() - start
        out.append(GenerationResult("".join(text), tokens, reason, len(prompt_ids), timings))


# -- a batch ---------------------------------------------------------------------------------------------
def generate_rows(
    engine: Engine,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    budgets: Sequence[int] | None = None,
    length_reasons: Sequence[str] | None = None,
    cancel=None,
    pad_id: int = 0,
) -> list[GenerationResult]:
    """Generate for several prompts at once: one right-padded prefill, then one step for all rows.

    Row b stops after `budgets[b]` tokens (default params.max_new_tokens) with `length_reasons[b]`.
    Each row draws from its own `params.make_rng()`, so a seeded row gives the same tokens as the
    same prompt run alone. Finished rows keep feeding a token into one parked slot (their outputs
    are ignored) until every row is done.
    """
    B = len(prompts)
    budgets = [params.max_new_tokens] * B if budgets is None else [int(n) for n in budgets]
    length_reasons = ["length"] * B if length_reasons is None else list(length_reasons)
    lengths = np.array([len(p) for p in prompts], np.int64)
    needed = max(int(n) + m for n, m in zip(lengths, budgets))
    if needed > engine.arch.context_length:
        raise ContextLengthError(f"a batch row needs {needed} positions, more than the context of {engine.arch.context_length}")
    start = time.perf_counter()
    ids = np.full((B, int(lengths.max())), pad_id, np.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    rngs = [params.make_rng() for _ in range(B)]
    pipes = [_pipe(tokenizer, params) for _ in range(B)]
    histories = [list(p) for p in prompts]
    tokens: list[list[int]] = [[] for _ in range(B)]
    texts: list[list[str]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    timings = [Timings(prompt_tokens=int(n)) for n in lengths]
    cache = engine.new_cache(B, kv_capacity(needed, engine.arch.context_length))
    try:
        logits = text_logits(engine.forward(cache, ids, lengths)[:, -1], tokenizer)  # [B, V']
        ttft = time.perf_counter() - start
        for step in range(max(budgets)):
            if _cancelled(cancel):
                break
            nxt = np.full((B, 1), pad_id, np.int64)
            for b in range(B):
                if reasons[b] is None:
                    reasons[b], nxt[b, 0] = _row_step(b, logits[b], params, rngs, histories, tokens, texts, pipes)
                    timings[b].ttft_s = timings[b].ttft_s or ttft
                    timings[b].generated_tokens = len(tokens[b])
                    timings[b].decode_s = time.perf_counter() - start - ttft
                    if reasons[b] is None and len(tokens[b]) == budgets[b]:
                        reasons[b] = length_reasons[b]
            done = np.array([r is not None for r in reasons])
            if done.all():
                break
            logits = text_logits(engine.forward(cache, nxt)[:, -1], tokenizer)
            # A finished row is parked: it still takes part in each step (the batch shape is fixed), but
            # its length is wound back so it keeps overwriting one spare slot instead of growing.
            cache.lengths[done] -= 1
    finally:
        engine.release(cache)
    results = []
    for b in range(B):
        reason = reasons[b] or "cancelled"
        if reason != "stop_string":
            texts[b].append(pipes[b].finish())
        timings[b].total_s = time.perf_counter() - start
        results.append(GenerationResult("".join(texts[b]), tokens[b], reason, int(lengths[b]), timings[b]))
    return results


def _row_step(b, logits_row, params, rngs, histories, tokens, texts, pipes) -> tuple[str | None, int]:
    """Sample row b's next token and extend its text; (finish reason or None, token to feed next)."""
    token = sample_next(logits_row, params, rngs[b], histories[b])
    if is_stop_token(token, params):
        return "eos", token
    tokens[b].append(token)
    histories[b].append(token)
    piece, stopped = pipes[b].add(token)
    texts[b].append(piece)
    return ("stop_string" if stopped else None), token


def check_prompt_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """A non-empty list of ints in [0, vocab_size), or a UsageError saying what is wrong."""
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
        raise UsageError("a prompt must be a string or a list of integer token ids")
    ids = [int(i) for i in ids]
    if not ids:
        raise UsageError("the prompt is empty; pass some text or at least one token id")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UsageError(f"prompt token ids {bad[:5]} are outside this model's vocabulary [0, {vocab_size}); use ids from its tokenizer")
    return ids
