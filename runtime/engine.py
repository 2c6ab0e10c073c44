"""One forward step of an exported GPT: the bottom rung of the decoding ladder.

`Engine.forward(cache, input_ids, lengths)` runs the graph once for a batch of
right-padded rows and returns logits; everything above it (sampling, stop
strings, streaming, batching, threads) lives elsewhere and never touches
onnxruntime directly.

Two cache strategies, chosen by the bundle's `kv_cache.update`, never silently:
- "inplace": one preallocated buffer per layer [B, n_kv_head, capacity, head_dim]
  is bound as both past and present (GroupQueryAttention writes the new keys in
  place), so a decode step copies nothing but the new token's keys. The buffers
  live on the session's device (CUDA: IO binding keeps them there) and go back
  to a pool when a generation ends, so later requests of the same size reuse them.
- "concat": standard ops; present = past ++ new, fed back as numpy. Portable, and
  what Hugging Face Optimum's decoder exports use, at an O(context) copy per step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from gptedge.errors import ContextLengthError, UsageError
from gptedge.runtime.bundle import BundleSpec

NP_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}  # KV cache dtypes (bundle.KV_DTYPES)
POOL_LIMIT = 4  # idle KV caches kept per (batch, capacity): a burst of concurrent requests must not pin memory forever
BOUND_STEP_MAX = 16  # steps of up to this many tokens run on bound buffers: decode (1), verify (1 + proposals)


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
class KVCache:
    """The KV state of one batch of sequences.

    `lengths[b]` counts the real tokens stored for row b; positions beyond it in
    the buffer are stale and masked by the graph.
    """

    batch: int
    capacity: int  # positions the buffers hold ("inplace"); grows without bound for "concat"
    lengths: np.ndarray  # [B] int64
    values: list  # "inplace": OrtValues bound as past and present; "concat": numpy arrays [B, Hkv, P, D]
    valid: np.ndarray | None = None  # "concat" only: [B, P] int64 attention mask of stored positions
    binding: ort.IOBinding | None = None  # "inplace": KV bound once, inputs re-bound each step
    logits: dict[tuple[int, int], tuple[np.ndarray, ort.OrtValue]] = field(default_factory=dict)
    bound: dict[tuple[int, int], BoundStep] = field(default_factory=dict)  # "inplace": `Engine._bound_step`'s
    bound_key: tuple[int, int] | None = None  # the (S, K) whose buffers `binding` holds now (None: re-bind)
    host: list[np.ndarray] | None = None  # "inplace" on the CPU: the numpy arrays `values` wrap (same memory)

    # The operations every loop needs, one implementation per kind of cache (in place on the host, in place on
    # a device, concatenated).
    @property
    def reusable(self) -> bool:
        """Whether stored positions can be read out and written in (host memory: in place on the CPU, concat)."""
        return self.host is not None or self.valid is not None

    def rewind(self, n: int) -> None:
        """Forget the last `n` positions of a batch-1 cache: by length in place (stale positions are masked);
        a concat cache also drops them from its arrays, which its attention mask would read."""
        if n <= 0:
            return
        self.lengths -= n
        if self.valid is not None:
            keep = int(self.lengths[0])
            self.values = [v[:, :, :keep] for v in self.values]
            self.valid = self.valid[:, :keep]

    def prefix(self, n: int) -> list[np.ndarray]:
        """Row 0's first `n` positions, per past input [n_kv_head, n, head_dim] (views: copy to keep them)."""
        arrays = self.host if self.host is not None else self.values
        if not self.reusable:
            raise UsageError("this cache lives on a device: its positions cannot be read out")
        return [a[0, :, :n] for a in arrays]

    def load_prefix(self, kv: list[np.ndarray], n: int) -> None:
        """Make row 0 hold `n` stored positions (per past input [n_kv_head, >= n, head_dim]) and nothing else."""
        if self.host is not None:
            for array, stored in zip(self.host, kv):
                array[0, :, :n] = stored[:, :n]
        elif self.valid is not None:
            self.values = [np.ascontiguousarray(stored[None, :, :n]) for stored in kv]
            self.valid = np.ones((1, n), np.int64)
        else:
            raise UsageError("this cache lives on a device: stored positions cannot be written into it")
        self.lengths[0] = n


def right_pad(prompts, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of any lengths as one batch: ids [B, max_len] padded on the right with `pad_id`, and lengths [B].

    The graph reads `lengths` (seqlens / the attention mask), so pads are never attended to.
    """
    lengths = np.array([len(p) for p in prompts], np.int64)
    if len(prompts) == 0 or lengths.min() < 1:
        raise UsageError("every prompt needs at least one token")
    ids = np.full((len(prompts), int(lengths.max())), pad_id, np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
    return ids, lengths


class Engine:
    """Runs an exported GPT graph one step at a time; thread-safe, one KV cache per generation."""

    def __init__(self, session: ort.InferenceSession, spec: BundleSpec, device: str = "cpu",
                 serialize_runs: bool = False) -> None:
        self.session = session
        self.spec = spec
        self.arch = spec.architecture
        self.io = spec.io
        self.device = device  # "cpu" or "cuda": where the KV buffers live
        self.kv_dtype = NP_DTYPES[spec.kv_cache.dtype]
        self.inplace = spec.kv_cache.update == "inplace"
        self.past_names = self.io.past_names(self.arch.n_layer)
        self.present_names = self.io.present_names(self.arch.n_layer)
        self._run_lock = threading.Lock() if serialize_runs else None  # DirectML: one Run at a time per session
        self._pool: dict[tuple[int, int], list[KVCache]] = {}
        self._pool_lock = threading.Lock()

    # -- caches ---------------------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """A cache for `batch` rows of up to `capacity` positions, reused from the pool when one fits."""
        if capacity > self.arch.context_length:
            raise ContextLengthError(
                f"a KV cache of {capacity} positions exceeds the model's context of {self.arch.context_length}; "
                "shorten the prompt or max_new_tokens"
            )
        if batch < 1 or capacity < 1:
            raise UsageError(f"batch ({batch}) and capacity ({capacity}) must be >= 1")
        if self.inplace:
            with self._pool_lock:
                pooled = self._pool.get((batch, capacity))
                if pooled:
                    cache = pooled.pop()
                    cache.lengths[:] = 0
                    return cache
            return self._allocate_inplace(batch, capacity)
        shape = (batch, self.arch.n_kv_head, 0, self.arch.head_dim)
        return KVCache(
            batch=batch, capacity=capacity, lengths=np.zeros(batch, np.int64),
            values=[np.zeros(shape, self.kv_dtype) for _ in self.past_names], valid=np.zeros((batch, 0), np.int64),
        )

    def _allocate_inplace(self, batch: int, capacity: int) -> KVCache:
        """Buffers on the KV device; on the CPU, numpy arrays the OrtValues wrap, so positions can be read out and
        written in (prefix reuse) without a copy of the whole buffer."""
        shape = [batch, self.arch.n_kv_head, capacity, self.arch.head_dim]
        if self.device == "cpu":
            return self.cache_over([np.zeros(shape, self.kv_dtype) for _ in self.past_names],
                                   np.zeros(batch, np.int64), check=False)
        values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device, 0)
                  for _ in self.past_names]
        binding = self.session.io_binding()
        for past, present, value in zip(self.past_names, self.present_names, values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)  # same memory: the step writes in place
        return KVCache(batch=batch, capacity=capacity, lengths=np.zeros(batch, np.int64), values=values,
                       binding=binding)

    @property
    def kv_device_is_host(self) -> bool:
        """KV positions live in host memory (in place on the CPU, or concatenated): they can be read out and
        written in (prefix reuse)."""
        return self.device == "cpu"

    @property
    def shares_host_rows(self) -> bool:
        """True when KV buffers can be host arrays whose row ranges are bound as caches (`cache_over`).

        In-place graphs on the CPU only: there a batch's rows live in one numpy array per layer, so a
        sequence can be prefilled straight into its row and the running rows decoded as one batch.
        """
        return self.inplace and self.device == "cpu"

    def cache_over(self, arrays: list[np.ndarray], lengths: np.ndarray, check: bool = True) -> KVCache:
        """An in-place cache over caller-owned host arrays [B, n_kv_head, capacity, head_dim] (views are fine).

        `lengths` is used as is (a view of the caller's array stays in sync). The arrays must stay
        alive and C-contiguous while the cache is used; onnxruntime writes the new keys into them.
        """
        if check and not self.shares_host_rows:
            raise UsageError("cache_over needs an in-place graph running on the CPU")
        batch, _, capacity, _ = arrays[0].shape
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        binding = self.session.io_binding()
        for past, present, value in zip(self.past_names, self.present_names, values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        return KVCache(batch=batch, capacity=capacity, lengths=lengths, values=values, binding=binding, host=arrays)

    @property
    def bytes_per_position(self) -> int:
        """KV bytes one sequence position takes across all layers (keys and values)."""
        a = self.arch
        return a.n_layer * 2 * a.n_kv_head * a.head_dim * np.dtype(self.kv_dtype).itemsize

    def release(self, cache: KVCache) -> None:
        """Return an in-place cache's buffers to the pool for the next request of the same size."""
        if self.inplace and cache.binding is not None:
            with self._pool_lock:
                pool = self._pool.setdefault((cache.batch, cache.capacity), [])
                if len(pool) < POOL_LIMIT:
                    pool.append(cache)

    def clear_pool(self) -> None:
        with self._pool_lock:
            self._pool.clear()

    # -- one step -------------------------------------------------------------------------------
    def forward(
        self,
        cache: KVCache,
        input_ids: np.ndarray,
        lengths: np.ndarray | None = None,
        logits_index: np.ndarray | None = None,
        *,
        every_position: bool = False,
    ) -> np.ndarray:
        """Append `input_ids` [B, S] (row b holds `lengths[b]` real tokens, right-padded) and return logits.

        Returns float32 logits [B, K, V] for the positions in `logits_index` [B, K] (default: each row's
        last real token, K = 1; `every_position`: all S positions, K = S, as a speculative verify step
        reads them). The returned array is reused by the next call with the same (B, K): copy it if you
        keep it.
        """
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        B, S = input_ids.shape
        if B != cache.batch:
            raise UsageError(f"input batch {B} does not match the cache's batch {cache.batch}")
        if every_position and logits_index is not None:
            raise UsageError("pass logits_index or every_position, not both")
        if lengths is None and logits_index is None and self.inplace and S <= BOUND_STEP_MAX and (B == 1 or S == 1):
            return self._bound_step(cache, input_ids, S if every_position else 1)
        if every_position:
            logits_index = np.broadcast_to(np.arange(S, dtype=np.int64), (B, S))
        lengths = np.full(B, S, np.int64) if lengths is None else np.asarray(lengths, np.int64)
        if lengths.min() < 1 or lengths.max() > S:
            raise UsageError("each row needs between 1 and S new tokens")
        self._check_room(cache, int((cache.lengths + S).max()), int((cache.lengths + lengths).max()))
        if logits_index is None:
            logits_index = (lengths - 1).reshape(B, 1)
        logits_index = np.ascontiguousarray(logits_index, dtype=np.int64)
        inputs = self.step_inputs(cache, input_ids, lengths, logits_index)
        if self.inplace:
            logits = self._forward_inplace(cache, inputs, logits_index)
        else:
            logits = self._forward_concat(cache, inputs, logits_index)
        cache.lengths += lengths
        return logits

    def _check_room(self, cache: KVCache, buffer_end: int, sequence_end: int) -> None:
        """Refuse a step whose buffer positions (padding included) overflow an in-place cache, or whose real
        tokens overflow the model's context."""
        if self.inplace and buffer_end > cache.capacity:
            raise ContextLengthError(f"the KV cache holds {cache.capacity} positions and this step needs {buffer_end}")
        if sequence_end > self.arch.context_length:
            raise ContextLengthError("the sequence would exceed the model's context of "
                                     f"{self.arch.context_length} positions")

    def step_inputs(self, cache: KVCache, input_ids: np.ndarray, lengths: np.ndarray,
                    logits_index: np.ndarray) -> dict[str, np.ndarray]:
        """The graph inputs of one step besides the KV buffers: the engine's whole contract with the graph."""
        io = self.io
        S = input_ids.shape[1]
        # Pads get in-range positions (their outputs are never used): the position table has context_length rows.
        positions = np.minimum(cache.lengths[:, None] + np.arange(S)[None, :], self.arch.context_length - 1)
        feed = {io.input_ids: input_ids}
        if io.position_ids:
            feed[io.position_ids] = np.ascontiguousarray(positions, np.int64)
        if io.logits_index:
            feed[io.logits_index] = logits_index
        if self.inplace:
            feed[io.seqlens_k] = (cache.lengths + lengths - 1).astype(np.int32)  # last real position per row
            feed[io.total_sequence_length] = np.array(int((cache.lengths + S).max()), np.int32)
        else:
            new_valid = (np.arange(S)[None, :] < lengths[:, None]).astype(np.int64)
            feed[io.attention_mask] = np.concatenate([cache.valid, new_valid], axis=1)
        return feed

    def _bound_step(self, cache: KVCache, input_ids: np.ndarray, k: int) -> np.ndarray:
        """S real tokens per row on an in-place cache, logits at the last K = k positions (1 or S): `step_inputs`
        for that shape, written into buffers bound once per shape.

        A decode step of a small model costs about as much in Python as in onnxruntime, and allocating and
        re-binding five inputs and the logits is most of the Python part, so each step shape keeps its buffers
        and only their values change (tests/test_engine_decode.py checks them against `step_inputs`). A decode
        step and the verify steps of speculative decoding (1 + proposals tokens, every position's logits) take
        this path; switching shapes re-binds existing OrtValues, allocating nothing.
        """
        B, S = input_ids.shape
        end = int(cache.lengths.max()) + S
        self._check_room(cache, end, end)
        key = (S, k)
        step = cache.bound.get(key)
        if step is None:
            index = np.broadcast_to(np.arange(S - k, S, dtype=np.int64), (B, k))
            template = self.step_inputs(cache, input_ids, np.full(B, S, np.int64), np.ascontiguousarray(index))
            arrays = {name: np.array(value) for name, value in template.items()}
            values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
            step = cache.bound[key] = BoundStep(arrays, values, np.arange(S, dtype=np.int64),
                                                self._logits_buffer(cache, B, k))
        binding, io, lengths = cache.binding, self.io, cache.lengths
        if cache.bound_key != key:
            for name, value in step.values.items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(io.logits, step.logits[1])
            cache.bound_key = key
        arrays = step.arrays
        arrays[io.input_ids][...] = input_ids
        if io.position_ids:  # the room check keeps every position inside the table: no clamp needed
            np.add(lengths[:, None], step.offsets, out=arrays[io.position_ids])
        np.add(lengths, S - 1, out=arrays[io.seqlens_k], casting="unsafe")  # last real position per row
        arrays[io.total_sequence_length][...] = end  # logits_index stays as the template set it
        self._run(lambda: self.session.run_with_iobinding(binding))
        lengths += S
        array = step.logits[0]
        return array if array.dtype == np.float32 else array.astype(np.float32)

    def prefill_feed(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Every input of one standalone run prefilling `ids` [S] from an empty cache, KV included, logits at every
        position: what a calibrator (quantize's static recipe) runs the float graph on."""
        S = len(ids)
        shape = (1, self.arch.n_kv_head, S if self.inplace else 0, self.arch.head_dim)
        empty = KVCache(batch=1, capacity=S, lengths=np.zeros(1, np.int64), values=[],
                        valid=np.zeros((1, 0), np.int64))
        feed = self.step_inputs(empty, np.asarray(ids, np.int64)[None, :], np.array([S], np.int64),
                                np.arange(S, dtype=np.int64)[None, :])
        feed.update((name, np.zeros(shape, self.kv_dtype)) for name in self.past_names)
        return feed

    def _logits_buffer(self, cache: KVCache, batch: int, k: int) -> tuple[np.ndarray, ort.OrtValue]:
        """Host buffer the logits output is written into: no allocation per decode step."""
        key = (batch, k)
        if key not in cache.logits:
            dtype = np.float16 if self.spec.dtype == "fp16" else np.float32
            array = np.empty((batch, k, self.arch.vocab_size), dtype)
            cache.logits[key] = (array, ort.OrtValue.ortvalue_from_numpy(array))
        return cache.logits[key]

    def _forward_inplace(self, cache: KVCache, inputs: dict[str, np.ndarray], logits_index: np.ndarray) -> np.ndarray:
        binding = cache.binding
        cache.bound_key = None
        for name, value in inputs.items():
            binding.bind_cpu_input(name, value)
        array, value = self._logits_buffer(cache, *logits_index.shape)
        binding.bind_ortvalue_output(self.io.logits, value)
        self._run(lambda: self.session.run_with_iobinding(binding))
        return array if array.dtype == np.float32 else array.astype(np.float32)

    def _forward_concat(self, cache: KVCache, inputs: dict[str, np.ndarray], logits_index: np.ndarray) -> np.ndarray:
        io = self.io
        feed = {**inputs, **dict(zip(self.past_names, cache.values))}
        outputs = self._run(lambda: self.session.run([io.logits, *self.present_names], feed))
        cache.values = outputs[1:]
        cache.valid = inputs[io.attention_mask]
        logits = outputs[0]
        if not io.logits_index:  # graphs without logits_index (e.g. Optimum's) return every position
            logits = np.take_along_axis(logits, logits_index[:, :, None], axis=1)
        return logits.astype(np.float32, copy=False)

    def _run(self, fn):
        if self._run_lock is None:
            return fn()
        with self._run_lock:
            return fn()
