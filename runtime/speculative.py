"""Speculative decoding with prompt lookup: several tokens per engine step, the same greedy output.

When a model copies from its input (editing code, quoting, filling a template), the next tokens are
often already in the prompt or the output so far. `lookup_proposals` finds the longest recent n-gram
ending the text that occurred before and proposes what followed it; one engine step then runs the
pending token and the proposals together (batch 1: GroupQueryAttention takes several new tokens on a
non-empty in-place cache there), and the `Decoding` advances over the resulting rows one by one,
exactly as it would over single steps, until its choice differs from a proposal. The rows after the
first disagreement are discarded and the cache is wound back by length (positions past a row's
length are stale and masked), so nothing is copied.

Exact for greedy decoding: every token is the argmax of the model's logits after exactly the tokens
before it, which is what plain decoding computes. (A verify step computes several rows in one
matrix product; its float rounding can differ from one-row steps in the last bits, as any batch
size does.) Sampling needs the acceptance rule that keeps the distribution; it is not done here, and
`speculative=` with temperature > 0 is refused rather than silently changing what a seed produces.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from gptedge.errors import UsageError
from gptedge.runtime.decoding import Decoding, Step
from gptedge.runtime.engine import Engine, KVCache
from gptedge.runtime.generator import _cancelled, drive, prefill

MAX_NGRAM = 4  # longest suffix looked up; longer matches are rarer and rarely better
# A verify step of k rows costs more than one row but far less than k (per k: benchmarks/results/speculative.json),
# so a few accepted proposals pay for it; the length adapts to how many are accepted, up to this.
MAX_PROPOSALS = 8
MODES = (None, "lookup")


def lookup_proposals(history: Sequence[int], k: int, max_ngram: int = MAX_NGRAM, window: int = 4096) -> list[int]:
    """Up to `k` tokens that followed an earlier occurrence of the longest n-gram ending `history`.

    Of the earlier occurrences, the most recent one with `k` tokens after it wins (in a repeated run the
    most recent match sits one token back and has only one to offer), else the one with the most.
    Vectorised over the last `window` tokens, so a lookup costs microseconds, not a decode step.
    """
    if k < 1 or len(history) < 2:
        return []
    h = np.asarray(history[-window:], np.int64)
    L = len(h)
    for n in range(min(max_ngram, L - 1), 0, -1):
        suffix = h[L - n:]
        hit = np.ones(L - n, bool)  # hit[i]: h[i:i+n] == suffix, for starts before the suffix itself
        for t in range(n):
            hit &= h[t:L - n + t] == suffix[t]
        starts = np.flatnonzero(hit)
        if len(starts) == 0:
            continue
        follow = np.minimum(L - (starts + n), k)  # how many tokens each occurrence can offer
        full = starts[follow == k]
        start = int(full[-1]) if len(full) else int(starts[np.argmax(follow)])
        return h[start + n:start + n + k].tolist()
    return []


def check_speculative(mode, params) -> None:
    if mode not in MODES:
        raise UsageError(f"speculative must be None or 'lookup', got {mode!r}")
    if mode is not None and not params.greedy:
        raise UsageError("speculative='lookup' is exact for greedy decoding only; pass temperature=0, or leave "
                         "speculative off for sampling")


def stream_speculative(engine: Engine, seq: Decoding, *, cancel=None, on_token: Callable[[int], None] | None = None,
                       max_proposals: int = MAX_PROPOSALS) -> Iterator[str]:
    """`stream_tokens` with prompt-lookup proposals verified in multi-token steps (see the module docstring).

    `seq.timings.proposed` / `accepted` count the proposals.
    """
    return drive(engine, seq, lambda cache: lookup_steps(engine, cache, seq, cancel, max_proposals), on_token)


def lookup_steps(engine: Engine, cache: KVCache, seq: Decoding, cancel=None,
                 max_proposals: int = MAX_PROPOSALS) -> Iterator[Step]:
    """Prefill, then steps of the pending token + lookup proposals; the proposal length grows while proposals
    are accepted and shrinks when they are not."""
    k = 2
    rows = prefill(engine, cache, seq.prompt_ids)[None, :]  # [1, V]: the row for the first new token
    proposals: list[int] = []
    while not _cancelled(cancel):
        accepted = 0
        for j in range(rows.shape[0]):
            step = seq.advance(rows[j])
            yield step
            if seq.done or j >= len(proposals) or step.token != proposals[j]:
                break
            accepted += 1
        seq.timings.proposed += len(proposals)
        seq.timings.accepted += accepted
        cache.lengths -= len(proposals) - accepted  # the rows after the first disagreement are stale
        if seq.done:
            return
        if proposals:
            k = min(max_proposals, k + 1) if accepted == len(proposals) else max(1, accepted)
        room = seq.params.max_new_tokens - len(seq.tokens) - 1  # every row fed yields one more token
        proposals = lookup_proposals(seq.prompt_ids + seq.tokens, min(k, room))
        feed = np.array([[step.token, *proposals]], np.int64)
        index = np.arange(feed.shape[1], dtype=np.int64)[None, :]
        rows = engine.forward(cache, feed, logits_index=index)[0]  # [1 + len(proposals), V]
