"""Hugging Face model types as data: a config mapping and a weight-name mapping each.

Every supported `model_type` is a point in `GPTConfig`'s space, so importing one is two
translations and no model code: `HFFamily.config` turns config.json into `GPTConfig`
arguments, and `WeightMap` says which Hugging Face tensors make each of ours (several
concatenated along the output dimension: q, k, v into the packed `c_attn`; gate and up
into the packed `c_fc`). Config flags that change the arithmetic in ways `GPT` does not
implement are refused rather than silently ignored: a model that exports but computes
something else is worse than an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gptedge.errors import CheckpointError

# HF activation name -> nn.GELU(approximate=...). gelu_fast is the same tanh formula written differently.
GELU_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}
# GPT-2 flags whose non-default value changes the computation: (name, value GPT implements, default if absent).
GPT2_REQUIRED_FLAGS = (
    ("scale_attn_weights", True, True),
    ("scale_attn_by_inverse_layer_idx", False, False),
    ("reorder_and_upcast_attn", False, False),
    ("add_cross_attention", False, False),
)


@dataclass(frozen=True)
class WeightMap:
    """Our state-dict names -> the Hugging Face tensors that make them (names after `base` is removed)."""

    base: str  # prefix of the backbone's tensors in a *ForCausalLM file ("transformer." / "model.")
    layer: str  # a block's prefix on the HF side, with {i}
    globals: dict[str, str]  # our name -> HF name
    per_layer: dict[str, tuple[str, ...]]  # our suffix after transformer.h.{i}. -> HF suffixes, concatenated on dim 0
    transposed: tuple[str, ...] = ()  # our suffixes stored [in, out] on the HF side (GPT-2's Conv1D)
    ignored: tuple[str, ...] = ()  # HF tensor-name endings that are buffers, not weights
    head: str = "lm_head.weight"  # the untied LM head's name (never under `base`)


GPT2_WEIGHTS = WeightMap(
    base="transformer.", layer="h.{i}.",
    globals={"transformer.wte.weight": "wte.weight", "transformer.wpe.weight": "wpe.weight",
             "transformer.ln_f.weight": "ln_f.weight", "transformer.ln_f.bias": "ln_f.bias"},
    per_layer={name: (name,) for name in (
        "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.weight", "attn.c_attn.bias",
        "attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
        "mlp.c_proj.bias")},
    transposed=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
    ignored=(".attn.bias", ".attn.masked_bias"),  # causal-mask buffers older transformers saved
)

_LLAMA_GLOBALS = {"transformer.wte.weight": "embed_tokens.weight", "transformer.ln_f.weight": "norm.weight"}
_LLAMA_LAYER = {
    "ln_1.weight": ("input_layernorm.weight",),
    "ln_2.weight": ("post_attention_layernorm.weight",),
    "attn.c_attn.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.c_attn.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.c_proj.weight": ("self_attn.o_proj.weight",),
    "attn.c_proj.bias": ("self_attn.o_proj.bias",),
    "attn.q_norm.weight": ("self_attn.q_norm.weight",),
    "attn.k_norm.weight": ("self_attn.k_norm.weight",),
    "mlp.c_fc.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.c_fc.bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
    "mlp.c_proj.weight": ("mlp.down_proj.weight",),
    "mlp.c_proj.bias": ("mlp.down_proj.bias",),
}
LLAMA_WEIGHTS = WeightMap(base="model.", layer="layers.{i}.", globals=_LLAMA_GLOBALS, per_layer=_LLAMA_LAYER,
                          ignored=(".rotary_emb.inv_freq",))
# Phi-3 stores q, k, v already packed (in that order) and gate, up packed (gate first): our layouts exactly.
PHI3_WEIGHTS = WeightMap(
    base="model.", layer="layers.{i}.", globals=_LLAMA_GLOBALS,
    per_layer={**_LLAMA_LAYER, "attn.c_attn.weight": ("self_attn.qkv_proj.weight",),
               "mlp.c_fc.weight": ("mlp.gate_up_proj.weight",)},
    ignored=(".rotary_emb.inv_freq",),
)


def _int(hf: dict[str, Any], key: str, default: Any = None) -> int:
    value = hf.get(key, default)
    if value is None:
        raise ValueError(f"it has no {key}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}={value!r} is not an integer")
    return value


def gpt2_config(hf: dict[str, Any], where: Path) -> dict[str, Any]:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in GELU_ACTIVATIONS:
        raise CheckpointError(f"{where}: activation_function {activation!r} is not supported; supported: "
                              f"{', '.join(GELU_ACTIVATIONS)}")
    for name, wanted, default in GPT2_REQUIRED_FLAGS:
        if hf.get(name, default) != wanted:
            raise CheckpointError(f"{where}: {name}={hf.get(name)!r} is not supported (gptedge's GPT computes "
                                  f"{name}={wanted}); this model cannot be exported")
    n_embd = _int(hf, "n_embd", 768)
    n_inner = hf.get("n_inner")
    return dict(
        block_size=_int(hf, "n_positions", hf.get("n_ctx", 1024)), vocab_size=_int(hf, "vocab_size", 50257),
        n_layer=_int(hf, "n_layer", 12), n_head=_int(hf, "n_head", 12), n_embd=n_embd, bias=True,
        intermediate_size=None if n_inner is None else _int(hf, "n_inner"),
        gelu_approximate=GELU_ACTIVATIONS[activation], layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def rope_scaling(hf: dict[str, Any], where: Path) -> dict[str, Any] | None:
    """config.json's rope_scaling as `GPTConfig.rope_scaling`, or a CheckpointError naming what is supported."""
    raw = hf.get("rope_scaling")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: rope_scaling={raw!r} is not an object; restore config.json")
    kind = raw.get("rope_type", raw.get("type"))
    kind = "longrope" if kind == "su" else kind  # transformers' old name for it
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(raw["factor"])}
    if kind == "llama3":
        return {"type": "llama3", **{k: float(raw[k]) for k in ("factor", "low_freq_factor", "high_freq_factor")},
                "original_max_position_embeddings": int(raw["original_max_position_embeddings"])}
    if kind == "longrope":
        original = raw.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
        if original is None:
            original, factor = hf["max_position_embeddings"], float(raw.get("factor", 1.0))
        else:
            factor = hf["max_position_embeddings"] / original
        attention = raw.get("attention_factor")
        if attention is None:  # transformers' default: sqrt(1 + log(factor) / log(original context))
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return {"type": "longrope", "short_factor": [float(x) for x in raw["short_factor"]],
                "long_factor": [float(x) for x in raw["long_factor"]], "attention_factor": float(attention),
                "original_max_position_embeddings": int(original)}
    raise CheckpointError(f"{where}: rope_scaling type {kind!r} is not supported; gptedge implements none/default, "
                          "linear, llama3 and longrope (contexts up to the original one)")


def _sliding_window(hf: dict[str, Any], uses_flag: bool) -> int | None:
    window = hf.get("sliding_window")
    if window is None:
        return None
    if uses_flag:  # Qwen2/3: a window only when use_sliding_window, and only on the layers marked sliding
        layers = hf.get("layer_types") or []
        if not hf.get("use_sliding_window", False) or (layers and "sliding_attention" not in layers):
            return None
    return _int(hf, "sliding_window")


def llama_config(hf: dict[str, Any], where: Path, *, qkv_bias: bool | None = None, qk_norm: bool = False,
                 window_flag: bool = False) -> dict[str, Any]:
    """The Llama-style mapping; qkv_bias None: from attention_bias (which then also covers o_proj)."""
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {hf.get('hidden_act')!r} is not supported; "
                              "gptedge's SwiGLU uses silu")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{where}: partial_rotary_factor={hf['partial_rotary_factor']} is not supported; "
                              "gptedge rotates whole heads")
    n_embd, n_head = _int(hf, "hidden_size"), _int(hf, "num_attention_heads")
    attention_bias = bool(hf.get("attention_bias", False))
    head_dim = hf.get("head_dim")
    return dict(
        block_size=_int(hf, "max_position_embeddings", 2048), vocab_size=_int(hf, "vocab_size"),
        n_layer=_int(hf, "num_hidden_layers"), n_head=n_head, n_embd=n_embd,
        n_kv_head=_int(hf, "num_key_value_heads", n_head), head_dim=None if head_dim is None else _int(hf, "head_dim"),
        bias=False, qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
        proj_bias=attention_bias if qkv_bias is None else False, mlp_bias=bool(hf.get("mlp_bias", False)),
        positions="rope", rope_theta=float(hf.get("rope_theta", 10000.0)), rope_scaling=rope_scaling(hf, where),
        norm="rmsnorm", layer_norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), mlp="swiglu",
        intermediate_size=_int(hf, "intermediate_size"), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qk_norm=qk_norm, sliding_window=_sliding_window(hf, window_flag),
    )


@dataclass(frozen=True)
class HFFamily:
    architectures: tuple[str, ...]  # config.json `architectures` values that are this family's language models
    config: Callable[[dict[str, Any], Path], dict[str, Any]]  # config.json -> GPTConfig arguments
    weights: WeightMap


def _partial(fn: Callable[..., dict[str, Any]], **kw: Any) -> Callable[[dict[str, Any], Path], dict[str, Any]]:
    return lambda hf, where: fn(hf, where, **kw)


FAMILIES: dict[str, HFFamily] = {
    "gpt2": HFFamily(("GPT2LMHeadModel", "GPT2Model"), gpt2_config, GPT2_WEIGHTS),
    "llama": HFFamily(("LlamaForCausalLM",), llama_config, LLAMA_WEIGHTS),
    "mistral": HFFamily(("MistralForCausalLM",), llama_config, LLAMA_WEIGHTS),
    "qwen2": HFFamily(("Qwen2ForCausalLM",), _partial(llama_config, qkv_bias=True, window_flag=True), LLAMA_WEIGHTS),
    "qwen3": HFFamily(("Qwen3ForCausalLM",), _partial(llama_config, qk_norm=True, window_flag=True), LLAMA_WEIGHTS),
    "phi3": HFFamily(("Phi3ForCausalLM",), llama_config, PHI3_WEIGHTS),
}


def supported() -> str:
    return ", ".join(f"{name} ({fam.architectures[0]})" for name, fam in FAMILIES.items())
