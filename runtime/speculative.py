"""Speculative decoding: several tokens per engine step, distributed exactly as plain decoding's.

A proposer guesses the next few tokens cheaply; one engine step then runs the pending token and the
proposals together (batch 1: GroupQueryAttention takes several new tokens on a non-empty in-place
cache there), which gives the model's logits after every prefix at once. The `Decoding` walks the
rows one by one, exactly as it would over single steps: each row either confirms its proposal or
yields a different token, and at the first one that differs the rest are discarded and the cache is
wound back by length (positions past a row's length are stale and masked), so nothing is copied.
Two proposers exist: prompt lookup here (`NgramIndex`: next to free, good when the output copies the
input), and a small draft model with its own KV cache (gptedge.runtime.draft).

Why the output is exact (every token distributed as plain decoding would draw it):
- Greedy: a row's token is the argmax of the model's logits after exactly the tokens before it,
  which is what plain decoding computes; a proposal is kept only when it is that argmax.
- Sampling: the rule of Leviathan et al. and Chen et al. (2023). With p the row's processed
  distribution (`Decoding.distribution`: the very one plain sampling draws from, penalties over the
  history up to that row, temperature, top-k/p, min-p, the constraint, padded ids excluded) and q the
  distribution the proposal x was drawn from, x is kept with probability min(1, p(x) / q(x)); else
  the token is drawn from norm(max(0, p - q)) and the run stops. Then P(token = y) = min(q(y), p(y))
  + (1 - sum_x min(q(x), p(x))) * max(0, p(y) - q(y)) / Z = p(y), Z being that same 1 - sum. After
  a fully accepted run the last row's token is drawn from p as usual. A lookup proposal is a point
  mass (q(x) = 1): kept with probability p(x), else drawn from p without x.
(A verify step computes several rows in one matrix product; its float rounding can differ from
one-row steps in the last bits, as any batch size does.) Every draw comes from the sequence's own
generator, so a seeded run repeats, but speculation uses its draws differently from plain sampling:
the same seed gives a different (equally distributed) text with and without it.
"""

from __future__ import annotations

import bisect
import time
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from gptedge.runtime.cache import KVCache
from gptedge.runtime.decoding import Decoding, Step
from gptedge.runtime.engine import Engine
from gptedge.runtime.generator import _cancelled, drive, prefill
from gptedge.runtime.prefix import PrefixStore
from gptedge.runtime.sampling import TokenDistribution

MAX_NGRAM = 4  # longest suffix looked up; longer matches are rarer and rarely better
# A verify step of k rows costs more than one row but far less than k (per k: benchmarks/results/speculative.json),
# so a few accepted proposals pay for it; the length adapts to how many are accepted, up to this (a verify step of
# 1 + MAX_PROPOSALS tokens still runs on the engine's bound buffers: engine.BOUND_STEP_MAX).
MAX_PROPOSALS = 15
PAUSE = 16  # plain steps before proposing is tried again after it stopped paying (a draft must catch up then)
LOOKUP_PAUSE = 4  # ... for prompt lookup, whose retry costs one verify step and no catch-up
MAX_BACKOFF = 4  # ... at most PAUSE << MAX_BACKOFF steps
PROBE = 2  # timed runs start with this many plain steps, to measure what a plain token costs
EMA = 0.3  # weight of the newest measurement in the running averages
# What each proposal adds to a verify step, as a fraction of a one-token step: the untimed estimate `Pacer.pays`
# weighs acceptance against (the measured costs are in benchmarks/results/speculative.json, `ratio`).
VERIFY_EXTRA = 0.125


class NgramIndex:
    """Where every n-gram (n <= max_ngram) of a growing token sequence starts: prompt lookup in O(1) a token.

    A generation's tokens only ever grow (rejected proposals never enter it), so each new token adds its
    max_ngram n-grams to the index and a lookup is a few dictionary reads and bisections, where scanning the
    history again costs about a small model's decode step on every proposal.
    """

    def __init__(self, max_ngram: int = MAX_NGRAM) -> None:
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self._starts: dict[tuple[int, ...], list[int]] = {}  # n-gram -> its start positions, ascending

    def extend(self, tokens: Sequence[int]) -> NgramIndex:
        for token in tokens:
            self.tokens.append(int(token))
            end = len(self.tokens)
            for n in range(1, min(self.max_ngram, end) + 1):
                self._starts.setdefault(tuple(self.tokens[end - n:end]), []).append(end - n)
        return self

    def propose(self, k: int, window: int = 4096) -> list[int]:
        """Up to `k` tokens that followed an earlier occurrence of the longest n-gram ending the sequence.

        Of the earlier occurrences (within the last `window` tokens), the most recent one with `k` tokens after
        it wins (in a repeated run the most recent match sits one token back and has only one to offer), else
        the earliest, which has the most.
        """
        L = len(self.tokens)
        lo = max(0, L - window)
        if k < 1 or L - lo < 2:
            return []
        for n in range(min(self.max_ngram, L - lo - 1), 0, -1):
            starts = self._starts[tuple(self.tokens[L - n:])]  # its last start is the suffix itself
            last = len(starts) - 1
            first = bisect.bisect_left(starts, lo, 0, last)
            if first == last:
                continue
            full = bisect.bisect_right(starts, L - n - k, first, last) - 1  # the last start with k tokens after it
            start = starts[full] if full >= first else starts[first]
            return self.tokens[start + n:start + n + k]
        return []


def lookup_proposals(history: Sequence[int], k: int, max_ngram: int = MAX_NGRAM, window: int = 4096) -> list[int]:
    """`NgramIndex.propose` over `history`, built for this one lookup (a generation keeps one index and extends it)."""
    return NgramIndex(max_ngram).extend(history).propose(k, window)


# -- the acceptance rule ---------------------------------------------------------------------------------------
def residual(p: np.ndarray, token: int, q: np.ndarray | None = None) -> np.ndarray:
    """norm(max(0, p - q)): what a rejected proposal's row is drawn from; q None means a point mass on `token`.

    If p - q has no positive entry (p equals q up to rounding, so a rejection had probability ~0), p itself.
    """
    if q is None:
        r = p.copy()
        r[token] = 0.0
    else:
        r = np.maximum(p - q, 0.0)
    total = r.sum()
    return r / total if total > 0 else p


def accept_proposal(p: np.ndarray, token: int, q: np.ndarray | None, rng: np.random.Generator) -> tuple[int, bool]:
    """(the row's token, whether it is the proposal `token`), distributed as a draw from `p`.

    `p`: the row's processed distribution (normalised, over the vocabulary); `q`: the distribution the
    proposal was drawn from, None for a deterministic proposal (prompt lookup). Kept with probability
    min(1, p(token) / q(token)), one `rng.random()`; a rejection draws once more, from `residual`.
    """
    qx = 1.0 if q is None else float(q[token])
    if rng.random() * qx < p[token]:  # u < p/q, without dividing by a q that rounding made tiny
        return token, True
    return TokenDistribution(None, residual(p, token, q), p.size).draw(rng), False


def verify_row(seq: Decoding, logits: np.ndarray, proposal: int, q: np.ndarray | None) -> tuple[int, bool]:
    """The token `seq` takes from a verify row proposing `proposal` (drawn from `q`), and whether it is the proposal."""
    if seq.params.greedy:
        token = seq.choose(logits)
        return token, token == proposal
    return accept_proposal(seq.distribution(logits).probs(), proposal, q, seq.rng)


# -- the loop ----------------------------------------------------------------------------------------------------
class Proposer(Protocol):
    """Guesses the tokens after a sequence's history, and hears how its guesses went."""

    def propose(self, seq: Decoding, room: int) -> tuple[list[int], list[np.ndarray] | None]:
        """At most `room` tokens to follow `seq`'s tokens so far, and the distribution each was drawn from
        (None: chosen deterministically, each a point mass). `seq` is not modified."""

    def verified(self, proposed: int, accepted: int, committed: int, seconds: float) -> None:
        """A step ran `proposed` proposals (0: a plain step), `accepted` were kept, `committed` tokens
        were taken in all, in `seconds` of proposing, engine and sampling time."""

    def close(self) -> None:
        """The generation ended: free what the proposer holds."""


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new


class Pacer:
    """How many tokens to propose next (0: a plain step), from how proposing has paid so far.

    A verify step costs more than a one-token step, so proposals that are rarely accepted slow decoding
    down (prompt lookup under sampling, a draft that disagrees): the length adapts to acceptance, and when
    the expected tokens per verify step no longer cover its cost, decoding takes plain steps for a while
    (twice as long after each fallback in a row), then tries again. `cost` is a proposal's own cost in
    model steps (a draft's step: `draft.step_cost_ratio`; prompt lookup: 0); `timed` lets measured times
    replace the estimate (only where timings may steer: greedy, or unseeded sampling, since a seeded run
    must repeat); `fallback=False` always proposes (tests that must exercise every step).
    """

    def __init__(self, cost: float, timed: bool, fallback: bool = True, max_proposals: int = MAX_PROPOSALS,
                 pause: int = PAUSE) -> None:
        self.k = 2
        self.cost = cost
        self.timed = timed
        self.fallback = fallback
        self.max_proposals = max_proposals
        self.acceptance = 0.5  # running fraction of proposals accepted
        self.pause = PROBE if timed and fallback else 0  # plain steps to take before proposing
        self.plain_s: float | None = None  # running seconds per token of plain steps
        self.draft_s: float | None = None  # ... and of speculative ones
        self.pause_steps = pause
        self.misses = 0  # fallbacks in a row: each one pauses twice as long, so a proposer that never pays costs ~0

    def proposals(self, room: int) -> int:
        return 0 if self.pause > 0 else max(0, min(self.k, room))

    def record(self, proposed: int, accepted: int, committed: int, seconds: float) -> None:
        if not proposed:
            self.pause = max(0, self.pause - 1)
            self.plain_s = _average(self.plain_s, seconds / committed)
            return
        self.acceptance = _average(self.acceptance, accepted / proposed)
        self.draft_s = _average(self.draft_s, seconds / committed)
        self.k = adapt_length(self.k, proposed, accepted, self.max_proposals)
        if self.fallback and not self.pays():
            self.pause, self.draft_s, self.k = self.pause_steps << min(self.misses, MAX_BACKOFF), None, 2
            self.misses += 1
        else:
            self.misses = 0

    def pays(self) -> bool:
        """Whether proposing gives more tokens per second than plain steps (measured), or, untimed, whether
        the expected tokens of a verify step (the accepted run and one more) cover its estimated cost."""
        if self.timed and self.plain_s is not None and self.draft_s is not None:
            return self.draft_s <= self.plain_s
        expected = sum(self.acceptance ** i for i in range(self.k + 1))
        return expected >= 1 + (VERIFY_EXTRA + self.cost) * self.k


class LookupProposer:
    """Prompt lookup over the generation's prompt and output (`NgramIndex`, extended as tokens are committed), paced
    by a `Pacer` (a lookup costs next to nothing; the verify step does)."""

    def __init__(self, pacer: Pacer) -> None:
        self.pacer = pacer
        self.index = NgramIndex()

    def propose(self, seq: Decoding, room: int) -> tuple[list[int], None]:
        k = self.pacer.proposals(room)
        if not k:
            return [], None
        known, prompt = len(self.index.tokens), len(seq.prompt_ids)
        self.index.extend(seq.prompt_ids[known:] if known < prompt else ())
        self.index.extend(seq.tokens[max(0, known - prompt):])
        return self.index.propose(k), None

    def verified(self, proposed: int, accepted: int, committed: int, seconds: float) -> None:
        self.pacer.record(proposed, accepted, committed, seconds)

    def close(self) -> None:
        pass


def adapt_length(k: int, proposed: int, accepted: int, max_proposals: int) -> int:
    """The next proposal length: twice as many after a fully accepted run (a copied span is long: reach it in a few
    steps), else what was accepted (at least 1)."""
    return min(max_proposals, 2 * k) if accepted == proposed else max(1, accepted)


def verify_steps(engine: Engine, cache: KVCache, seq: Decoding, proposer: Proposer, cancel=None,
                 store: PrefixStore | None = None) -> Iterator[Step]:
    """Prefill (reusing `store`), then steps of the pending token + the proposer's guesses, each row chosen by
    `verify_row`."""
    rows = prefill(engine, cache, seq.prompt_ids, store=store)[None, :]  # [1, V]: the row for the first new token
    proposals: list[int] = []
    qs: list[np.ndarray] | None = None
    started = None  # when the current step's proposing began (None: the prefill, not a step to report)
    try:
        while not _cancelled(cancel):
            accepted = committed = 0
            for j in range(rows.shape[0]):
                if j < len(proposals):
                    token, kept = verify_row(seq, rows[j], proposals[j], None if qs is None else qs[j])
                else:
                    token, kept = seq.choose(rows[j]), False
                step = seq.commit(token, rows[j])
                committed += 1
                paused = time.perf_counter()
                yield step
                if started is not None:
                    started += time.perf_counter() - paused  # the consumer's time is not the step's
                if seq.done or not kept:
                    break
                accepted += 1
            seq.timings.proposed += len(proposals)
            seq.timings.accepted += accepted
            cache.rewind(len(proposals) - accepted)  # the rows after the first disagreement are stale
            if started is not None:
                proposer.verified(len(proposals), accepted, committed, time.perf_counter() - started)
            if seq.done:
                return
            room = seq.params.max_new_tokens - len(seq.tokens) - 1  # every row fed yields one more token
            started = time.perf_counter()
            proposals, qs = proposer.propose(seq, room)
            feed = np.array([[step.token, *proposals]], np.int64)
            rows = engine.verify(cache, feed)  # [1 + len(proposals), V], bound buffers
    finally:
        proposer.close()


def stream_speculative(engine: Engine, seq: Decoding, proposer: Proposer | None = None, *, cancel=None,
                       on_token: Callable[[int], None] | None = None,
                       store: PrefixStore | None = None) -> Iterator[str]:
    """`stream_tokens` with proposals (prompt lookup unless `proposer` is given) verified in multi-token steps.

    `seq.timings.proposed` / `accepted` count the proposals.
    """
    if proposer is None:  # paced by acceptance alone: a lookup is free, and timings of tiny steps are noise
        proposer = LookupProposer(Pacer(0.0, timed=False, pause=LOOKUP_PAUSE))
    return drive(engine, seq, lambda cache: verify_steps(engine, cache, seq, proposer, cancel, store), on_token)
