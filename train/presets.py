"""Named model sizes with the training settings that suit them, in one table.

Numbers were chosen by measuring on a 2-core CPU (see the comments); explicit
options given to `gptedge train` override any of them.
"""

from __future__ import annotations

from typing import Any

from gptedge.errors import UsageError

# Settings every preset shares unless its row says otherwise.
COMMON: dict[str, Any] = {
    "dropout": 0.0,  # the default corpora are large relative to these models; overfitting is not the risk
    "grad_accum": 1,
    "min_lr_ratio": 0.1,  # cosine decays to 10% of the peak, as in GPT-3/nanoGPT
    "weight_decay": 0.1,
    "beta1": 0.9,
    "beta2": 0.95,  # 0.95 rather than 0.999: steadier for transformers with large learning rates
    "grad_clip": 1.0,
    "val_fraction": 0.1,
    "eval_batches": 8,
    "seed": 1337,
}

# A Llama-style point of GPTConfig's space: rotary positions, RMSNorm, SwiGLU, grouped KV heads, no biases.
# The MLP is ~8/3 as wide as the residual stream (rounded to a multiple of 16) so that SwiGLU's three
# matrices cost what GPT-2's two 4x-wide ones do.
def llama_style(n_embd: int, n_kv_head: int) -> dict[str, Any]:
    return dict(positions="rope", rope_theta=10000.0, norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=n_kv_head,
                intermediate_size=16 * round(8 * n_embd / 3 / 16), layer_norm_epsilon=1e-5)


PRESETS: dict[str, dict[str, Any]] = {
    # For tests and a quick look: trains on the stdlib corpus in seconds on 2 CPU cores.
    "tiny": dict(
        n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512,
        batch_size=32, steps=200, lr=3e-3, finetune_lr=1e-3, warmup=20, eval_every=50,
        stdlib_bytes=500_000,
    ),
    # For the demo: about two minutes on 2 CPU cores, validation loss far below the unigram baseline.
    "small": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=2048,
        batch_size=16, steps=300, lr=2e-3, finetune_lr=3e-4, warmup=30, eval_every=100,
        stdlib_bytes=3_000_000,
    ),
    # GPT-2 (124M) shape, for real hardware (a GPU, or several with torchrun). 0.5M tokens a step.
    "gpt2": dict(
        n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257,
        batch_size=16, grad_accum=32, steps=5000, lr=6e-4, finetune_lr=6e-5, warmup=200, eval_every=250,
        eval_batches=20, stdlib_bytes=None,
    ),
}

# The "tiny" and "small" runs as Llama-style models (two query heads per KV head): same sizes and settings.
PRESETS["tiny-llama"] = {**PRESETS["tiny"], "architecture": llama_style(64, 1)}
PRESETS["small-llama"] = {**PRESETS["small"], "architecture": llama_style(128, 2)}
# listed in this order
PRESETS = {name: PRESETS[name] for name in ("tiny", "small", "tiny-llama", "small-llama", "gpt2")}

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


def get_preset(name: str) -> dict[str, Any]:
    """The full settings of preset `name` (COMMON merged with its row); UsageError if unknown."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return {**COMMON, **PRESETS[name]}
