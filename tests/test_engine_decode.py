"""The engine's one-token fast path: inputs bound once and updated in place give what `step_inputs` describes.

The fast path restates the graph contract for S = 1 (for speed); these tests hold it to `step_inputs`, the one
statement of that contract, and to the general path's logits, across prefills, multi-token steps and batches.
"""

from __future__ import annotations

import numpy as np
import pytest

from gptedge.errors import ContextLengthError


def general_step(engine, cache, tokens: np.ndarray) -> np.ndarray:
    """A one-token step through the general path (explicit lengths and logits index skip the fast path)."""
    B = cache.batch
    return engine.forward(cache, tokens, np.ones(B, np.int64), np.zeros((B, 1), np.int64))


@pytest.mark.parametrize("batch", [1, 3])
def test_fast_decode_matches_the_general_path(runtime_model, batch: int) -> None:
    engine = runtime_model.engine
    fast, slow = engine.new_cache(batch, 64), engine.new_cache(batch, 64)
    prompts = np.arange(3, 3 + 5 * batch).reshape(batch, 5)
    lengths = np.array([5, 3, 4][:batch])
    for cache in (fast, slow):
        engine.forward(cache, prompts, lengths)
    rng = np.random.default_rng(0)
    for step in range(12):
        tokens = rng.integers(3, 200, (batch, 1))
        expected = engine.step_inputs(fast, tokens, np.ones(batch, np.int64), np.zeros((batch, 1), np.int64))
        a = engine.forward(fast, tokens).copy()
        b = general_step(engine, slow, tokens).copy()
        np.testing.assert_array_equal(a, b)
        assert fast.decode_bound
        for name, value in expected.items():
            np.testing.assert_array_equal(fast.decode[name], value, err_msg=name)
            assert fast.decode[name].dtype == value.dtype and fast.decode[name].shape == value.shape
        if step == 5:  # a multi-token step (a speculative verify) re-binds; the next decode binds its buffers again
            more = rng.integers(3, 200, (1, 3)) if batch == 1 else None
            if more is not None:
                for cache in (fast, slow):
                    engine.forward(cache, more, logits_index=np.arange(3)[None, :])
                assert not fast.decode_bound
        np.testing.assert_array_equal(fast.lengths, slow.lengths)
    engine.release(fast)
    engine.release(slow)


def test_pooled_cache_reuses_its_bound_buffers(runtime_model) -> None:
    model = runtime_model
    first = model.generate("def add(a, b):", max_new_tokens=20, temperature=0, stop_token_ids=())
    again = model.generate("def add(a, b):", max_new_tokens=20, temperature=0, stop_token_ids=())  # pooled cache
    other = model.generate("Hello", max_new_tokens=20, temperature=0, stop_token_ids=())
    assert first.token_ids == again.token_ids
    assert model.generate("Hello", max_new_tokens=20, temperature=0, stop_token_ids=()).token_ids == other.token_ids


def test_fast_decode_refuses_a_full_cache(runtime_model) -> None:
    engine = runtime_model.engine
    cache = engine.new_cache(1, 4)
    engine.forward(cache, np.array([[3, 4, 5, 6]]))
    with pytest.raises(ContextLengthError, match="holds 4 positions and this step needs 5"):
        engine.forward(cache, np.array([[7]]))
    assert int(cache.lengths[0]) == 4
