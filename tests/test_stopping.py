"""Stop strings across piece boundaries: held back while they might match, never emitted."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptedge.errors import UsageError
from gptedge.runtime.stopping import StopStringMatcher


def run(stops, pieces) -> tuple[list[tuple[str, bool]], str]:
    """Feed pieces until a stop; return every feed result and the user-visible text."""
    m = StopStringMatcher(stops)
    results, out = [], []
    for piece in pieces:
        emitted, stopped = m.feed(piece)
        results.append((emitted, stopped))
        out.append(emitted)
        if stopped:
            return results, "".join(out)
    out.append(m.flush())
    return results, "".join(out)


def test_no_stop_passes_text_through_immediately():
    results, text = run(["STOP"], ["hello ", "world"])
    assert results == [("hello ", False), ("world", False)]
    assert text == "hello world"


def test_stop_split_across_two_pieces():
    results, text = run(["STOP"], ["hello ST", "OP and more"])
    assert results == [("hello ", False), ("", True)]
    assert text == "hello "


def test_stop_split_across_three_pieces_with_text_before_in_last():
    results, text = run(["<end>"], ["abc<", "en", "d>tail"])
    assert results == [("abc", False), ("", False), ("", True)]
    assert text == "abc"
    results, text = run(["\n\nUser:"], ["Sure.\n", "\nUs", "er: hi"])
    assert results == [("Sure.", False), ("", False), ("", True)]


def test_partial_match_that_then_fails_is_released():
    results, text = run(["STOP"], ["a ST", "ART", " ok"])
    assert results == [("a ", False), ("START", False), (" ok", False)]
    assert text == "a START ok"
    # The held tail can restart a match: "SST" then "OP" stops after the first S.
    results, text = run(["STOP"], ["SS", "T", "OP"])
    assert results == [("S", False), ("", False), ("", True)]
    assert text == "S"


def test_stop_at_the_very_start():
    assert run(["STOP"], ["STOP now"]) == ([("", True)], "")
    assert run(["STOP"], ["S", "TOP"]) == ([("", False), ("", True)], "")


def test_overlapping_stops_first_to_end_wins_longest_on_tie():
    assert run(["ab", "abc"], ["xabc"])[1] == "x"
    assert run(["ab", "abc"], ["xa", "bc"])[1] == "x"
    assert run(["abc", "b"], ["abc"])[1] == "a"  # "b" completes first
    assert run(["abc", "b"], ["a", "bc"])[1] == "a"
    assert run(["b", "ab"], ["xab"])[1] == "x"  # both end at the same place: the longer is cut
    assert run(["b", "ab"], ["xa", "b"])[1] == "x"


def test_several_stop_strings():
    stops = ["\n\n", "User:", "###"]
    assert run(stops, ["one\n", "two ##", "# three"])[1] == "one\ntwo "
    assert run(stops, ["a User", ": b\n\n"])[1] == "a "


def test_unicode_stop_strings():
    assert run(["你好", "🎉end"], ["说你", "好吗"]) == ([("说", False), ("", True)], "说")
    assert run(["🎉end"], ["party 🎉", "en", "d!"])[1] == "party "
    assert run(["🎉end"], ["party 🎉", "!"])[1] == "party 🎉!"
    assert run(["é"], ["cafe\u0301", "é"])[1] == "cafe\u0301"  # code points, no normalisation


def test_after_stop_and_flush():
    m = StopStringMatcher(["END"])
    assert m.feed("one E") == ("one ", False)
    assert m.flush() == "E"
    assert m.flush() == ""
    assert m.feed("x END y") == ("x ", True)
    assert m.stopped
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_no_stop_strings_and_bad_input():
    m = StopStringMatcher([])
    assert m.feed("anything") == ("anything", False)
    assert m.feed("") == ("", False)
    assert StopStringMatcher("END").stop_strings == ("END",)
    assert StopStringMatcher(["a", "a", "b"]).stop_strings == ("a", "b")
    with pytest.raises(UsageError, match="non-empty"):
        StopStringMatcher(["ok", ""])


def _reference(text: str, stops: list[str]) -> str:
    ends = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    return text[: min(ends)[1]] if ends else text


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet="abc€", max_size=30),
    st.lists(st.text(alphabet="abc€", min_size=1, max_size=4), min_size=1, max_size=4),
    st.lists(st.integers(0, 30), max_size=8),
)
def test_any_chunking_gives_the_reference_answer(text, stops, cuts):
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    results, out = run(stops, pieces)
    assert out == _reference(text, stops)
    assert any(stopped for _, stopped in results) == any(s in text for s in stops)
