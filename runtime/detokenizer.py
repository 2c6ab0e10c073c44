"""Incremental detokenizer for streaming: never emits half a UTF-8 character.

Why this is needed: byte-level BPE (GPT-2 and most current models) splits one
Chinese character (3 bytes) or emoji (4 bytes) across several tokens, and a
sentencepiece model with byte fallback does the same with <0xE4>-style tokens.
Decoding a token on its own then yields U+FFFD, and decoding every token
separately would also lose the context some decoders need (a leading space that
depends on the previous token). So we decode a short *window* of recent ids:

    ids:   ... | context (already emitted) | pending (new) |
                 ^prefix_offset             ^read_offset

`add` decodes the window and emits the part past the context's text, but only
once that text no longer ends in U+FFFD (an unfinished character). The window
then slides forward, so each step decodes a handful of ids: O(1) amortized per
token instead of re-decoding the whole output (the scheme of HF TGI and vLLM).

Guarantee: "".join(pieces) + flush() == tokenizer.decode(all ids), exactly, for
byte-level BPE (GPT-2 family), including invalid byte sequences a model may
produce: they come out as U+FFFD just as in tokenizer.decode (a trailing one
waits until a later token completes a character, or until flush()). For
sentencepiece-style decoders with byte fallback (<0xE4> tokens) the guarantee
holds whenever the bytes form valid UTF-8; on an invalid byte run tokenizers'
ByteFallback turns the *whole* run into U+FFFD, retroactively, which text
already streamed cannot follow.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer

from gptedge.errors import UsageError

__all__ = ["StreamingDetokenizer"]

_REPLACEMENT = "\ufffd"


@functools.lru_cache(maxsize=16)
def token_count(tokenizer: Tokenizer) -> int:
    """Entries in the tokenizer, added tokens included: ids at or above it have no text.

    Cached because `get_vocab_size` walks the whole vocabulary (the time for 50k entries is in
    benchmarks/results/runtime-choices.json), which would otherwise land on every generation's time
    to first token.
    """
    return tokenizer.get_vocab_size(with_added_tokens=True)


class StreamingDetokenizer:
    """Turn a stream of token ids into text pieces that are always whole characters."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._vocab_size = token_count(tokenizer)
        # Only the window is stored: window[:read] is emitted context, window[read:] is pending.
        self._window: list[int] = []
        self._read = 0
        self._context_text = ""  # decode(window[:read]), cached so each add decodes once
        self._num_tokens = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def add(self, token_id: int) -> str:
        """Feed one id; return the text it completes ("" while a character is unfinished)."""
        token_id = int(token_id)
        if not 0 <= token_id < self._vocab_size:
            raise UsageError(
                f"token id {token_id} is outside this tokenizer's vocabulary [0, {self._vocab_size}); "
                "the model and tokenizer do not match"
            )
        self._num_tokens += 1
        self._window.append(token_id)
        text = self._decode(self._window)
        if len(text) <= len(self._context_text) or text.endswith(_REPLACEMENT):
            return ""  # nothing new yet (a skipped special token), or a character is still split
        piece = text[len(self._context_text) :]
        # Slide: the pending ids become the next step's context, so the window stays short.
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._context_text = self._decode(self._window)
        return piece

    def flush(self) -> str:
        """Return whatever is still pending (U+FFFD for a character that never finished).

        Call once at the end of generation; afterwards the detokenizer starts a
        fresh window, so further `add` calls keep working.
        """
        text = self._decode(self._window)
        rest = text[len(self._context_text) :] if len(text) > len(self._context_text) else ""
        self._window, self._read, self._context_text = [], 0, ""
        return rest

    @property
    def num_tokens(self) -> int:
        """How many ids were added (stop checks and token budgets count ids, not text)."""
        return self._num_tokens
