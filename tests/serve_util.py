"""A live gptedge server on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from gptedge.runtime.serve.app import ServeConfig, ServerState, create_app
from gptedge.runtime.serve.cli import bind


@contextlib.contextmanager
def live_server(bundle: Path, state_class=ServerState, **settings) -> Iterator[tuple[str, ServerState]]:
    import uvicorn

    settings = {"provider": "cpu", "threads": 1, "parallel": 4, **settings}
    config = ServeConfig(bundles=[("tiny", bundle)], **settings)
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    state = state_class(config)
    server = uvicorn.Server(uvicorn.Config(create_app(config, state), log_level="warning", timeout_keep_alive=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield url, state
    finally:
        server.should_exit = True
        thread.join(20)


def wait_ready(url: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{url} did not become ready in {timeout} s")
