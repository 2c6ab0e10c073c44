"""The decode ladder: prefill -> (sample -> check stop -> decode step)*, one request or a batch.

Each rung is a small function over an `Engine` and its `KVCache`; `stream_tokens` strings them
together for one request and `generate_rows` for a right-padded batch. Both advance a `Decoding`
(gptedge.runtime.decoding) per sequence, which samples, checks stops and builds the text, so the
pieces a stream yields, joined, are exactly `GenerationResult.text`. Nothing here touches
onnxruntime directly, and nothing here knows about files or providers (that is `model.py`).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from gptedge.errors import ContextLengthError, UsageError
from gptedge.runtime.decoding import CancelToken, Decoding, GenerationResult, Step, Timings
from gptedge.runtime.engine import Engine, KVCache, right_pad
from gptedge.runtime.prefix import PrefixStore

__all__ = ["CancelToken", "Decoding", "GenerationResult", "Timings", "generate_rows", "prefill", "stream_tokens"]

PREFILL_CHUNK = 256  # prompt tokens per run when prefilling (bounds activation memory)
KV_ROUNDING = 64  # KV buffers come in multiples of this, so requests of similar size share pooled buffers


# -- rungs ---------------------------------------------------------------------------------------------
def kv_capacity(needed: int, context: int, multiple: int = KV_ROUNDING) -> int:
    """KV positions to allocate: what the request needs, rounded up to `multiple`, capped at the context."""
    return min(context, -(-needed // multiple) * multiple)


def prefill_runs(start: int, end: int, chunk: int = PREFILL_CHUNK) -> list[tuple[int, int]]:
    """Runs of at most `chunk` tokens covering positions start..end-1, none of one token unless only one is left.

    onnxruntime computes a token's keys, values and logits identically in any run of two or more tokens, but
    a one-token run takes other kernels and comes out in other last bits: so a prompt prefilled from a stored
    prefix (gptedge.runtime.prefix) gives exactly the cold run's output only if neither run has single tokens.
    """
    runs = [(s, min(s + chunk, end)) for s in range(start, end, chunk)]
    if len(runs) > 1 and runs[-1][1] - runs[-1][0] == 1 and runs[-2][1] - runs[-2][0] >= 3:
        (a, b), (_, c) = runs[-2], runs[-1]  # a last run of one token: it takes one from the run before
        runs[-2:] = [(a, b - 1), (b - 1, c)]
    return runs


def prefill(engine: Engine, cache: KVCache, prompt_ids: Sequence[int], chunk: int = PREFILL_CHUNK,
            store: PrefixStore | None = None) -> np.ndarray:
    """Prefill the prompt in runs of at most `chunk` tokens (prefill_runs); logits row [V] for the next token.

    One run per chunk keeps the activations of a long prompt bounded (the peak memory and time of a
    900-token prompt both ways are in benchmarks/results/runtime-choices.json): each chunk is still a
    large matrix product. Batch 1 only: GroupQueryAttention refuses several new tokens per row on a
    non-empty cache when batch > 1. `store`: reuse the longest stored prefix of the prompt (the cache must be
    empty) and store this prompt's keys and values for later ones.
    """
    ids = np.asarray(prompt_ids, np.int64)[None, :]
    n = ids.shape[1]
    reuse = store is not None and cache.reusable and cache.length == 0
    done = 0
    if reuse:
        done, kv = store.lookup(ids[0])
        if done:
            cache.load_prefix(kv, done)
    logits = None
    for start, stop in prefill_runs(done, n, chunk):
        logits = engine.prefill(cache, ids[:, start:stop])
    if reuse:
        store.save(ids[0], cache.prefix(n))
    return logits[0]


def decode_step(engine: Engine, cache: KVCache, token_id: int) -> np.ndarray:
    """Append one token; logits row [V] for the one after it."""
    return engine.decode(cache, np.array([[token_id]], np.int64))[0]


def _cancelled(cancel) -> bool:
    return cancel is not None and cancel.is_set()


# -- one request -------------------------------------------------------------------------------------------
StepLoop = Callable[[KVCache], Iterator[Step]]


def drive(engine: Engine, seq: Decoding, steps: StepLoop,
          on_token: Callable[[int], None] | None = None) -> Iterator[str]:
    """Run one sequence's step loop over its own KV cache; yield its text pieces, then the held-back tail.

    `steps(cache)` prefills and decodes, yielding each `Step` as `seq` advances (plain decoding, or a
    speculative loop). This owns what every one-sequence loop shares: the cache is sized from `seq`
    and goes back to the pool as soon as decoding stops (before the last pieces are yielded), and
    closing the iterator early ends the generation with finish_reason "cancelled".
    """
    cache = engine.new_cache(1, kv_capacity(seq.positions_needed, engine.arch.context_length))
    loop = steps(cache)
    try:
        try:
            for step in loop:
                if on_token is not None:
                    on_token(step.token)
                if step.text:
                    yield step.text
        finally:
            loop.close()
            cache.release()
        _, tail = seq.finish()
        if tail:
            yield tail
    finally:
        seq.finish()  # closed early: the result says "cancelled"


def plain_steps(engine: Engine, cache: KVCache, seq: Decoding, cancel=None,
                store: PrefixStore | None = None) -> Iterator[Step]:
    """Prefill (reusing `store`), then one token per engine step until the sequence is done or `cancel` is set."""
    logits = prefill(engine, cache, seq.prompt_ids, store=store)
    while not _cancelled(cancel):
        step = seq.advance(logits)
        yield step
        if seq.done:
            return
        logits = decode_step(engine, cache, step.token)


def stream_tokens(
    engine: Engine,
    seq: Decoding,
    *,
    cancel=None,
    on_token: Callable[[int], None] | None = None,
    store: PrefixStore | None = None,
) -> Iterator[str]:
    """Yield the text pieces of one generation; when it ends, `seq.result` holds its GenerationResult.

    `on_token(id)` is called with each sampled token id as soon as it is chosen (stop ids included),
    for callers that need ids or per-token timing rather than text. Closing the iterator early (or
    setting `cancel`) ends the generation with finish_reason "cancelled" (see `drive`).
    """
    return drive(engine, seq, lambda cache: plain_steps(engine, cache, seq, cancel, store), on_token)


# -- a batch ---------------------------------------------------------------------------------------------
def generate_rows(engine: Engine, seqs: Sequence[Decoding], *, cancel=None, pad_id: int = 0) -> list[GenerationResult]:
    """Advance several sequences at once: one right-padded prefill, then one step for all rows.

    Each sequence draws from its own generator, so a seeded row gives the same tokens as the same
    prompt run alone. Finished rows keep feeding a token into one parked slot (their outputs are
    ignored) until every row is done.
    """
    B = len(seqs)
    needed = max(s.positions_needed for s in seqs)
    if needed > engine.arch.context_length:
        raise ContextLengthError(f"a batch row needs {needed} positions, "
                                 f"more than the context of {engine.arch.context_length}")
    ids, lengths = right_pad([s.prompt_ids for s in seqs], pad_id)
    cache = engine.new_cache(B, kv_capacity(needed, engine.arch.context_length))
    try:
        logits = engine.prefill(cache, ids, lengths)  # [B, V]
        while not _cancelled(cancel):
            nxt = np.full((B, 1), pad_id, np.int64)
            for b, s in enumerate(seqs):
                if not s.done:
                    nxt[b, 0] = s.advance(logits[b]).token
            done = np.array([s.done for s in seqs])
            if done.all():
                break
            # A finished row is parked: it still takes part in each step (the batch shape is fixed), but
            # its length is held, so it keeps overwriting one spare slot instead of growing.
            with cache.holding(done):
                logits = engine.decode(cache, nxt)
    finally:
        cache.release()
    return [s.finish()[0] for s in seqs]


def check_prompt_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """A non-empty list of ints in [0, vocab_size), or a UsageError saying what is wrong."""
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
        raise UsageError("a prompt must be a string or a list of integer token ids")
    ids = [int(i) for i in ids]
    if not ids:
        raise UsageError("the prompt is empty; pass some text or at least one token id")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UsageError(f"prompt token ids {bad[:5]} are outside this model's vocabulary [0, {vocab_size}); "
                         "use ids from its tokenizer")
    return ids
