"""The byte-level BPE tokenizer: exact round trip for any text, fixed vocabulary size, end-of-text token."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from gptedge.errors import CheckpointError, UsageError
from gptedge.train.tokenizer import EOT, decode, encode, encode_many, eot_id, load_tokenizer, train_tokenizer

CORPUS = [
    "def add(a, b):\n    return a + b\n\n" * 20,
    "The quick brown fox jumps over the lazy dog. " * 30,
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n" * 10,
    "import os\nimport sys\nprint(sys.argv, os.getcwd())\n" * 10,
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(iter(CORPUS), vocab_size=320)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_encode_decode_round_trips_any_text(tok: Tokenizer, text: str) -> None:
    assert decode(tok, encode(tok, text)) == text


@pytest.mark.parametrize(
    "text",
    ["", "   leading spaces", "中文字符和标点，。", "emoji 🎉👩‍👩‍👧 flags 🇫🇷", "tabs\tand\r\nnewlines\n\n",
     "\x00\x01\x7f\u200b", "ascii mixed with 日本語 and العربية", "def f():\n\treturn '🐍'\n"],
)
def test_hard_strings_round_trip(tok: Tokenizer, text: str) -> None:
    ids = encode(tok, text)
    assert decode(tok, ids) == text
    assert all(0 <= i < tok.get_vocab_size() for i in ids)


def test_unseen_characters_fall_back_to_bytes(tok: Tokenizer) -> None:
    # "世" never occurs in the corpus: it becomes its three UTF-8 bytes, not an unknown token.
    assert len(encode(tok, "世")) == 3


def test_vocab_size_and_merges(tok: Tokenizer) -> None:
    assert tok.get_vocab_size() == 320
    # 63 learned merges already halve the training text's length (no merges: one token per byte).
    text = CORPUS[0]
    assert len(encode(tok, text)) <= 0.55 * len(text.encode())


def test_end_of_text_is_one_special_token(tok: Tokenizer) -> None:
    i = eot_id(tok)
    assert tok.id_to_token(i) == EOT
    assert encode(tok, f"a{EOT}b").count(i) == 1
    assert decode(tok, [i]) == EOT


def test_training_is_deterministic_and_saves_to_json(tok: Tokenizer, tmp_path: Path) -> None:
    again = train_tokenizer(iter(CORPUS), vocab_size=320)
    assert again.to_str() == tok.to_str()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    loaded = load_tokenizer(path)
    text = "class Point: 🎉 中文"
    assert encode(loaded, text) == encode(tok, text)
    assert encode_many(loaded, [text, "x"]) == [encode(tok, text), encode(tok, "x")]


def test_vocab_too_small_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="at least 257"):
        train_tokenizer(iter(CORPUS), vocab_size=200)


def test_missing_or_garbage_tokenizer_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)
