"""Freeze examples/desktop_chat.py into a one-folder app from this clone: `python scripts/freeze_app.py OUT_DIR`.

PyInstaller cannot see an editable install (`pip install -e .` maps `gptedge` onto this clone's folders through an
import hook, not a folder on sys.path), so this builds gptedge's wheel, unpacks it into OUT_DIR/site, and runs
examples/desktop_chat.spec with that folder on PYTHONPATH: what an app's build machine, where gptedge is
pip-installed, gets from `pyinstaller examples/desktop_chat.spec` directly. Prints the app folder's path.
Needs PyInstaller (in the dev extra) and the runtime's packages in this Python.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "examples" / "desktop_chat.spec"


def run(command: list[str], **kwargs) -> None:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode:
        sys.exit(f"freeze_app: {' '.join(command[:4])} ... failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")


def freeze(out: Path) -> Path:
    """Wheel -> OUT/site -> PyInstaller; returns OUT/dist/desktop_chat."""
    out = out.resolve()
    for name in ("wheel", "site", "work", "dist"):
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out / "wheel"), str(ROOT)])
    wheel = next((out / "wheel").glob("gptedge-*.whl"))
    run([*pip, "install", "--no-deps", "--target", str(out / "site"), str(wheel)])
    env = {**os.environ, "PYTHONPATH": str(out / "site")}
    run([sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN", "--distpath", str(out / "dist"),
         "--workpath", str(out / "work"), str(SPEC)], cwd=out, env=env)
    return out / "dist" / "desktop_chat"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="build folder (wheel/, site/, work/, dist/ are written under it)")
    print(freeze(parser.parse_args().out))


if __name__ == "__main__":
    main()
