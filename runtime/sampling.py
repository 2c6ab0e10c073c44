"""Next-token sampling as small, pure numpy functions (llama2.c / mlx-lm style).

Why pure functions with the generator passed in: a seeded run repeats exactly
(the only randomness is one `rng.random()` per sampled token), each filter can
be tested on a hand-written vector, and the same code serves `generate`,
`chat`, batched generation and the `next` table.

Pipeline of `sample_next` (the llama.cpp / HF order, minus the exotic samplers):

    logits -> NaN to -inf -> penalties -> (greedy: argmax) -> shift so max = 0
           -> temperature -> top-k -> top-p -> min-p -> softmax -> one draw

Everything before the draw is `token_distribution`: the one definition of "the
distribution the next token comes from". Plain sampling draws from it, and
speculative decoding's acceptance rule (gptedge.runtime.speculative) compares
against it, so the two cannot drift apart.

Conventions shared by every function here:
- Work in float64: a float32 softmax over 50k tokens loses the tail, and
  dividing a huge float32 logit by a small temperature overflows.
- A masked token has logit -inf (probability exactly 0). NaN is never produced:
  a NaN logit (a broken model) is treated as -inf, i.e. it can never be picked;
  +inf logits share all the probability equally.
- Ties are broken toward the lowest token id everywhere (greedy, top-k, top-p),
  so `top_k=1` is exactly greedy and results never depend on sort stability.
- Each filter always keeps the most likely token, so sampling never runs out of
  candidates unless the model itself gave no finite logit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from gptedge.errors import UsageError

__all__ = [
    "SamplingParams",
    "TokenDistribution",
    "apply_penalties",
    "apply_temperature",
    "filter_logits",
    "log_softmax",
    "min_p_filter",
    "ranked_top_k",
    "sample_next",
    "softmax",
    "token_distribution",
    "top_k_filter",
    "top_p_filter",
]

History = Sequence[int] | np.ndarray


# ----------------------------------------------------------------------------- params


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


# The numeric SamplingParams fields: field -> (what a valid value passes, the allowed values as the message says them).
# SamplingParams.validate and the public filters check through `_check`, so a direct caller gets the same message.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda v: _is_real(v) and not math.isnan(v) and v >= 0 and not math.isinf(v),
                    "a finite number >= 0 (0 means greedy)"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 switches it off)"),
    "top_p": (lambda v: _is_real(v) and not math.isnan(v) and 0.0 < v <= 1.0, "in (0, 1] (1 switches it off)"),
    "min_p": (lambda v: _is_real(v) and not math.isnan(v) and 0.0 <= v < 1.0, "in [0, 1) (0 switches it off)"),
    "repetition_penalty": (lambda v: _is_real(v) and math.isfinite(v) and v > 0,
                           "a finite number > 0 (1 switches it off)"),
    "presence_penalty": (lambda v: _is_real(v) and math.isfinite(v), "a finite number (0 switches it off)"),
    "frequency_penalty": (lambda v: _is_real(v) and math.isfinite(v), "a finite number (0 switches it off)"),
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
}


def _check(name: str, value: Any) -> None:
    """UsageError (its field `name`) saying the allowed values when `value` breaks `name`'s rule in _RULES."""
    valid, allowed = _RULES[name]
    if not valid(value):
        raise UsageError(f"{name} must be {allowed}, got {value!r}", field=name)


@dataclass(frozen=True)
class SamplingParams:
    """Every knob of one generation, checked once when built (not per token).

    temperature 0 means greedy; top_k 0, top_p 1, min_p 0 and the neutral
    penalties (1, 0, 0) switch their step off. `stop_token_ids` end generation
    when sampled (the token is not output); `stop_strings` end it when the text
    contains them (see gptedge.runtime.stopping). `seed=None` draws a fresh
    seed from the OS; an int makes the run repeat exactly.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        # Friendly normalisation: one id / one string, or a list, becomes a tuple,
        # so the frozen params stay hashable and comparable.
        ids = self.stop_token_ids
        if _is_int(ids) or isinstance(ids, str):
            ids = (ids,)
        strings = self.stop_strings
        if isinstance(strings, str):
            strings = (strings,)
        try:
            object.__setattr__(self, "stop_token_ids", tuple(ids))
            object.__setattr__(self, "stop_strings", tuple(strings))
        except TypeError:
            raise UsageError(
                "stop_token_ids and stop_strings must be sequences (e.g. (50256,) and ('\\n\\n',)), "
                f"got {self.stop_token_ids!r} and {self.stop_strings!r}"
            ) from None
        self.validate()

    def validate(self) -> None:
        """Raise UsageError naming the allowed values for the first bad field."""
        for name in _RULES:
            _check(name, getattr(self, name))
        for i in self.stop_token_ids:
            if not _is_int(i) or i < 0:
                raise UsageError(f"stop_token_ids must be non-negative integer token ids, got {i!r}",
                                 field="stop_token_ids")
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise UsageError(f"stop_strings must be non-empty strings, got {s!r}", field="stop_strings")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise UsageError(f"seed must be an integer >= 0 or None (random), got {self.seed!r}", field="seed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def make_rng(self) -> np.random.Generator:
        """The generator a run with these params draws from (PCG64 via default_rng)."""
        return np.random.default_rng(self.seed)


# ----------------------------------------------------------------------------- helpers
#
# Internally a row of logits is kept as *candidates*: (ids, vals) with ids the
# ascending token ids whose logit is > -inf (None meaning "all of them", the
# common dense case, so no index array is built) and vals their logits. After
# top-k only k candidates remain, so every later step (softmax, sort, cumsum,
# draw) costs O(k), not O(V), and no exp() of -inf or index array spans the
# whole vocabulary. The public full-row filters convert to this form and back,
# so they and `sample_next` run the same code.

Cands = tuple["np.ndarray | None", np.ndarray]


def _as_logits(logits: np.ndarray) -> np.ndarray:
    """A float64 copy with NaN mapped to -inf, so no later step can create NaN."""
    x = np.array(logits, dtype=np.float64)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise UsageError(f"logits must have a non-empty last (vocabulary) axis, got shape {x.shape}")
    nan = np.isnan(x)
    if nan.any():
        x[nan] = -np.inf
    return x


def _check_1d(x: np.ndarray) -> None:
    if x.ndim != 1:
        raise UsageError(f"expected one row of logits with shape [vocab], got shape {x.shape}")


def _shift_max_to_zero(x: np.ndarray, axis: int = -1, inplace: bool = False) -> np.ndarray:
    """x - max(x) along axis, defined for -inf/+inf entries (NaN-free input).

    Rows whose max is +inf become 0 at the +inf entries and -inf elsewhere (the
    +inf tokens share the mass); a row with no finite logit has no distribution.
    `inplace` reuses x's buffer: fresh vocabulary-sized temporaries per token
    cost more than the arithmetic on them (page faults), so the hot path avoids them.
    """
    if x.ndim == 1:  # one row, the sampling hot path: a Python float check instead of three tiny-array ops
        top = float(x.max())
        if math.isfinite(top):
            with np.errstate(over="ignore"):  # -1e308 - 1e308 -> -inf is the intended result
                if inplace:
                    x -= top
                    return x
                return x - top
    m = np.max(x, axis=axis, keepdims=True)
    if not np.isfinite(m).all():
        if np.isneginf(m).any():
            raise UsageError(
                "every logit in a row is -inf or NaN, so there is nothing to sample; "
                "check the model output (a NaN model) or the filters applied before"
            )
        pos = np.isposinf(m)
        x = np.where(pos, np.where(np.isposinf(x), 0.0, -np.inf), x)
        m = np.where(pos, 0.0, m)
    with np.errstate(over="ignore"):  # -1e308 - 1e308 -> -inf is the intended result
        if inplace:
            x -= m
            return x
        return x - m


def _compact(x: np.ndarray) -> Cands:
    neg = x == -np.inf
    if not neg.any():
        return None, x
    ids = np.flatnonzero(~neg)
    return ids, x[ids]


def _select(c: Cands, sel: np.ndarray) -> Cands:
    """Keep candidates at ascending positions `sel` (order, hence canonical form, preserved)."""
    ids, vals = c
    return (sel if ids is None else ids[sel]), vals[sel]


def _expand(c: Cands, vocab: int) -> np.ndarray:
    ids, vals = c
    if ids is None:
        return vals
    out = np.full(vocab, -np.inf)
    out[ids] = vals
    return out


def _relative_probs(vals: np.ndarray, inplace: bool = False) -> np.ndarray:
    """exp(v - max v): each candidate's probability divided by the top one's."""
    e = _shift_max_to_zero(vals, inplace=inplace)
    return np.exp(e, out=e)


# ----------------------------------------------------------------------------- softmax


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable softmax in float64 along `axis` (any leading batch shape).

    -inf entries get probability 0, NaN counts as -inf, +inf entries share the
    mass equally; a row with no finite logit raises UsageError instead of
    returning NaN.
    """
    e = _shift_max_to_zero(_as_logits(logits), axis, inplace=True)
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable log-softmax in float64 (perplexity, next-token tables).

    Computed as (x - max) - log(sum(exp(x - max))), so huge logits do not
    overflow; masked (-inf) entries give -inf, never NaN.
    """
    z = _shift_max_to_zero(_as_logits(logits), axis, inplace=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


# ----------------------------------------------------------------------------- penalties, temperature


def _history_counts(history: History, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(history)
    if ids.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise UsageError(
            f"history must be a 1-D sequence of integer token ids, got dtype {ids.dtype} shape {ids.shape}"
        )
    if ids.min() < 0 or ids.max() >= vocab:
        raise UsageError(f"history holds token ids outside [0, {vocab}); pass ids from this model's vocabulary")
    return np.unique(ids, return_counts=True)


def _penalize(x: np.ndarray, history: History, repetition: float, presence: float, frequency: float) -> None:
    """In place on a NaN-free float64 row; see apply_penalties."""
    # float(): an int penalty (valid) must not reach numpy as an int64 it cannot hold (2**63 overflows)
    repetition, presence, frequency = float(repetition), float(presence), float(frequency)
    ids, counts = _history_counts(history, x.shape[0])
    if ids.size == 0:
        return
    v = x[ids]
    with np.errstate(over="ignore"):  # overflow to +-inf is the meaningful result here
        if repetition != 1.0:
            # HF / llama.cpp: push a seen token's logit toward "less likely" whatever its sign.
            v = np.where(v > 0, v / repetition, v * repetition)
        if presence != 0.0 or frequency != 0.0:
            # OpenAI / llama.cpp; -inf stays -inf and the subtrahend is finite, so no inf - inf.
            v = v - (counts * frequency + presence)
    x[ids] = v


def apply_penalties(
    logits: np.ndarray,
    history: History,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> np.ndarray:
    """Penalize tokens that already occur in `history` (token ids; repeats count).

    Semantics match HF and llama.cpp: the repetition penalty divides a seen
    token's positive logit and multiplies a negative one (so > 1 always makes it
    less likely); the presence penalty is subtracted once per seen token; the
    frequency penalty is subtracted `count` times. Which ids form the history
    (prompt + output, or a recent window) is the caller's choice.
    Returns a new float64 row; the input is not modified.
    """
    # Same checks as SamplingParams, so a direct caller gets the same messages.
    SamplingParams(
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty
    )
    x = _as_logits(logits)
    _check_1d(x)
    _penalize(x, history, repetition_penalty, presence_penalty, frequency_penalty)
    return x


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """logits / temperature (temperature > 0; greedy is handled by argmax, not here).

    < 1 sharpens, > 1 flattens. Returns a new float64 array; -inf stays -inf.
    """
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise UsageError(
            f"temperature for scaling must be a finite number > 0 (0 means greedy: use argmax), got {temperature!r}"
        )
    with np.errstate(over="ignore"):
        return _as_logits(logits) / float(temperature)


# ----------------------------------------------------------------------------- filters


TOP_K_PASSES = 8  # falling thresholds `_top_k` tries (max - 1, - 4, ... - 4**7) before selecting over the whole row


def _top_k(c: Cands, k: int) -> Cands:
    vals = c[1]
    n = vals.size
    if k <= 0 or k >= n:
        return c
    # The k-th largest value is the threshold. An argpartition over a whole 50k row is slow, so it runs over a head
    # instead: the values within 1, 4, 16, ... of the max, the first head that holds k (counting is cheap). A large
    # k (an eighth of the row or more) needs most of the row: select over all of it at once.
    pool = None
    top = float(vals.max())
    if math.isfinite(top) and 8 * k < n:
        for i in range(TOP_K_PASSES):
            mask = vals >= top - 4.0**i
            count = np.count_nonzero(mask)
            if count >= k:
                pool = np.flatnonzero(mask) if 2 * count < n else None
                break
    if pool is None:
        idx = np.argpartition(vals, n - k)[n - k :]
    else:
        idx = pool[np.argpartition(vals[pool], pool.size - k)[pool.size - k :]]
    thr = vals[idx].min()
    if np.count_nonzero(vals == thr) == np.count_nonzero(vals[idx] == thr):
        return _select(c, np.sort(idx))  # no tie crosses the boundary: the common case
    return _select(c, _first_k(vals, thr, k))


def _first_k(vals: np.ndarray, thr: float, k: int) -> np.ndarray:
    """Positions of the k largest values, taking the lowest positions among those == thr.

    `thr` must be the k-th largest value; vals are in token-id order, so this is
    the deterministic "ties go to the lowest id" rule used by top-k and top-p.
    """
    keep = vals > thr  # at most k - 1 of these
    keep[np.flatnonzero(vals == thr)[: k - int(np.count_nonzero(keep))]] = True
    return np.flatnonzero(keep)


HEAD_RATIO = 1 / 16  # each pass of `_nucleus` lowers its probability threshold by this factor


def _nucleus(probs: np.ndarray, p: float) -> tuple[int, float]:
    """(how many tokens top-p keeps, probability of the last one kept).

    Sorts values, never indices (an argsort is much slower than a value sort), and only a head of them: every
    value >= a threshold, the threshold starting at max / 16 and falling 16x a pass until the head holds mass p.
    A head holds every value tied with its threshold, so it is an exact prefix of the fully sorted values and its
    sequential cumsum equals the full one's: the result is the full sort's, bit for bit. A threshold costs one
    comparison and a masked sum over the row, less than an np.partition per pass would
    (benchmarks/results/runtime-choices.json `sampling`); peaked distributions reach p in the first pass or two,
    flat ones within a few more. Zero probabilities carry no mass and are never counted.
    """
    top = float(probs.max())
    thr = top * HEAD_RATIO
    while True:
        keep = probs >= thr if thr > 0 else probs > 0
        if thr == 0 or np.sum(probs, where=keep) >= p * (1 - 1e-12):  # the cumsum below decides exactly
            head = np.sort(probs[keep])[::-1]
            cs = np.cumsum(head)
            if thr == 0 or cs[-1] >= p:
                cut = min(int(np.searchsorted(cs, p, side="left")) + 1, head.size)
                return cut, float(head[cut - 1])
        thr = thr * HEAD_RATIO if thr * HEAD_RATIO > np.finfo(np.float64).tiny else 0.0


def _top_p(c: Cands, p: float) -> Cands:
    if p >= 1.0:
        return c
    probs = _relative_probs(c[1])
    probs /= probs.sum()
    count, last = _nucleus(probs, p)
    # The kept set is {prob > last} plus the lowest ids among {prob == last}.
    return _select(c, _first_k(probs, last, count))


def _min_p(c: Cands, min_p: float) -> Cands:
    if min_p <= 0.0:
        return c
    # prob_i >= min_p * prob_max  <=>  exp(v_i - v_max) >= min_p; no normalisation needed.
    return _select(c, np.flatnonzero(_relative_probs(c[1]) >= min_p))


def _full_row_filter(logits: np.ndarray, step: Callable[[Cands, Any], Cands], arg: Any) -> np.ndarray:
    x = _as_logits(logits)
    _check_1d(x)
    return _expand(step(_compact(x), arg), x.shape[0])


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep exactly the k most likely tokens (k = 0 or k >= vocab: keep all).

    Ties at the boundary are broken toward the lowest token ids, so exactly k
    tokens survive (fewer only if fewer than k logits are > -inf) and
    top_k = 1 picks the same token as greedy. Uses np.partition, O(V), no sort.
    """
    _check("top_k", k)
    return _full_row_filter(logits, _top_k, int(k))


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest most-likely set with cumulative prob >= p.

    Tokens are ordered by probability, ties by lowest id, and the shortest
    prefix of that order whose sequential cumulative sum reaches p is kept; the
    top token is always kept and zero-probability tokens never are (so if
    rounding leaves the total just below p, all non-zero tokens stay). p = 1
    keeps everything.
    """
    _check("top_p", p)
    return _full_row_filter(logits, _top_p, float(p))


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Keep tokens whose probability is >= min_p * (probability of the top token).

    Unlike top-p this scales with the model's confidence: a peaked distribution
    keeps few tokens, a flat one keeps many. min_p < 1 always keeps the top token.
    """
    _check("min_p", min_p)
    return _full_row_filter(logits, _min_p, float(min_p))


def ranked_top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest of `values` [V] (k clipped to V), largest first and equal values in position order:
    the rows of the next-token table and the rivals of a token's log probability."""
    k = min(k, values.shape[0])
    if k < 1:
        return np.zeros(0, np.int64)
    top = np.argpartition(-values, k - 1)[:k]
    return top[np.lexsort((top, -values[top]))]


# ----------------------------------------------------------------------------- sampling


def _penalized(logits: np.ndarray, params: SamplingParams, history: History | None) -> np.ndarray:
    """Sanitized float64 copy of one row with the params' penalties applied."""
    x = _as_logits(logits)
    _check_1d(x)
    if params.penalized and history is not None:
        _penalize(x, history, params.repetition_penalty, params.presence_penalty, params.frequency_penalty)
    return x


def _argmax(x: np.ndarray) -> int:
    i = int(np.argmax(x))  # first maximum: lowest id on ties
    if x[i] == -np.inf:
        raise UsageError("every logit is -inf or NaN, so there is nothing to sample; check the model output")
    return i


def _candidates(x: np.ndarray, params: SamplingParams) -> Cands:
    """temperature -> top-k -> top-p -> min-p on a penalized row we own (non-greedy)."""
    # Shift so max = 0 before dividing: a huge logit / a small temperature cannot overflow.
    z = _shift_max_to_zero(x, inplace=True)
    if params.temperature != 1.0:
        with np.errstate(over="ignore"):  # z <= 0, so overflow can only reach -inf (masked)
            z /= params.temperature
    c = _top_k(_compact(z), params.top_k)
    c = _top_p(c, params.top_p)
    return _min_p(c, params.min_p)


def filter_logits(logits: np.ndarray, params: SamplingParams, history: History | None = None) -> np.ndarray:
    """The row `sample_next` draws from: kept tokens' (scaled) logits, -inf elsewhere.

    Exposed so tests and tools (e.g. "what could the sampler pick") see exactly
    the candidate set, computed by the same code as sampling. For greedy params
    only the argmax survives.
    """
    x = _penalized(logits, params, history)
    if params.greedy:
        out = np.full_like(x, -np.inf)
        i = _argmax(x)
        out[i] = x[i]
        return out
    return _expand(_candidates(x, params), x.shape[0])


class TokenDistribution(NamedTuple):
    """The distribution the next token is drawn from, kept in candidate form (see `token_distribution`).

    Token `ids[i]` (token i itself when ids is None) has probability proportional to `weights[i]`; every
    other id has probability 0. The weights stay unnormalised because a draw is one inverse-CDF pick over
    exactly these numbers, which is what `sample_next` has always drawn: a seed keeps its tokens.
    """

    ids: np.ndarray | None
    weights: np.ndarray
    vocab: int

    def draw(self, rng: np.random.Generator) -> int:
        """One token, from exactly one `rng.random()`."""
        i = _draw(self.weights, rng.random())
        return i if self.ids is None else int(self.ids[i])

    def probs(self) -> np.ndarray:
        """Normalised float64 probabilities over the whole vocabulary [vocab]."""
        dense = np.zeros(self.vocab)
        if self.ids is None:
            dense[:] = self.weights
        else:
            dense[self.ids] = self.weights
        dense /= dense.sum()
        return dense


def token_distribution(
    logits_row: np.ndarray, params: SamplingParams, history: History | None = None
) -> TokenDistribution:
    """What the next token is drawn from after every processing step: penalties (over `history`) ->
    temperature -> top-k -> top-p -> min-p -> softmax; for greedy params, all the mass on the argmax.

    The one definition of the processed distribution: `sample_next` draws from it and speculative
    decoding's acceptance rule reads it, so a verified token is distributed as a plainly sampled one.
    """
    x = _penalized(logits_row, params, history)
    if params.greedy:
        return TokenDistribution(np.array([_argmax(x)]), np.ones(1), x.shape[0])
    ids, vals = _candidates(x, params)
    return TokenDistribution(ids, _relative_probs(vals, inplace=True), x.shape[0])  # vals is ours: reuse it


def sample_next(
    logits_row: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator | None,
    history: History | None = None,
) -> int:
    """Pick the next token id from one row of logits, shape [vocab].

    Greedy (temperature 0) returns the argmax after penalties (lowest id on
    ties) and never touches `rng` (None is fine). Otherwise one draw from
    `token_distribution` (penalties -> temperature -> top-k -> top-p -> min-p ->
    softmax): exactly one `rng.random()` (inverse CDF), so a seeded generator
    repeats the same tokens. `history` is the ids the penalties look at
    (ignored when they are neutral).
    """
    if params.greedy:
        if not params.penalized and isinstance(logits_row, np.ndarray) and logits_row.ndim == 1 and logits_row.size:
            # No copy: the argmax of the row as it is; a NaN (argmax returns it first) or an all -inf row takes
            # the full path below, which maps NaN to -inf or explains the empty row.
            i = int(np.argmax(logits_row))
            if logits_row[i] > -np.inf:
                return i
        return int(token_distribution(logits_row, params, history).ids[0])
    if not isinstance(rng, np.random.Generator):
        raise UsageError("sampling with temperature > 0 needs rng=np.random.default_rng(seed) (or params.make_rng())")
    return token_distribution(logits_row, params, history).draw(rng)


_BLOCK = 1024


def _draw(weights: np.ndarray, u: float) -> int:
    """Inverse-CDF pick of a position with weight > 0, for u in [0, 1).

    np.cumsum is sequential and slow over 50k entries, so a long row is cut into
    blocks: pick the block from the cumsum of the block sums, then the position
    from the cumsum inside that one block. Weights need not be normalised.
    """
    if weights.size <= 4 * _BLOCK:
        cs = np.cumsum(weights)
        return _search(weights, cs, u * cs[-1])
    starts = np.arange(0, weights.size, _BLOCK)
    sums = np.add.reduceat(weights, starts)
    block_cs = np.cumsum(sums)
    target = u * block_cs[-1]
    j = _search(sums, block_cs, target)
    block = weights[starts[j] : starts[j] + _BLOCK]
    return int(starts[j]) + _search(block, np.cumsum(block), target - (block_cs[j - 1] if j else 0.0))


def _search(weights: np.ndarray, cs: np.ndarray, target: float) -> int:
    """First position whose cumsum exceeds target; that position always has weight > 0."""
    i = int(np.searchsorted(cs, target, side="right"))
    if i >= cs.size:  # rounding put the target at the very end: last position with weight
        i = int(np.flatnonzero(weights)[-1])
    return i

