"""The text a quantization run reads: held-out text for the quality gate, calibration text for int8-static.

Both accept files, folders, globs or literal text. When only one text is given and the recipe
calibrates, its first part calibrates and the rest is held out: the gate must never score a model on
the text its activation ranges were fitted to.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gptedge.errors import DataError, QuantizeError
from gptedge.text import decode_text

MIN_EVAL_TOKENS = 128
MIN_CALIBRATION_TOKENS = 128
MAX_TEXT_BYTES = 4_000_000  # read at most this much text (files are read in order until the cap)
HELD_OUT_FRACTION = 0.25  # of the only text given, when int8-static must calibrate on the rest

TextInput = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def read_text(values: TextInput, max_bytes: int = MAX_TEXT_BYTES) -> tuple[str, str]:
    """Text from files, folders (recursively, hidden entries skipped), globs, or literal text; plus a description.

    A value that names no existing file or folder is taken as the text itself, except a glob pattern (glob
    characters, no spaces) that matches nothing: that is a DataError naming the pattern.
    Reading stops at `max_bytes`. Binary files (with NUL bytes) are skipped.
    """
    items = [values] if isinstance(values, (str, os.PathLike)) else list(values)
    files: list[Path] = []
    literal: list[str] = []
    for item in items:
        s = os.fspath(item)
        if "\n" in s or "\0" in s or len(s) > 4096:  # text, not a path: never stat or glob it
            literal.append(s)
            continue
        path = Path(s).expanduser()
        try:
            if path.is_file():
                files.append(path)
                continue
            if path.is_dir():
                files += sorted(p for p in path.rglob("*")
                                if p.is_file() and not any(x.startswith(".") for x in p.relative_to(path).parts))
                continue
        except OSError:  # e.g. a name too long for the filesystem: it is text
            pass
        globbed = any(c in s for c in "*?[")
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(s), recursive=True)) if globbed else []
        if matches:
            files += [m for m in matches if m.is_file()]
        elif globbed and not any(ch.isspace() for ch in s):  # a pattern, not a sentence with a "*" in it
            raise DataError(f"the pattern {s!r} matches no files; check it (quote it so the shell does not expand it), "
                            "or pass the files or the text itself")
        else:
            literal.append(s)
    parts, total, used = list(literal), sum(len(t.encode()) for t in literal), 0
    for f in files:
        if total >= max_bytes:
            break
        data = f.read_bytes()[: max_bytes - total]
        if b"\0" in data:
            continue
        parts.append(decode_text(data, errors="replace"))  # UTF-8 whatever the locale, CRLF read as LF
        total += len(data)
        used += 1
    what = []
    if used:
        what.append(f"{used} file{'s' * (used != 1)}")
    if literal:
        what.append(f"{len(literal)} literal text{'s' * (len(literal) != 1)} (not existing paths)")
    return "\n\n".join(parts), f"{', '.join(what) or 'nothing'}, {total:,} bytes"


def builtin_text() -> tuple[str, str]:
    """English prose every Python has and no model is tuned on: the language reference's help topics
    (pydoc_data), ~450 KB. The default held-out text where none is given; a model's own domain is better."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return text, f"Python's pydoc help topics (built in, {len(text.encode()):,} bytes)"


@dataclass
class Texts:
    """Token ids the gate scores, the ids calibration reads (None: nothing calibrates), and where they came from."""

    eval_ids: np.ndarray
    calibration_ids: np.ndarray | None
    note: str


def load_texts(tokenizer: Any, calibration: TextInput | None, eval_text: TextInput | None, need_calibration: bool,
               max_eval_tokens: int) -> Texts:
    """Read and tokenize the texts, split the only one given when calibration needs its own part, check lengths."""
    def encode(text: str) -> np.ndarray:
        return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int64)

    builtin = calibration is None and eval_text is None
    if builtin:  # English prose that ships with Python: a gate every model can take, if not one about its domain
        eval_text, builtin_note = builtin_text()
    cal = None
    if calibration is not None:
        text, cal_desc = read_text(calibration)
        cal = encode(text)
    if eval_text is not None:
        text, eval_desc = read_text(eval_text)
        if builtin:
            eval_desc = f"{builtin_note}; --eval-text with text of your model's domain makes a gate that speaks of it"
        held = encode(text)
        note = f"held-out text: {eval_desc}"
        if need_calibration and cal is None:  # calibrate on the first part of the only text given
            cut = int(len(held) * (1 - HELD_OUT_FRACTION))
            cal, held = held[:cut], held[cut:]
            note += f"; its first {100 * (1 - HELD_OUT_FRACTION):.0f}% calibrates, the rest is held out"
    elif need_calibration:
        cut = int(len(cal) * (1 - HELD_OUT_FRACTION))
        cal, held = cal[:cut], cal[cut:]
        note = (f"calibration text ({cal_desc}): first {100 * (1 - HELD_OUT_FRACTION):.0f}% calibrates, "
                "the rest is held out")
    else:
        held, cal = cal, None
        note = f"held-out text: the calibration text ({cal_desc}; nothing is calibrated by this method)"
    if len(held) < MIN_EVAL_TOKENS:
        raise QuantizeError(f"held-out text is too short for the quality gate: {len(held)} tokens, at least "
                            f"{MIN_EVAL_TOKENS} needed; pass more text with --eval-text (or --calibration)")
    if need_calibration and len(cal) < MIN_CALIBRATION_TOKENS:
        raise QuantizeError(f"calibration text is too short: {len(cal)} tokens, calibrating needs at least "
                            f"{MIN_CALIBRATION_TOKENS}; pass more text with --calibration")
    return Texts(held[:max_eval_tokens], cal, note)


__all__ = ["read_text", "load_texts", "builtin_text", "Texts", "MIN_EVAL_TOKENS"]
