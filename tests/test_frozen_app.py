"""The desktop example frozen by PyInstaller (examples/desktop_chat.spec) into a one-folder app, run for real:
its headless self-test prints the API's greedy text, its folder carries no torch or onnx, and its window,
started under Xvfb, streams an answer (screenshot kept in build/test-artifacts/)."""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gptedge.runtime import Model

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "desktop_chat.py"
ARTIFACTS = ROOT / "build" / "test-artifacts"
SIZE_LIMIT_MB = 150

pytestmark = pytest.mark.slow


def example():
    """examples/desktop_chat.py as a module (it is a script to copy, not part of the package)."""
    spec = importlib.util.spec_from_file_location("desktop_chat", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def freeze(dest: Path) -> Path:
    """Run the documented recipe (scripts/freeze_app.py: wheel, then examples/desktop_chat.spec); the app folder."""
    if importlib.util.find_spec("PyInstaller") is None:
        pytest.skip("PyInstaller is not installed (pip install -e .[dev])")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "freeze_app.py"), str(dest)],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Path:
    return freeze(tmp_path_factory.mktemp("frozen"))


def binary(app: Path) -> Path:
    return app / ("desktop_chat.exe" if os.name == "nt" else "desktop_chat")


def folder_mb(folder: Path) -> float:
    """Bytes of the files themselves (PyInstaller links some libraries to their copy: counted once)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def test_selftest_prints_the_apis_greedy_text(app: Path, runtime_bundle: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}  # the frozen app's own Python only
    done = subprocess.run([str(binary(app)), "--selftest", str(runtime_bundle)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    expected = Model.load(runtime_bundle, provider="cpu", threads=1).generate(
        example().SELFTEST_PROMPT, max_new_tokens=32, temperature=0.0).text
    assert report["text"] == expected and report["same_as_generate"] and report["provider"] == "cpu"
    assert expected  # a real answer, not an empty one


def test_frozen_folder_has_no_torch_or_onnx_and_is_small(app: Path) -> None:
    names = {p.name for p in app.rglob("*")}
    for heavy in ("torch", "onnx", "transformers", "onnxscript"):
        assert heavy not in names, f"{heavy} was frozen into the app"
    assert any(n.startswith("onnxruntime") for n in names) and "tokenizers" in names
    assert folder_mb(app) < SIZE_LIMIT_MB


@pytest.fixture(scope="module")
def chat_bundle(tmp_path_factory, one_torch_thread) -> Path:
    """A model trained in seconds on one exchange, so the window shows readable text (a random model's bytes
    need not be printable)."""
    from gptedge.export.exporter import export_bundle
    from gptedge.train.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("chat-model")
    corpus = root / "corpus.txt"
    corpus.write_text("User: def add(a, b):\nAssistant: return a + b\n\n" * 400, encoding="utf-8")
    checkpoint = train(TrainConfig(out=str(root / "checkpoint"), data=[str(corpus)], preset="tiny", steps=60,
                                   batch_size=8, lr=3e-3, eval_every=60, eval_batches=1,
                                   cache_dir=str(root / "cache"), progress=False), log=lambda _: None)
    return export_bundle(checkpoint, root / "bundle", progress=False)


@pytest.fixture
def display():
    """A private X server (Xvfb) for the window; skipped where Xvfb is not installed."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("Xvfb is not installed (apt-get install -y xvfb)")
    number = f":{90 + os.getpid() % 500}"
    server = subprocess.Popen([xvfb, number, "-screen", "0", "800x600x24", "-nolisten", "tcp"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = Path(f"/tmp/.X{number[1:]}-lock")
    deadline = time.monotonic() + 20
    while not lock.exists() and time.monotonic() < deadline and server.poll() is None:
        time.sleep(0.1)
    if server.poll() is not None:
        pytest.skip(f"Xvfb {number} did not start")
    time.sleep(0.5)
    yield number
    server.terminate()
    server.wait(timeout=10)


WINDOW = (0, 0, 720, 480)  # where the window opens on the virtual screen


def text_pixels(shot) -> int:
    """Dark pixels in the window: text on the light transcript background."""
    return sum(shot.crop(WINDOW).convert("L").histogram()[:128])


def test_window_streams_an_answer_under_xvfb(app: Path, chat_bundle: Path, display: str) -> None:
    from PIL import ImageGrab, ImageStat

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}, "DISPLAY": display}
    proc = subprocess.Popen([str(binary(app)), str(chat_bundle), "--prompt", "def add(a, b):",
                             "--max-new-tokens", "40", "--temperature", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=120)  # the app prints its JSON report when the answer has finished streaming
        shot = ImageGrab.grab(xdisplay=display)  # before the window closes itself (1.5 s later)
        deadline = time.monotonic() + 1.0
        while text_pixels(shot) <= 2000 and time.monotonic() < deadline:  # the X server may still be drawing
            time.sleep(0.1)
            shot = ImageGrab.grab(xdisplay=display)
        proc.wait(timeout=60)
    except queue.Empty:
        line = ""
    finally:
        if proc.poll() is None:
            proc.kill()
    assert line, proc.stderr.read()[-3000:]
    report = json.loads(line)
    assert "error" not in report, report["error"]
    from gptedge.runtime import CancelToken

    session = example().ChatSession(Model.load(chat_bundle, provider="cpu", threads=1), 40, 0.0)
    expected = "".join(session.stream("def add(a, b):", CancelToken()))
    assert report["answer"] == expected and "return a + b" in expected  # the frozen window answered as the API
    assert "You: def add(a, b):" in report["transcript"]
    assert expected in report["transcript"]  # the streamed pieces are what the window shows
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot.save(ARTIFACTS / "desktop_chat.png")
    assert text_pixels(shot) > 2000, "the window shows almost no text"
    assert ImageStat.Stat(shot.crop(WINDOW).convert("L")).stddev[0] > 10


def test_stop_cancels_the_answer_and_keeps_the_window_usable(runtime_bundle: Path, display: str,
                                                             monkeypatch) -> None:
    """The window in this process (no freezing): Stop right after Send cancels the stream at its next token, the
    transcript says so, the status line reports it, and Send works again."""
    import tkinter as tk

    monkeypatch.setenv("DISPLAY", display)
    root = tk.Tk()
    try:
        window = example().ChatWindow(root, runtime_bundle, max_new_tokens=64, temperature=0.8, threads=1)
        finished: list[str] = []
        window.on_answer = finished.append
        pump(root, lambda: window.session is not None, window)
        window.send("hello")
        window.stop()  # before the worker's first token: the stream ends at once
        pump(root, lambda: bool(finished), window)
        assert window.transcript.get("1.0", "end").rstrip().endswith("[stopped]")
        assert "finish: cancelled" in window.status.cget("text")
        assert str(window.send_button.cget("state")) == "normal" and window.cancel is None
        window.send("again")  # the conversation goes on after a stop
        pump(root, lambda: len(finished) == 2, window)
        assert [m["role"] for m in window.session.messages] == ["user", "assistant", "user", "assistant"]
    finally:
        root.destroy()


def pump(root, done, window, timeout: float = 60.0) -> None:
    """Run Tk's event loop until `done()` (the test's stand-in for mainloop)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"stuck; the window shows {window.transcript.get('1.0', 'end')!r}"
        root.update()
        time.sleep(0.01)
