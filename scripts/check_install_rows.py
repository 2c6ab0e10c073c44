"""Every row of README.md's install table, installed alone into a clean venv, does what the row promises.

    python scripts/check_install_rows.py      (run by .ci/run; a few minutes, mostly pip)

A missing dependency in an extra (the `quantize` extra once lacked onnx-ir, which onnxruntime's
MatMulNBits quantizer imports) shows up only in an install that has nothing else: the test suite's
venv has every extra at once. Each row gets its own venv, a non-editable install from this checkout,
and the commands its row stands for, run from a folder outside the checkout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    print("  $", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)
    if result.returncode != 0:
        raise SystemExit(f"check_install_rows: {' '.join(cmd)} failed ({result.returncode}):\n"
                         f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


def venv(where: Path, name: str, *installs: list[str]) -> Path:
    """A fresh venv with `installs` run in order (each a pip argument list); its bin folder."""
    folder = where / name
    run([sys.executable, "-m", "venv", str(folder)], where)
    bin_dir = folder / ("Scripts" if os.name == "nt" else "bin")
    for args in installs:
        run([str(bin_dir / "python"), "-m", "pip", "install", "-q", *args], where)
    return bin_dir


def absent(bin_dir: Path, modules: list[str], cwd: Path) -> None:
    code = f"import importlib.util as u; missing = [m for m in {modules!r} if u.find_spec(m) is None]; print(missing)"
    out = run([str(bin_dir / "python"), "-c", code], cwd).stdout.strip()
    if out != repr(modules):
        raise SystemExit(f"check_install_rows: the row installed more than it says: {out} (expected all of {modules})")


def serve_answers(bin_dir: Path, bundle: Path, cwd: Path) -> None:
    proc = subprocess.Popen([str(bin_dir / "gptedge"), "serve", f"m={bundle}", "--port", "0", "--threads", "1"],
                            cwd=cwd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            if "ready at" in line:
                url = line.split("ready at ")[1].split("/ ")[0]
        if url is None:
            raise SystemExit("check_install_rows: gptedge serve never became ready")
        with urllib.request.urlopen(url + "/health", timeout=10) as response:
            assert response.status == 200
        print(f"  served {url}/health: 200", flush=True)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gptedge-install-rows-") as tmp:
        work = Path(tmp)
        (work / "held.txt").write_text((ROOT / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
        src = str(ROOT)

        print("row: to train and export (torch first, then .[all])", flush=True)
        bin_all = venv(work, "all", ["torch==2.13.0"], [f"{src}[all]"])
        run([str(bin_all / "gptedge"), "train", "--preset", "tiny", "--steps", "3", "--out", "ckpt"], work)
        run([str(bin_all / "gptedge"), "export", "ckpt", "fp32"], work)
        bundle = work / "fp32"

        print("row: to run bundles (.)", flush=True)
        bin_base = venv(work, "base", [src])
        absent(bin_base, ["torch", "onnx", "jinja2", "starlette"], work)
        out = run([str(bin_base / "gptedge"), "generate", str(bundle), "def f():", "--max-new-tokens", "5",
                   "--temperature", "0"], work).stdout
        print(f"  generated {out.strip()!r}", flush=True)
        run([str(bin_base / "python"), "-c", "from gptedge.runtime import Model; import sys; "
             f"print(Model.load({str(bundle)!r}).generate('x', max_new_tokens=3).text)"], work)

        print("row: to quantize bundles (.[quantize])", flush=True)
        bin_q = venv(work, "quantize", [f"{src}[quantize]"])
        absent(bin_q, ["torch"], work)
        for method in ("int8-weight", "int4-weight", "int8-dynamic", "int8-static"):
            run([str(bin_q / "gptedge"), "quantize", str(bundle), method, "--method", method, "--eval-text", "held.txt",
                 "--max-ppl-increase", "1000", "--no-progress"], work)

        print("row: gptedge chat with templates (.[chat]) / gptedge serve (.[serve])", flush=True)
        bin_chat = venv(work, "chat", [f"{src}[chat]"])
        run([str(bin_chat / "gptedge"), "chat", str(bundle), "--max-new-tokens", "5"], work, input="hello\n")
        bin_serve = venv(work, "serve", [f"{src}[serve]"])
        absent(bin_serve, ["torch", "onnx"], work)
        serve_answers(bin_serve, bundle, work)
    print(f"check_install_rows: every install row works ({time.monotonic() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
