"""The engine's bound steps: inputs bound once per step shape and updated in place give what `step_inputs` describes.

The bound path restates the graph contract for steps of S real tokens with logits at the last or every position (for
speed: decode steps and speculative verify steps); these tests hold it to `step_inputs`, the one statement of that
contract, and to the general path's logits, across prefills, shape changes, multi-token steps and batches.
"""

from __future__ import annotations

import numpy as np
import pytest

from gptedge.errors import ContextLengthError, UsageError


def general_step(engine, cache, tokens: np.ndarray, every: bool = False) -> np.ndarray:
    """A step through the general path (explicit lengths and logits index skip the bound buffers)."""
    B, S = tokens.shape
    index = np.tile(np.arange(S), (B, 1)) if every else np.full((B, 1), S - 1)
    return engine.forward(cache, tokens, np.full(B, S, np.int64), index)


def assert_bound_as_described(engine, cache, tokens: np.ndarray, k: int, before: np.ndarray) -> None:
    """The buffers bound for this step shape hold exactly what `step_inputs` asks for, at the lengths `before`."""
    B, S = tokens.shape
    assert cache.bound_key == (S, k)
    stored = cache.lengths.copy()
    cache.lengths[:] = before
    expected = engine.step_inputs(cache, tokens, np.full(B, S, np.int64), np.tile(np.arange(S - k, S), (B, 1)))
    cache.lengths[:] = stored
    arrays = cache.bound[(S, k)].arrays
    assert arrays.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)
        assert arrays[name].dtype == value.dtype and arrays[name].shape == value.shape, name


@pytest.mark.parametrize("batch", [1, 3])
def test_bound_decode_matches_the_general_path(runtime_model, batch: int) -> None:
    engine = runtime_model.engine
    fast, slow = engine.new_cache(batch, 64), engine.new_cache(batch, 64)
    prompts = np.arange(3, 3 + 5 * batch).reshape(batch, 5)
    lengths = np.array([5, 3, 4][:batch])
    for cache in (fast, slow):
        engine.forward(cache, prompts, lengths)
    rng = np.random.default_rng(0)
    for step in range(12):
        tokens = rng.integers(3, 200, (batch, 1))
        before = fast.lengths.copy()
        a = engine.forward(fast, tokens).copy()
        b = general_step(engine, slow, tokens).copy()
        np.testing.assert_array_equal(a, b)
        assert_bound_as_described(engine, fast, tokens, 1, before)
        if step == 5 and batch == 1:  # a verify step binds its own buffers; the next decode binds its own again
            more = rng.integers(3, 200, (1, 3))
            before = fast.lengths.copy()
            a = engine.forward(fast, more, every_position=True).copy()
            np.testing.assert_array_equal(a, general_step(engine, slow, more, every=True))
            assert a.shape == (1, 3, engine.arch.vocab_size)
            assert_bound_as_described(engine, fast, more, 3, before)
        np.testing.assert_array_equal(fast.lengths, slow.lengths)
    engine.release(fast)
    engine.release(slow)


def test_verify_steps_of_every_length_match_the_general_path(runtime_model) -> None:
    """Steps of 1..9 tokens, logits at every or the last position, in a shuffled order: each shape's buffers are
    re-bound (not refilled from another shape's) and the cache lengths move as the general path's do."""
    engine = runtime_model.engine
    fast, slow = engine.new_cache(1, 128), engine.new_cache(1, 128)
    for cache in (fast, slow):
        engine.forward(cache, np.array([[5, 6, 7, 8]]), np.array([4]))
    rng = np.random.default_rng(1)
    for S in [3, 1, 9, 2, 3, 5, 1, 9, 4]:
        every = bool(rng.integers(2))
        tokens = rng.integers(3, 200, (1, S))
        before = fast.lengths.copy()
        a = engine.forward(fast, tokens, every_position=every) if every else engine.forward(fast, tokens)
        np.testing.assert_array_equal(a, general_step(engine, slow, tokens, every=every))
        assert_bound_as_described(engine, fast, tokens, S if every else 1, before)
        np.testing.assert_array_equal(fast.lengths, slow.lengths)
        fast.lengths -= S // 2  # a speculative rewind: later steps overwrite the stale positions
        slow.lengths -= S // 2
    assert len(fast.bound) <= 2 * 9  # one buffer set per step shape, however often a shape comes back


def test_longer_steps_take_the_general_path(runtime_model) -> None:
    engine = runtime_model.engine
    cache = engine.new_cache(1, 64)
    engine.forward(cache, np.array([[3]]))
    assert cache.bound_key == (1, 1)
    engine.forward(cache, np.arange(3, 23)[None, :])  # 20 tokens: more than a bound step holds
    assert (20, 1) not in cache.bound and cache.bound_key is None  # the general path re-bound the inputs
    with pytest.raises(UsageError, match="logits_index or every_position"):
        engine.forward(cache, np.array([[3]]), logits_index=np.zeros((1, 1)), every_position=True)


def test_pooled_cache_reuses_its_bound_buffers(runtime_model, monkeypatch) -> None:
    """A released cache goes to the pool and the next generation of its size gets that very object back, its
    bound step buffers included (nothing re-allocated, nothing re-bound), and still gives a fresh cache's tokens."""
    model, engine = runtime_model, runtime_model.engine
    assert engine.inplace  # only in-place caches are pooled
    handed_out = []
    new_cache = engine.new_cache

    def recording_new_cache(*args, **kwargs):
        cache = new_cache(*args, **kwargs)
        handed_out.append(cache)
        return cache

    monkeypatch.setattr(engine, "new_cache", recording_new_cache)
    kw = dict(max_new_tokens=20, temperature=0, stop_token_ids=())

    def generate(prompt: str):
        result = model.generate(prompt, cache_prompt=False, **kw)  # no stored prefix: every step runs
        return result, handed_out[-1]

    engine.clear_pool()  # earlier tests' caches must not stand in for a fresh one
    first, cache = generate("def add(a, b):")
    size = (cache.batch, cache.capacity)
    assert [c is cache for c in engine._pool.get(size, [])] == [True], "the released cache did not go to the pool"
    bound = dict(cache.bound)
    assert (1, 1) in bound  # its decode steps ran on bound buffers
    kv_values = list(cache.values)

    again, reused = generate("def add(a, b):")
    assert reused is cache, "the second generation did not get the pooled cache back"
    assert all(cache.bound.get(key) is step for key, step in bound.items()), "bound steps were rebuilt"
    assert all(a is b for a, b in zip(cache.values, kv_values)), "the KV buffers were replaced"
    assert again.token_ids == first.token_ids

    other, dirty = generate("Hello")  # the pooled cache, still holding the last prompt's positions
    assert dirty is cache
    engine.clear_pool()
    fresh, clean = generate("Hello")
    assert clean is not cache and (clean.batch, clean.capacity) == size
    assert other.token_ids == fresh.token_ids


@pytest.mark.parametrize("stored, S", [(4, 1), (2, 3)])
def test_bound_step_refuses_a_full_cache(runtime_model, stored: int, S: int) -> None:
    engine = runtime_model.engine
    cache = engine.new_cache(1, 4)
    engine.forward(cache, np.arange(3, 3 + stored)[None, :])
    with pytest.raises(ContextLengthError, match="holds 4 positions and this step needs 5"):
        engine.forward(cache, np.full((1, S), 7), every_position=S > 1)
    assert int(cache.lengths[0]) == stored
