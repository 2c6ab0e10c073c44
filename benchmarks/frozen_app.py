"""What a frozen desktop app costs: `python benchmarks/frozen_app.py`.

Freezes examples/desktop_chat.py with the documented recipe (scripts/freeze_app.py: gptedge's wheel, then
examples/desktop_chat.spec) into a one-folder app, and measures the folder (bytes of its files, links counted
once; the largest parts) and the frozen binary's `--selftest` on the GPT-2-124M-shape INT8 bundle (load, stream
32 greedy tokens, compare with generate()), wall time from process start to exit. Writes
benchmarks/results/frozen-app.json and .md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import HERE, machine, make_random_gpt2
from peers import CACHE, prepare_gptedge

ROOT = HERE.parent
RESULTS = HERE / "results"


def files_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def parts(app: Path, top: int = 8) -> list[tuple[str, float]]:
    """The largest entries of the app's _internal folder, MB."""
    inner = app / "_internal"
    sizes = [(p.name, (files_bytes(p) if p.is_dir() else p.stat().st_size) / 1e6)
             for p in inner.iterdir() if not p.is_symlink()]
    return sorted(sizes, key=lambda x: -x[1])[:top]


def main() -> None:
    root = CACHE / "gpt2-124m"
    bundle = prepare_gptedge(make_random_gpt2(root / "hf"), root, ["int8-weight"], None)["int8-weight"]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "freeze_app.py"), tmp], capture_output=True,
                              text=True, check=True)
        freeze_s = time.perf_counter() - start
        app = Path(done.stdout.strip().splitlines()[-1])
        binary = app / "desktop_chat"
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            out = subprocess.run([str(binary), "--selftest", str(bundle)], capture_output=True, text=True, check=True)
            runs.append(time.perf_counter() - start)
            report = json.loads(out.stdout.strip().splitlines()[-1])
        names = {p.name for p in app.rglob("*")}
        result = {
            **machine(),
            "app_mb": files_bytes(app) / 1e6,
            "largest_parts_mb": dict(parts(app)),
            "has_torch": "torch" in names, "has_onnx": "onnx" in names,
            "freeze_s": freeze_s,
            "selftest_s": sorted(runs)[1], "selftest_runs_s": runs,
            "selftest_same_as_generate": report["same_as_generate"],
            "bundle": "gpt2-124m int8-weight (random weights)",
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "frozen-app.json").write_text(json.dumps(result, indent=1))
    lines = [f"Frozen desktop example (PyInstaller one-folder, {result['versions'].get('onnxruntime')} onnxruntime "
             f"CPU build): **{result['app_mb']:.1f} MB**; torch {'INCLUDED' if result['has_torch'] else 'absent'}, "
             f"onnx {'INCLUDED' if result['has_onnx'] else 'absent'}; built in {freeze_s:.0f} s.", "",
             "| part | MB |", "|---|---:|", *[f"| {k} | {v:.1f} |" for k, v in result["largest_parts_mb"].items()], "",
             f"`--selftest` on the GPT-2-124M-shape INT8 bundle (start, load, 32 greedy tokens streamed and compared "
             f"with generate(), exit): {result['selftest_s']:.2f} s (median of 3); machine: {result['machine']}; "
             f"{result['time']}."]
    (RESULTS / "frozen-app.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
