"""One loaded Model serves many threads at once: each generation has its own KV cache, results equal sequential runs."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from gptedge.runtime import CancelToken, Model

PROMPTS = ["def add(a, b):", "Hello world!", "你好，世界。", "The quick brown fox", "x = 1\ny =", "😀🎉"]


def _run(model: Model, prompt: str, i: int):
    kw = dict(temperature=0.9, top_p=0.95, seed=i, max_new_tokens=24, stop_token_ids=())
    if i % 2:
        kw = dict(temperature=0.0, max_new_tokens=18 + i, stop_token_ids=())
    r = model.generate(prompt, **kw)
    return r.token_ids, r.text


def test_threads_give_the_same_results_as_sequential(runtime_model: Model) -> None:
    jobs = [(p, i) for i, p in enumerate(PROMPTS * 2)]  # 12 generations, mixed sizes and samplers
    sequential = [_run(runtime_model, p, i) for p, i in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda job: _run(runtime_model, *job), jobs))
    assert threaded == sequential


def test_concurrent_streams_interleave_without_mixing(runtime_model: Model) -> None:
    """Two streams advanced alternately in one thread: each keeps its own cache."""
    kw = dict(temperature=0.0, max_new_tokens=20, stop_token_ids=())
    a_alone = runtime_model.generate(PROMPTS[0], **kw).text
    b_alone = runtime_model.generate(PROMPTS[1], **kw).text
    a, b = runtime_model.stream(PROMPTS[0], **kw), runtime_model.stream(PROMPTS[1], **kw)
    pieces_a, pieces_b = [], []
    live = [(a, pieces_a), (b, pieces_b)]
    while live:  # one piece from each in turn
        for item in list(live):
            piece = next(item[0], None)
            if piece is None:
                live.remove(item)
            else:
                item[1].append(piece)
    assert "".join(pieces_a) == a_alone and "".join(pieces_b) == b_alone


def test_cancel_from_another_thread_frees_the_buffer(runtime_model: Model) -> None:
    engine = runtime_model.engine
    engine.clear_pool()
    token = CancelToken()
    started, cancelled = threading.Event(), threading.Event()
    result = {}

    def work() -> None:
        stream = runtime_model.stream("Hello", temperature=1.0, seed=3, max_new_tokens=120, stop_token_ids=(),
                                      cancel=token)
        for i, _ in enumerate(stream):
            if i == 2:
                started.set()
                assert cancelled.wait(30)  # the generation cannot run to its end before the cancel lands
        result["r"] = stream.result

    thread = threading.Thread(target=work)
    thread.start()
    assert started.wait(30)
    token.cancel()
    cancelled.set()
    thread.join(30)
    assert result["r"].finish_reason == "cancelled"
    assert len(result["r"].token_ids) <= 4  # stopped at the next token after the cancel
    assert sum(len(v) for v in engine._pool.values()) == 1  # its buffer went back to the pool


def test_pool_is_bounded_after_a_burst(runtime_model: Model) -> None:
    engine = runtime_model.engine
    engine.clear_pool()
    streams = [runtime_model.stream(p, temperature=0.0, max_new_tokens=5, stop_token_ids=()) for p in PROMPTS]
    for s in streams:
        next(s)  # all six hold a cache at once
    for s in streams:
        s.close()
    assert sum(len(v) for v in engine._pool.values()) <= 4
