"""Packaging: one import package `gptedge`, light imports, a CLI whose --help works everywhere."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=kw.pop("cwd", ROOT), **kw)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    test_commands = [line.strip() for b in blocks for line in b.splitlines() if "pytest" in line and "venv" in line]
    assert test_commands, "README.md must show the command that sets up and runs the tests"
    assert test_commands[0] in ci.replace("pip install -q ", "pip install "), \
        "'.ci/run' must run README.md's test command"


@pytest.mark.slow
def test_wheel_holds_only_the_gptedge_package(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("gptedge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"gptedge", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top
    for sub in ("runtime", "export", "quantize", "train"):
        assert f"gptedge/{sub}/__init__.py" in names
    assert "gptedge/runtime/engine.py" in names and "gptedge/train/model.py" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_import_gptedge_is_light():
    code = ("import sys, gptedge, gptedge.cli; "
            "print(sorted(m for m in ('numpy','onnxruntime','torch','onnx') if m in sys.modules))")
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_top_level_help_lists_every_command():
    from gptedge.cli import COMMANDS

    result = _run("-m", "gptedge.cli", "--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("command",
                         ["train", "export", "quantize", "generate", "chat", "next", "eval", "info", "bench", "demo"])
def test_every_command_explains_every_option(command):
    result = _run("-m", "gptedge.cli", command, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    # Every option line ("  --name ...") is followed by help text on the same or the next line.
    for i, line in enumerate(lines):
        m = re.match(r"^\s{2}(-{1,2}[\w-]+)", line)
        if m and m.group(1) not in ("-h", "--help"):
            rest = line[m.end():].strip()
            has_text = (bool(re.search(r"\s{2,}\S", line[m.end():]))
                        or (i + 1 < len(lines) and lines[i + 1].startswith(" " * 8)))
            assert has_text, f"`gptedge {command}` option {m.group(1)} has no help: {line!r} {rest!r}"


def test_unknown_command_fails_with_one_line():
    result = _run("-m", "gptedge.cli", "frobnicate")
    assert result.returncode != 0
    assert "unknown command" in result.stderr or "invalid choice" in result.stderr


@pytest.mark.parametrize("command, module, hint", [
    (["train", "--steps", "1", "--out", "run"], "torch", "pip install torch=="),
    (["quantize", "b", "o", "--eval-text", "x"], "onnx", "gptedge[quantize]"),
    (["serve", "b"], "uvicorn", "gptedge[serve]"),
])
def test_a_missing_extra_is_one_line_saying_what_to_install(tmp_path, command, module, hint):
    code = (f"import sys; sys.modules[{module!r}] = None; from gptedge.cli import main; "
            f"sys.exit(main({command!r}))")
    result = _run("-c", code, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"needs {module}, which is not installed" in lines[0] and hint in lines[0], lines


def test_python_dash_m_gptedge_is_the_cli():
    result = _run("-m", "gptedge", "--version")
    assert result.returncode == 0 and result.stdout.startswith("gptedge ")


@pytest.mark.parametrize("args", [["info", "{bundle}"], ["next", "{bundle}", "x", "--top", "200"],
                                  ["generate", "{bundle}", "Hello", "--max-new-tokens", "60", "--temperature", "0"]])
def test_a_closed_pipe_ends_quietly(runtime_bundle, args):
    argv = [a.replace("{bundle}", str(runtime_bundle)) for a in args]
    proc = subprocess.Popen([sys.executable, "-m", "gptedge", *argv, "--provider", "cpu"] if args[0] != "info" else
                            [sys.executable, "-m", "gptedge", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT)
    proc.stdout.read(1)  # like `| head -c 1`: read a little, then hang up
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()


def test_nothing_at_the_root_shadows_the_installed_package():
    """Python puts the working folder first on sys.path: a folder named gptedge/ at the root would hide an installed
    (non-editable) gptedge from anyone who runs Python there. Every subpackage lives in its own folder, mapped by
    package-dir, the root package's files included (core/)."""
    assert not (ROOT / "gptedge").exists()
    line = next(x for x in (ROOT / "pyproject.toml").read_text().splitlines() if x.startswith("package-dir"))
    mapping = dict(re.findall(r'"([\w.]+)" = "([\w/]+)"', line))
    assert mapping["gptedge"] == "core" and all(not folder.startswith("gptedge") for folder in mapping.values())
    result = _run("-c", "import gptedge, gptedge.runtime, gptedge.cli; print(gptedge.runtime.__name__)")
    assert result.returncode == 0 and result.stdout.strip() == "gptedge.runtime", result.stderr
