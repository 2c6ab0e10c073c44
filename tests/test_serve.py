"""gptedge serve against the official openai client on a live loopback server: equal to the Python API."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from gptedge.runtime import Model
from gptedge.runtime.chat import template_for
from serve_util import live_server, wait_ready

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "ok": {"type": "boolean"}},
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(runtime_bundle: Path):
    with live_server(runtime_bundle) as (url, state):
        wait_ready(url)
        yield url, state


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat_ids(model: Model, messages) -> list[int]:
    return model.encode(template_for(model).render(messages))


def test_models_and_health(server, client) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["models"]["tiny"] == {"active": 0, "waiting": 0}


def test_completion_equals_generate_for_the_same_seed(client, runtime_model: Model) -> None:
    expected = runtime_model.generate("def add(a, b):", temperature=0.8, seed=5, max_new_tokens=20)
    got = client.completions.create(model="tiny", prompt="def add(a, b):", temperature=0.8, seed=5, max_tokens=20)
    assert got.choices[0].text == expected.text
    assert got.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert got.usage.prompt_tokens == expected.prompt_tokens and got.usage.completion_tokens == len(expected.token_ids)
    stream = client.completions.create(model="tiny", prompt="def add(a, b):", temperature=0.8, seed=5, max_tokens=20,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids) and chunks[-1].choices == []


def test_completion_defaults_to_16_tokens_and_takes_token_ids(client, runtime_model: Model) -> None:
    ids = runtime_model.encode("Hello world")
    got = client.completions.create(model="tiny", prompt=ids, temperature=0, extra_body={"top_k": 1})
    expected = runtime_model.generate(ids, temperature=0, max_new_tokens=16)
    assert got.choices[0].text == expected.text and got.usage.completion_tokens == len(expected.token_ids) <= 16


def test_chat_equals_generate_on_the_rendered_template(client, runtime_model: Model) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好 😀 hello"}]
    ids = chat_ids(runtime_model, messages)
    expected = runtime_model.generate(ids, temperature=0.7, seed=11, max_new_tokens=24, stop_strings=("\nUser:",))
    got = client.chat.completions.create(model="tiny", messages=messages, temperature=0.7, seed=11, max_tokens=24)
    assert got.choices[0].message.content == expected.text and got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="tiny", messages=messages, temperature=0.7, seed=11, max_tokens=24,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_n_choices_each_get_their_own_seed(client, runtime_model: Model) -> None:
    got = client.completions.create(model="tiny", prompt="Hello", temperature=1.0, seed=40, max_tokens=8, n=3,
                                    extra_body={"ignore_eos": True})
    texts = [c.text for c in sorted(got.choices, key=lambda c: c.index)]
    assert texts == [runtime_model.generate("Hello", temperature=1.0, seed=40 + j, max_new_tokens=8,
                                            stop_token_ids=()).text
                     for j in range(3)]
    assert all(c.finish_reason == "length" for c in got.choices)  # ignore_eos: the budget always runs out
    assert got.usage.prompt_tokens == len(runtime_model.encode("Hello")) and got.usage.completion_tokens == 24
    two = client.completions.create(model="tiny", prompt=["Hello", "def f():"], temperature=0, max_tokens=4, n=2,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[2].text == runtime_model.generate("def f():", temperature=0, max_new_tokens=4,
                                                         stop_token_ids=()).text
    assert two.usage.prompt_tokens == len(runtime_model.encode("Hello")) + len(runtime_model.encode("def f():"))


def test_sampling_fields_and_stop_strings_reach_the_sampler(client, runtime_model: Model) -> None:
    kw = dict(temperature=0.9, top_p=0.8, presence_penalty=0.5, frequency_penalty=0.3, seed=2)
    ext = dict(top_k=20, min_p=0.05, repetition_penalty=1.2)
    full = runtime_model.generate("The quick", max_new_tokens=30, **kw, **ext)
    stop = full.text[6:9]
    expected = runtime_model.generate("The quick", max_new_tokens=30, stop_strings=(stop,), **kw, **ext)
    got = client.completions.create(model="tiny", prompt="The quick", max_tokens=30, stop=[stop], extra_body=ext, **kw)
    assert got.choices[0].text == expected.text and got.choices[0].finish_reason == "stop"


def test_logprobs_are_the_models_log_probabilities(client, runtime_model: Model) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    got = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=5, logprobs=True,
                                         top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens
    table = runtime_model.next_tokens(chat_ids(runtime_model, messages), k=3)
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx([math.log(p) for _, _, p in table], abs=1e-4)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy took the most likely
    done = client.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=4, logprobs=2)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == done.usage.completion_tokens
    assert "".join(lp.tokens) == done.choices[0].text or "\ufffd" in "".join(lp.tokens)


def test_eight_concurrent_streams_each_equal_a_solo_run(server, client, runtime_model: Model) -> None:
    prompts = [f"Story {i}: once upon a time" for i in range(8)]
    expected = [runtime_model.generate(p, temperature=0.9, seed=i, max_new_tokens=12 + 3 * i).text
                for i, p in enumerate(prompts)]
    got: dict[int, str] = {}

    def one(i: int) -> None:
        stream = client.completions.create(model="tiny", prompt=prompts[i], temperature=0.9, seed=i,
                                           max_tokens=12 + 3 * i, stream=True)
        got[i] = "".join(c.choices[0].text for c in stream if c.choices)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got.get(i) for i in range(8)] == expected


def test_json_schema_output_always_parses_and_validates(client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(20):
        got = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Who?"}], seed=seed,
                                             temperature=1.0, max_tokens=100, response_format=fmt)
        assert got.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(got.choices[0].message.content), SCHEMA)


def test_disconnect_mid_stream_frees_the_row(server, runtime_model: Model, monkeypatch) -> None:
    url, state = server
    batcher = state.models["tiny"].batcher
    step = batcher._decode_step

    def paced_step() -> None:  # the tiny model would finish all 110 tokens before the client reads its third line
        time.sleep(0.005)
        step()

    monkeypatch.setattr(batcher, "_decode_step", paced_step)
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 110, "temperature": 1.0, "seed": 1, "stream": True,
            "ignore_eos": True}
    steps_before = batcher.steps
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert batcher.active == 1
    deadline = time.monotonic() + 5
    while batcher.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.active == 0 and batcher.steps - steps_before < 100  # cancelled, not run to the end


def test_the_cli_serves_prints_its_url_and_stops_on_ctrl_c(runtime_bundle: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "gptedge.cli", "serve", f"tiny={runtime_bundle}", "--port", "0",
                             "--threads", "1", "--provider", "cpu"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = None
        for line in proc.stderr:
            if "ready at" in line:
                url = line.split("ready at ")[1].split("/ ")[0]
                break
        assert url, "the server never said where it listens"
        got = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).completions.create(
            model="tiny", prompt="Hi", max_tokens=3, temperature=0)
        assert got.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        proc.kill()
