"""Speculative decoding with a draft model: a smaller model guesses, the model verifies several tokens per step.

The draft (a bundle with the same tokenizer, loaded as its own `Model`) keeps its own KV cache, which
always holds a prefix of the sequence's history: it catches up on whatever it has not seen (the prompt
at first, then the verified token and anything decoded without it) in one multi-token run, proposes k
tokens one step at a time, and after verification is wound back by length to the accepted prefix.
When the model is greedy the draft proposes its own argmax; when it samples, the draft samples from
its own processed distribution q (the same SamplingParams, its own history for the penalties) and
hands q to the acceptance rule in gptedge.runtime.speculative, which keeps the output distributed
exactly as plain sampling's.

A draft step is not free, so the `Pacer` (gptedge.runtime.speculative, shared with prompt lookup)
watches whether proposing pays: the length adapts to acceptance, and when the expected tokens per
verify step no longer cover what the draft steps and the verify step cost, decoding falls back to
plain one-token steps for a while (longer after each fallback in a row), then tries again.
Where timings may steer (greedy, whose output does not depend on the path, or unseeded sampling) the
costs are measured; a seeded sampling run must repeat exactly, so there they are a static estimate
from the two models' sizes and only the (deterministic) acceptance counts steer.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from gptedge.errors import ContextLengthError, UsageError
from gptedge.runtime.bundle import Architecture
from gptedge.runtime.cache import KVCache
from gptedge.runtime.decoding import Decoding
from gptedge.runtime.detokenizer import token_count
from gptedge.runtime.engine import Engine
from gptedge.runtime.generator import decode_step, kv_capacity, prefill
from gptedge.runtime.sampling import sample_next, token_distribution
from gptedge.runtime.speculative import MAX_PROPOSALS, Pacer, stream_speculative

if TYPE_CHECKING:  # pragma: no cover - model.py imports this module
    from gptedge.runtime.model import Model

def check_tokenizer(model: Model, draft: Model) -> None:
    """Refuse a draft (a loaded Model, like `model`) whose ids do not mean the model's tokens.

    Only the tokenizers are compared: the draft's embedding may be padded differently. Comparing two
    vocabularies takes a while (0.1 s for 50k tokens), so `Model` remembers the drafts that passed.
    """
    ours, theirs = token_count(model.tokenizer), token_count(draft.tokenizer)
    if ours != theirs:
        raise UsageError(f"the draft model {draft.folder} has a tokenizer of {theirs} tokens and the model "
                         f"{ours}; a draft must use the model's tokenizer (same vocabulary, same ids)")
    if draft.tokenizer is model.tokenizer:
        return
    a, b = model.tokenizer.get_vocab(with_added_tokens=True), draft.tokenizer.get_vocab(with_added_tokens=True)
    if a != b:
        _, token = min((i, t) for t, i in set(a.items()) ^ set(b.items()))  # the lowest id that differs
        raise UsageError(f"the draft model {draft.folder} has another tokenizer than the model: token "
                         f"{token!r} is id {b.get(token)} in the draft and {a.get(token)} in the model; "
                         "a draft must use the model's tokenizer (same vocabulary, same ids)")


def check_context(context: int, needed: int) -> None:
    """Refuse a draft whose `context` cannot hold a request of `needed` positions (prompt + max_new_tokens)."""
    if needed > context:
        raise ContextLengthError(f"the request needs {needed} positions (prompt + max_new_tokens) and the draft "
                                 f"model's context holds {context}; lower max_new_tokens, shorten the prompt, or use "
                                 "a draft with a longer context", field="max_new_tokens")


def step_cost_ratio(model: Architecture, draft: Architecture) -> float:
    """A draft step's cost in model steps, estimated from sizes: by weights (memory traffic and arithmetic) or
    by layers (per-operator overhead, what small models spend their time on), whichever is larger."""
    def weights(a: Architecture) -> int:
        return 12 * a.n_layer * a.n_embd ** 2 + a.vocab_size * a.n_embd

    return min(1.0, max(weights(draft) / weights(model), draft.n_layer / model.n_layer))


class DraftProposer:
    """A draft model's side of one generation (see the module docstring); a `Proposer` for `verify_steps`."""

    def __init__(self, engine: Engine, seq: Decoding, pacer: Pacer) -> None:
        self.engine = engine
        self.pacer = pacer
        self.capacity = kv_capacity(seq.positions_needed, engine.arch.context_length)
        self.cache: KVCache | None = None
        self.base = 0  # history tokens the cache held when the last proposals were made
        self.catch_up_s = 0.0

    def propose(self, seq: Decoding, room: int) -> tuple[list[int], list[np.ndarray] | None]:
        k = self.pacer.proposals(room)
        if k == 0:
            return [], None
        history = seq.prompt_ids + seq.tokens
        start = time.perf_counter()
        if self.cache is None:
            self.cache = self.engine.new_cache(1, self.capacity)
        row = prefill(self.engine, self.cache, history[self.cache.length:])
        self.catch_up_s = time.perf_counter() - start  # the price of tokens decoded without the draft
        self.base = len(history)
        params, vocab = seq.params, seq.vocab
        tokens: list[int] = []
        qs: list[np.ndarray] | None = None if params.greedy else []
        for i in range(k):
            if qs is None:
                token = sample_next(row[:vocab], params, None, history)
            else:
                dist = token_distribution(row[:vocab], params, history)
                token = dist.draw(seq.rng)
                qs.append(dist.probs())
            tokens.append(token)
            history.append(token)
            if i < k - 1:
                row = decode_step(self.engine, self.cache, token)
        return tokens, qs

    def verified(self, proposed: int, accepted: int, committed: int, seconds: float) -> None:
        if proposed:
            # The cache holds the history, then the proposals but the last; keep the accepted ones.
            self.cache.rewind_to(self.base + min(accepted, proposed - 1))
            seconds -= self.catch_up_s
        self.pacer.record(proposed, accepted, committed, seconds)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.release()
            self.cache = None


def stream_draft(engine: Engine, seq: Decoding, draft: Engine, *, cost: float = 1.0, fallback: bool = True,
                 cancel=None, on_token: Callable[[int], None] | None = None, store=None,
                 max_proposals: int = MAX_PROPOSALS) -> Iterator[str]:
    """`stream_tokens` with `draft`'s proposals verified in multi-token steps; `cost` is a draft step in model
    steps (`step_cost_ratio`), `fallback=False` proposes at every step whether it pays or not. Raises
    ContextLengthError before anything runs if the draft's context cannot hold the request."""
    check_context(draft.arch.context_length, seq.positions_needed)
    timed = seq.params.greedy or seq.params.seed is None
    pacer = Pacer(cost, timed, fallback, max_proposals)
    return stream_speculative(engine, seq, DraftProposer(draft, seq, pacer), cancel=cancel, on_token=on_token,
                              store=store)
