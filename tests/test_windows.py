"""What a Windows desktop app would hit first, simulated on Linux (no Windows machine is available):

- output into a pipe in a legacy code page (PYTHONIOENCODING=cp1252, as Windows writes redirected output in
  the ANSI code page): every command, a Chinese prompt and Chinese folder names, exit 0, no traceback, and the
  text arrives whole as UTF-8;
- text input under a C locale and CRLF line ends: read as UTF-8, the same as the LF file;
- files held open: Windows refuses to rename or delete them; replacing a loaded bundle fails clearly and leaves
  it whole, replacing another bundle works;
- no POSIX-only calls outside guards, SIGINT-only signal handling, and the cache under the platform's folder.
"""

from __future__ import annotations

import ast
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptedge.errors import GptEdgeError, OutputBusyError

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ["core", "runtime", "export", "quantize", "train"]
CHINESE = "你好，世界。模型"
GPTEDGE = [sys.executable, "-m", "gptedge"]

pytestmark = pytest.mark.slow


def legacy_env(**extra: str) -> dict[str, str]:
    """Redirected output in Windows' ANSI code page, UTF-8 mode off, as a Windows Python without -X utf8 has it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUTF8", "PYTHONIOENCODING")}
    return {**env, "PYTHONIOENCODING": "cp1252", "PYTHONUTF8": "0", **extra}


def run(args: list[str], env: dict[str, str], stdin: bytes | None = None, timeout: float = 300) -> str:
    """Run gptedge with stdout and stderr piped; it must exit 0 without a traceback. Returns stdout, decoded as UTF-8
    (strictly: text that did not arrive whole fails here)."""
    done = subprocess.run([*GPTEDGE, *args], env=env, input=stdin, capture_output=True, timeout=timeout)
    err = done.stderr.decode("utf-8", errors="replace")
    assert done.returncode == 0 and "Traceback" not in err, f"gptedge {args[0]}: rc {done.returncode}\n{err[-3000:]}"
    return done.stdout.decode("utf-8")


@pytest.fixture(scope="module")
def chinese_tree(tmp_path_factory) -> dict[str, Path]:
    """Every folder and file with a Chinese name: corpus, checkpoint, bundle, quantized bundle."""
    root = tmp_path_factory.mktemp("windows") / "数据"
    root.mkdir()
    corpus = root / "语料.txt"
    corpus.write_bytes(("def 加(a, b):\r\n    return a + b  # 你好，世界\r\n\r\n" * 300).encode("utf-8"))
    return {"root": root, "corpus": corpus, "checkpoint": root / "训练", "bundle": root / "模型",
            "int8": root / "量化"}


def test_every_command_survives_a_legacy_code_page_pipe(chinese_tree) -> None:
    t, env = chinese_tree, legacy_env(GPTEDGE_CACHE=str(chinese_tree["root"] / "缓存"))
    out = run(["train", str(t["corpus"]), "--out", str(t["checkpoint"]), "--preset", "tiny", "--steps", "4",
               "--eval-every", "0", "--cache-dir", str(t["root"] / "缓存"), "--no-progress"], env)
    assert f"checkpoint: {t['checkpoint']}" in out  # the Chinese folder name, whole, through a cp1252 pipe
    assert "模型" in run(["export", str(t["checkpoint"]), str(t["bundle"]), "--quiet"], env)
    assert "量化" in run(["quantize", str(t["bundle"]), str(t["int8"]), "--eval-text", str(t["corpus"]),
                         "--max-ppl-increase", "1000", "--no-progress"], env)
    bundle = str(t["int8"])
    text = run(["generate", bundle, CHINESE, "--max-new-tokens", "16", "--temperature", "0"], env)
    from gptedge.runtime import Model

    expected = Model.load(bundle, provider="cpu", threads=1).generate(CHINESE, max_new_tokens=16, temperature=0.0)
    assert text == expected.text + "\n"  # the whole text, not '?' for what cp1252 lacks
    run(["chat", bundle, "--max-new-tokens", "8"], env, stdin=f"{CHINESE}\n".encode("utf-8"))
    run(["next", bundle, CHINESE], env)
    run(["eval", bundle, str(t["corpus"])], env)
    assert "训练" in run(["info", bundle], env)  # provenance names the checkpoint folder
    run(["bench", bundle, "--runs", "1", "--prompt-tokens", "8", "--new-tokens", "4", "--late-position", "16"], env)


def test_serve_prints_chinese_names_into_a_legacy_pipe(chinese_tree) -> None:
    bundle = chinese_tree["int8"]
    if not bundle.exists():
        pytest.skip("needs the bundle of test_every_command_survives_a_legacy_code_page_pipe")
    proc = subprocess.Popen([*GPTEDGE, "serve", str(bundle), "--port", "0"], env=legacy_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    try:
        while not seen or b"ready at http://127.0.0.1:" not in seen[-1]:
            line = proc.stderr.readline()
            assert line, b"".join(seen).decode(errors="replace")
            seen.append(line)
    finally:
        proc.terminate()
        _, rest = proc.communicate(timeout=30)
    err = (b"".join(seen) + rest).decode("utf-8")  # strict: the names arrived whole
    assert "量化" in err and "Traceback" not in err


def test_text_input_is_utf8_and_crlf_whatever_the_locale(runtime_bundle, tmp_path: Path) -> None:
    """LC_ALL=C and UTF-8 mode off: files and standard input are still read as UTF-8, and CRLF as LF."""
    text = "def add(a, b):\n    return a + b  # 你好，世界 😀\n\n" * 20
    lf, crlf = tmp_path / "lf.txt", tmp_path / "crlf.txt"
    lf.write_bytes(text.encode("utf-8"))
    crlf.write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    env = {**legacy_env(LC_ALL="C", LANG="C")}
    env.pop("PYTHONIOENCODING")
    evals = [run(["eval", str(runtime_bundle), str(f)], env) for f in (lf, crlf)]
    assert evals[0].split("|")[0] == evals[1].split("|")[0]  # the same perplexity
    prompt = "def add(a, b):\n    return"
    outs = [run(["generate", str(runtime_bundle), "-", "--max-new-tokens", "12", "--temperature", "0"], env,
                stdin=p.encode("utf-8")) for p in (prompt, prompt.replace("\n", "\r\n"))]
    assert outs[0] == outs[1]
    probe = ("import sys; from pathlib import Path; from gptedge.quantize.texts import read_text; "
             "from gptedge.train.data import read_sources; "
             "a = read_text([sys.argv[1]])[0], read_sources([Path(sys.argv[1])]).texts; "
             "b = read_text([sys.argv[2]])[0], read_sources([Path(sys.argv[2])]).texts; "
             "print(a == b, '\\u4f60\\u597d' in a[0])")  # escapes: a C locale cannot decode a Chinese argv
    done = subprocess.run([sys.executable, "-c", probe, str(lf), str(crlf)], env=env, capture_output=True)
    assert done.stdout.decode("utf-8").split() == ["True", "True"], done.stderr.decode(errors="replace")


# --------------------------------------------------------------------------------------------- files held open
class WindowsFiles:
    """os.replace and shutil.rmtree the way Windows treats a folder with an open file in it: renaming it is refused,
    deleting it removes what is not open and leaves the rest (ignore_errors) or raises."""

    def __init__(self, monkeypatch) -> None:
        self.open: set[Path] = set()
        real_replace, real_rmtree = os.replace, shutil.rmtree

        def holds(path) -> bool:
            path = Path(path).resolve()
            return any(path == p or path in p.parents for p in self.open)

        def replace(src, dst, *args, **kwargs):
            if holds(src) or holds(dst):
                raise PermissionError(errno.EACCES, "The process cannot access the file because it is being used "
                                                    "by another process", str(src))
            return real_replace(src, dst, *args, **kwargs)

        def rmtree(path, ignore_errors=False, *args, **kwargs):
            if holds(path):
                if ignore_errors:
                    return
                raise PermissionError(errno.EACCES, "being used by another process", str(path))
            return real_rmtree(path, ignore_errors, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(shutil, "rmtree", rmtree)
        monkeypatch.setattr("gptedge.atomic.BUSY_WAIT_S", 0.01)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_loaded_bundle_is_never_half_replaced(runtime_checkpoint, runtime_bundle, tmp_path: Path,
                                                monkeypatch) -> None:
    from gptedge.export.exporter import export_bundle
    from gptedge.quantize import quantize_bundle
    from gptedge.runtime import Model

    loaded = Path(shutil.copytree(runtime_bundle, tmp_path / "loaded"))
    other = Path(shutil.copytree(runtime_bundle, tmp_path / "other"))
    before = snapshot(loaded)
    model = Model.load(loaded, provider="cpu", threads=1)
    files = WindowsFiles(monkeypatch)
    files.open.add(loaded.resolve())  # the app holds the loaded bundle's files open
    with pytest.raises(OutputBusyError, match="is in use and cannot be replaced.*Nothing was changed"):
        export_bundle(runtime_checkpoint, loaded, force=True, progress=False)
    with pytest.raises(OutputBusyError, match="is in use"):
        quantize_bundle(other, loaded, eval_text="def add(a, b):\n    return a + b\n" * 200,
                        max_ppl_increase=1000.0, force=True, progress=False, log=lambda _: None)
    assert snapshot(loaded) == before  # the old bundle, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loaded", "other"]  # no temporary folder left
    # Another bundle is replaced while this one stays loaded, and the loaded model keeps working.
    export_bundle(runtime_checkpoint, other, force=True, progress=False)
    assert model.generate("def", max_new_tokens=4, temperature=0.0).token_ids
    # The destination is only ever the old or the new bundle: a new bundle whose rename is refused (a scanner
    # holding a fresh file) puts the old one back.
    files.open.clear()
    real_replace = os.replace
    calls = []

    def refuse_the_new(src, dst, *args, **kwargs):
        calls.append(Path(src).name)
        if Path(src).name.startswith(".tmp-gptedge-"):
            raise PermissionError(errno.EACCES, "being used by another process", str(src))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refuse_the_new)
    before = snapshot(other)
    with pytest.raises(GptEdgeError, match="cannot write .*nothing was written"):
        export_bundle(runtime_checkpoint, other, force=True, progress=False)
    assert snapshot(other) == before and any(c.startswith(".tmp-gptedge-") for c in calls)


def test_a_stale_old_folder_left_by_windows_is_removed_by_the_next_write(runtime_checkpoint, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """Windows keeps a file that is still open after its folder was renamed aside: the .old folder stays until the
    next write of that destination, which removes it."""
    from gptedge.export.exporter import export_bundle

    out = export_bundle(runtime_checkpoint, tmp_path / "b", progress=False)
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda p, ignore_errors=False, *a, **k: None
                        if ".old-gptedge-" in str(p) else real_rmtree(p, ignore_errors, *a, **k))
    export_bundle(runtime_checkpoint, out, force=True, progress=False)
    assert any(p.name.startswith(".old-gptedge-b-") for p in tmp_path.iterdir())
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    export_bundle(runtime_checkpoint, out, force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# --------------------------------------------------------------------------------------------- portable code
POSIX_ONLY = {("os", "getuid"), ("os", "geteuid"), ("os", "getgid"), ("os", "fork"), ("os", "forkpty"),
              ("os", "killpg"), ("os", "setsid"), ("os", "getpgid"), ("os", "uname"), ("os", "sync"),
              ("os", "mkfifo"), ("os", "sched_getaffinity"), ("os", "sched_setaffinity"), ("signal", "SIGKILL"),
              ("signal", "SIGALRM"), ("signal", "alarm"), ("signal", "SIGHUP"), ("signal", "SIGUSR1"),
              ("signal", "SIGTERM"), ("signal", "setitimer")}
POSIX_MODULES = {"fcntl", "pwd", "grp", "termios", "resource", "posix"}


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside `if os.name == ...` / `sys.platform` / `hasattr(...)`, after such an early return, or in a try that
    catches ImportError / AttributeError / OSError."""
    child, node = node, parents.get(node)
    while node is not None:
        if isinstance(node, ast.If) and any(s in ast.unparse(node.test) for s in ("os.name", "sys.platform",
                                                                                   "hasattr(")):
            return True
        if isinstance(node, ast.Try) and child in node.body and any(
                h.type is not None and any(e in ast.unparse(h.type) for e in ("ImportError", "AttributeError",
                                                                              "OSError", "Exception"))
                for h in node.handlers):
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module)):
            body = node.body
            position = next((i for i, s in enumerate(body) if s is child), len(body))
            for earlier in body[:position]:  # `if os.name == "nt": ... return` before the POSIX branch
                if isinstance(earlier, ast.If) and any(s in ast.unparse(earlier.test) for s in ("os.name",
                                                                                                "sys.platform",
                                                                                                "hasattr(")):
                    if any(isinstance(x, (ast.Return, ast.Raise)) for x in ast.walk(earlier)):
                        return True
        child, node = node, parents.get(node)
    return False


def _findings() -> list[str]:
    found = []
    for folder in PACKAGE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
            where = f"{path.relative_to(ROOT)}"
            for node in ast.walk(tree):
                hit = None
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                        and (node.value.id, node.attr) in POSIX_ONLY:
                    hit = f"{node.value.id}.{node.attr}"
                elif isinstance(node, ast.Import):
                    hit = next((a.name for a in node.names if a.name.split(".")[0] in POSIX_MODULES), None)
                elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in POSIX_MODULES:
                    hit = node.module
                elif isinstance(node, ast.Call) and ast.unparse(node.func) == "signal.signal" \
                        and "SIGINT" not in ast.unparse(node.args[0]):
                    hit = f"signal.signal({ast.unparse(node.args[0])})"
                if hit and not _guarded(node, parents):
                    found.append(f"{where}:{node.lineno}: {hit}")
    return found


def test_no_posix_only_calls_outside_guards() -> None:
    assert _findings() == []


def test_the_scan_finds_what_it_looks_for(tmp_path: Path, monkeypatch) -> None:
    """The scan is not vacuous: unguarded POSIX-only code in a package folder is reported, guarded code is not."""
    folder = tmp_path / "core"
    folder.mkdir()
    (folder / "bad.py").write_text("import os, signal, fcntl\nos.getuid()\nsignal.signal(signal.SIGTERM, None)\n"
                                   "if os.name != 'nt':\n    os.fork()\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIRS", ["core"])
    found = _findings()
    assert any("fcntl" in f for f in found) and any("os.getuid" in f for f in found)
    assert any("SIGTERM" in f for f in found) and not any("os.fork" in f for f in found)


@pytest.mark.parametrize("platform, env, expected", [
    ("win32", {"LOCALAPPDATA": r"C:\Users\李\AppData\Local"}, r"C:\Users\李\AppData\Local/gptedge"),
    ("darwin", {}, "Library/Caches/gptedge"),
    ("linux", {"XDG_CACHE_HOME": "/home/li/.cache"}, "/home/li/.cache/gptedge"),
])
def test_cache_goes_under_the_platform_cache_folder(platform: str, env: dict, expected: str,
                                                    monkeypatch) -> None:
    from gptedge.runtime import providers

    monkeypatch.delenv("GPTEDGE_CACHE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "platform", platform)
    assert str(providers.cache_root()).endswith(expected)


def test_cache_names_stay_short(runtime_bundle, tmp_path: Path, monkeypatch) -> None:
    """Windows' 260-character path limit: what gptedge adds under the cache folder is a short, fixed-length name."""
    from gptedge.runtime import Model

    monkeypatch.setenv("GPTEDGE_CACHE", str(tmp_path))
    Model.load(runtime_bundle, provider="cpu", threads=1)
    names = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")]
    assert names and max(len(n) for n in names) <= 80, names


def test_ctrl_c_in_chat_is_sigint_and_ends_cleanly(runtime_bundle) -> None:
    """Ctrl-C is SIGINT on a Windows console too (KeyboardInterrupt), and gptedge installs no other handler
    (scanned above): an interrupted `chat` waiting for input says goodbye and exits 0, no traceback."""
    import signal

    proc = subprocess.Popen([*GPTEDGE, "chat", str(runtime_bundle), "--max-new-tokens", "16"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stderr.readline()  # "chatting with ...": the model is loaded and chat waits for input
        assert b"chatting with" in line, line
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode(errors="replace")
