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


def run(batcher: Batcher, model: Model, prompt, on_step=None, **kw):
    """Submit one request; (event that fires when done, holder of [result, error, steps]). `on_step(steps)`, if
    given, is called on the batcher's thread after each step is recorded."""
    ids = model.prompt_ids(prompt)
    seq = Decoding(model.tokenizer, ids, model.sampling_params(**kw))
    done, box = threading.Event(), {"steps": []}

    def stepped(step):
        box["steps"].append(step)
        if on_step is not None:
            on_step(box["steps"])

    def finished(result, error):
        box["result"], box["error"] = result, error
        done.set()

    box["request"] = batcher.submit(seq, stepped, finished)
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
    """A long prompt joining a running request is prefilled one chunk per loop turn, with a decode step of the
    running request between its chunks (not all at once while the running one waits), and both give their
    solo tokens."""
    import gptedge.runtime.batcher as batcher_module

    monkeypatch.setattr(batcher_module, "PREFILL_CHUNK", 7)
    long_prompt = list(range(3, 90))
    kw = dict(temperature=0, max_new_tokens=10, stop_token_ids=())
    expected = [runtime_model.generate(p, **kw).token_ids for p in ("Hello", long_prompt)]
    engine, events = runtime_model.engine, []
    batcher = Batcher(engine, rows=2)
    prefill, decode = engine.prefill, engine.decode

    def recording_prefill(cache, input_ids, *args, **kwargs):
        if threading.current_thread() is batcher._thread:
            events.append(("prefill", [int(t) for t in np.asarray(input_ids)[0]]))
        return prefill(cache, input_ids, *args, **kwargs)

    def recording_decode(cache, tokens, *args, **kwargs):
        if threading.current_thread() is batcher._thread:
            events.append(("decode", np.asarray(tokens).shape[0]))  # the batch: how many rows it steps
        return decode(cache, tokens, *args, **kwargs)

    monkeypatch.setattr(engine, "prefill", recording_prefill)
    monkeypatch.setattr(engine, "decode", recording_decode)
    submitted = threading.Event()

    def short_step(steps) -> None:
        events.append(("short", len(steps)))
        if len(steps) == 1:  # the short request is running: hold the batcher until the long one is queued
            assert submitted.wait(60), "the long request was not submitted"

    try:
        first = run(batcher, runtime_model, "Hello", on_step=short_step, **kw)
        second = run(batcher, runtime_model, long_prompt, **kw)
        submitted.set()
        assert first[0].wait(60) and second[0].wait(60)
    finally:
        submitted.set()
        batcher.close()
    assert [first[1]["result"].token_ids, second[1]["result"].token_ids] == expected
    short_prompt, *chunks = [ids for kind, ids in events if kind == "prefill"]  # the short one ran first, alone
    assert short_prompt == [int(t) for t in runtime_model.prompt_ids("Hello")]
    assert sum(chunks, []) == long_prompt and len(chunks) > 1, f"not prefilled in chunks: {chunks}"
    assert all(len(c) <= 7 for c in chunks), [len(c) for c in chunks]
    # From the long prompt's first chunk to the short request's last token, each loop turn runs one chunk, then
    # one decode step of the short request alone (the long one is not running yet), which gives its next token.
    begin = events.index(("prefill", chunks[0]))
    end = max(i for i, (kind, _) in enumerate(events) if kind == "short") + 1
    turns = [events[i:i + 3] for i in range(begin, end, 3)]
    assert len(turns) >= 3 and all([kind for kind, _ in turn] == ["prefill", "decode", "short"] and turn[1][1] == 1
                                   for turn in turns), f"decode steps did not run between the chunks: {events}"
    assert [turn[2][1] for turn in turns] == list(range(3, 3 + len(turns))), events


def test_cancel_frees_the_row_within_a_step(runtime_model: Model) -> None:
    batcher = Batcher(runtime_model.engine, rows=1)
    third, cancelled = threading.Event(), threading.Event()

    def hold_at_the_third_step(steps) -> None:
        if len(steps) == 3:  # the batcher waits here until the test has cancelled, so the cancel lands mid-stream
            third.set()
            assert cancelled.wait(60), "the test did not cancel"

    try:
        done, box = run(batcher, runtime_model, "Hello", on_step=hold_at_the_third_step, temperature=0.8, seed=1,
                        max_new_tokens=100, stop_token_ids=())
        assert third.wait(60), f"the request did not reach its third step in 60 s ({len(box['steps'])} steps)"
        box["request"].cancel()
        cancelled.set()
        assert done.wait(30), "the cancelled request did not end"
        result = box["result"]
        assert result.finish_reason == "cancelled" and len(result.token_ids) == 3  # freed before another step
        assert batcher.active == 0
        again = run(batcher, runtime_model, "Hello", temperature=0, max_new_tokens=5, stop_token_ids=())
        assert again[0].wait(30) and again[1]["result"].token_ids == runtime_model.generate(
            "Hello", temperature=0, max_new_tokens=5, stop_token_ids=()).token_ids
    finally:
        cancelled.set()
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
    running, gate = threading.Event(), threading.Event()

    def blocking_step(step) -> None:
        running.set()
        gate.wait(60)

    try:
        full.submit(Decoding(runtime_model.tokenizer, [1], runtime_model.sampling_params(max_new_tokens=50)),
                    blocking_step, lambda r, e: None)
        assert running.wait(60), "the first request never ran a step"
        assert full.active == 1 and full.waiting == 0  # it holds the only row (its callback blocks); none waits
        run(full, runtime_model, "a", max_new_tokens=2)
        with pytest.raises(QueueFull, match="already waiting"):
            run(full, runtime_model, "b", max_new_tokens=2)
    finally:
        gate.set()
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
