"""Stop strings matched across token (text piece) boundaries, never shown to the user.

Why a matcher and not `if stop in text`: text arrives in streamed pieces, a
stop string such as "\\n\\nUser:" usually spans several of them, and whatever we
already printed cannot be taken back. So the matcher holds back the shortest
tail of the text that could still grow into a stop string and releases it as
soon as it cannot.

Rule when several stop strings could match: the one that *ends* first wins
(generation stops as early as possible, and the result does not depend on how
the text was cut into pieces); among those ending at the same place the longest
wins, so none of it is emitted. E.g. stops ("ab", "abc") on "xabc" -> "x";
stops ("abc", "b") on "abc" -> "a".

Typical loop (detokenizer pieces in, user-visible text out):

    piece = detok.add(token)
    out, stopped = matcher.feed(piece)
    emit(out)
    if stopped: break
    ...
    at the end (no stop):  out, stopped = matcher.feed(detok.flush()); emit(out)
                           if not stopped: emit(matcher.flush())
"""

from __future__ import annotations

from collections.abc import Iterable

from gptedge.errors import UsageError

__all__ = ["StopStringMatcher"]


class StopStringMatcher:
    """Streaming search for any of several stop strings; text after a match is dropped."""

    def __init__(self, stop_strings: Iterable[str]) -> None:
        if isinstance(stop_strings, str):
            stop_strings = (stop_strings,)
        stops = tuple(dict.fromkeys(stop_strings))  # dedupe, keep order
        for s in stops:
            if not isinstance(s, str) or not s:
                raise UsageError(f"stop strings must be non-empty strings, got {s!r}")
        self._stops = stops
        # Every proper prefix of a stop string: a text tail in this set might become a match.
        self._prefixes = frozenset(s[:i] for s in stops for i in range(1, len(s)))
        self._max_hold = max((len(s) - 1 for s in stops), default=0)
        self._held = ""
        self._stopped = False

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self._stops

    @property
    def stopped(self) -> bool:
        """True once a stop string has completed; later feeds return ("", True)."""
        return self._stopped

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add a text piece; return (text safe to emit now, whether a stop string completed).

        On a match the text before the stop string is returned (including any
        earlier held-back text) and the stop string and everything after it are
        dropped.
        """
        if self._stopped:
            return "", True
        if not self._stops:
            return piece, False
        if not piece:
            return "", False
        text = self._held + piece
        cut = self._earliest_match(text)
        if cut is not None:
            self._held, self._stopped = "", True
            return text[:cut], True
        hold = self._partial_tail(text)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """End of generation without a stop: return the held-back tail (it never matched)."""
        held, self._held = self._held, ""
        return held

    def _earliest_match(self, text: str) -> int | None:
        """Start index of the match that ends first (longest on a tie), or None.

        `text` is the held tail (shorter than any stop string, never a match by
        itself) plus the new piece, so the search is O(len(piece)) per stop.
        """
        best_end, best_start = None, None
        for s in self._stops:
            i = text.find(s)
            if i < 0:
                continue
            end = i + len(s)
            if best_end is None or end < best_end or (end == best_end and i < best_start):
                best_end, best_start = end, i
        return best_start

    def _partial_tail(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        for k in range(min(self._max_hold, len(text)), 0, -1):
            if text[-k:] in self._prefixes:
                return k
        return 0
