"""One sequence's decode state, advanced one sampled token at a time.

`Decoding` owns everything that belongs to a single generation and nothing that belongs to the
engine: the sampler's generator, the token history the penalties read, the text pipe (UTF-8-safe
detokenizer, then stop strings), the finish reason, the timings and optional per-token log
probabilities. Every decode loop drives the same object, so sampling, stop checks, text and result
assembly are written once:

    seq = Decoding(tokenizer, prompt_ids, params)
    logits = prefill(...)                      # any engine, any batch row
    while not seq.done:
        step = seq.advance(logits_row)         # -> Step(token, text, finish_reason, ...)
        ... yield step.text, feed step.token ...
    result = seq.finish()                      # GenerationResult; "cancelled" if stopped early

The single-request stream, the padded batch and the server's continuous batcher are its users, and so
are the speculative decoders: `advance` is `commit(choose(logits), logits)`, and a speculative decoder
chooses with its acceptance rule instead (reading `distribution`, the same one `choose` draws from, and
`rng`) and commits the same way, so history, text, stops, log probabilities and timings are written once.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from gptedge.runtime.detokenizer import StreamingDetokenizer, token_count
from gptedge.runtime.sampling import (
    SamplingParams,
    TokenDistribution,
    log_softmax,
    ranked_top_k,
    sample_next,
    token_distribution,
)
from gptedge.runtime.stopping import StopStringMatcher


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
    decode_s: float = 0.0  # first token sampled -> last token sampled
    total_s: float = 0.0
    proposed: int = 0  # speculative decoding: tokens proposed for verification
    accepted: int = 0  # ... and how many of them the model's own choice confirmed

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first divided by the time they took (the prefill is not in it)."""
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else math.nan

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else math.nan


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log probability under the model (before any sampling filter), and its rivals."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (id, logprob), most likely first


@dataclass
class GenerationResult:
    """What a generation produced.

    `token_ids` are the sampled tokens, without a final stop token id (eos) but including the tokens
    of a matched stop string; `text` is their decoded text cut before the stop string.
    `finish_reason`: "eos" (a stop token id), "stop_string", "length" (max_new_tokens),
    "cancelled", or "context" (the model's context is full; only when max_new_tokens was not given).
    `logprobs`: one entry per token in `token_ids` when they were asked for, else None.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    timings: Timings = field(repr=False)
    logprobs: list[TokenLogprob] | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.text  # print(model.generate(...)) prints the completion


@dataclass(frozen=True)
class Step:
    """What one `Decoding.advance` produced: the sampled id (a stop id included), the text it released."""

    token: int
    text: str
    finish_reason: str | None
    logprob: TokenLogprob | None = None


class LogitsConstraint(Protocol):
    """Restricts which tokens may come next (structured output): masks a row, then learns the choice."""

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """`logits` [V] with every forbidden id set to -inf (may modify and return the same array)."""

    def accept(self, token: int) -> None:
        """Record the sampled token; after this `mask` describes the position after it."""

    def done(self) -> bool:
        """True once the constrained text is complete (the generation ends with "eos")."""


class TextPipe:
    """tokens -> UTF-8-safe text -> stop-string filter; held-back text is released only by `finish`."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]) -> None:
        self.detok = StreamingDetokenizer(tokenizer)
        self.matcher = StopStringMatcher(stop_strings) if stop_strings else None

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


class Decoding:
    """The state of one generation between engine steps (see the module docstring).

    `length_reason` is the finish reason when the token budget runs out ("length", or "context"
    when the budget was shortened to what the context holds). `logprobs`: None, or how many rival
    tokens to report per position (0 = only the sampled one). `constraint` masks each row before
    sampling. `start` is when the request began (time to first token counts from it).
    """

    def __init__(
        self,
        tokenizer,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        length_reason: str = "length",
        logprobs: int | None = None,
        constraint: LogitsConstraint | None = None,
        start: float | None = None,
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.length_reason = length_reason
        self.constraint = constraint
        self.start = time.perf_counter() if start is None else start
        self.timings = Timings(prompt_tokens=len(self.prompt_ids))
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self._vocab = token_count(tokenizer)
        self._logprobs = logprobs
        self._logprob_list: list[TokenLogprob] | None = [] if logprobs is not None else None
        self._rng = params.make_rng()
        self._history = list(self.prompt_ids)
        self._pipe = TextPipe(tokenizer, params.stop_strings)
        self._text: list[str] = []
        self._first: float | None = None
        self._result: GenerationResult | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def positions_needed(self) -> int:
        """KV positions this sequence can use: prompt + budget (the last sampled token is never fed)."""
        return len(self.prompt_ids) + self.params.max_new_tokens

    @property
    def vocab(self) -> int:
        """Ids below this have text (the tokenizer's entries); a padded embedding's rows above it are never chosen."""
        return self._vocab

    @property
    def rng(self) -> np.random.Generator:
        """The sequence's own generator: every random choice of this generation draws from it."""
        return self._rng

    def _row(self, logits: np.ndarray) -> np.ndarray:
        if self.done:
            raise RuntimeError("choosing a token for a finished sequence")
        row = logits[: self._vocab]  # padded embedding rows have no text: never sampled
        if self.constraint is not None:
            row = self.constraint.mask(np.array(row, np.float32))
        return row

    def distribution(self, logits: np.ndarray) -> TokenDistribution:
        """What `choose` draws the next token from, given `logits` [V >= vocab] for the position after the
        tokens so far: the constraint's mask, then the sampler's processing (penalties over the history)."""
        return token_distribution(self._row(logits), self.params, self._history)

    def choose(self, logits: np.ndarray) -> int:
        """Sample the next token from `logits` [V >= vocab] without moving the state (see `commit`)."""
        return sample_next(self._row(logits), self.params, self._rng, self._history)

    def advance(self, logits: np.ndarray) -> Step:
        """Sample the next token from `logits` [V >= vocab] and move the state past it."""
        return self.commit(self.choose(logits), logits)

    def commit(self, token: int, logits: np.ndarray) -> Step:
        """Move the state past `token`, chosen from `logits` (by `choose`, or a speculative decoder's
        acceptance rule): history, text, stops, constraint, log probabilities, timings, token budget."""
        if self.done:
            raise RuntimeError("commit() on a finished sequence")
        now = time.perf_counter()
        if self._first is None:
            self._first = now
            self.timings.ttft_s = now - self.start
        self.timings.decode_s = now - self._first
        logprob = self._logprob(logits, token) if self._logprobs is not None else None
        if token in self.params.stop_token_ids:
            self.finish_reason = "eos"
            return Step(token, "", "eos")  # a stop id is not part of the output: no log probability for it
        self.tokens.append(token)
        self._history.append(token)
        self.timings.generated_tokens = len(self.tokens)
        if logprob is not None:
            self._logprob_list.append(logprob)
        piece, stopped = self._pipe.add(token)
        if piece:
            self._text.append(piece)
        if self.constraint is not None:
            self.constraint.accept(token)
        if stopped:
            self.finish_reason = "stop_string"
        elif self.constraint is not None and self.constraint.done():
            self.finish_reason = "eos"
        elif len(self.tokens) == self.params.max_new_tokens:
            self.finish_reason = self.length_reason
        return Step(token, piece, self.finish_reason, logprob)

    def _logprob(self, logits: np.ndarray, token: int) -> TokenLogprob:
        lp = log_softmax(np.asarray(logits[: self._vocab], np.float64))
        top = tuple((int(i), float(lp[i])) for i in ranked_top_k(lp, self._logprobs))
        return TokenLogprob(int(token), float(lp[token]), top)

    def finish(self, reason: str = "cancelled") -> tuple[GenerationResult, str]:
        """End the sequence (with `reason` if it is still running); (result, text still held back).

        Idempotent: a second call returns the same result and no text.
        """
        if self._result is not None:
            return self._result, ""
        if self.finish_reason is None:
            self.finish_reason = reason
        tail = "" if self.finish_reason == "stop_string" else self._pipe.finish()
        if tail:
            self._text.append(tail)
        self.timings.total_s = time.perf_counter() - self.start
        self._result = GenerationResult(
            "".join(self._text), self.tokens, self.finish_reason, len(self.prompt_ids), self.timings, self._logprob_list
        )
        return self._result, tail

    @property
    def result(self) -> GenerationResult | None:
        """The result once `finish` has been called, else None."""
        return self._result
