"""Continuous batching: rows joining and leaving a running batch give exactly their solo results."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from gptedge.errors import ContextLengthError, UsageError
from gptedge.runtime import Model
from gptedge.runtime.batcher import Batcher, QueueFull
from gptedge.runtime.decoding import Decoding

PROMPTS = ["def add(a, b):", "Hello world", "你好，世界", "The quick brown fox jumps over", "x", "print(", "😀🎉",
           "fox"]


def run(batcher: Batcher, model: Model, prompt, **kw):
    """Submit one request; (event that fires when done, holder of [result, error, steps])."""
    ids = model.prompt_ids(prompt)
    seq = Decoding(model.tokenizer, ids, model.sampling_params(**kw))
    done, box = threading.Event(), {"steps": []}

    def finished(result, error):
        box["result"], box["error"] = result, error
        done.set()

    box["request"] = batcher.submit(seq, box["steps"].append, finished)
    return done, box


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_rows_joining_at_different_times_match_solo_runs(runtime_model: Model, rows: int) -> None:
    kws = [dict(temperature=0.9, seed=i, max_new_tokens=6 + 5 * (i % 4), stop_token_ids=())
           for i in range(len(PROMPTS))]
    solo = [runtime_model.generate(p, **kw) for p, kw in zip(PROMPTS, kws)]
    batcher = Batcher(runtime_model.engine, rows=rows)
    try:
        pending = []
        for p, kw in zip(PROMPTS, kws):
            pending.append(run(batcher, runtime_model, p, **kw))
            time.sleep(0.003)  # later requests join a batch that is already decoding
        for done, _ in pending:
            assert done.wait(30)
    finally:
        batcher.close()
    for (_, box), expected in zip(pending, solo):
        assert box["error"] is None
        got = box["result"]
        assert got.token_ids == expected.token_ids and got.text == expected.text
        assert got.finish_reason == expected.finish_reason
        assert got.text.startswith("".join(s.text for s in box["steps"]))  # the rest is the held-back tail
    if rows > 1:
        assert batcher.steps < sum(len(r.token_ids) for r in solo)  # rows really shared steps


def test_long_prompts_are_prefilled_in_chunks_between_decode_steps(runtime_model: Model, monkeypatch) -> None:
    import gptedge.runtime.batcher as batcher_module

    monkeypatch.setattr(batcher_module, "PREFILL_CHUNK", 7)
    long_prompt = list(range(3, 90))
    kw = dict(temperature=0, max_new_tokens=10, stop_token_ids=())
    expected = [runtime_model.generate(p, **kw).token_ids for p in ("Hello", long_prompt)]
    batcher = Batcher(runtime_model.engine, rows=2)
    try:
        first = run(batcher, runtime_model, "Hello", **kw)
        second = run(batcher, runtime_model, long_prompt, **kw)
        assert first[0].wait(30) and second[0].wait(30)
    finally:
        batcher.close()
    assert [first[1]["result"].token_ids, second[1]["result"].token_ids] == expected


def test_cancel_frees_the_row_within_a_step(runtime_model: Model) -> None:
    batcher = Batcher(runtime_model.engine, rows=1)
    try:
        done, box = run(batcher, runtime_model, "Hello", temperature=0.8, seed=1, max_new_tokens=100, stop_token_ids=())
        while len(box["steps"]) < 3:
            time.sleep(0.001)
        box["request"].cancel()
        assert done.wait(5)
        assert box["result"].finish_reason == "cancelled" and len(box["result"].token_ids) < 100
        assert batcher.active == 0
        again = run(batcher, runtime_model, "Hello", temperature=0, max_new_tokens=5, stop_token_ids=())
        assert again[0].wait(10) and again[1]["result"].token_ids == runtime_model.generate(
            "Hello", temperature=0, max_new_tokens=5, stop_token_ids=()).token_ids
    finally:
        batcher.close()


def test_budget_queue_and_bad_settings(runtime_model: Model) -> None:
    engine = runtime_model.engine
    per_position = engine.bytes_per_position
    small = Batcher(engine, rows=2, kv_budget_mb=2 * 64 * per_position / 2**20, max_queue=1)
    try:
        assert small.capacity == 64 and small._arrays[0].shape[0] == 2
        with pytest.raises(ContextLengthError, match="each sequence here holds 64"):
            run(small, runtime_model, "Hello", max_new_tokens=80)
    finally:
        small.close()
    with pytest.raises(UsageError, match="holds no position"):
        Batcher(engine, rows=4, kv_budget_mb=1e-6)
    with pytest.raises(UsageError, match="rows"):
        Batcher(engine, rows=0)
    full = Batcher(engine, rows=1, max_queue=1)
    try:
        gate = threading.Event()
        full.submit(Decoding(runtime_model.tokenizer, [1], runtime_model.sampling_params(max_new_tokens=50)),
                    lambda s: gate.wait(5), lambda r, e: None)
        time.sleep(0.05)  # the first request is running (its callback blocks), the queue is empty
        run(full, runtime_model, "a", max_new_tokens=2)
        with pytest.raises(QueueFull, match="already waiting"):
            run(full, runtime_model, "b", max_new_tokens=2)
        gate.set()
    finally:
        full.close()


def test_views_share_memory_with_the_row_arrays(runtime_model: Model) -> None:
    batcher = Batcher(runtime_model.engine, rows=3)
    try:
        done, _ = run(batcher, runtime_model, "Hello world", temperature=0, max_new_tokens=3, stop_token_ids=())
        assert done.wait(10)
        assert np.abs(batcher._arrays[0][0, :, :5]).sum() > 0  # the prefill wrote into row 0 of the shared array
        assert np.abs(batcher._arrays[0][1:]).sum() == 0
    finally:
        batcher.close()
