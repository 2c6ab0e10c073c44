"""The KV cache: one interface every decoding loop uses, one implementation per kind of storage.

A `KVCache` is the keys and values of a batch of sequences plus `lengths[b]`, the real tokens row b holds
(positions past it are stale and masked by the graph). Loops never touch the storage: they ask the cache to

- `rewind(n)` / `rewind_to(length)`: forget positions (a rejected speculative proposal, a draft's guesses);
- `holding(rows)`: keep some rows' lengths through a step (a finished row parked in a fixed batch, a row still
  prefilling while the others decode);
- `prefix(n)` / `load_prefix(kv, n)`: read a prompt's positions out, or bring stored ones in (prefix reuse);
- `release()`: give the buffers back to the engine's pool for the next request of the same size.

Storage kinds (chosen by the bundle's `kv_cache.update` and the provider, never silently):
- `InPlaceKV`: one preallocated buffer per past input [B, n_kv_head, capacity, head_dim] bound as both past
  and present (GroupQueryAttention writes the new keys in place). On the CPU the buffers are numpy arrays the
  OrtValues wrap (`host`), so positions can be read and written without a copy; on a device they stay there.
- `ConcatKV`: standard ops, present = past ++ new, fed back as numpy arrays with an attention mask.
- `HostRows`: the server's batcher's rows, one host array per past input; any row range is an in-place
  cache (`view`), and a row moves into another's place with `move`.

The shape follows mlx-lm's models/cache.py (one cache object per layer stack with `update` / `trim`) and
gpt-fast's `KVCache.update` (preallocated, written in place).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import onnxruntime as ort

from gptedge.errors import UsageError


@dataclass
class BoundStep:
    """The inputs of one step shape (S new tokens per row, logits at K positions), bound once and written in place.

    `arrays` are host buffers `values` wrap without a copy; `offsets` is arange(S), each new token's place after
    the row's stored length; `logits` is shared with the general path's steps of the same (B, K).
    """

    arrays: dict[str, np.ndarray]
    values: dict[str, ort.OrtValue]
    offsets: np.ndarray
    logits: tuple[np.ndarray, ort.OrtValue]  # the cache's logits buffer for (B, K), bound as the output


@dataclass
class InPlaceKV:
    """Buffers bound as past and present; the IO binding and per-shape step buffers live with them."""

    values: list[ort.OrtValue]
    binding: ort.IOBinding
    host: list[np.ndarray] | None = None  # on the CPU: the numpy arrays `values` wrap (same memory)
    logits: dict[tuple[int, int], tuple[np.ndarray, ort.OrtValue]] = field(default_factory=dict)
    bound: dict[tuple[int, int], BoundStep] = field(default_factory=dict)  # Engine's bound steps by (S, K)
    bound_key: tuple[int, int] | None = None  # the (S, K) whose buffers `binding` holds now (None: re-bind)

    def readable(self) -> list[np.ndarray] | None:
        return self.host

    def drop_after(self, keep: int) -> None:
        """Positions past a row's length are masked: nothing to do."""

    def write(self, kv: list[np.ndarray], n: int) -> None:
        if self.host is None:
            raise UsageError("this cache lives on a device: stored positions cannot be written into it")
        for array, stored in zip(self.host, kv):
            array[0, :, :n] = stored[:, :n]


@dataclass
class ConcatKV:
    """Numpy arrays [B, n_kv_head, P, head_dim] that grow each step, and the mask of their stored positions."""

    values: list[np.ndarray]
    valid: np.ndarray  # [B, P] int64: 1 where a position holds a real token

    def readable(self) -> list[np.ndarray]:
        return self.values

    def drop_after(self, keep: int) -> None:
        """The attention mask would read dropped positions: cut them from the arrays (batch 1)."""
        self.values = [v[:, :, :keep] for v in self.values]
        self.valid = self.valid[:, :keep]

    def write(self, kv: list[np.ndarray], n: int) -> None:
        self.values = [np.ascontiguousarray(stored[None, :, :n]) for stored in kv]
        self.valid = np.ones((1, n), np.int64)


class KVCache:
    """The KV state of one batch of sequences (see the module docstring)."""

    def __init__(self, batch: int, capacity: int, lengths: np.ndarray, kv: InPlaceKV | ConcatKV,
                 on_release: Callable[[KVCache], None] | None = None) -> None:
        self.batch = batch
        self.capacity = capacity  # positions the buffers hold (in place); grows without bound when concatenated
        self.lengths = lengths  # [B] int64, real tokens per row (a view of a HostRows' lengths stays in sync)
        self.kv = kv
        self._on_release = on_release

    @property
    def values(self) -> list:
        """Per past input: the bound OrtValues (in place) or the numpy arrays (concatenated)."""
        return self.kv.values

    @property
    def length(self) -> int:
        """Row 0's length: the whole state of a batch-1 cache."""
        return int(self.lengths[0])

    @property
    def reusable(self) -> bool:
        """Whether stored positions can be read out and written in (host memory: in place on the CPU, concat)."""
        return self.kv.readable() is not None

    def rewind(self, n: int) -> None:
        """Forget the last `n` positions of a batch-1 cache."""
        if n > 0:
            self.rewind_to(self.length - n)

    def rewind_to(self, length: int) -> None:
        """Keep the first `length` positions of a batch-1 cache."""
        if not 0 <= length <= self.length:
            raise UsageError(f"cannot rewind a cache of {self.length} positions to {length}")
        if length < self.length:
            self.lengths[0] = length
            self.kv.drop_after(length)

    @contextlib.contextmanager
    def holding(self, rows: np.ndarray) -> Iterator[None]:
        """Rows where `rows` (a [B] bool mask) is set keep their lengths through the steps inside: their new
        positions are written but not counted: in place, the next step overwrites them; concatenated, they stay
        in the arrays and the row's later steps, whose outputs nobody reads, still see them."""
        before = self.lengths[rows].copy()
        try:
            yield
        finally:
            self.lengths[rows] = before

    def prefix(self, n: int) -> list[np.ndarray]:
        """Row 0's first `n` positions, per past input [n_kv_head, n, head_dim] (views: copy to keep them)."""
        arrays = self.kv.readable()
        if arrays is None:
            raise UsageError("this cache lives on a device: its positions cannot be read out")
        return [a[0, :, :n] for a in arrays]

    def load_prefix(self, kv: list[np.ndarray], n: int) -> None:
        """Make row 0 hold `n` stored positions (per past input [n_kv_head, >= n, head_dim]) and nothing else."""
        self.kv.write(kv, n)
        self.lengths[0] = n

    def release(self) -> None:
        """Give the buffers back to their engine's pool (once; a cache is not used after this)."""
        on_release, self._on_release = self._on_release, None
        if on_release is not None:
            on_release(self)

    # White-box access for the engine's bound-step tests (tests/test_engine_decode.py).
    @property
    def bound(self) -> dict[tuple[int, int], BoundStep]:
        return self.kv.bound

    @property
    def bound_key(self) -> tuple[int, int] | None:
        return self.kv.bound_key


class HostRows:
    """A batcher's KV rows: one host array per past input [rows, n_kv_head, capacity, head_dim] and their lengths.

    Any range of rows is an in-place cache over views of the arrays (`view`), made once per range: a prompt is
    prefilled straight into its row, and the running rows [0, k) decode as one batch, with nothing copied.
    """

    def __init__(self, arrays: list[np.ndarray], cache_over: Callable[[list[np.ndarray], np.ndarray], KVCache]):
        self.arrays = arrays
        self.lengths = np.zeros(arrays[0].shape[0], np.int64)
        self._cache_over = cache_over
        self._views: dict[tuple[int, int], KVCache] = {}

    def view(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) as a cache (its lengths are a view of these rows' lengths)."""
        key = (start, stop)
        if key not in self._views:
            self._views[key] = self._cache_over([a[start:stop] for a in self.arrays], self.lengths[start:stop])
        return self._views[key]

    def clear(self, row: int) -> None:
        self.lengths[row] = 0

    def move(self, source: int, dest: int) -> None:
        """Row `source`'s stored positions become row `dest`'s; `source` is left empty."""
        n = int(self.lengths[source])
        for a in self.arrays:
            a[dest, :, :n] = a[source, :, :n]
        self.lengths[dest] = n
        self.lengths[source] = 0
