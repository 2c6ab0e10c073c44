"""The training loop: pretraining, exact resuming, fine-tuning, and data parallelism under torchrun.

One optimizer step = `grad_accum` micro-batches of `batch_size` windows on each
of `world_size` processes. Every process draws the same global batch of window
starts from one seeded generator and keeps its own rows; DDP averages the
gradients, so the update is the same as one process taking the whole global
batch with `grad_accum * world_size` micro-batches.

A checkpoint (see `gptedge.train.checkpoint`) is written at every evaluation
and at the end, so an interrupted run loses at most `eval_every` steps and
continues exactly with `--resume`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gptedge import __version__
from gptedge.atomic import atomic_write_bytes, check_output_dir
from gptedge.errors import CheckpointError, OutputExistsError, TrainingDiverged, UsageError
from gptedge.train import checkpoint as ckpt
from gptedge.train import data as corpus
from gptedge.train import ddp, lora
from gptedge.train.model import GPT, GPTConfig
from gptedge.train.presets import SHAPE_KEYS, get_preset
from gptedge.train.tokenizer import load_tokenizer, train_tokenizer

DEFAULT_PRESET = "small"
TOKENIZER_RECIPE = 2  # bump when train_tokenizer changes, to invalidate cached tokenizers
METRICS = "metrics.jsonl"  # one JSON line per step (train loss, lr) and per evaluation (val loss)


@dataclass
class TrainConfig:
    """A training run. Options left at None come from the preset (new run) or the checkpoint (--resume)."""

    # Checkpoint folder to write (atomically, at every evaluation and at the end).
    out: str = "gptedge-run"
    # Text files, folders, globs, or .jsonl prompt/completion files; empty: the Python standard library's source.
    data: list[str] = field(default_factory=list)
    # Named size (gptedge.train.presets): model shape plus training settings that suit it.
    preset: str | None = None
    # Model shape overrides; a resumed or fine-tuned run must keep the checkpoint's shape.
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    # Context length in tokens; also the length of each training window.
    block_size: int | None = None
    # Model-space choices beyond the shape (positions, norm, mlp, n_kv_head, ...; see GPTConfig): the preset's.
    architecture: dict[str, Any] | None = None
    # Tokenizer vocabulary to train (a small corpus may yield fewer tokens; the model takes the real size).
    vocab_size: int | None = None
    # Dropout while training; may change when fine-tuning (it is not part of the weights' shape).
    dropout: float | None = None
    # Optimizer steps of the whole run; the LR schedule spans them, and --resume continues towards them.
    steps: int | None = None
    # Windows per forward pass on each process; a step sees batch_size * grad_accum * processes windows.
    batch_size: int | None = None
    # Micro-batches summed into one step: a larger effective batch without more memory.
    grad_accum: int | None = None
    # Peak learning rate, reached after warmup (fine-tuning defaults to the preset's smaller finetune_lr).
    lr: float | None = None
    # The cosine schedule ends at lr * min_lr_ratio.
    min_lr_ratio: float | None = None
    # Steps of linear warmup from ~0 to lr: early Adam updates are noisy, small steps keep them harmless.
    warmup: int | None = None
    # AdamW decoupled weight decay, applied to matrices and embeddings only (not biases or LayerNorm gains).
    weight_decay: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    # Clip the global gradient norm to this (0 disables): protects against rare loss spikes.
    grad_clip: float | None = None
    # Validation loss (and a checkpoint) every this many steps; 0: only at the end.
    eval_every: int | None = None
    # Batches of evenly spaced windows per evaluation: more is a steadier number, and slower.
    eval_batches: int | None = None
    # Fraction of the token stream (its end) held out for validation.
    val_fraction: float | None = None
    # Seeds weights, batch sampling and every RNG, so a run is reproducible.
    seed: int | None = None
    # auto (CUDA with bf16 autocast, else MPS, else CPU) | cpu | cuda | mps.
    device: str = "auto"
    # CPU threads for PyTorch (None: PyTorch's default, one per physical core; torchrun sets 1 per process).
    threads: int | None = None
    # Read at most this many bytes of input (default: the preset's cap for the stdlib corpus, none for your data).
    max_corpus_bytes: int | None = None
    # Where tokenizers and token ids are cached (default $GPTEDGE_CACHE or ~/.cache/gptedge).
    cache_dir: str | None = None
    # Continue this checkpoint's run exactly (weights, optimizer, RNGs, data position).
    resume: str | None = None
    # Fine-tune: start from this model's weights and tokenizer with a fresh optimizer at step 0: a gptedge
    # checkpoint, a local Hugging Face folder or a GGUF file (read by gptedge.export's loaders).
    init_from: str | None = None
    # LoRA (gptedge.train.lora): adapters of this rank on a frozen model; None trains every weight.
    lora_rank: int | None = None
    # The adapters' update is scaled by alpha / rank.
    lora_alpha: float | None = None
    # Which projections get adapters: attention, mlp or all.
    lora_targets: str | None = None
    # Dropout on the adapters' input.
    lora_dropout: float | None = None
    # An adapter file (a LoRA run's adapter.safetensors) to put on the --init-from model before training on.
    adapter: str | None = None
    # Stop (with a checkpoint) after this many steps although the schedule spans `steps`: split a run in parts.
    stop_after: int | None = None
    # Replace an existing output folder.
    force: bool = False
    # Show the progress bar.
    progress: bool = True


# Options that control this invocation only; a resumed run takes them from the command line, never the checkpoint.
RUN_OPTIONS = ("out", "device", "threads", "cache_dir", "resume", "init_from", "adapter", "stop_after", "force",
               "progress")
LORA_DEFAULTS = {"lora_alpha": 16.0, "lora_targets": "all", "lora_dropout": 0.0}
FINETUNE_WINDOW = 256  # default training window of an imported model (its context may be thousands of tokens)


def _explicit(config: TrainConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(TrainConfig)
            if f.name not in RUN_OPTIONS and getattr(config, f.name) not in (None, [])}


def _check_shape(config: TrainConfig, source: str, meta: dict[str, Any]) -> None:
    """A resumed or fine-tuned run keeps the checkpoint's shape; say so if the options ask for another."""
    have = {**meta.get("model", {}), **{k: v for k, v in (meta.get("train") or {}).items() if k in SHAPE_KEYS}}
    want = {k: get_preset(config.preset)[k] for k in SHAPE_KEYS} if config.preset else {}
    want.update({k: getattr(config, k) for k in SHAPE_KEYS if getattr(config, k) is not None})
    if config.init_from and want.get("block_size", 0) <= have.get("block_size", 0):
        want.pop("block_size", None)  # fine-tuning: a training window within the model's context
    diff = [f"{k} {have.get(k)} vs {v}" for k, v in want.items() if have.get(k) != v]
    if diff:
        raise CheckpointError(
            f"checkpoint {source} has an incompatible model shape ({', '.join(diff)} asked for); "
            "drop the shape options/--preset to keep the checkpoint's shape, "
            "or train a new model without --resume/--init-from"
        )


def resolve_config(config: TrainConfig, imported: Any = None) -> tuple[TrainConfig, dict[str, Any] | None]:
    """Fill every None from the preset or the checkpoint; validate; return it with the checkpoint's config.json
    (for an imported model, `imported`: gptedge.export.source.Source, the config.json it would have)."""
    if config.resume and config.init_from:
        raise UsageError("--resume and --init-from exclude each other: resume continues a run, "
                         "init-from fine-tunes from its weights")
    if config.adapter and not config.init_from:
        raise UsageError("--adapter puts adapters on a base model: pass that model with --init-from")
    source = config.resume or config.init_from
    if imported is not None:
        meta = {"model": imported.model.config.to_dict(), "train": {}, "source": source_facts(imported)}
    else:
        meta = ckpt.read_config(source) if source else None
    explicit = _explicit(config)
    if meta is not None:
        _check_shape(config, source, meta)
    if config.resume:
        saved = meta.get("train") or {}
        base = {**get_preset(saved.get("preset") or DEFAULT_PRESET), **saved}
    else:
        preset = config.preset or ((meta or {}).get("train") or {}).get("preset") or DEFAULT_PRESET
        base = {**get_preset(preset), "preset": preset}
        if meta is not None:  # fine-tune: the checkpoint's shape, the preset's fine-tuning rate
            base.update({k: meta["model"][k] for k in SHAPE_KEYS}, lr=base["finetune_lr"])
            if imported is not None:
                base["block_size"] = min(meta["model"]["block_size"], FINETUNE_WINDOW)
            base.update({k: v for k, v in (meta.get("lora") and _lora_fields(meta["lora"]) or {}).items()})
        if not config.data and config.max_corpus_bytes is None:
            base["max_corpus_bytes"] = base["stdlib_bytes"]
    merged = {**base, **explicit}
    run = {k: getattr(config, k) for k in RUN_OPTIONS}
    cfg = TrainConfig(**{f.name: merged.get(f.name) for f in fields(TrainConfig) if f.name not in RUN_OPTIONS}, **run)
    cfg.data = list(merged.get("data") or [])
    if cfg.lora_rank is not None:
        for name, value in LORA_DEFAULTS.items():
            setattr(cfg, name, value if getattr(cfg, name) is None else getattr(cfg, name))
    _validate(cfg)
    return cfg, meta


def _lora_fields(lora_meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's "lora" entry as TrainConfig fields: fine-tuning a LoRA run goes on training its adapters."""
    return {f"lora_{k}": v for k, v in lora_meta.items()}


def lora_config(cfg: TrainConfig) -> lora.LoRAConfig | None:
    if cfg.lora_rank is None:
        return None
    return lora.LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                           dropout=cfg.lora_dropout)


def source_facts(imported: Any) -> dict[str, Any]:
    """What an imported model's bundle needs beside the weights, kept in every checkpoint trained from it."""
    return {"kind": imported.kind, "family": imported.family, "chat_template": imported.chat_template,
            "special_tokens": imported.special_tokens, "generation_defaults": imported.generation_defaults}


def load_import(path: str | None) -> Any:
    """A Hugging Face folder or GGUF file to fine-tune, loaded by gptedge.export's loaders (the same code that
    exports it, so training starts from exactly the model an export of it would verify); None for a gptedge
    checkpoint (or no path)."""
    if path is None or ckpt.is_checkpoint(path):
        return None
    from gptedge.export.exporter import load_source

    return load_source(path)


def _validate(cfg: TrainConfig) -> None:
    positive = ("steps", "batch_size", "grad_accum", "block_size", "vocab_size", "n_layer", "n_head", "n_embd",
                "eval_batches")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}")
    for name in ("warmup", "eval_every", "weight_decay", "grad_clip"):
        if not (getattr(cfg, name) >= 0 and math.isfinite(getattr(cfg, name))):  # NaN fails `>= 0` too
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, not {getattr(cfg, name)}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UsageError(f"--lr must be a positive finite number, not {cfg.lr}")
    if not 0 <= cfg.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), not {cfg.dropout}")
    if not 0 < cfg.val_fraction < 1:
        raise UsageError(f"the validation fraction must be between 0 and 1, not {cfg.val_fraction}")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise UsageError(f"--stop-after must be at least 1, not {cfg.stop_after}")
    lora_config(cfg)  # checks the LoRA options
    if cfg.n_embd % cfg.n_head:
        raise UsageError(f"n_embd {cfg.n_embd} must be divisible by n_head {cfg.n_head}; change one of them")
    try:
        GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                  n_embd=cfg.n_embd, **(cfg.architecture or {}))
    except ValueError as exc:
        raise UsageError(f"the model these options describe is invalid ({exc}); with preset {cfg.preset!r} "
                         "choose --n-head / --n-embd that fit its architecture") from None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    min_lr = cfg.lr * cfg.min_lr_ratio
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def _stderr(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def _quiet(message: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Prepared:
    tokenizer_json: str
    vocab_size: int
    train: corpus.TokenData
    val: corpus.TokenData


def prepare_data(cfg: TrainConfig, env: ddp.DistEnv, tokenizer_json: str | None,
                 log: Callable[[str], None], chat: Any = None, eot: int | None = None) -> Prepared:
    """Find and read the inputs, train (or reuse) the tokenizer, tokenize into the cache, split.

    `chat`: the model's chat template (runtime.chat.ChatTemplate) for JSONL conversations; `eot`: the token that
    ends a document (default: a gptedge tokenizer's <|endoftext|>)."""
    files = corpus.resolve_inputs(cfg.data) if cfg.data else corpus.stdlib_files()
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else corpus.default_cache_dir()
    # Chat lines tokenize as the template renders them, and examples are checked against the window.
    fp = corpus.fingerprint(files, cfg.max_corpus_bytes) + f"|{chat.source if chat else ''}|{eot}|{cfg.block_size}"
    memo: dict[str, corpus.Sources] = {}

    def sources() -> corpus.Sources:
        if "s" not in memo:
            memo["s"] = corpus.read_sources(files, cfg.max_corpus_bytes, log=corpus.warn if env.is_main else _quiet,
                                       chat_template=chat)
        return memo["s"]

    def make_tokenizer() -> str:
        key = hashlib.sha256(f"{fp}|{cfg.vocab_size}|{TOKENIZER_RECIPE}".encode()).hexdigest()[:24]
        path = cache_dir / "tokenizers" / f"{key}.json"
        if not path.is_file():
            src = sources()
            log(f"training a {cfg.vocab_size}-token BPE tokenizer on {src.n_bytes / 1e6:.1f} MB "
                f"from {src.n_files} file(s)")
            tok = train_tokenizer(src.training_texts(), cfg.vocab_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, tok.to_str().encode("utf-8"))
        return path.read_text(encoding="utf-8")

    if tokenizer_json is None:
        tokenizer_json = ddp.rank0_first(env, make_tokenizer)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    key = corpus.cache_key(fp, tokenizer_json)
    tokens = ddp.rank0_first(env, lambda: corpus.load_or_build_tokens(cache_dir, key, sources, tok, eot,
                                                                        cfg.block_size))
    if tokens.meta["n_skipped"] and not memo:
        log(f"gptedge: warning: {tokens.meta['n_skipped']} input file(s) are not UTF-8 "
            "and were skipped (cached result)")
    train_data, val_data = tokens.split(cfg.val_fraction)
    corpus.check_fits(train_data, val_data, cfg.block_size)
    return Prepared(tokenizer_json, tok.get_vocab_size(), train_data, val_data)


# ---------------------------------------------------------------------------------------------
# RNG and trainer state


def rng_state() -> dict[str, Any]:
    """Every RNG as tensors and plain values, so torch.load(weights_only=True) can read it back."""
    algo, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"algo": algo, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["algo"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# The loop


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: GPT, data: corpus.TokenData, cfg: TrainConfig, env: ddp.DistEnv, device: torch.device) -> float:
    """Mean loss per target token over the same evenly spaced windows every time (ranks split the windows)."""
    was_training = model.training
    model.eval()
    starts = corpus.eval_starts(data, cfg.block_size, cfg.eval_batches * cfg.batch_size)[env.rank :: env.world_size]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, number of targets]
    for i in range(0, len(starts), cfg.batch_size):
        batch = corpus.windows(data, starts[i : i + cfg.batch_size], cfg.block_size)
        x, y = (torch.from_numpy(a).to(device) for a in batch)
        with _autocast(device):
            logits, _, _ = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=corpus.IGNORE_INDEX,
                               reduction="sum")
        total += torch.stack([loss.double(), (y != corpus.IGNORE_INDEX).sum().double()])
    ddp.all_reduce_sum(total, env)
    model.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _param_groups(model: GPT, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings only: decaying biases and LayerNorm gains just fights the fit. Frozen
    parameters (a LoRA run's base) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied wte/lm_head matrix appears once
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _check_out(cfg: TrainConfig) -> Path:
    """The output folder, checked as every command checks its output (gptedge.atomic.check_output_dir): it may
    not overlap the model it starts from, and may exist only with --force, or when a run resumes in place."""
    out = Path(cfg.out).resolve()
    source = cfg.resume or cfg.init_from
    if cfg.resume is not None and Path(cfg.resume).resolve() == out:
        return out  # continuing a run in place
    try:
        if source is not None:
            check_output_dir(source, out, cfg.force)
        elif out.exists() and not cfg.force:
            raise OutputExistsError(f"{out} already exists")
    except OutputExistsError:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it, --resume {cfg.out} to continue it, "
                                "or choose another --out") from None
    return out


def _read_metrics(folder: str | None, up_to_step: int) -> list[dict[str, Any]]:
    if not folder or not (Path(folder) / METRICS).is_file():
        return []
    lines = (Path(folder) / METRICS).read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["step"] <= up_to_step]


def train(config: TrainConfig, log: Callable[[str], None] = _stderr) -> Path:
    """Train (or resume, or fine-tune) as `config` says; return the checkpoint folder.

    Under torchrun each process calls this; only rank 0 logs and writes the checkpoint.
    """
    env = ddp.env_from_environ()
    imported = load_import(config.init_from)
    cfg, meta = resolve_config(config, imported)
    out = _check_out(cfg)
    device = ddp.pick_device(cfg.device, env)
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise UsageError(f"--threads must be at least 1, not {cfg.threads}")
        torch.set_num_threads(cfg.threads)
    ddp.init(env, device)
    try:
        return _train(cfg, meta, env, device, out, log if env.is_main else _quiet, imported)
    finally:
        ddp.shutdown()


def _train(cfg: TrainConfig, meta: dict[str, Any] | None, env: ddp.DistEnv, device: torch.device,
           out: Path, log: Callable[[str], None], imported: Any = None) -> Path:
    source = cfg.resume or cfg.init_from
    if imported is not None:
        tokenizer_json = imported.tokenizer.to_str()
    else:
        tokenizer_json = load_tokenizer(Path(source) / ckpt.TOKENIZER).to_str() if source else None
    facts = (meta or {}).get("source")  # an imported model's template and special tokens, carried run to run
    chat, eot = _chat_and_eot(facts, tokenizer_json)
    prep = prepare_data(cfg, env, tokenizer_json, log, chat=chat, eot=eot)
    seed_everything(cfg.seed)
    if imported is not None:
        model = _with_dropout(imported.model, cfg.dropout).requires_grad_(True)
    elif meta is not None:
        model = _with_dropout(ckpt.load_checkpoint(source)[0], cfg.dropout)
    else:
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=prep.vocab_size, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, **(cfg.architecture or {})))
    adapters = _adapt(model, cfg)
    model.to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=True if device.type == "cuda" else None)
    sampler = corpus.BatchSampler(prep.train, cfg.block_size, cfg.seed)
    step, tokens_seen, history = 0, 0, []
    if cfg.resume:
        state = ckpt.load_trainer_state(cfg.resume)
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        history = _read_metrics(cfg.resume, step)
    if env.rank > 0:  # distinct dropout masks per rank, reproducible from (seed, rank, step)
        torch.manual_seed(cfg.seed + 7919 * env.rank + step)
    net = model
    if env.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    A, B, W, T = cfg.grad_accum, cfg.batch_size, env.world_size, cfg.block_size
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {model.num_params() / 1e6:.2f}M parameters ({cfg.n_layer} layers, {cfg.n_head} heads, width "
        f"{cfg.n_embd}, window {T}, vocab {model.config.vocab_size}) "
        f"on {device}{f' x {W} processes' if W > 1 else ''}"
        + (f"; LoRA rank {adapters.rank} on {adapters.targets}: {trainable / 1e6:.2f}M trainable" if adapters else ""))
    log(f"data: {len(prep.train.tokens):,} training and {len(prep.val.tokens):,} validation tokens; "
        f"{A * B * W * T:,} tokens per step; steps {step} -> {end}")

    def save(final: bool, val_loss: float | None, train_loss: float | None = None,
             extra: dict[str, Any] | None = None) -> None:
        if not env.is_main:
            return
        state = {"step": step, "tokens_seen": tokens_seen, "optimizer": optimizer.state_dict(),
                 "sampler": sampler.state_dict(), "rng": rng_state()}
        info = {"train": asdict(cfg), "step": step, "tokens_seen": tokens_seen, "val_loss": val_loss,
                **({"lora": adapters.to_dict()} if adapters else {}), **({"source": facts} if facts else {}),
                "train_loss": train_loss, "final": final, "gptedge_version": __version__,
                "data": {**prep.train.meta, "n_train_tokens": len(prep.train.tokens),
                         "n_val_tokens": len(prep.val.tokens)},
                **(extra or {})}
        metrics = "".join(json.dumps(r) + "\n" for r in history)
        ckpt.save_checkpoint(out, model, info, prep.tokenizer_json, state, force=True, extra_files={METRICS: metrics})

    bar = tqdm(total=end, initial=step, disable=not (env.is_main and cfg.progress), unit="step", dynamic_ncols=True,
               file=sys.stderr)
    train_time, session_tokens = 0.0, 0
    while step < end:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = sampler.global_starts(W * A * B).reshape(W * A, B)[env.rank * A : (env.rank + 1) * A]  # [A, B]
        loss_sum = torch.zeros((), device=device)
        for m, starts in enumerate(rows):
            x, y = (torch.from_numpy(a).to(device, non_blocking=True) for a in corpus.windows(prep.train, starts, T))
            sync = net.no_sync() if env.enabled and m < A - 1 else contextlib.nullcontext()  # all-reduce once per step
            with sync:
                with _autocast(device):
                    _, loss, _ = net(x, y)
                (loss / A).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = float(ddp.all_reduce_sum(loss_sum / A, env)) / W
        if not math.isfinite(step_loss):
            bar.close()  # every rank sees the same reduced loss, so all stop together; no checkpoint of NaN weights
            raise TrainingDiverged(
                f"the training loss became {step_loss} at step {step + 1}; lower --lr (now {cfg.lr:g}) or raise "
                "--warmup, then start again or --resume the last good checkpoint"
            )
        step += 1
        tokens_seen += A * B * W * T
        session_tokens += A * B * W * T
        train_time += time.perf_counter() - t0
        history.append({"step": step, "loss": step_loss, "lr": lr})
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{session_tokens / train_time:,.0f}", refresh=False)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < end:
            val_loss = evaluate(model, prep.val, cfg, env, device)
            history.append({"step": step, "val_loss": val_loss})
            log(f"step {step}: train loss {step_loss:.4f}, val loss {val_loss:.4f}")
            save(final=False, val_loss=val_loss)
    bar.close()

    val_loss = evaluate(model, prep.val, cfg, env, device)
    train_loss = evaluate(model, prep.train, cfg, env, device)
    history.append({"step": step, "val_loss": val_loss})
    summary = {
        "unigram_entropy": corpus.unigram_entropy(prep.val, prep.vocab_size),
        "tokens_per_s": session_tokens / train_time if train_time > 0 else None,
        "train_seconds": train_time,
    }
    save(final=step >= cfg.steps, val_loss=val_loss, train_loss=train_loss, extra=summary)
    return out


def _chat_and_eot(facts: dict[str, Any] | None, tokenizer_json: str | None) -> tuple[Any, int | None]:
    """The chat template JSONL conversations render with, and the end-of-text id, for the model being trained:
    an imported model's own; gptedge's default transcript template and <|endoftext|> otherwise."""
    from gptedge.runtime.chat import DEFAULT_TEMPLATE, ChatTemplate

    if not facts:
        return ChatTemplate(DEFAULT_TEMPLATE, {}), None
    specials = facts.get("special_tokens") or {}
    if facts.get("chat_template") is None:
        chat = None
    else:
        chat = ChatTemplate(facts["chat_template"], {f"{k}_token": specials[k] for k in ("bos", "eos", "pad")
                                                    if isinstance(specials.get(k), str)})
    eot = specials.get("eos_id")
    if eot is None:
        raise UsageError("the model names no end-of-text token, which training needs to separate documents")
    return chat, int(eot)


def _adapt(model: GPT, cfg: TrainConfig) -> lora.LoRAConfig | None:
    """Put LoRA adapters on `model` as the options (or the --adapter file) say; the config trained, or None."""
    config = lora_config(cfg)
    if cfg.adapter:
        from_file = lora.read_adapter_config(cfg.adapter)
        if config is not None and config != from_file:
            raise UsageError(f"--adapter {cfg.adapter} was trained with rank {from_file.rank} on "
                             f"{from_file.targets}; drop the --lora options or make them match")
        config = from_file
        cfg.lora_rank, cfg.lora_alpha = config.rank, config.alpha
        cfg.lora_targets, cfg.lora_dropout = config.targets, config.dropout
    if config is None:
        return None
    lora.apply_lora(model, config)
    if cfg.adapter:
        lora.load_adapters(model, cfg.adapter)
    return config


def _with_dropout(model: GPT, dropout: float) -> GPT:
    """Set dropout on a loaded model (fine-tuning may change it; it has no weights)."""
    model.config.dropout = dropout
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = dropout
    return model


def iter_metrics(folder: str | Path) -> Iterator[dict[str, Any]]:
    """The per-step records of a checkpoint's metrics.jsonl (train loss, lr, val loss)."""
    path = Path(folder) / METRICS
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            yield json.loads(line)
