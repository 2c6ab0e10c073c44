"""One forward step of an exported GPT: the bottom rung of the decoding ladder.

The engine runs the graph once for a batch of right-padded rows and returns logits; everything above it
(sampling, stop strings, streaming, batching, threads) lives elsewhere and never touches onnxruntime directly.
Its steps are named by what the loops do with them:

- `prefill(cache, ids, lengths)`: new prompt tokens, logits of each row's last real one;
- `decode(cache, tokens)`: one token per row (bound buffers on in-place caches: nothing allocated per step);
- `verify(cache, ids)`: a batch-1 run of 1 + proposals tokens, logits at every position (speculative decoding);
- `step(cache, ids, lengths, logits_index)`: the general step the others are cases of.

The KV state is a `KVCache` (gptedge.runtime.cache): in place (buffers bound as past and present, pooled for
the next request of the same size) or concatenated, as the bundle's `kv_cache.update` says.
"""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort

from gptedge.errors import ContextLengthError, UsageError
from gptedge.runtime.bundle import BundleSpec
from gptedge.runtime.cache import BoundStep, ConcatKV, HostRows, InPlaceKV, KVCache

__all__ = ["Engine", "KVCache", "right_pad"]

NP_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}  # KV cache dtypes (bundle.KV_DTYPES)
POOL_LIMIT = 4  # idle KV caches kept per (batch, capacity): a burst of concurrent requests must not pin memory forever
BOUND_STEP_MAX = 16  # steps of up to this many tokens run on bound buffers: decode (1), verify (1 + proposals)


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
        self.device = device  # where the KV buffers live: "cpu", "cuda" or "dml" (loading.make_engine chooses)
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
                    cache._on_release = self._pool_cache
                    return cache
            cache = self._allocate_inplace(batch, capacity)
            cache._on_release = self._pool_cache
            return cache
        shape = (batch, self.arch.n_kv_head, 0, self.arch.head_dim)
        empty = [np.zeros(shape, self.kv_dtype) for _ in self.past_names]
        return KVCache(batch, capacity, np.zeros(batch, np.int64), ConcatKV(empty, np.zeros((batch, 0), np.int64)))

    def _allocate_inplace(self, batch: int, capacity: int) -> KVCache:
        """Buffers on the KV device; on the CPU, numpy arrays the OrtValues wrap, so positions can be read out and
        written in (prefix reuse) without a copy of the whole buffer."""
        shape = [batch, self.arch.n_kv_head, capacity, self.arch.head_dim]
        if self.device == "cpu":
            return self.cache_over([np.zeros(shape, self.kv_dtype) for _ in self.past_names],
                                   np.zeros(batch, np.int64), check=False)
        values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device, 0)
                  for _ in self.past_names]
        return KVCache(batch, capacity, np.zeros(batch, np.int64), InPlaceKV(values, self._bind_in_place(values)))

    def _bind_in_place(self, values: list[ort.OrtValue]) -> ort.IOBinding:
        """A binding with each layer's buffer bound as both its past input and its present output: same memory, so
        the step writes the new keys and values in place."""
        binding = self.session.io_binding()
        for past, present, value in zip(self.past_names, self.present_names, values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        return binding

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
        return KVCache(batch, capacity, lengths, InPlaceKV(values, self._bind_in_place(values), host=arrays))

    def host_rows(self, rows: int, capacity: int) -> HostRows:
        """`rows` sequences of up to `capacity` positions in host arrays (in-place graphs on the CPU)."""
        if not self.shares_host_rows:
            raise UsageError("host rows need an in-place graph running on the CPU")
        shape = (rows, self.arch.n_kv_head, capacity, self.arch.head_dim)
        return HostRows([np.zeros(shape, self.kv_dtype) for _ in self.past_names], self.cache_over)

    @property
    def bytes_per_position(self) -> int:
        """KV bytes one sequence position takes across all layers (keys and values)."""
        a = self.arch
        return a.n_layer * 2 * a.n_kv_head * a.head_dim * np.dtype(self.kv_dtype).itemsize

    def release(self, cache: KVCache) -> None:
        """Return a cache's buffers to the pool for the next request of the same size (`KVCache.release`)."""
        cache.release()

    def _pool_cache(self, cache: KVCache) -> None:
        with self._pool_lock:
            pool = self._pool.setdefault((cache.batch, cache.capacity), [])
            if len(pool) < POOL_LIMIT:
                pool.append(cache)

    def clear_pool(self) -> None:
        with self._pool_lock:
            self._pool.clear()

    # -- steps ----------------------------------------------------------------------------------
    # Each returns float32 logits in a buffer the next step of the same shape reuses: copy what you keep.
    def prefill(self, cache: KVCache, input_ids: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """Append prompt tokens `input_ids` [B, S] (row b holds `lengths[b]` real ones, right-padded; default
        all S); logits [B, V] of each row's last real token."""
        input_ids = self._ids(cache, input_ids)
        if lengths is None and self._bindable(*input_ids.shape):
            return self._bound_step(cache, input_ids, 1)[:, 0]
        return self.step(cache, input_ids, lengths)[:, 0]

    def decode(self, cache: KVCache, tokens: np.ndarray) -> np.ndarray:
        """Append one token per row, `tokens` [B, 1]; logits [B, V] for the tokens after them."""
        tokens = self._ids(cache, tokens)
        if tokens.shape[1] != 1:
            raise UsageError(f"a decode step takes one token per row, got {tokens.shape[1]}")
        return (self._bound_step(cache, tokens, 1) if self.inplace else self.step(cache, tokens))[:, 0]

    def verify(self, cache: KVCache, input_ids: np.ndarray) -> np.ndarray:
        """Append a batch-1 run `input_ids` [1, S] (a token and its proposals); logits [S, V] at every position."""
        input_ids = self._ids(cache, input_ids)
        B, S = input_ids.shape
        if B != 1:
            raise UsageError(f"a verify step runs one sequence, got {B}")
        if self._bindable(B, S):
            return self._bound_step(cache, input_ids, S)[0]
        return self.step(cache, input_ids, logits_index=np.arange(S, dtype=np.int64)[None, :])[0]

    def forward(
        self,
        cache: KVCache,
        input_ids: np.ndarray,
        lengths: np.ndarray | None = None,
        logits_index: np.ndarray | None = None,
        *,
        every_position: bool = False,
    ) -> np.ndarray:
        """Logits [B, K, V] at `logits_index` [B, K] (default each row's last real token; `every_position`: all S),
        for callers that describe a step by its arguments: it runs as the named step they amount to."""
        if every_position and logits_index is not None:
            raise UsageError("pass logits_index or every_position, not both")
        input_ids = self._ids(cache, input_ids)
        B, S = input_ids.shape
        if lengths is None and logits_index is None and self._bindable(B, S):
            return self._bound_step(cache, input_ids, S if every_position else 1)
        if every_position:
            logits_index = np.broadcast_to(np.arange(S, dtype=np.int64), (B, S))
        return self.step(cache, input_ids, lengths, logits_index)

    def step(self, cache: KVCache, input_ids: np.ndarray, lengths: np.ndarray | None = None,
             logits_index: np.ndarray | None = None) -> np.ndarray:
        """The general step: `input_ids` [B, S] with `lengths[b]` real tokens per row (default S); logits
        [B, K, V] at `logits_index` [B, K] (default each row's last real token), inputs bound afresh."""
        input_ids = self._ids(cache, input_ids)
        B, S = input_ids.shape
        lengths = np.full(B, S, np.int64) if lengths is None else np.asarray(lengths, np.int64)
        if lengths.min() < 1 or lengths.max() > S:
            raise UsageError("each row needs between 1 and S new tokens")
        self._check_room(cache, int((cache.lengths + S).max()), int((cache.lengths + lengths).max()))
        if logits_index is None:
            logits_index = (lengths - 1).reshape(B, 1)
        logits_index = np.ascontiguousarray(logits_index, dtype=np.int64)
        inputs = self.step_inputs(cache, input_ids, lengths, logits_index)
        if self.inplace:
            logits = self._forward_inplace(cache.kv, inputs, logits_index)
        else:
            logits = self._forward_concat(cache.kv, inputs, logits_index)
        cache.lengths += lengths
        return logits

    def _ids(self, cache: KVCache, input_ids: np.ndarray) -> np.ndarray:
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if input_ids.shape[0] != cache.batch:
            raise UsageError(f"input batch {input_ids.shape[0]} does not match the cache's batch {cache.batch}")
        return input_ids

    def _bindable(self, batch: int, tokens: int) -> bool:
        """Steps that run on bound buffers: in place, at most BOUND_STEP_MAX tokens, batch 1 or one token per row
        (GroupQueryAttention refuses several new tokens per row on a non-empty cache when batch > 1)."""
        return self.inplace and tokens <= BOUND_STEP_MAX and (batch == 1 or tokens == 1)

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
            feed[io.attention_mask] = np.concatenate([cache.kv.valid, new_valid], axis=1)
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
        kv = cache.kv
        step = kv.bound.get(key)
        if step is None:
            index = np.broadcast_to(np.arange(S - k, S, dtype=np.int64), (B, k))
            template = self.step_inputs(cache, input_ids, np.full(B, S, np.int64), np.ascontiguousarray(index))
            arrays = {name: np.array(value) for name, value in template.items()}
            values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
            step = kv.bound[key] = BoundStep(arrays, values, np.arange(S, dtype=np.int64),
                                             self._logits_buffer(kv, B, k))
        binding, io, lengths = kv.binding, self.io, cache.lengths
        if kv.bound_key != key:
            for name, value in step.values.items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(io.logits, step.logits[1])
            kv.bound_key = key
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
        empty = KVCache(1, S, np.zeros(1, np.int64), ConcatKV([], np.zeros((1, 0), np.int64)))
        feed = self.step_inputs(empty, np.asarray(ids, np.int64)[None, :], np.array([S], np.int64),
                                np.arange(S, dtype=np.int64)[None, :])
        feed.update((name, np.zeros(shape, self.kv_dtype)) for name in self.past_names)
        return feed

    def _logits_buffer(self, kv: InPlaceKV, batch: int, k: int) -> tuple[np.ndarray, ort.OrtValue]:
        """Host buffer the logits output is written into: no allocation per decode step."""
        key = (batch, k)
        if key not in kv.logits:
            dtype = np.float16 if self.spec.dtype == "fp16" else np.float32
            array = np.empty((batch, k, self.arch.vocab_size), dtype)
            kv.logits[key] = (array, ort.OrtValue.ortvalue_from_numpy(array))
        return kv.logits[key]

    def _forward_inplace(self, kv: InPlaceKV, inputs: dict[str, np.ndarray], logits_index: np.ndarray) -> np.ndarray:
        binding = kv.binding
        kv.bound_key = None
        for name, value in inputs.items():
            binding.bind_cpu_input(name, value)
        array, value = self._logits_buffer(kv, *logits_index.shape)
        binding.bind_ortvalue_output(self.io.logits, value)
        self._run(lambda: self.session.run_with_iobinding(binding))
        return array if array.dtype == np.float32 else array.astype(np.float32)

    def _forward_concat(self, kv: ConcatKV, inputs: dict[str, np.ndarray], logits_index: np.ndarray) -> np.ndarray:
        io = self.io
        feed = {**inputs, **dict(zip(self.past_names, kv.values))}
        outputs = self._run(lambda: self.session.run([io.logits, *self.present_names], feed))
        kv.values = outputs[1:]
        kv.valid = inputs[io.attention_mask]
        logits = outputs[0]
        if not io.logits_index:  # graphs without logits_index (e.g. Optimum's) return every position
            logits = np.take_along_axis(logits, logits_index[:, :, None], axis=1)
        return logits.astype(np.float32, copy=False)

    def _run(self, fn):
        if self._run_lock is None:
            return fn()
        with self._run_lock:
            return fn()
