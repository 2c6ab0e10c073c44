"""Structured output: a JSON schema (or "any JSON object") enforced token by token with llguidance.

llguidance is the grammar engine llama.cpp and onnxruntime-genai use: it compiles a JSON schema to a
grammar and, at each position, computes the set of tokens that keep the text a valid prefix. The
`JsonConstraint` turns that set into -inf logits for everything else before the sampler runs (no
second pass, no retries), so a generation that ends by itself ("stop") always parses and validates.
A generation cut by max_tokens ("length") can still be unfinished JSON, as with any server.

Whitespace is not free (`whitespace_flexible` off): a model cannot wander in spaces and newlines
until its budget runs out, and the output is compact JSON.

Needs the `serve` extra (llguidance).
"""

from __future__ import annotations

import functools
import json
import threading
from typing import Any

import numpy as np

from gptedge.errors import UsageError
from gptedge.runtime.detokenizer import token_count

JSON_OPTIONS = {"whitespace_flexible": False}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401 - the bitmask helpers
    except ImportError:
        raise UsageError("structured output needs llguidance: pip install 'gptedge[serve]'") from None
    return llguidance


class GrammarFactory:
    """Builds constraints for one model's tokenizer; the llguidance tokenizer is made once (about a second)."""

    def __init__(self, tokenizer, stop_ids: tuple[int, ...]) -> None:
        if not stop_ids:
            raise UsageError("this model has no end-of-text token, which structured output needs to end the JSON")
        self._tokenizer = tokenizer
        self._stop_ids = list(stop_ids)
        self._lltok = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self):
        ll = _llguidance()
        with self._lock:
            if self._lltok is None:
                self._lltok = ll.LLTokenizer(self._tokenizer.to_str(), n_vocab=token_count(self._tokenizer),
                                             eos_token=self._stop_ids)
            return self._lltok

    def json_schema(self, schema: dict[str, Any] | None) -> "JsonConstraint":
        """A fresh constraint for one sequence: `schema`, or any JSON object when None."""
        ll = _llguidance()
        grammar = _grammar(json.dumps(ANY_OBJECT if schema is None else schema, sort_keys=True))
        matcher = ll.LLMatcher(self._ll_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise UsageError(f"the JSON schema cannot be enforced: {matcher.get_error()}")
        return JsonConstraint(matcher, token_count(self._tokenizer))


    def lark(self, grammar_text: str) -> "JsonConstraint":
        """A fresh constraint for one sequence from a Lark grammar (llguidance's dialect, `%json {schema}` inside)."""
        ll = _llguidance()
        grammar = _lark(grammar_text)
        matcher = ll.LLMatcher(self._ll_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise UsageError(f"the grammar cannot be enforced: {matcher.get_error()}")
        return JsonConstraint(matcher, token_count(self._tokenizer))


@functools.lru_cache(maxsize=64)
def _lark(text: str) -> str:
    ll = _llguidance()
    try:
        grammar = ll.LLMatcher.grammar_from_lark(text)
    except ValueError as exc:
        raise UsageError(f"the grammar is not valid: {exc}") from None
    error = ll.LLMatcher.validate_grammar(grammar)
    if error:
        raise UsageError(f"the grammar cannot be enforced: {error}")
    return grammar


@functools.lru_cache(maxsize=64)
def _grammar(schema_json: str) -> str:
    ll = _llguidance()
    try:
        grammar = ll.LLMatcher.grammar_from_json_schema(schema_json, overrides=JSON_OPTIONS)
    except ValueError as exc:
        raise UsageError(f"the JSON schema is not valid: {exc}") from None
    error = ll.LLMatcher.validate_grammar(grammar)
    if error:
        raise UsageError(f"the JSON schema cannot be enforced: {error}")
    return grammar


class JsonConstraint:
    """One sequence's grammar state; implements gptedge.runtime.decoding.LogitsConstraint."""

    def __init__(self, matcher, vocab: int) -> None:
        self._matcher = matcher
        self._vocab = vocab
        self._bits = np.zeros((1, (vocab + 31) // 32), np.int32)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        import llguidance.numpy as lln

        lln.fill_next_token_bitmask(self._matcher, self._bits)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: logits.shape[0]].astype(bool)
        logits[~allowed] = -np.inf
        return logits

    def accept(self, token: int) -> None:
        self._matcher.consume_token(int(token))
        if self._matcher.is_error():
            raise UsageError(f"the structured-output grammar rejected token {token}: {self._matcher.get_error()}")

    def done(self) -> bool:
        return self._matcher.is_stopped()
