"""Checkpoint folders: safetensors weights + JSON config + tokenizer.json + trainer state.

    CKPT/model.safetensors   weights; a tied lm_head/wte matrix stored once (as transformer.wte.weight),
                             an untied head as lm_head.weight
    CKPT/config.json         {"format": "gptedge-checkpoint", "version": 1, "model": ..., "train": ..., "step": ...}
    CKPT/tokenizer.json      the tokenizer the model was trained with
    CKPT/trainer_state.pt    optimizer, RNG and data-sampler state for exact resuming
    CKPT/adapter.safetensors LoRA runs only: the adapters (config.json "lora" says how); model.safetensors then
                             holds the frozen base weights, and loading puts the adapters back on them

The folder is written atomically. Weights are safetensors (no code can hide in
them) and trainer_state.pt is only ever read with `torch.load(weights_only=True)`,
so a checkpoint from a stranger cannot run code when loaded.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from gptedge.atomic import atomic_output_dir
from gptedge.errors import CheckpointError, GptEdgeError
from gptedge.train import lora
from gptedge.train.model import GPT, GPTConfig

FORMAT = "gptedge-checkpoint"
VERSION = 1
WEIGHTS, CONFIG, TOKENIZER, TRAINER_STATE = "model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt"


def is_checkpoint(path: str | Path) -> bool:
    """True when `path` is a folder with a gptedge config.json and weights (cheap: reads one small JSON)."""
    path = Path(path)
    try:
        cfg = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("format") == FORMAT and (path / WEIGHTS).is_file()


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of checkpoint `path`, checked for format and version."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} not found; pass the folder `gptedge train --out` wrote")
    try:
        cfg = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} has no {CONFIG}; it is not a gptedge checkpoint "
                              "(pass the folder `gptedge train --out` wrote)") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / CONFIG} is unreadable or not JSON ({exc}); "
                              "restore the checkpoint or retrain") from exc
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gptedge checkpoint (config.json lacks \"format\": \"{FORMAT}\")")
    if cfg.get("version") != VERSION:
        raise CheckpointError(f"{path} is checkpoint version {cfg.get('version')}; "
                              f"this gptedge reads version {VERSION}, upgrade gptedge")
    return cfg


def model_state(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict to save: contiguous CPU tensors, a tied head left out (safetensors refuses shared storage),
    LoRA adapters left out (they have their own file)."""
    keep = model.weight_shapes()
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
            if k in keep and ".lora_" not in k}


def save_checkpoint(
    dest: str | Path,
    model: GPT,
    config: dict[str, Any],
    tokenizer_json: str,
    trainer_state: dict[str, Any] | None,
    force: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a checkpoint folder atomically; `config` holds everything but format/version/model.

    `extra_files` (name -> text) are written alongside, e.g. the training metrics.
    """
    meta = {"format": FORMAT, "version": VERSION, "model": model.config.to_dict(), **config}
    with atomic_output_dir(dest, force=force) as tmp:
        save_file(model_state(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        if config.get("lora"):
            lora.save_adapters(model, lora.LoRAConfig(**config["lora"]), tmp / lora.ADAPTER_FILE)
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        (tmp / TOKENIZER).write_text(tokenizer_json, encoding="utf-8")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(dest).resolve()


def _check_shapes(file: Path, have: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(have))
    extra = sorted(set(have) - set(expected))
    wrong = sorted(k for k in set(expected) & set(have) if tuple(have[k]) != tuple(expected[k]))
    if missing or extra or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)) if keys
        )
        raise CheckpointError(f"{file} does not match its config.json ({detail}); "
                              "the checkpoint is damaged or mixed up, retrain")


def _open_error(file: Path, exc: Exception) -> CheckpointError:
    if isinstance(exc, FileNotFoundError):
        return CheckpointError(f"{file} not found; the checkpoint is incomplete, restore it or retrain")
    return CheckpointError(f"{file} is not a valid safetensors file ({exc}); restore the checkpoint or retrain")


def check_weight_shapes(config: GPTConfig, path: str | Path) -> None:
    """Compare the safetensors header with the shapes `config` implies, allocating nothing.

    Runs before the model is built, so a config.json with absurd sizes (terabytes of parameters)
    is refused instead of allocated: the expected shapes come from a model on the meta device.
    """
    file = Path(path) / WEIGHTS
    try:
        with safe_open(str(file), framework="pt") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise _open_error(file, exc) from exc
    with torch.device("meta"):
        expected = GPT(config).weight_shapes()
    _check_shapes(file, have, expected)


def load_weights(model: GPT, path: str | Path) -> None:
    """Load `path`/model.safetensors into `model`, requiring every tensor to be present with the right shape."""
    file = Path(path) / WEIGHTS
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise _open_error(file, exc) from exc
    _check_shapes(file, {k: tuple(v.shape) for k, v in state.items()}, model.weight_shapes())
    # A tied lm_head.weight is wte's tensor: strict=True would demand it, and the in-place copy keeps the tie.
    model.load_state_dict(state, strict=not model.config.tie_embeddings)


def load_checkpoint(path: str | Path) -> tuple[GPT, dict[str, Any]]:
    """The model (eval mode, CPU, fp32) and the config.json dict of a gptedge checkpoint."""
    cfg = read_config(path)
    try:
        gpt_config = GPTConfig.from_dict(cfg["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{Path(path) / CONFIG} has an invalid \"model\" entry ({exc}); "
                              "restore the checkpoint or retrain") from exc
    check_weight_shapes(gpt_config, path)
    model = GPT(gpt_config)
    load_weights(model, path)
    if cfg.get("lora"):
        try:
            config = lora.LoRAConfig(**cfg["lora"])
        except (TypeError, GptEdgeError) as exc:
            raise CheckpointError(f"{Path(path) / CONFIG} has an invalid \"lora\" entry ({exc})") from exc
        lora.load_adapters(lora.apply_lora(model, config), Path(path) / lora.ADAPTER_FILE)
    return model.eval(), cfg


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """trainer_state.pt, loaded with weights_only=True: tensors and plain Python values only, never code."""
    file = Path(path) / TRAINER_STATE
    if not file.is_file():
        raise CheckpointError(f"{file} not found; this checkpoint cannot be resumed "
                              "(use --init-from to fine-tune from its weights)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{file} contains Python objects other than tensors and plain values and was refused "
            "(loading it could run code); it was not written by gptedge: use a checkpoint you trust, "
            "or --init-from to start from its weights only"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{file} is damaged ({str(exc).splitlines()[0]}); use --init-from, "
                              "or an earlier checkpoint") from exc
    if not isinstance(state, dict) or not {"step", "optimizer", "sampler", "rng"} <= set(state):
        raise CheckpointError(f"{file} is not a gptedge trainer state; use --init-from to start from the weights only")
    return state
