"""Faults: processes killed mid-write, a full disk, permission errors. Nothing half-written is ever visible.

`gptedge export` and `gptedge quantize` run as real subprocesses and get SIGKILL at points spread over
their run (export: at each stage it reports on stderr; quantize: at fractions of a measured run).
After every kill the destination still holds the earlier, complete bundle, which loads with its
checksums verified; temporary folders never pile up, and the next run removes them.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gptedge import atomic
from gptedge.errors import GptEdgeError
from gptedge.runtime import Model
from gptedge.runtime.bundle import SPEC_NAME, read_spec

TEMP_PREFIXES = (".tmp-gptedge-", ".old-gptedge-", ".gptedge-quantize-")
RUN_TIMEOUT_S = 180


def temporaries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(TEMP_PREFIXES))


def assert_complete_bundle(folder: Path, spec_bytes: bytes | None = None) -> None:
    """A whole bundle: every checksum verified, the model loads and generates; optionally exactly `spec_bytes`."""
    read_spec(folder, verify_checksums=True)
    if spec_bytes is not None:
        assert (folder / SPEC_NAME).read_bytes() == spec_bytes, "the earlier bundle was replaced"
    model = Model.load(folder, provider="cpu", threads=1)
    assert model.generate([1, 2, 3], max_new_tokens=2, temperature=0.0, stop_token_ids=()).token_ids


class Run:
    """A `python -m gptedge.cli ...` subprocess whose stdout and stderr are collected as they arrive."""

    def __init__(self, argv: list[str]) -> None:
        self.start = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "gptedge.cli", *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.stdout = self.stderr = b""
        self._readers = [threading.Thread(target=self._read, args=(name,), daemon=True)
                         for name in ("stdout", "stderr")]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str) -> None:
        stream = getattr(self.proc, name)
        while chunk := stream.read1(4096):
            setattr(self, name, getattr(self, name) + chunk)

    def wait_for(self, text: str, timeout: float = RUN_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.stderr:
            assert self.proc.poll() is None or text.encode() in self.stderr, \
                f"ended before {text!r}: {self.stderr.decode()}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s"
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL the run and anything it started (its own process group)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.finish()

    def finish(self) -> int:
        rc = self.proc.wait(RUN_TIMEOUT_S)
        for reader in self._readers:
            reader.join(10)
        return rc


# -- SIGKILL at points spread over a run ----------------------------------------------------------------------------
# (where, stderr text to wait for (None: from the start), seconds after it)
EXPORT_KILLS = [
    ("importing", None, 0.2),
    ("loading the checkpoint", "loading", 0.0),
    ("mid-trace", "tracing the graph", 1.0),
    ("verifying", "verifying against PyTorch", 0.0),
    ("writing gptedge.json", "writing gptedge.json", 0.0),
]


def test_export_killed_anywhere_leaves_the_earlier_bundle(runtime_checkpoint: Path, runtime_bundle: Path,
                                                          tmp_path: Path) -> None:
    dest = tmp_path / "bundle"
    shutil.copytree(runtime_bundle, dest)
    earlier = (dest / SPEC_NAME).read_bytes()
    previous_leftovers: list[str] = []
    for where, text, delay in EXPORT_KILLS:
        run = Run(["export", str(runtime_checkpoint), str(dest), "--force"])
        if text is not None:
            run.wait_for(text)
        time.sleep(delay)
        run.kill()
        # The rename into place follows the checksum stage; until that stage reported its time, only the
        # earlier bundle (byte for byte) may be there. After it, a run that won the race left a whole new one.
        renamed = re.search(rb"writing gptedge\.json[^\n]*\.\.\. [0-9.]+ s", run.stderr) is not None
        assert_complete_bundle(dest, None if renamed else earlier)
        earlier = (dest / SPEC_NAME).read_bytes()
        leftovers = temporaries(tmp_path)
        assert len(leftovers) <= 1, (where, leftovers)  # each run removed what the killed one before it left
        if b"tracing the graph" in run.stderr:  # this run entered its output folder, so it removed the previous run's
            assert not set(previous_leftovers) & set(leftovers), (where, previous_leftovers, leftovers)
        previous_leftovers = leftovers


def test_quantize_killed_anywhere_leaves_the_earlier_bundle(runtime_bundle: Path, tmp_path: Path) -> None:
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)))
    dest = tmp_path / "out" / "int8"
    argv = ["quantize", str(runtime_bundle), str(dest), "--eval-text", str(heldout), "--max-ppl-increase", "1000",
            "--no-progress", "--force"]
    first = Run(argv)
    assert first.finish() == 0, first.stderr.decode()
    duration = time.monotonic() - first.start
    earlier = (dest / SPEC_NAME).read_bytes()
    for fraction in (0.0, 0.3, 0.55, 0.8, 0.95):
        run = Run(argv)
        time.sleep(max(0.2, fraction * duration))
        run.kill()
        # The gate's table is printed before anything is moved into place: without it, only the earlier bundle.
        renamed = b"perplexity" in run.stdout
        assert_complete_bundle(dest, None if renamed else earlier)
        earlier = (dest / SPEC_NAME).read_bytes()
        assert len(temporaries(dest.parent)) <= 1, (fraction, temporaries(dest.parent))
    last = Run(argv)
    assert last.finish() == 0, last.stderr.decode()
    assert temporaries(dest.parent) == [], "the next run must remove what killed runs left"
    assert_complete_bundle(dest)


# -- a full disk -----------------------------------------------------------------------------------------------------
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving_a_checkpoint(runtime_checkpoint: Path, runtime_gpt, tmp_path: Path,
                                             monkeypatch) -> None:
    from gptedge.train import checkpoint

    dest = tmp_path / "ckpt"
    shutil.copytree(runtime_checkpoint, dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    monkeypatch.setattr(checkpoint, "save_file", _no_space)  # the weights write, inside atomic_output_dir's body
    with pytest.raises(GptEdgeError, match="disk full while writing .*; free space and run again"):
        checkpoint.save_checkpoint(dest, runtime_gpt, {}, (dest / "tokenizer.json").read_text(), None, force=True)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert temporaries(tmp_path) == []


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 200 KB tmpfs (needs root and mount); skipped where it cannot be mounted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_really_full_during_quantize(runtime_bundle: Path, tiny_disk: Path) -> None:
    """The quantized model (~0.2 MB, plus scratch copies) does not fit on a 200 KB disk:
    one clear error, nothing left."""
    run = Run(["quantize", str(runtime_bundle), str(tiny_disk / "int8"), "--eval-text", "x = 1\n" * 300,
               "--max-ppl-increase", "1000", "--no-progress"])
    rc = run.finish()
    stderr = run.stderr.decode()
    assert rc == 2 and "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("gptedge")]
    assert len(lines) == 1 and lines[0].startswith("gptedge quantize: error: disk full"), stderr
    assert list(tiny_disk.iterdir()) == []


# -- permission errors (tests run as root, so chmod would not stop them: the calls are made to fail) -------------------
def test_unwritable_parent_is_a_clear_error(runtime_checkpoint: Path, runtime_gpt, tmp_path: Path, monkeypatch) -> None:
    from gptedge.train import checkpoint

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", denied)
    with pytest.raises(GptEdgeError, match="cannot write to .*Permission denied; choose a writable output folder"):
        checkpoint.save_checkpoint(tmp_path / "ckpt", runtime_gpt, {}, "{}", None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("refused", ["old-aside-always", "new-in"])
def test_rename_refused_keeps_the_earlier_output(runtime_checkpoint: Path, runtime_gpt, tmp_path: Path, monkeypatch,
                                                 refused: str) -> None:
    """Replacing an existing folder takes two renames; whichever is refused, the earlier folder is back in place.
    Moving the old one aside is retried (Windows refuses while a file in it is open), then reported as busy."""
    from gptedge.train import checkpoint

    dest = tmp_path / "ckpt"
    shutil.copytree(runtime_checkpoint, dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        moving = "old-aside-always" if Path(src) == dest else "new-in" if ".tmp-gptedge-" in str(src) else None
        if moving == refused:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky_replace)
    monkeypatch.setattr(atomic, "BUSY_WAIT_S", 0.0)
    message = "is in use and cannot be replaced" if refused == "old-aside-always" else "cannot write .*nothing"
    with pytest.raises(GptEdgeError, match=message):
        checkpoint.save_checkpoint(dest, runtime_gpt, {}, (dest / "tokenizer.json").read_text(), None, force=True)
    assert len(calls) == (atomic.BUSY_ATTEMPTS if refused == "old-aside-always" else 3)  # aside, new in, old back
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert temporaries(tmp_path) == []


def test_a_rename_refused_for_a_moment_is_retried(runtime_checkpoint: Path, runtime_gpt, tmp_path: Path,
                                                  monkeypatch) -> None:
    """A virus scanner that holds a file for a moment: the write waits and then replaces the folder."""
    from gptedge.train import checkpoint

    dest = tmp_path / "ckpt"
    shutil.copytree(runtime_checkpoint, dest)
    real_replace, refusals = os.replace, [2]

    def scanner(src, dst):
        if Path(src) == dest and refusals[0]:
            refusals[0] -= 1
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", scanner)
    monkeypatch.setattr(atomic, "BUSY_WAIT_S", 0.0)
    checkpoint.save_checkpoint(dest, runtime_gpt, {"note": "new"}, (dest / "tokenizer.json").read_text(), None,
                               force=True)
    assert refusals == [0] and temporaries(tmp_path) == []


def test_quantize_output_under_a_regular_file(runtime_bundle: Path, tmp_path: Path) -> None:
    from gptedge.quantize import quantize_bundle

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(GptEdgeError, match="cannot write"):
        quantize_bundle(runtime_bundle, blocker / "int8", eval_text="x = 1\n" * 300, progress=False,
                        log=lambda line: None)
    assert blocker.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]
