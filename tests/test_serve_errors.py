"""Bad, hostile and unlucky requests get OpenAI-shaped errors with the right status, and the server keeps serving."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from gptedge.runtime.serve.app import ServerState
from serve_util import live_server, wait_ready

OK = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}

# (name, path, json body or raw bytes, status, error code or None, param or None)
CASES = [
    ("not json", "/v1/completions", b"{not json", 400, None, None),
    ("not an object", "/v1/completions", [1, 2], 400, None, None),
    ("unknown model", "/v1/completions", {**OK, "model": "nope"}, 404, "model_not_found", "model"),
    ("model not a string", "/v1/completions", {**OK, "model": 3}, 400, None, "model"),
    ("negative max_tokens", "/v1/completions", {**OK, "max_tokens": -5}, 400, None, "max_tokens"),
    ("max_tokens a string", "/v1/completions", {**OK, "max_tokens": "10"}, 400, None, "max_tokens"),
    ("max_tokens past the context", "/v1/completions", {**OK, "max_tokens": 10_000}, 400, "context_length_exceeded",
     "prompt"),
    ("max_completion_tokens zero", "/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, 400, None,
     "max_completion_tokens"),
    ("temperature negative", "/v1/completions", {**OK, "temperature": -1}, 400, None, "temperature"),
    ("temperature true", "/v1/completions", {**OK, "temperature": True}, 400, None, "temperature"),
    ("top_p above one", "/v1/completions", {**OK, "top_p": 2}, 400, None, "top_p"),
    ("presence_penalty out of range", "/v1/completions", {**OK, "presence_penalty": 3}, 400, None, "presence_penalty"),
    ("seed negative", "/v1/completions", {**OK, "seed": -1}, 400, None, "seed"),
    ("n zero", "/v1/completions", {**OK, "n": 0}, 400, None, "n"),
    ("n huge", "/v1/completions", {**OK, "n": 1000}, 400, None, "n"),
    ("logprobs too many", "/v1/completions", {**OK, "logprobs": 50}, 400, None, "logprobs"),
    ("top_logprobs without logprobs", "/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, None, "top_logprobs"),
    ("stop of ints", "/v1/completions", {**OK, "stop": [1, 2]}, 400, None, "stop"),
    ("empty prompt", "/v1/completions", {**OK, "prompt": ""}, 400, None, "prompt"),
    ("prompt ids outside the vocabulary", "/v1/completions", {**OK, "prompt": [1, 99999999]}, 400, None, "prompt"),
    ("prompt of objects", "/v1/completions", {**OK, "prompt": {"a": 1}}, 400, None, "prompt"),
    ("no messages", "/v1/chat/completions", {"model": "tiny"}, 400, None, "messages"),
    ("unknown role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, None,
     "messages"),
    ("image content", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, None,
     "messages"),
    ("bad response_format", "/v1/chat/completions", {**CHAT, "response_format": {"type": "yaml"}}, 400, None,
     "response_format"),
    ("unenforceable schema", "/v1/chat/completions",
     {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     400, None, "response_format"),
    ("stream not a bool", "/v1/completions", {**OK, "stream": "yes"}, 400, None, "stream"),
    ("file path as model", "/v1/completions", {**OK, "model": "../../etc/passwd"}, 404, "model_not_found", "model"),
    # Nested past the JSON parser's recursion limit, and past gptedge's own bound but within the parser's.
    ("nested 5000 deep", "/v1/chat/completions", b'{"a":' * 5000 + b"1" + b"}" * 5000, 400, "too_deep", None),
    ("nested 65 deep", "/v1/chat/completions",
     {**CHAT, "metadata": json.loads('{"a":' * 64 + "1" + "}" * 64)}, 400, "too_deep", None),
]


@pytest.fixture(scope="module")
def server(runtime_bundle: Path):
    with live_server(runtime_bundle, max_body_bytes=1 << 20, body_timeout_s=1.0) as (url, state):
        wait_ready(url)
        yield url


def _post(url: str, path: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    return httpx.post(url + path, json=body, timeout=30)


@pytest.mark.parametrize("name, path, body, status, code, param", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_the_documented_status(server: str, name, path, body, status, code, param) -> None:
    response = _post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"]
    if code:
        assert error["code"] == code
    if param:
        assert error["param"] == param, error


def test_routes_sizes_and_slow_clients(server: str) -> None:
    assert httpx.get(server + "/v1/completions").status_code == 405
    missing = httpx.get(server + "/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    huge = httpx.post(server + "/v1/completions", json={**OK, "prompt": "x" * (10 * 2**20)}, timeout=30)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    port = int(server.rsplit(":", 1)[1])
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{")
    assert _post(server, "/v1/completions", OK).status_code == 200  # others are served while one client dawdles
    slow.settimeout(10)
    reply = slow.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 408"), reply
    slow.close()


def test_the_server_keeps_serving_after_all_of_that(server: str) -> None:
    threads = [threading.Thread(target=_post, args=(server, p, b)) for _, p, b, *_ in CASES]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    response = _post(server, "/v1/completions", OK)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(server + "/health").json()["models"]["tiny"] == {"active": 0, "waiting": 0}


def test_api_key_is_required_and_compared(runtime_bundle: Path) -> None:
    with live_server(runtime_bundle, api_key="s3cret") as (url, _):
        wait_ready(url)
        assert httpx.get(url + "/health").status_code == 200  # health and the page need no key
        assert httpx.get(url + "/").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.post(url + "/v1/completions", json=OK, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models").status_code == 401
        ok = httpx.post(url + "/v1/completions", json=OK, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_cors_is_closed_unless_an_origin_is_given(runtime_bundle: Path) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with live_server(runtime_bundle) as (url, _):
        wait_ready(url)
        assert "access-control-allow-origin" not in httpx.options(url + "/v1/completions", headers=preflight).headers
    with live_server(runtime_bundle, cors_origins=["https://app.example"]) as (url, _):
        wait_ready(url)
        allowed = httpx.options(url + "/v1/completions", headers=preflight)
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"


def test_full_queue_is_503_and_loading_is_503(runtime_bundle: Path) -> None:
    with live_server(runtime_bundle, parallel=1, max_queue=0) as (url, _):
        wait_ready(url)
        response = httpx.post(url + "/v1/completions", json=OK)
        assert response.status_code == 503 and response.json()["error"]["code"] == "queue_full"

    release = threading.Event()

    class SlowLoad(ServerState):
        def load(self) -> None:
            release.wait(30)
            super().load()

    with live_server(runtime_bundle, state_class=SlowLoad) as (url, _):
        deadline = time.monotonic() + 10
        while True:
            try:
                health = httpx.get(url + "/health")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert health.status_code == 503 and health.json()["status"] == "loading"
        early = httpx.post(url + "/v1/completions", json=OK)
        assert early.status_code == 503 and early.json()["error"]["code"] == "loading"
        release.set()
        assert wait_ready(url)["status"] == "ok"
