"""Text in and out, the same on every OS and locale.

In: every text gptedge reads (corpora, eval text, JSONL, calibration text, prompts from standard input,
chat templates) is UTF-8 whatever the locale says (Windows' ANSI code page, `LC_ALL=C`), a leading BOM is
dropped, and CRLF or CR line ends read as LF, so a file saved on Windows trains and scores as its LF twin.

Out: Python writes a redirected stdout in the locale's encoding (on Windows the ANSI code page, where
Chinese cannot be written at all), so a pipe, a file or an app reading the CLI's output would get a
UnicodeEncodeError traceback or '?'. `configure_streams` makes output that is not a console UTF-8, and
makes a console that cannot show a character print a replacement instead of crashing mid-answer.
"""

from __future__ import annotations

import sys


def normalize_newlines(text: str) -> str:
    """CRLF and lone CR to LF (what Python's universal newlines do, for text that did not come through open())."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def decode_text(raw: bytes, errors: str = "strict") -> str:
    """UTF-8 bytes of a text file -> str: BOM dropped, line ends normalized. UnicodeDecodeError when not UTF-8
    (with errors="strict")."""
    return normalize_newlines(raw.decode("utf-8", errors=errors).removeprefix("\ufeff"))


def read_text_file(path, errors: str = "strict") -> str:
    """A text file as decode_text reads it (never the locale's encoding)."""
    with open(path, "rb") as f:
        return decode_text(f.read(), errors)


def configure_streams() -> None:
    """UTF-8 for output that is not a console; a replacement character, never a crash, for one that cannot
    show a character; standard input read as UTF-8 with universal newlines when it is not a console."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is None:
            continue
        try:
            if stream.isatty():
                reconfigure(errors="replace")
            else:
                reconfigure(encoding="utf-8", errors="replace")
        except (OSError, ValueError):  # a closed or exotic stream: leave it as it is
            pass
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        try:
            if not sys.stdin.isatty():
                reconfigure(encoding="utf-8", newline=None)
        except (OSError, ValueError):
            pass
