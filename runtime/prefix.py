"""Prompts that are never prefilled twice: the KV of recent prompts, kept within a RAM budget.

A new generation looks for the stored prompt that shares the longest token prefix with its own (tokens are
compared, never hashes), copies that prefix's keys and values into its cache, and prefills only the rest. The
output is the cold run's, token for token: onnxruntime computes a prompt token's keys and values the same way
in any run of two or more tokens (tests/test_prefix.py holds every path to that), so gptedge prefills in such
runs only (generator.prefill_runs) and reuses at most all but the last two tokens of a prompt. Only what a
prefill computed is stored: a decode step's keys and values (one token at a time) come out in other last bits.

Entries are evicted least recently used first when the budget is exceeded. Thread-safe: the server's requests
share one store. A store can be written to a file and read back in a later process (`save_file` / `load_file`:
a desktop app's fixed system prompt is then fast on the first request of the day too); the file names the
bundle it was computed by and is refused for any other.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptedge.errors import UsageError

MIN_PREFIX = 16  # shorter prompts are cheap to prefill and would only churn the store
FILE_FORMAT = "gptedge-prompt-cache/1"
KEEP_PREFILLING = 2  # tokens of every prompt always prefilled (a one-token run computes other last bits)


@dataclass
class Entry:
    tokens: np.ndarray  # [n] int64
    kv: list[np.ndarray]  # per past input (key_0, value_0, ...): [n_kv_head, n, head_dim]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.kv) + self.tokens.nbytes


class PrefixStore:
    """Stored prompt prefixes, least recently used first out, within `budget_bytes`."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = int(budget_bytes)
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()
        self.hits = self.reused_tokens = 0  # for stats and tests

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: np.ndarray | list[int]) -> tuple[int, list[np.ndarray] | None]:
        """(n, kv): the longest stored prefix of `ids` usable by a new prefill, and its keys and values (views:
        copy them out before the store is changed); (0, None) when there is none worth reusing."""
        ids = np.asarray(ids, np.int64)
        limit = len(ids) - KEEP_PREFILLING
        best, found = 0, None
        with self._lock:
            for key, entry in self._entries.items():
                m = min(limit, len(entry.tokens))
                if m <= best:
                    continue
                differ = np.flatnonzero(entry.tokens[:m] != ids[:m])
                n = int(differ[0]) if len(differ) else m
                if n > best:
                    best, found = n, key
            if found is None or best < MIN_PREFIX:
                return 0, None
            self._entries.move_to_end(found)
            self.hits += 1
            self.reused_tokens += best
            return best, [a[:, :best] for a in self._entries[found].kv]

    def save(self, ids: np.ndarray | list[int], kv: list[np.ndarray]) -> None:
        """Store a prefilled prompt (kv: per past input [n_kv_head, n, head_dim], copied here); a prompt that
        extends a stored one replaces it."""
        ids = np.asarray(ids, np.int64)
        if len(ids) < MIN_PREFIX or self.budget <= 0:
            return
        entry = Entry(ids.copy(), [np.array(a, copy=True, order="C") for a in kv])
        if entry.nbytes > self.budget:
            return
        with self._lock:
            for key in [k for k, e in self._entries.items()
                        if len(e.tokens) <= len(ids) and np.array_equal(e.tokens, ids[:len(e.tokens)])]:
                del self._entries[key]  # a prefix of this prompt: the new entry holds all of it
            self._entries[self._next] = entry
            self._next += 1
            while sum(e.nbytes for e in self._entries.values()) > self.budget:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def save_file(self, path: str | os.PathLike[str], identity: str) -> int:
        """Write every entry to `path` (numpy .npz, no pickles) with the `identity` of the bundle that computed
        them, atomically; returns the entries written."""
        with self._lock:
            entries = list(self._entries.values())
        arrays: dict[str, np.ndarray] = {
            "header": np.array(json.dumps({"format": FILE_FORMAT, "identity": identity, "entries": len(entries)}))}
        for i, entry in enumerate(entries):
            arrays[f"tokens_{i}"] = entry.tokens
            arrays.update((f"kv_{i}_{j}", a) for j, a in enumerate(entry.kv))
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=".prompt-cache-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(entries)

    def load_file(self, path: str | os.PathLike[str], identity: str, layout: tuple[int, int, int, np.dtype]) -> int:
        """Add the entries of a file `save_file` wrote for the bundle `identity`; `layout` is (past inputs,
        n_kv_head, head_dim, dtype), which every array is checked against. Returns the entries read."""
        count, heads, head_dim, dtype = layout
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                if header.get("format") != FILE_FORMAT:
                    raise UsageError(f"{path} is not a gptedge prompt cache ({FILE_FORMAT})")
                if header.get("identity") != identity:
                    raise UsageError(f"{path} was written for another bundle; delete it, or load the bundle it was "
                                     "written for")
                entries = []
                for i in range(int(header["entries"])):
                    tokens = data[f"tokens_{i}"]
                    kv = [data[f"kv_{i}_{j}"] for j in range(count)]
                    shape = (heads, len(tokens), head_dim)
                    if tokens.dtype != np.int64 or tokens.ndim != 1 or any(
                            a.shape != shape or a.dtype != dtype for a in kv):
                        raise UsageError(f"{path}: entry {i} does not fit this bundle's KV layout")
                    entries.append((tokens, kv))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise UsageError(f"{path} is not a readable gptedge prompt cache ({exc})") from None
        for tokens, kv in entries:
            self.save(tokens, kv)
        return len(entries)
