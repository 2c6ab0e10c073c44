"""Byte-level BPE tokenizer, trained with Hugging Face `tokenizers` (GPT-2's recipe).

Byte-level means every string maps to tokens and back *exactly*: the 256 byte
symbols are all in the vocabulary (`initial_alphabet`), so there is no unknown
token, and the ByteLevel decoder turns the bytes back into the original text
(Chinese characters and emoji split across tokens included). The saved
`tokenizer.json` is all the runtime needs: it loads with `tokenizers` alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from gptedge.errors import CheckpointError, UsageError

EOT = "<|endoftext|>"  # separates documents and ends fine-tuning examples; GPT-2's spelling
MIN_VOCAB = 256 + 1  # every byte plus the end-of-text token
# Han ideographs and kana are written without spaces, so GPT-2's regex would hand BPE a whole clause
# as one "word" and merges would glue characters across word boundaries ("客的"). Then a prompt that
# ends mid-clause tokenizes differently from the same text in training, and the next-token table of
# "我喜欢阅读技术博客" would not show "的". One character per pre-token keeps the tokenization of
# a prefix a prefix of the tokenization (byte-level merges inside a character remain).
CJK_CHARACTER = Regex(r"[\p{Han}\p{Hiragana}\p{Katakana}]")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (including `<|endoftext|>`) on `texts`.

    Deterministic for the same texts in the same order (the trainer breaks ties by pair).
    """
    if vocab_size < MIN_VOCAB:
        raise UsageError(f"vocab size {vocab_size} is too small; use at least {MIN_VOCAB} (256 bytes + {EOT})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(CJK_CHARACTER, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def eot_id(tok: Tokenizer) -> int:
    """Id of `<|endoftext|>`; a tokenizer without it cannot separate documents."""
    i = tok.token_to_id(EOT)
    if i is None:
        raise CheckpointError(f"the tokenizer has no {EOT} token; use a tokenizer.json written by `gptedge train`")
    return i


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json, with a gptedge error if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found; a gptedge checkpoint keeps its tokenizer as tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for parse errors
        raise CheckpointError(f"{path} is not a valid tokenizer.json ({exc}); retrain or restore it") from exc


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` (no special tokens added)."""
    return tok.encode(text, add_special_tokens=False).ids


def encode_many(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts, in parallel inside the Rust library; skips offsets when it can (faster)."""
    batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [e.ids for e in batch(texts, add_special_tokens=False)]


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Text of `ids`, special tokens kept, so encode -> decode is the identity."""
    return tok.decode(list(ids), skip_special_tokens=False)
