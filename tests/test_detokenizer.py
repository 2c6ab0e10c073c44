"""Streaming detokenizer on byte-level BPE tokenizers built inside the test."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptedge.errors import UsageError
from gptedge.runtime.detokenizer import StreamingDetokenizer

EOT = "<|endoftext|>"
CORPUS = [
    "Hello world, this is a small corpus for a byte-level tokenizer.",
    "你好，世界！我们在测试流式解码器。中文字符需要三个字节。",
    "Emoji time 😀🎉🐍 and flags 🇫🇷 plus family 👨‍👩‍👧 sequences.",
    "Mixed: the 猫 sat on the mat 🐱, naïve café façade, Ünïcödé ok?",
    "Numbers 12345 and symbols €£¥ — dashes, «quotes», 日本語テキスト。",
]
# ASCII, 3-byte CJK, 4-byte emoji, 2-byte Latin, ZWJ and regional indicators (flag halves).
ALPHABET = "abcdefghij ,.!?\nHW" + "你好世界中文猫测试字节" + "😀🎉🐍🐱👍" + "éüçñ€—" + "\u200d\U0001f1eb\U0001f1f7"


def _byte_level(model: models.BPE) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A 320-token byte-level BPE: few merges, so most multi-byte characters stay split."""
    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOT],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


@pytest.fixture(scope="module")
def bytes_only() -> Tokenizer:
    """Vocabulary of the 256 byte symbols and no merges: every byte is its own token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return _byte_level(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> tuple[list[str], str]:
    d = StreamingDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    pieces = [d.add(i) for i in ids]
    rest = d.flush()
    assert d.num_tokens == len(ids)
    return pieces, rest


def test_emoji_split_byte_by_byte(bytes_only):
    ids = bytes_only.encode("😀").ids
    assert len(ids) == 4
    assert bytes_only.decode(ids[:1]) == "\ufffd"  # why the detokenizer must wait
    pieces, rest = stream(bytes_only, ids)
    assert pieces == ["", "", "", "😀"] and rest == ""
    pieces, rest = stream(bytes_only, bytes_only.encode("a😀b中").ids)
    assert pieces == ["a", "", "", "", "😀", "b", "", "", "中"] and rest == ""


def test_flush_returns_an_unfinished_character_like_decode(bytes_only):
    ids = bytes_only.encode("ok😀").ids[:4]  # "o", "k", and half of the emoji
    pieces, rest = stream(bytes_only, ids)
    assert pieces == ["o", "k", "", ""]
    assert rest == bytes_only.decode(ids[2:]) and "\ufffd" in rest
    assert "".join(pieces) + rest == bytes_only.decode(ids)


def test_invalid_bytes_in_the_middle_do_not_stall(bytes_only):
    lead = bytes_only.encode("中").ids[0]  # a lone 3-byte lead byte, then ASCII
    ids = [lead, *bytes_only.encode("ab").ids]
    pieces, rest = stream(bytes_only, ids)
    assert pieces == ["", "\ufffda", "b"] and rest == ""
    assert "".join(pieces) == bytes_only.decode(ids)


def test_mixed_text_round_trips_with_whole_characters(bpe):
    text = "Hello 你好世界 😀🎉 naïve 猫!"
    ids = bpe.encode(text).ids
    assert any(bpe.decode([i]).endswith("\ufffd") for i in ids)  # the tokenizer really splits characters
    pieces, rest = stream(bpe, ids)
    assert "".join(pieces) + rest == text
    assert all("\ufffd" not in p for p in pieces)


def test_special_tokens(bpe):
    eot = bpe.token_to_id(EOT)
    ids = [*bpe.encode("hi 中").ids, eot, *bpe.encode("ok").ids]
    pieces, rest = stream(bpe, ids)
    assert "".join(pieces) + rest == "hi 中ok"
    pieces, rest = stream(bpe, ids, skip_special_tokens=False)
    assert "".join(pieces) + rest == f"hi 中{EOT}ok"


def test_rejects_ids_outside_the_vocabulary(bpe):
    d = StreamingDetokenizer(bpe)
    with pytest.raises(UsageError, match="vocabulary"):
        d.add(bpe.get_vocab_size())
    with pytest.raises(UsageError, match="vocabulary"):
        d.add(-1)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=40))
def test_property_text_streams_exactly_in_whole_characters(bpe, text):
    ids = bpe.encode(text).ids
    pieces, rest = stream(bpe, ids)
    assert "".join(pieces) + rest == bpe.decode(ids) == text
    assert rest == ""  # valid text always completes by its last token
    assert all("\ufffd" not in p for p in pieces)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 319), max_size=60), st.booleans())
def test_property_any_id_sequence_matches_decode(bpe, ids, skip):
    pieces, rest = stream(bpe, ids, skip_special_tokens=skip)
    assert "".join(pieces) + rest == bpe.decode(ids, skip_special_tokens=skip)


class _CountingTokenizer:
    """Wraps a Tokenizer and records how many ids each decode call receives."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.lengths: list[int] = []

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.inner.get_vocab_size(with_added_tokens=with_added_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_work_per_token_is_constant_not_growing(bpe):
    text = " ".join(CORPUS) * 20
    ids = bpe.encode(text).ids
    assert len(ids) > 3000
    counting = _CountingTokenizer(bpe)
    pieces, rest = stream(counting, ids)
    assert "".join(pieces) + rest == text
    # Each add decodes a short window (at most two decode calls), never the whole history.
    assert max(counting.lengths) <= 8
    assert len(counting.lengths) <= 2 * len(ids) + 1


@pytest.fixture(scope="module")
def byte_fallback() -> Tokenizer:
    """Llama-style: "▁" for spaces, <0xNN> byte tokens, leading space stripped on decode."""
    words = {"▁Hello": 257, "▁world": 258, "▁": 259, "!": 260}
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, **words}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.sampled_from([257, 258, 259, 260]), st.sampled_from(list(ALPHABET))), max_size=20))
def test_property_byte_fallback_tokenizer_streams_valid_text_exactly(byte_fallback, items):
    """Words and whole characters spelled as <0xNN> byte tokens; context-dependent leading space."""
    ids = [i for item in items for i in ([item] if isinstance(item, int) else [1 + b for b in item.encode()])]
    pieces, rest = stream(byte_fallback, ids)
    assert "".join(pieces) + rest == byte_fallback.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
