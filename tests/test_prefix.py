"""Prompts that are never prefilled twice, and outputs that are the cold run's, token for token.

The store (gptedge.runtime.prefix) is checked on its own: longest token prefix, never a prompt's last two
tokens, least recently used out within the budget. Then every path that prefills is held to a cold run with the
same prompt: a solo generation (greedy and seeded sampling, prompt lookup), the continuous batcher with rows that
share a system prompt, and the HTTP server with `cache_prompt` on and off.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from gptedge.runtime import Model
from gptedge.runtime.batcher import Batcher
from gptedge.runtime.decoding import Decoding
from gptedge.runtime.generator import prefill_runs
from gptedge.runtime.prefix import KEEP_PREFILLING, MIN_PREFIX, PrefixStore

SYSTEM = "You are a careful assistant. def add(a, b):\n    return a + b\n\n"  # within the tiny model's context
QUESTIONS = ["print(add(1, 2))", "for i in range(10):", "Hello world! The quick", "class Point:"]


def _kv(n: int, value: float = 1.0) -> list[np.ndarray]:
    return [np.full((2, n, 4), value, np.float32) for _ in range(4)]


def test_the_store_finds_the_longest_token_prefix_and_keeps_the_last_two_tokens_to_prefill() -> None:
    store = PrefixStore(1 << 20)
    a = np.arange(100)
    store.save(a, _kv(100))
    n, kv = store.lookup(a)
    assert n == 100 - KEEP_PREFILLING and kv[0].shape == (2, n, 4)
    b = a.copy()
    b[40] = 999  # one token differs: only the tokens before it are reused
    assert store.lookup(b)[0] == 40
    assert store.lookup(np.concatenate([a[:MIN_PREFIX - 1], [7, 7, 7]]))[0] == 0  # too short to be worth it
    assert store.lookup(np.arange(1, 60))[0] == 0  # no common first token
    store.save(np.concatenate([a, [1, 2, 3]]), _kv(103))  # extends the stored prompt: it replaces it
    assert len(store) == 1 and store.lookup(np.concatenate([a, [1, 2, 3, 4, 5]]))[0] == 103


def test_the_store_stays_within_its_budget_least_recently_used_out() -> None:
    one = sum(x.nbytes for x in _kv(50)) + 50 * 8
    store = PrefixStore(int(2.5 * one))
    prompts = [np.arange(50) + 1000 * i for i in range(3)]
    store.save(prompts[0], _kv(50))
    store.save(prompts[1], _kv(50))
    assert store.lookup(prompts[0])[0] == 48  # used: now the most recent
    store.save(prompts[2], _kv(50))  # over budget: the least recently used (prompts[1]) goes
    assert store.nbytes <= store.budget and len(store) == 2
    assert store.lookup(prompts[1])[0] == 0 and store.lookup(prompts[0])[0] == 48
    assert PrefixStore(10).save(prompts[0], _kv(50)) is None and len(PrefixStore(10)) == 0


@pytest.mark.parametrize("n", [1, 2, 255, 256, 257, 300, 513, 1000])
def test_prefill_runs_never_leave_a_single_token_run(n: int) -> None:
    for start in (0, 3):
        if start >= n:
            continue
        runs = prefill_runs(start, n)
        assert runs[0][0] == start and runs[-1][1] == n and all(b == c for (_, b), (c, _) in zip(runs, runs[1:]))
        assert all(256 >= stop - s >= 2 for s, stop in runs) or n - start == 1


@pytest.fixture()
def model(runtime_bundle: Path) -> Model:
    return Model.load(runtime_bundle, provider="cpu", threads=1, prefix_cache_mb=64)


def _prompt(model: Model, question: str) -> list[int]:
    return model.encode(SYSTEM + question)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=7)],
                         ids=["greedy", "seeded"])
def test_a_warm_generation_is_the_cold_one(model: Model, sampling: dict) -> None:
    cold = [model.generate(_prompt(model, q), max_new_tokens=24, cache_prompt=False, **sampling) for q in QUESTIONS]
    assert len(model.prefix_store) == 0  # cache_prompt=False stores nothing either
    warm = [model.generate(_prompt(model, q), max_new_tokens=24, **sampling) for q in QUESTIONS]
    assert model.prefix_store.hits == len(QUESTIONS) - 1  # the first stored the system prompt, the rest reused it
    assert model.prefix_store.reused_tokens >= (len(QUESTIONS) - 1) * (len(model.encode(SYSTEM)) - 2)
    assert [r.token_ids for r in warm] == [r.token_ids for r in cold]
    again = model.generate(_prompt(model, QUESTIONS[0]), max_new_tokens=24, **sampling)  # the whole prompt stored
    assert again.token_ids == cold[0].token_ids
    looked_up = model.generate(_prompt(model, QUESTIONS[1]), max_new_tokens=24, speculative="lookup", **sampling)
    if sampling["temperature"] == 0:
        assert looked_up.token_ids == cold[1].token_ids


def test_batched_rows_sharing_a_system_prompt_get_their_cold_answers(model: Model) -> None:
    params = model.sampling_params(max_new_tokens=20, temperature=0)
    cold = [model.generate(_prompt(model, q), params, cache_prompt=False).token_ids for q in QUESTIONS]
    model.generate(_prompt(model, "warm up: "), params)  # stores the system prompt
    batcher = Batcher(model.engine, rows=4, max_queue=16, store=model.prefix_store)
    results: dict[int, list[int]] = {}
    done = threading.Event()
    try:
        for i, q in enumerate(QUESTIONS * 2):
            seq = Decoding(model.tokenizer, _prompt(model, q), params)

            def finished(result, error, i=i):
                results[i] = result.token_ids
                if len(results) == 2 * len(QUESTIONS):
                    done.set()

            batcher.submit(seq, lambda step: None, finished)
        assert done.wait(120)
    finally:
        batcher.close()
    assert [results[i] for i in range(2 * len(QUESTIONS))] == cold * 2
    assert model.prefix_store.hits >= 2 * len(QUESTIONS)


def test_the_server_reuses_prompts_and_answers_as_cold(runtime_bundle: Path) -> None:
    import httpx

    from serve_util import live_server, wait_ready

    with live_server(runtime_bundle) as (url, state):
        wait_ready(url)
        model = state.models["tiny"].model
        body = dict(model="tiny", max_tokens=16, temperature=0)

        def ask(question: str, cache_prompt: bool) -> str:
            reply = httpx.post(url + "/v1/completions", json={**body, "prompt": SYSTEM + question,
                                                               "cache_prompt": cache_prompt}, timeout=60)
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]["text"]

        cold = [ask(q, False) for q in QUESTIONS]
        assert model.prefix_store.hits == 0 and len(model.prefix_store) == 0
        answers: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, ask(QUESTIONS[i % 4], True)))
                   for i in range(8)]
        ask("warm up", True)
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [answers[i] for i in range(8)] == cold * 2  # 8 concurrent clients, each its own cold answer
        assert model.prefix_store.hits >= 8
        bad = httpx.post(url + "/v1/completions", json={**body, "prompt": "x", "cache_prompt": "yes"}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_prompt"


def test_a_saved_prompt_cache_starts_a_new_process_warm_and_only_for_its_bundle(model: Model, runtime_checkpoint,
                                                                              tmp_path: Path) -> None:
    from gptedge.errors import UsageError
    from gptedge.export.exporter import export_bundle

    cold = model.generate(_prompt(model, QUESTIONS[0]), max_new_tokens=16, temperature=0, cache_prompt=False)
    model.generate(_prompt(model, QUESTIONS[1]), max_new_tokens=4, temperature=0)
    assert model.save_prompt_cache(tmp_path / "p.npz") == 1
    later = Model.load(model.folder, provider="cpu", threads=1, prefix_cache_mb=64)  # a later start
    assert later.load_prompt_cache(tmp_path / "p.npz") == 1
    warm = later.generate(_prompt(later, QUESTIONS[0]), max_new_tokens=16, temperature=0)
    assert warm.token_ids == cold.token_ids and later.prefix_store.hits == 1
    other = export_bundle(runtime_checkpoint, tmp_path / "other", max_context=96, progress=False)
    with pytest.raises(UsageError, match="written for another bundle"):
        Model.load(other, provider="cpu", threads=1).load_prompt_cache(tmp_path / "p.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    with pytest.raises(UsageError, match="not a readable gptedge prompt cache"):
        later.load_prompt_cache(tmp_path / "bad.npz")
    with pytest.raises(UsageError, match="keeps no prompt cache"):
        Model.load(model.folder, provider="cpu", threads=1, prefix_cache_mb=0).save_prompt_cache(tmp_path / "x.npz")


def test_the_server_keeps_its_prompt_cache_across_restarts(runtime_bundle: Path, tmp_path: Path) -> None:
    import httpx

    from serve_util import live_server, wait_ready

    body = dict(model="tiny", max_tokens=8, temperature=0, prompt=SYSTEM + QUESTIONS[2])
    with live_server(runtime_bundle, prompt_cache_dir=tmp_path) as (url, state):
        wait_ready(url)
        first = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    assert (tmp_path / "tiny.npz").is_file()  # written at shutdown
    with live_server(runtime_bundle, prompt_cache_dir=tmp_path) as (url, state):
        wait_ready(url)
        store = state.models["tiny"].model.prefix_store
        assert len(store) == 1
        again = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert again == first and store.hits == 1
