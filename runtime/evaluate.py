"""Measure a model through an `Engine`, torch-free: perplexity, next-token predictions, greedy continuations.

These are the numbers `gptedge eval`, `Model.perplexity` and the quantization
quality gate report. Everything runs through `Engine.forward`, so any bundle
(in-place or concatenating KV cache, fp32/fp16, float or quantized) is measured
by the very code path that serves it.

Perplexity of a text longer than the context uses a sliding window ("strided
perplexity", as in the Hugging Face docs): each window feeds up to `window`
tokens and scores only the last `stride` of its targets, so every token is
scored exactly once and, after the first window, with at least
`window - stride + 1` tokens of context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from gptedge.errors import UsageError
from gptedge.runtime.engine import Engine, right_pad

# Logits rows requested per forward call while scoring: bounds the [K, V] logits buffer to ~16 MiB.
_LOGITS_BYTES = 1 << 24

Progress = Callable[[int], None]  # called with the number of tokens just processed (e.g. tqdm.update)


@dataclass(frozen=True)
class PerplexityResult:
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # tokens scored
    ppl: float  # exp(nll)

    @classmethod
    def from_nll(cls, nll: np.ndarray) -> "PerplexityResult":
        mean = float(np.mean(nll, dtype=np.float64)) if len(nll) else float("nan")
        return cls(nll=mean, tokens=int(len(nll)), ppl=math.exp(mean) if len(nll) else float("nan"))


@dataclass(frozen=True)
class TokenScores:
    """Per target token `token_ids[1:]`: its negative log-likelihood and the model's top-1 prediction."""

    nll: np.ndarray  # [N-1] float64, nats
    top1: np.ndarray  # [N-1] int64, argmax of the logits that predicted the target

    def perplexity(self) -> PerplexityResult:
        return PerplexityResult.from_nll(self.nll)


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) per window over n tokens: inputs ids[begin:end-1] (at most `window`),
    targets first_target..end-1, each target scored exactly once."""
    end = min(window + 1, n)
    spans = [(0, end, 1)]
    while end < n:
        new_end = min(end + stride, n)
        spans.append((max(0, new_end - 1 - window), new_end, end))
        end = new_end
    return spans


def score_tokens(
    engine: Engine,
    token_ids: Sequence[int] | np.ndarray,
    window: int | None = None,
    stride: int | None = None,
    progress: Progress | None = None,
) -> TokenScores:
    """Score every token of `token_ids` after the first: NLL and top-1 prediction, with a sliding window.

    window: input positions per window, i.e. the most context a prediction gets (default and maximum:
    the model's context length).
    stride: new targets per window after the first (default window // 2). Each target of a later window
    sees at least window - stride + 1 tokens; stride = window gives disjoint windows (fastest).
    """
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    context = engine.arch.context_length
    for name, value in (("window", window), ("stride", stride)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise UsageError(f"{name} must be a whole number of tokens, got {value!r}")
    window = context if window is None else int(window)
    if not 1 <= window <= context:
        raise UsageError(f"window must be between 1 and the model's context of {context} tokens, got {window}")
    stride = max(1, window // 2) if stride is None else int(stride)
    if not 1 <= stride <= window:
        raise UsageError(f"stride must be between 1 and the window ({window}), got {stride}")
    if len(ids) < 2:
        raise UsageError("perplexity needs at least 2 tokens of text")
    if ids.min() < 0 or ids.max() >= engine.arch.vocab_size:
        raise UsageError(f"token ids must lie in [0, {engine.arch.vocab_size}); "
                         "the text was encoded with another tokenizer")
    nll = np.zeros(len(ids) - 1, np.float64)
    top1 = np.zeros(len(ids) - 1, np.int64)
    chunk = max(16, _LOGITS_BYTES // (4 * engine.arch.vocab_size))
    for begin, end, first in _windows(len(ids), window, stride):
        _score_window(engine, ids, begin, end, first, chunk, nll, top1)
        if progress is not None:
            progress(end - first)
    return TokenScores(nll=nll, top1=top1)


def _score_window(engine: Engine, ids: np.ndarray, begin: int, end: int, first: int, chunk: int,
                  nll: np.ndarray, top1: np.ndarray) -> None:
    """Feed ids[begin:end-1] in chunks through one KV cache; targets first..end-1 fill nll/top1."""
    cache = engine.new_cache(1, end - 1 - begin)
    try:
        for start in range(begin, end - 1, chunk):
            stop = min(start + chunk, end - 1)  # inputs start..stop-1 predict targets start+1..stop
            lo = max(start, first - 1)  # first input position whose prediction is scored
            local = np.arange(lo, stop) - start if lo < stop else np.array([stop - 1 - start])
            logits = engine.step(cache, ids[None, start:stop], logits_index=local[None, :])[0]  # [K, V]
            if lo >= stop:
                continue
            targets = ids[lo + 1:stop + 1]
            logits = logits.astype(np.float64)
            peak = logits.max(axis=-1)
            lse = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=-1))
            nll[lo:stop] = lse - logits[np.arange(len(targets)), targets]
            top1[lo:stop] = logits.argmax(axis=-1)
    finally:
        cache.release()


def perplexity(
    engine: Engine,
    token_ids: Sequence[int] | np.ndarray,
    window: int | None = None,
    stride: int | None = None,
    progress: Progress | None = None,
) -> PerplexityResult:
    """Perplexity of `token_ids` under the model (sliding window; see `score_tokens`)."""
    return score_tokens(engine, token_ids, window, stride, progress).perplexity()


def top1_agreement(reference: TokenScores, candidate: TokenScores) -> float:
    """Fraction of positions where two models predict the same next token (same text, same windows)."""
    if reference.top1.shape != candidate.top1.shape:
        raise UsageError("top-1 agreement needs scores of the same text")
    return float(np.mean(reference.top1 == candidate.top1)) if len(reference.top1) else float("nan")


def next_token_logits(engine: Engine, prompts: Sequence[Sequence[int]]) -> np.ndarray:
    """Logits [B, V] (float32, a copy) for the token after each prompt; prompts are batched right-padded."""
    ids, lengths = right_pad(prompts)
    cache = engine.new_cache(len(prompts), int(lengths.max()))
    try:
        return engine.prefill(cache, ids, lengths).copy()
    finally:
        cache.release()


def greedy_decode(engine: Engine, prompts: Sequence[Sequence[int]], n: int,
                  keep_logits: bool = False) -> tuple[list[list[int]], list[np.ndarray] | None]:
    """The next `n` greedy (argmax) tokens after each prompt, decoded as one right-padded batch; EOS does not stop it.

    Runs exactly as serving does: one prefill, then one token per step through the KV cache, rows at
    different lengths. `keep_logits`: also return each row's float32 logits at every real position
    [len(prompt) + n, V] (the n-th token is fed too), which export verification compares with PyTorch.
    """
    if n < 1:
        raise UsageError(f"n must be >= 1, got {n}")
    ids, lengths = right_pad(prompts)
    B, S = ids.shape
    cache = engine.new_cache(B, S + n - (0 if keep_logits else 1))  # without logits the last token is never fed
    out = np.zeros((B, n), np.int64)
    rows: list[list[np.ndarray]] | None = None
    try:
        if keep_logits:
            logits = engine.step(cache, ids, lengths, np.tile(np.arange(S, dtype=np.int64), (B, 1)))
            rows = [list(logits[b, : lengths[b]].copy()) for b in range(B)]
            last = np.stack([r[-1] for r in rows])
        else:
            last = engine.prefill(cache, ids, lengths)
        for step in range(n):
            out[:, step] = last.argmax(axis=-1)
            if step + 1 < n or keep_logits:
                last = engine.decode(cache, out[:, step:step + 1])
                if rows is not None:
                    for b in range(B):
                        rows[b].append(last[b].copy())
    finally:
        cache.release()
    logits_out = None if rows is None else [np.stack(r).astype(np.float32) for r in rows]
    return out.tolist(), logits_out


def greedy_continuations(engine: Engine, prompts: Sequence[Sequence[int]], n: int) -> list[list[int]]:
    """The next `n` greedy tokens after each prompt (see greedy_decode)."""
    return greedy_decode(engine, prompts, n)[0]


def greedy_continuation(engine: Engine, prompt_ids: Sequence[int], n: int) -> list[int]:
    """The next `n` greedy tokens after one prompt."""
    return greedy_continuations(engine, [list(prompt_ids)], n)[0]


@dataclass(frozen=True)
class GreedyAgreement:
    """How closely free-running greedy continuations of a candidate follow the reference's.

    prefix: mean over prompts of (identical tokens before the first divergence) / n, the strict measure:
            once two continuations diverge, the later tokens answer different prefixes.
    positionwise: mean fraction of positions holding the same token (counts re-synchronisation too).
    first_divergence: per prompt, index of the first differing token, or n when all match.
    """

    prefix: float
    positionwise: float
    first_divergence: list[int]


def greedy_agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> GreedyAgreement:
    if len(reference) != len(candidate) or not reference:
        raise UsageError("greedy agreement needs the same, non-empty set of prompts for both models")
    firsts, prefix, positionwise = [], [], []
    for ref, cand in zip(reference, candidate):
        if len(ref) != len(cand) or not ref:
            raise UsageError("greedy agreement needs continuations of the same, non-zero length")
        same = np.asarray(ref) == np.asarray(cand)
        first = int(np.argmin(same)) if not same.all() else len(ref)
        firsts.append(first)
        prefix.append(first / len(ref))
        positionwise.append(float(same.mean()))
    return GreedyAgreement(prefix=float(np.mean(prefix)), positionwise=float(np.mean(positionwise)),
                           first_divergence=firsts)
