"""Multi-process data parallelism under torchrun: process group, device choice, rank-0-first work.

`torchrun --nproc_per_node N -m gptedge.train.cli ...` starts N copies of the
trainer with RANK/WORLD_SIZE/LOCAL_RANK set. Each holds a full model; DDP
averages gradients across ranks, so with each rank computing the mean loss of
its shard the update equals a single process's on the union of the shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from gptedge import errors
from gptedge.errors import GptEdgeError, UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main rank writes checkpoints and shows progress."""
        return self.rank == 0


def env_from_environ() -> DistEnv:
    """Read torchrun's variables; a plain `python` run is rank 0 of 1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv()
    return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(name: str, env: DistEnv) -> torch.device:
    """auto -> CUDA (one GPU per local rank), else MPS, else CPU; an unavailable explicit choice is a UsageError."""
    if name not in ("auto", "cpu", "cuda", "mps"):
        raise UsageError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() and not env.enabled else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but this PyTorch has no usable CUDA GPU; "
                             "use --device auto or cpu")
        if env.local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {env.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                             "use fewer processes per node")
        return torch.device("cuda", env.local_rank)
    if name == "mps":
        if not _mps_available():
            raise UsageError("--device mps was asked for but MPS is not available; use --device auto or cpu")
        if env.enabled:
            raise UsageError("multi-process training on MPS is not supported by PyTorch; "
                             "run one process or use --device cpu")
    return torch.device(name)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def init(env: DistEnv, device: torch.device) -> None:
    """Join the process group: NCCL between GPUs, gloo between CPU processes."""
    if env.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        # Every rank reaches this point before any tears the group down: a rank that destroys it while a
        # peer's gloo threads still talk to it can abort that peer ("terminate called without an active exception").
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum of `t` over ranks (in place); identity for one process."""
    if env.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def rank0_first(env: DistEnv, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on the other ranks, which then find its cached results.

    Used for work that writes caches (tokenizer training, tokenization). If rank 0 fails,
    the others raise the same error instead of waiting forever in a collective.
    """
    if not env.enabled:
        return fn()
    failure: list[tuple[str, str] | None] = [None]
    if env.is_main:
        try:
            result = fn()
        except Exception as exc:  # report any failure to the other ranks, then re-raise it here
            failure[0] = (type(exc).__name__, str(exc))
            dist.broadcast_object_list(failure, src=0)
            raise
        dist.broadcast_object_list(failure, src=0)
        return result
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        name, message = failure[0]
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, GptEdgeError):
            raise cls(message)
        raise GptEdgeError(f"rank 0 failed: {name}: {message}")
    return fn()
