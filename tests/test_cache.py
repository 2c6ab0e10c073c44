"""The KV-cache interface every loop uses: each operation on each kind of storage, against a cold run.

In place (CPU host memory), concatenated (an Optimum-style graph's storage, driven through the same engine
contract) and the batcher's host rows must agree: rewinding then re-feeding, holding rows through a step,
moving a row and loading a stored prefix all give the logits a fresh cache gives for the same tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from gptedge.errors import UsageError

PROMPT = np.arange(3, 23, dtype=np.int64)  # 20 tokens


@pytest.fixture(scope="module")
def concat_model(runtime_checkpoint, tmp_path_factory):
    from gptedge.export.exporter import export_bundle
    from gptedge.runtime import Model

    bundle = export_bundle(runtime_checkpoint, tmp_path_factory.mktemp("concat") / "b", kv="concat", progress=False)
    return Model.load(bundle, provider="cpu", threads=1)


@pytest.fixture(params=["inplace", "concat"])
def model(request, runtime_model, concat_model):
    return runtime_model if request.param == "inplace" else concat_model


def fresh(engine, ids: np.ndarray) -> np.ndarray:
    """Logits [V] after `ids` on a cache of their own."""
    cache = engine.new_cache(1, 64)
    try:
        return engine.prefill(cache, ids[None, :])[0].copy()
    finally:
        cache.release()


def test_rewind_then_refeed_matches_a_cold_run(model) -> None:
    engine = model.engine
    cache = engine.new_cache(1, 64)
    engine.prefill(cache, PROMPT[None, :])
    engine.verify(cache, np.array([[5, 6, 7, 8]]))  # proposals, then three of them rejected
    cache.rewind(3)
    assert cache.length == 21
    got = engine.decode(cache, np.array([[9]]))[0]
    np.testing.assert_allclose(got, fresh(engine, np.r_[PROMPT, 5, 9]), atol=1e-5)
    cache.rewind_to(20)
    np.testing.assert_allclose(engine.decode(cache, np.array([[4]]))[0], fresh(engine, np.r_[PROMPT, 4]), atol=1e-5)
    with pytest.raises(UsageError, match="cannot rewind"):
        cache.rewind_to(40)
    cache.release()


def test_holding_keeps_a_rows_length_through_a_step(model) -> None:
    engine = model.engine
    cache = engine.new_cache(2, 64)
    ids = np.stack([PROMPT, PROMPT[::-1]])
    engine.prefill(cache, ids)
    with cache.holding(np.array([False, True])):
        logits = engine.decode(cache, np.array([[7], [1]]))
    assert list(cache.lengths) == [21, 20]
    np.testing.assert_allclose(logits[0], fresh(engine, np.r_[PROMPT, 7]), atol=1e-5)
    after = engine.decode(cache, np.array([[7], [8]]))
    if engine.inplace:  # row 1's held position is overwritten, never read (concatenated, it stays: a parked row)
        np.testing.assert_allclose(after[1], fresh(engine, np.r_[PROMPT[::-1], 8]), atol=1e-5)
    cache.release()


def test_prefix_out_and_in_matches_a_cold_run(model) -> None:
    engine = model.engine
    source, target = engine.new_cache(1, 64), engine.new_cache(1, 64)
    engine.prefill(source, PROMPT[None, :])
    stored = [a.copy() for a in source.prefix(20)]
    target.load_prefix(stored, 16)
    assert target.length == 16
    got = engine.prefill(target, PROMPT[None, 16:])[0]
    np.testing.assert_allclose(got, fresh(engine, PROMPT), atol=1e-5)
    source.release()
    target.release()


def test_release_pools_once_and_the_pooled_cache_starts_empty(runtime_model) -> None:
    engine = runtime_model.engine
    engine.clear_pool()
    cache = engine.new_cache(1, 48)
    engine.prefill(cache, PROMPT[None, :])
    cache.release()
    cache.release()  # a second release does not pool it twice
    assert len(engine._pool[(1, 48)]) == 1
    again = engine.new_cache(1, 48)
    assert again is cache and again.length == 0
    again.release()


def test_host_rows_move_a_row_into_a_hole(runtime_model) -> None:
    engine = runtime_model.engine
    rows = engine.host_rows(3, 64)
    engine.prefill(rows.view(2, 3), PROMPT[None, :])
    rows.move(2, 0)
    assert list(rows.lengths) == [20, 0, 0]
    got = engine.decode(rows.view(0, 1), np.array([[6]]))[0]
    np.testing.assert_allclose(got, fresh(engine, np.r_[PROMPT, 6]), atol=1e-5)


def test_steps_are_named_and_checked(model) -> None:
    engine = model.engine
    cache = engine.new_cache(1, 64)
    with pytest.raises(UsageError, match="one token per row"):
        engine.decode(cache, np.array([[1, 2]]))
    with pytest.raises(UsageError, match="does not match the cache's batch"):
        engine.prefill(cache, np.ones((2, 3), np.int64))
    rows = engine.verify(cache, PROMPT[None, :4])
    assert rows.shape == (4, model.spec.architecture.vocab_size)
    cache.release()
