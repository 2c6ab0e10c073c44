"""README.md's walkthrough runs as written: every line of its first block, in order, in an empty folder."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def walkthrough_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Five minutes", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_walkthrough_block_is_what_the_test_runs() -> None:
    lines = walkthrough_lines()
    assert lines[0].startswith("gptedge train") and any(line.startswith("gptedge quantize") for line in lines)
    assert not any("path/to" in line or line.startswith(("gptedge chat", "gptedge serve")) for line in lines)


@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "GPTEDGE_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    for line in walkthrough_lines():
        result = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, f"{line!r} failed:\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (tmp_path / "run" / "int8" / "gptedge.json").is_file()
