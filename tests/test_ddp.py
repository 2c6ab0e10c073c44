"""Data-parallel training for real: torchrun with 2 CPU processes (gloo) against one process, same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptedge.train.checkpoint import load_checkpoint, read_config
from gptedge.train.trainer import TrainConfig, iter_metrics, train


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(train_corpus: Path, train_cache: Path, tmp_path: Path) -> None:
    steps, batch = 8, 4
    # One process: 2 micro-batches of 4 per step. Two processes: 1 micro-batch of 4 each. Same 8 windows per step.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(TrainConfig(out=str(tmp_path / "single"), data=[str(train_corpus)], preset="tiny", steps=steps,
                                   batch_size=batch, grad_accum=2, eval_every=4, eval_batches=2,
                                   cache_dir=str(train_cache), progress=False))
    finally:
        torch.set_num_threads(threads)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gptedge.train.cli", str(train_corpus), "--out", str(tmp_path / "ddp"), "--preset", "tiny",
           "--steps", str(steps), "--batch-size", str(batch), "--eval-every", "4", "--eval-batches", "2",
           "--cache-dir", str(train_cache), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("checkpoint:") == 1  # only rank 0 reports
    assert "x 2 processes" in proc.stderr

    ddp = tmp_path / "ddp"
    assert read_config(ddp)["tokens_seen"] == read_config(single)["tokens_seen"] == steps * 2 * batch * 64
    curve = lambda folder, key: [r[key] for r in iter_metrics(folder) if key in r]  # noqa: E731
    one, two = curve(single, "loss"), curve(ddp, "loss")
    assert len(one) == len(two) == steps
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-3 * abs(a)
    assert curve(single, "val_loss") == pytest.approx(curve(ddp, "val_loss"), rel=1e-4)
    pa, pb = load_checkpoint(single)[0].state_dict(), load_checkpoint(ddp)[0].state_dict()
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) <= 1e-4
