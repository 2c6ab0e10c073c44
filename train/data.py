"""Training data: text files, folders, globs or prompt/completion JSONL -> cached token ids -> batches.

The corpus is one stream of token ids: documents joined by `<|endoftext|>`,
JSONL examples as prompt + completion + `<|endoftext|>`. A parallel mask
marks which tokens may be *targets* (0 on prompt tokens), so fine-tuning puts
the loss on completions only while using the same sampler as pretraining.
(Windows are packed: one may span two examples, as in GPT-2 pretraining; no padding is wasted.)
A literal `<|endoftext|>` inside the input text is read as the special token.
Token ids live in a memory-mapped .npy under a cache folder keyed by the input
files (paths, sizes, mtimes) and the tokenizer, so a second run starts at once.

With no inputs the corpus is the Python standard library's own source, which
is present wherever Python is: a code-completion model with no download.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from gptedge.atomic import atomic_output_dir
from gptedge.errors import DataError
from gptedge.text import decode_text

CACHE_FORMAT = 1  # bump when the cached layout or the tokenization rules change
IGNORE_INDEX = -100  # targets with this value add nothing to the loss (F.cross_entropy's default)


def default_cache_dir() -> Path:
    """$GPTEDGE_CACHE, else $XDG_CACHE_HOME/gptedge, else ~/.cache/gptedge."""
    if os.environ.get("GPTEDGE_CACHE"):
        return Path(os.environ["GPTEDGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptedge"


def warn(message: str) -> None:
    print(f"gptedge: warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Finding the files


def stdlib_files() -> list[Path]:
    """The standard library's .py files in a fixed order, without its tests and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "dist-packages", "idle_test", "__pycache__"}
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]  # prune: site-packages alone can hold 100k files
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def resolve_inputs(specs: Sequence[str]) -> list[Path]:
    """Expand files, folders (recursively, hidden entries skipped) and globs into a sorted, de-duplicated list."""
    found: dict[Path, None] = {}  # ordered set
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and not _is_hidden(p, path))
        elif any(c in spec for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"the pattern {spec!r} matches no files; "
                                "check the pattern (quote it so the shell does not expand it)")
        else:
            raise DataError(f"{spec} does not exist; pass text files, folders, globs or .jsonl files")
        if path.is_dir() and not matches:
            raise DataError(f"the folder {spec} contains no files; put text files in it or pass other data")
        for m in matches:
            found.setdefault(m.resolve(), None)
    return list(found)


def fingerprint(files: Sequence[Path], max_bytes: int | None) -> str:
    """Hash of what identifies the raw data: each file's path, size and mtime, plus the byte cap."""
    h = hashlib.sha256(f"gptedge-data-{CACHE_FORMAT}|{max_bytes}".encode())
    for f in files:
        st = f.stat()
        h.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading the files


Segments = list[tuple[str, bool]]  # an example's text in order, each piece marked True where it is a target


@dataclass
class Sources:
    """Decoded inputs: plain-text documents and examples (prompt/completion pairs, chat conversations)."""

    texts: list[str] = field(default_factory=list)
    examples: list[Segments] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)  # "file:line" of each example, for errors
    n_files: int = 0  # files actually read
    skipped: list[Path] = field(default_factory=list)  # not UTF-8
    n_bytes: int = 0

    def training_texts(self) -> list[str]:
        """Everything the tokenizer should learn from."""
        return self.texts + ["".join(text for text, _ in e) for e in self.examples]


def chat_segments(messages: Any, template: Any, where: str) -> Segments:
    """A conversation rendered with the model's chat template, the assistant turns marked as targets.

    Each assistant turn is what rendering the conversation up to it adds after the assistant's cue (the
    template's generation prompt): the answer and the template's end-of-turn text, which teaches the model to
    stop. Everything else (system, user, tool turns, the cues) is context, never a target.
    """
    from gptedge.runtime.chat import ChatTemplateError

    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": ..., \"content\": ...}} "
                        "with string values")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn from")
    segments: Segments = []
    done = ""
    try:
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            cue = template.render(messages[:i], add_generation_prompt=True)
            whole = template.render(messages[: i + 1], add_generation_prompt=False)
            if not (cue.startswith(done) and whole.startswith(cue)):
                raise DataError(f"{where}: the chat template does not render this conversation turn by turn "
                                "(an earlier turn changes when a later one is added); use prompt/completion lines")
            segments += [(cue[len(done):], False), (whole[len(cue):], True)]
            done = whole
        rest = template.render(messages, add_generation_prompt=False)[len(done):]
    except ChatTemplateError as exc:
        raise DataError(f"{where}: the model's chat template refused this conversation ({exc})") from None
    return segments + [(rest, False)] if rest else segments


def _read_jsonl(path: Path, text: str, template: Any) -> list[tuple[Segments, str]]:
    examples = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg}); each line must be {{\"prompt\": ..., "
                            "\"completion\": ...} or {\"messages\": [...]}") from exc
        if isinstance(obj, dict) and "messages" in obj:
            if template is None:
                raise DataError(f"{where}: chat lines need the model's chat template; fine-tune a model that has "
                                "one (--init-from), or use prompt/completion lines")
            examples.append((chat_segments(obj["messages"], template, where), where))
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
            examples.append(([(obj["prompt"], False), (obj["completion"], True)], where))
        else:
            raise DataError(f"{where}: each line must be an object with string fields \"prompt\" and "
                            "\"completion\", or a \"messages\" list")
    return examples


def read_sources(files: Sequence[Path], max_bytes: int | None = None, log: Callable[[str], None] = warn,
                 chat_template: Any = None) -> Sources:
    """Read and decode `files` in order; skip (and count) those that are not UTF-8; stop after `max_bytes`.
    `chat_template` (runtime.chat.ChatTemplate) renders JSONL chat lines."""
    src = Sources()
    for path in files:
        if max_bytes is not None and src.n_bytes >= max_bytes:
            break
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror or exc}; fix its permissions or leave it out") from exc
        try:
            text = decode_text(raw)  # UTF-8 whatever the locale, BOM dropped, CRLF read as LF
        except UnicodeDecodeError:
            src.skipped.append(path)
            continue
        src.n_files += 1
        if path.suffix.lower() == ".jsonl":
            for segments, where in _read_jsonl(path, text, chat_template):
                src.examples.append(segments)
                src.origins.append(where)
                src.n_bytes += sum(len(t.encode()) for t, _ in segments)
                if max_bytes is not None and src.n_bytes >= max_bytes:
                    break
            continue
        if max_bytes is not None and src.n_bytes + len(raw) > max_bytes:
            # Cut at the cap; errors="ignore" only drops a character split by the cut.
            text = decode_text(raw[: max_bytes - src.n_bytes], errors="ignore")
        if text:
            src.texts.append(text)
            src.n_bytes += len(text.encode())
    if src.skipped:
        shown = ", ".join(str(p) for p in src.skipped[:5])
        more = f" and {len(src.skipped) - 5} more" if len(src.skipped) > 5 else ""
        log(f"skipped {len(src.skipped)} file(s) that are not UTF-8 text: {shown}{more}")
    if src.n_files == 0 and src.skipped:
        raise DataError(f"none of the {len(src.skipped)} input file(s) is UTF-8 text; "
                        "convert them to UTF-8 or pass text files")
    if not src.texts and not src.examples:
        raise DataError("the training data is empty; "
                        "pass files that contain text (or no DATA for the standard-library corpus)")
    return src


# ---------------------------------------------------------------------------------------------
# Tokenizing into the cache


@dataclass
class TokenData:
    """The whole corpus as token ids (memory-mapped) and, for prompt/completion data, the target mask."""

    tokens: np.ndarray  # [N] uint16 or uint32
    mask: np.ndarray | None  # [N] uint8: 1 where the token may be a target; None means all
    meta: dict[str, Any]

    def split(self, val_fraction: float) -> tuple["TokenData", "TokenData"]:
        """(train, val): the last `val_fraction` of the stream is held out."""
        n_val = max(1, int(round(len(self.tokens) * val_fraction)))
        cut = len(self.tokens) - n_val
        m = self.mask
        return (
            TokenData(self.tokens[:cut], None if m is None else m[:cut], self.meta),
            TokenData(self.tokens[cut:], None if m is None else m[cut:], self.meta),
        )


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 65535 else np.uint32


def cache_key(data_fingerprint: str, tokenizer_json: str) -> str:
    return hashlib.sha256(f"{data_fingerprint}|{tokenizer_json}".encode()).hexdigest()[:24]


def _tokenize(src: Sources, tok: Any, eot: int, max_example: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Token ids with `eot` after each document and example; the mask marks targets (an example's target
    segments, and the eot that ends a prompt/completion example, whose last segment is a target)."""
    from gptedge.train.tokenizer import encode_many

    dtype = token_dtype(tok.get_vocab_size())
    pieces, masks = [], []
    for ids in encode_many(tok, src.texts):
        pieces.append(np.asarray(ids + [eot], dtype=dtype))
        masks.append(np.ones(len(ids) + 1, dtype=np.uint8))
    flat = encode_many(tok, [text for e in src.examples for text, _ in e])
    at = 0
    for example, where in zip(src.examples, src.origins or [""] * len(src.examples)):
        ids = flat[at: at + len(example)]
        at += len(example)
        ends_in_target = example[-1][1]
        n = sum(map(len, ids)) + 1
        if max_example is not None and n > max_example + 1:
            raise DataError(f"{where}: this example is {n - 1} tokens, longer than the training window of "
                            f"{max_example}; shorten it or raise --block-size (up to the model's context)")
        pieces.append(np.asarray([t for part in ids for t in part] + [eot], dtype=dtype))
        masks.append(np.concatenate([np.full(len(part), target, np.uint8) for part, (_, target) in zip(ids, example)]
                                    + [np.array([ends_in_target], np.uint8)]))
    tokens = np.concatenate(pieces)
    return tokens, (np.concatenate(masks) if src.examples else None)


def load_or_build_tokens(
    cache_dir: Path,
    key: str,
    get_sources: Callable[[], Sources],
    tok: Any,
    eot: int | None = None,
    max_example: int | None = None,
) -> TokenData:
    """Memory-map the cached token ids for `key`, tokenizing `get_sources()` first if they are not cached.

    A cache entry that cannot be read back (damaged, or replaced by something else: it is a
    user-writable folder) is rebuilt; its files are never unpickled.
    """
    folder = Path(cache_dir) / "tokens" / key
    if (folder / "meta.json").is_file():
        try:
            return _load_tokens(folder)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warn(f"rebuilding the damaged token cache {folder} ({exc})")
    src = get_sources()
    if eot is None:
        from gptedge.train.tokenizer import eot_id

        eot = eot_id(tok)  # a gptedge tokenizer's <|endoftext|>; an imported model's end of text is passed in
    tokens, mask = _tokenize(src, tok, eot, max_example)
    meta = {
        "format": CACHE_FORMAT, "n_tokens": int(len(tokens)), "dtype": tokens.dtype.name,
        "has_mask": mask is not None, "n_files": src.n_files, "n_skipped": len(src.skipped),
        "n_bytes": src.n_bytes, "n_examples": len(src.examples),
    }
    with atomic_output_dir(folder, force=True) as tmp:
        np.save(tmp / "tokens.npy", tokens)
        if mask is not None:
            np.save(tmp / "mask.npy", mask)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    try:
        return _load_tokens(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read the token cache {folder} ({exc}); delete that folder and run again") from exc


def _load_tokens(folder: Path) -> TokenData:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    tokens = np.load(folder / "tokens.npy", mmap_mode="r", allow_pickle=False)
    mask = np.load(folder / "mask.npy", mmap_mode="r", allow_pickle=False) if meta["has_mask"] else None
    return TokenData(tokens, mask, meta)


# ---------------------------------------------------------------------------------------------
# Batches


def windows(data: TokenData, starts: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs x [n, T] and targets y [n, T] (int64; -100 where the mask forbids a target) at `starts`."""
    idx = starts[:, None] + np.arange(block_size + 1)[None, :]  # [n, T+1]
    seq = np.asarray(data.tokens[idx], dtype=np.int64)
    x, y = seq[:, :-1], seq[:, 1:].copy()
    if data.mask is not None:
        y[np.asarray(data.mask[idx[:, 1:]]) == 0] = IGNORE_INDEX
    return x, y


def check_fits(train: TokenData, val: TokenData, block_size: int) -> None:
    """Both splits need at least one full window of block_size + 1 tokens."""
    if len(train.tokens) <= block_size or len(val.tokens) <= block_size:
        raise DataError(
            f"block size {block_size} is larger than the data allows: the train split has {len(train.tokens)} tokens "
            f"and the validation split {len(val.tokens)}, each needs more than {block_size}; add more text, lower "
            "--block-size, or use a smaller --preset"
        )


class BatchSampler:
    """Draws random window starts from a seeded generator whose state is saved in checkpoints.

    Every data-parallel rank draws the same *global* batch (same generator, same state) and
    keeps its own rows, so the shards are disjoint and the union equals what one process
    with the same global batch would use: the math is the same at any world size.
    """

    def __init__(self, data: TokenData, block_size: int, seed: int) -> None:
        self.data = data
        self.block_size = block_size
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def global_starts(self, n: int) -> np.ndarray:
        return self.rng.integers(0, len(self.data.tokens) - self.block_size, size=n)

    def state_dict(self) -> dict[str, Any]:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["bit_generator"]


def eval_starts(data: TokenData, block_size: int, n: int) -> np.ndarray:
    """`n` evenly spaced window starts: the same windows at every evaluation, so the curve is comparable."""
    last = len(data.tokens) - block_size - 1
    return np.unique(np.linspace(0, last, num=n).round().astype(np.int64))


def unigram_entropy(data: TokenData, vocab_size: int) -> float:
    """Entropy (nats) of the token frequencies of `data`'s targets: the loss of the best context-free model."""
    tokens = np.asarray(data.tokens[1:])
    if data.mask is not None:
        tokens = tokens[np.asarray(data.mask[1:]) == 1]
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
