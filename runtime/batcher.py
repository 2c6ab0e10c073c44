"""Continuous batching: sequences that arrive at different times are decoded together, one step for all.

A `Batcher` owns one thread and a fixed set of KV rows (`rows`, each `capacity` positions) in one
host array per layer. A new request waits in a bounded queue for a free row; its prompt is then
prefilled straight into that row (a batch-1 view of the array: no copy), one chunk between decode
steps so a long prompt does not stall the others, and from its first token on it joins the running
batch: each step feeds one token per running row to a view of rows [0, k). A finished or cancelled
row leaves at once; the highest running row moves into the hole (a copy of its used positions), so
the batch stays packed. Every sequence is a `Decoding`, the object every other loop advances, so a
row gives exactly the tokens it would give alone with the same seed.

Why views of one array and not a batch-1 prefill copied into a batch buffer: GroupQueryAttention
refuses several new tokens per row on a non-empty cache at batch > 1, so a joining prompt is run on
its own either way; binding its row of the shared array as the batch-1 cache makes the join free.
Where KV does not live in host memory (CUDA, DirectML, concat graphs), there is one row: requests
are decoded one after another, each with its own cache.

Memory is bounded by construction: `rows * capacity` positions, sized from a budget in MB (the
arrays are zero pages until written, so an idle server costs little), and requests wait for a row
instead of allocating more.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from gptedge.errors import ContextLengthError, GptEdgeError, UsageError
from gptedge.runtime.cache import KVCache
from gptedge.runtime.decoding import Decoding, GenerationResult, Step
from gptedge.runtime.engine import Engine
from gptedge.runtime.generator import KV_ROUNDING, PREFILL_CHUNK, kv_capacity, prefill_runs
from gptedge.runtime.prefix import PrefixStore

log = logging.getLogger("gptedge.runtime")

# KV memory all rows share: 4 GPT-2-124M rows of 1024 fp32 positions take 4 * 1024 * 12 * 2 * 768 * 4 B = 288 MiB
DEFAULT_KV_BUDGET_MB = 1024


class QueueFull(GptEdgeError):
    """More requests are waiting than the batcher accepts; try again later."""


@dataclass
class BatchRequest:
    """One sequence in the batcher. `on_step` / `on_done` are called from the batcher's thread."""

    seq: Decoding
    on_step: Callable[[Step], None]
    on_done: Callable[[GenerationResult | None, BaseException | None], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the KV row
    cache: KVCache | None = None  # private mode only: this request's own cache
    cache_prompt: bool = True  # reuse a stored prompt prefix and store this prompt (the batcher's PrefixStore)

    def cancel(self) -> None:
        """Stop this sequence; its row is free by the batcher's next step."""
        self.cancelled.set()


class Batcher:
    """Decodes up to `rows` sequences together on one engine (see the module docstring)."""

    def __init__(self, engine: Engine, rows: int = 4, kv_budget_mb: float = DEFAULT_KV_BUDGET_MB, max_queue: int = 64,
                 pad_id: int = 0, name: str = "gptedge-batcher", store: PrefixStore | None = None) -> None:
        if not isinstance(rows, int) or rows < 1:
            raise UsageError(f"rows (--parallel) must be an integer >= 1, got {rows!r}")
        if not kv_budget_mb > 0:
            raise UsageError(f"the KV budget must be > 0 MB, got {kv_budget_mb!r}")
        self.engine = engine
        self.store = store  # prompts' keys and values shared with the model (gptedge.runtime.prefix)
        self.shared = engine.shares_host_rows
        self.rows = rows if self.shared else 1
        context = engine.arch.context_length
        fit = int(kv_budget_mb * 2**20 // (self.rows * engine.bytes_per_position))
        self.capacity = context if fit >= context else fit // KV_ROUNDING * KV_ROUNDING
        if self.capacity < 1:
            raise UsageError(
                f"a KV budget of {kv_budget_mb} MB holds no position for {self.rows} rows "
                f"({engine.bytes_per_position} bytes per position); raise --kv-budget-mb or lower --parallel"
            )
        self.max_queue = max_queue
        self.pad_id = pad_id
        self._rows = engine.host_rows(self.rows, self.capacity) if self.shared else None
        self._arrays = self._rows.arrays if self.shared else []  # the rows' memory (tests look at it)
        self._feeds: dict[int, np.ndarray] = {}  # the token array each batch size k is fed, reused
        self._slots: list[BatchRequest | None] = [None] * self.rows
        self._waiting: collections.deque[BatchRequest] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self.steps = 0  # decode steps run (for tests and stats)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- public ---------------------------------------------------------------------------------------
    def submit(self, seq: Decoding, on_step: Callable[[Step], None],
               on_done: Callable[[GenerationResult | None, BaseException | None], None],
               cache_prompt: bool = True) -> BatchRequest:
        """Queue a sequence; raises ContextLengthError if it can never fit a row, QueueFull if the queue is full."""
        if seq.positions_needed > self.capacity:
            raise ContextLengthError(
                f"the prompt ({len(seq.prompt_ids)} tokens) + max_tokens ({seq.params.max_new_tokens}) need "
                f"{seq.positions_needed} positions; each sequence here holds {self.capacity}"
                + ("" if self.capacity == self.engine.arch.context_length else
                   " (raise --kv-budget-mb or lower --parallel for longer ones)")
            )
        request = BatchRequest(seq, on_step, on_done, cache_prompt=cache_prompt)
        with self._wake:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting; try again shortly")
            self._waiting.append(request)
            self._wake.notify()
        return request

    @property
    def active(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_positions(self) -> int:
        """Positions stored in the KV rows of the sequences now running (for the server's metrics)."""
        if self.shared:
            return int(self._rows.lengths.sum())
        return sum(r.cache.length for r in list(self._slots) if r is not None and r.cache is not None)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; running and waiting sequences end as "cancelled"."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)

    # -- the loop -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and self.active == 0:
                    self._wake.wait()
                if self._closed:
                    break
                self._admit()
            try:
                self._drop_cancelled()
                self._prefill_one_chunk()
                self._decode_step()
            except Exception as exc:  # noqa: BLE001 - a failed run ends the sequences in it, not the server
                log.exception("gptedge: a batch step failed; ending the sequences in it")
                self._end_all(exc)
        self._end_all()
        while self._waiting:
            request = self._waiting.popleft()
            request.on_done(request.seq.finish()[0], None)

    def _admit(self) -> None:
        """Give waiting requests free rows (lowest first), skipping those cancelled while they waited."""
        while self._waiting and None in self._slots:
            request = self._waiting.popleft()
            if request.cancelled.is_set():
                request.on_done(request.seq.finish()[0], None)
                continue
            slot = self._slots.index(None)
            self._slots[slot] = request
            request.slot = slot
            if self.shared:
                self._rows.clear(slot)
            else:
                request.cache = self.engine.new_cache(1, kv_capacity(request.seq.positions_needed, self.capacity))
            if self.store is not None and request.cache_prompt:
                cache = self._row_cache(request)
                if cache.reusable:
                    n, kv = self.store.lookup(request.seq.prompt_ids)
                    if n:
                        cache.load_prefix(kv, n)
                        request.prefilled = n

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._slots if r is not None and r.cancelled.is_set()]:
            self._end(request.slot)

    def _end_all(self, error: BaseException | None = None) -> None:
        for request in [r for r in self._slots if r is not None]:
            self._end(request.slot, error)

    def _prefill_one_chunk(self) -> None:
        """One chunk of the oldest unfinished prompt; its first token when the prompt is complete."""
        pending = [r for r in self._slots if r is not None and r.prefilled < len(r.seq.prompt_ids)]
        if not pending:
            return
        request = min(pending, key=lambda r: r.seq.start)
        prompt = request.seq.prompt_ids
        start, stop = prefill_runs(request.prefilled, len(prompt), PREFILL_CHUNK)[0]
        cache = self._row_cache(request)
        logits = self.engine.prefill(cache, np.asarray(prompt[start:stop], np.int64)[None, :])[0]
        request.prefilled = stop
        if request.prefilled == len(prompt):
            if self.store is not None and request.cache_prompt and cache.reusable:
                self.store.save(prompt, cache.prefix(len(prompt)))
            self._advance(request, logits)

    def _decode_step(self) -> None:
        running = [s for s, r in enumerate(self._slots) if r is not None and r.prefilled == len(r.seq.prompt_ids)]
        if not running:
            return
        k = running[-1] + 1
        cache = self._rows_cache(k)
        feed = self._feeds.get(k)
        if feed is None:
            feed = self._feeds[k] = np.full((k, 1), self.pad_id, np.int64)
        idle = np.ones(k, bool)
        idle[running] = False  # rows in [0, k) not decoding: free, or mid-prefill
        feed[idle, 0] = self.pad_id
        for s in running:
            feed[s, 0] = self._slots[s].seq.tokens[-1]
        with cache.holding(idle):  # idle rows keep their length: their step writes a position nobody counts
            logits = self.engine.decode(cache, feed)
        self.steps += 1
        for request, row in [(self._slots[s], logits[s]) for s in running]:  # rows may move as others finish
            self._advance(request, row)

    def _advance(self, request: BatchRequest, logits: np.ndarray) -> None:
        step = request.seq.advance(logits)
        try:
            request.on_step(step)
        except Exception:  # noqa: BLE001 - a consumer's bug must not stop the other rows
            log.exception("gptedge: a step callback failed; cancelling that sequence")
            request.cancel()
        if request.seq.done:
            self._end(request.slot)

    def _end(self, slot: int, error: BaseException | None = None) -> None:
        request = self._slots[slot]
        self._slots[slot] = None
        if self.shared:
            self._rows.clear(slot)
        if request.cache is not None:
            request.cache.release()
            request.cache = None
        result = request.seq.finish()[0]
        try:
            request.on_done(None if error else result, error)
        except Exception:  # noqa: BLE001
            log.exception("gptedge: a done callback failed")
        self._compact(slot)

    def _compact(self, hole: int) -> None:
        """Move the highest occupied row into `hole`, so the decode batch [0, k) has no gaps."""
        if not self.shared:
            return
        occupied = [s for s, r in enumerate(self._slots) if r is not None]
        if not occupied or max(occupied) < hole:
            return
        top = max(occupied)
        self._rows.move(top, hole)
        request = self._slots[top]
        self._slots[hole], self._slots[top] = request, None
        request.slot = hole

    # -- caches ---------------------------------------------------------------------------------------
    def _row_cache(self, request: BatchRequest) -> KVCache:
        return self._rows.view(request.slot, request.slot + 1) if self.shared else request.cache

    def _rows_cache(self, k: int) -> KVCache:
        return self._rows.view(0, k) if self.shared else self._slots[0].cache
