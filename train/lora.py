"""LoRA: trainable low-rank adapters on a frozen model, merged into its weights at export.

A `LoRALinear` keeps the wrapped layer's `weight` and `bias` under their own names (so the base weights save and
load exactly as a plain model's do) and adds `lora_A` [r, in] and `lora_B` [out, r]; its output is
`x W^T + b + (dropout(x) A^T B^T) * alpha / r`. B starts at zero, so an adapted model computes exactly what its
base does until the first step.

Why our own module rather than PEFT's: PEFT wraps layers by module name and expects Hugging Face models; ours
packs q/k/v into one `c_attn` (and gate/up into one `c_fc` for SwiGLU), and a LoRA on a packed projection is a
low-rank update of the packed matrix, which this module expresses in a dozen lines without a dependency.

Targets name which projections get adapters: "attention" (c_attn, and the attention's c_proj), "mlp" (c_fc and
the MLP's c_proj) or "all" (both). The head and the embedding stay frozen and untouched.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gptedge.errors import CheckpointError, UsageError

ADAPTER_FILE = "adapter.safetensors"
TARGETS = {"attention": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}
TARGETS["all"] = TARGETS["attention"] + TARGETS["mlp"]


@dataclass(frozen=True)
class LoRAConfig:
    """How a run adapts its model (recorded in the checkpoint's config.json as "lora")."""

    rank: int = 8  # the update's rank: its size and what it can express
    alpha: float = 16.0  # the update is scaled by alpha / rank, so changing the rank keeps the step size
    targets: str = "all"  # "attention", "mlp" or "all": which projections get adapters
    dropout: float = 0.0  # dropout on the adapters' input only (the frozen path is not dropped)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise UsageError(f"--lora-rank must be an integer >= 1, got {self.rank!r}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise UsageError(f"--lora-alpha must be a positive number, got {self.alpha!r}")
        if self.targets not in TARGETS:
            raise UsageError(f"--lora-targets must be one of {', '.join(TARGETS)}, got {self.targets!r}")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"--lora-dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoRALinear(nn.Module):
    """A linear layer with a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Linear, config: LoRAConfig) -> None:
        super().__init__()
        self.weight = base.weight  # the frozen base parameters, under a plain Linear's names
        self.bias = base.bias
        self.scale = config.alpha / config.rank
        self.lora_A = nn.Parameter(torch.empty(config.rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(self.dropout(x), self.lora_A),
                                                              self.lora_B) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function: W + scale * B A."""
        out_features, in_features = self.weight.shape
        linear = nn.Linear(in_features, out_features, bias=self.bias is not None, device=self.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.scale * (self.lora_B @ self.lora_A))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def _targets(model: nn.Module, config: LoRAConfig) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every projection `config.targets` names."""
    found = []
    for name, module in model.named_modules():
        for suffix in TARGETS[config.targets]:
            parent, _, attr = suffix.rpartition(".")
            if name.endswith(parent) and isinstance(getattr(module, attr, None), (nn.Linear, LoRALinear)):
                found.append((module, attr))
    return found


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze every parameter of `model` and put adapters on the target projections (in place)."""
    model.requires_grad_(False)
    targets = _targets(model, config)
    if not targets:
        raise UsageError(f"the model has no {config.targets} projections to adapt")
    for parent, attr in targets:
        layer = getattr(parent, attr)
        if not isinstance(layer, LoRALinear):
            setattr(parent, attr, LoRALinear(layer, config))
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by the plain Linear it computes (in place); the model is then a plain model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors only (small: what --lora trains)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


def save_adapters(model: nn.Module, config: LoRAConfig, path: str | Path) -> None:
    """The adapters on their own, with their config in the file's metadata."""
    meta = {k: str(v) for k, v in config.to_dict().items()}
    save_file(adapter_state(model), str(path), metadata={"format": "gptedge-lora", **meta})


def load_adapters(model: nn.Module, path: str | Path) -> None:
    """Load adapters saved by `save_adapters` into a model `apply_lora` prepared with the same config."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable adapter file ({exc}); restore it or train again") from exc
    expected = {k: tuple(v.shape) for k, v in adapter_state(model).items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if have != expected:
        raise CheckpointError(f"{path} does not fit this model's adapters (rank, targets or base model differ); "
                              "use the base model and --lora options it was trained with")
    model.load_state_dict(state, strict=False)


def read_adapter_config(path: str | Path) -> LoRAConfig:
    """The LoRAConfig recorded in an adapter file's metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable adapter file ({exc})") from exc
    if meta.get("format") != "gptedge-lora":
        raise CheckpointError(f"{path} is not a gptedge adapter file (written by gptedge train --lora-rank)")
    return LoRAConfig(rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=meta["targets"],
                      dropout=float(meta["dropout"]))
