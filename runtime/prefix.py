"""Prompts that are never prefilled twice: the KV of recent prompts, kept within a RAM budget.

A new generation looks for the stored prompt that shares the longest token prefix with its own (tokens are
compared, never hashes), copies that prefix's keys and values into its cache, and prefills only the rest. The
output is the cold run's, token for token: onnxruntime computes a prompt token's keys and values the same way
in any run of two or more tokens (tests/test_prefix.py holds every path to that), so gptedge prefills in such
runs only (generator.prefill_runs) and reuses at most all but the last two tokens of a prompt. Only what a
prefill computed is stored: a decode step's keys and values (one token at a time) come out in other last bits.

Entries are evicted least recently used first when the budget is exceeded. Thread-safe: the server's requests
share one store.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

MIN_PREFIX = 16  # shorter prompts are cheap to prefill and would only churn the store
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
