"""What one token is, as text and as bytes: for next-token tables and per-token log probabilities.

A byte-level BPE token can be a fragment of a UTF-8 character, whose decoded text is U+FFFD. Its
real bytes come from the vocabulary entry, spelled in GPT-2's printable byte alphabet.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable stand-ins for the 256 bytes) -> byte value."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tokenizer, token_id: int, text: str) -> bytes:
    """The token's bytes: its text's UTF-8, or its vocabulary entry's bytes when it is part of a character."""
    if "\ufffd" not in text:
        return text.encode("utf-8")
    piece = tokenizer.id_to_token(token_id) or ""
    table = byte_decoder()
    if piece and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return text.encode("utf-8")


def token_repr(tokenizer, token_id: int, text: str) -> str:
    """repr() of the token's text, or of its raw bytes when it is only part of a UTF-8 character."""
    if "\ufffd" not in text:
        return repr(text)
    return repr(token_bytes(tokenizer, token_id, text))
