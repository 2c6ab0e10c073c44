"""GGUF architectures as data: how `general.architecture`'s metadata and tensor names map onto `GPTConfig`.

The same families the Hugging Face import covers, as llama.cpp's converter writes them: `llama` (also
Mistral, SmolLM2 and most Llama 3 derivatives), `qwen2`, `qwen3`, `phi3` and `gpt2`. A family is a
`WeightMap` over GGUF tensor names (blk.{i}.attn_q.weight, ...: the per-layer names concatenated into our
packed projections, as hf_families.py does for Hugging Face names) and a config reader over the
`{arch}.*` keys. Biases, q/k norms and an untied head are read off which tensors the file holds, not
assumed per family. llama.cpp's converter permutes the rows of Llama's attn_q / attn_k into its own rotary
layout; `rope_permuted` says so and the loader undoes it (a permutation of output rows, so quantized
blocks survive it unchanged). What the config cannot express is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from gptedge.export.gguf_file import GGUFError, GGUFFile
from gptedge.export.hf_families import WeightMap

_GLOBALS = {"transformer.wte.weight": "token_embd.weight", "transformer.ln_f.weight": "output_norm.weight"}
_LLAMA_LAYER = {
    "ln_1.weight": ("attn_norm.weight",),
    "ln_2.weight": ("ffn_norm.weight",),
    "attn.c_attn.weight": ("attn_q.weight", "attn_k.weight", "attn_v.weight"),
    "attn.c_attn.bias": ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
    "attn.c_proj.weight": ("attn_output.weight",),
    "attn.c_proj.bias": ("attn_output.bias",),
    "attn.q_norm.weight": ("attn_q_norm.weight",),
    "attn.k_norm.weight": ("attn_k_norm.weight",),
    "mlp.c_fc.weight": ("ffn_gate.weight", "ffn_up.weight"),
    "mlp.c_fc.bias": ("ffn_gate.bias", "ffn_up.bias"),
    "mlp.c_proj.weight": ("ffn_down.weight",),
    "mlp.c_proj.bias": ("ffn_down.bias",),
}
# llama.cpp's own tensors that are not weights: rotary frequency factors, read into the config instead.
_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
LLAMA_WEIGHTS = WeightMap(base="", layer="blk.{i}.", globals=_GLOBALS, per_layer=_LLAMA_LAYER, head="output.weight",
                          ignored=_ROPE_TENSORS)
# Phi-3's converter keeps the packed projections: attn_qkv (q, k, v) and ffn_up (gate, then up).
PHI3_WEIGHTS = WeightMap(
    base="", layer="blk.{i}.", globals=_GLOBALS, head="output.weight", ignored=_ROPE_TENSORS,
    per_layer={**_LLAMA_LAYER, "attn.c_attn.weight": ("attn_qkv.weight",), "mlp.c_fc.weight": ("ffn_up.weight",)},
)
GPT2_WEIGHTS = WeightMap(
    base="", layer="blk.{i}.", head="output.weight",
    globals={**_GLOBALS, "transformer.wpe.weight": "position_embd.weight", "transformer.ln_f.bias": "output_norm.bias"},
    per_layer={
        "ln_1.weight": ("attn_norm.weight",), "ln_1.bias": ("attn_norm.bias",),
        "ln_2.weight": ("ffn_norm.weight",), "ln_2.bias": ("ffn_norm.bias",),
        "attn.c_attn.weight": ("attn_qkv.weight",), "attn.c_attn.bias": ("attn_qkv.bias",),
        "attn.c_proj.weight": ("attn_output.weight",), "attn.c_proj.bias": ("attn_output.bias",),
        "mlp.c_fc.weight": ("ffn_up.weight",), "mlp.c_fc.bias": ("ffn_up.bias",),
        "mlp.c_proj.weight": ("ffn_down.weight",), "mlp.c_proj.bias": ("ffn_down.bias",),
    },
)


class Meta:
    """The `{arch}.*` metadata of one file, read with types checked (a wrong type is a one-line GGUFError)."""

    def __init__(self, file: GGUFFile, arch: str) -> None:
        self.file, self.arch = file, arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.file.metadata.get(f"{self.arch}.{key}", default)

    def int(self, key: str, default: int | None = None) -> int:
        value = self.get(key, default)
        if value is None:
            raise GGUFError(f"{self.file.path}: the metadata has no {self.arch}.{key}; the file is incomplete")
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
            raise GGUFError(f"{self.file.path}: {self.arch}.{key}={value!r} is not a positive integer "
                            "(per-layer values are not supported)")
        return int(value)

    def float(self, key: str, default: float | None = None) -> float:
        value = self.get(key, default)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise GGUFError(f"{self.file.path}: {self.arch}.{key}={value!r} is not a number")
        return float(value)

    def has_tensor(self, name: str) -> bool:
        return name in self.file.tensors

    def vector(self, name: str) -> list[float]:
        return [float(x) for x in self.file.dequantize(name).reshape(-1)]


def _rope_scaling(meta: Meta, head_dim: int) -> dict[str, Any] | None:
    """The rotary scaling the file declares: linear in the metadata, Llama 3's as rope_freqs, Phi-3's as factors."""
    where = meta.file.path
    kind = meta.get("rope.scaling.type", "none")
    if meta.has_tensor("rope_freqs.weight"):
        factors = meta.vector("rope_freqs.weight")
        if len(factors) != head_dim // 2:
            raise GGUFError(f"{where}: rope_freqs has {len(factors)} values for heads of {head_dim}; "
                            "the file is damaged")
        return {"type": "factors", "factors": factors}
    if meta.has_tensor("rope_factors_short.weight"):
        original = meta.int("rope.scaling.original_context_length")
        return {"type": "longrope", "short_factor": meta.vector("rope_factors_short.weight"),
                "long_factor": meta.vector("rope_factors_long.weight"),
                "attention_factor": meta.float("rope.scaling.attn_factor", 1.0),
                "original_max_position_embeddings": original}
    if kind in ("none", None):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": meta.float("rope.scaling.factor")}
    raise GGUFError(f"{where}: rope scaling {kind!r} is not supported; gptedge implements none, linear, Llama 3's "
                    "frequency factors and Phi-3's short factors")


def llama_config(meta: Meta) -> dict[str, Any]:
    """GPTConfig arguments of a Llama-style file (llama, qwen2, qwen3, phi3)."""
    where = meta.file.path
    n_embd, n_head = meta.int("embedding_length"), meta.int("attention.head_count")
    head_dim = meta.int("attention.key_length", n_embd // n_head)
    if meta.int("attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{where}: keys and values of different widths are not supported")
    if meta.int("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"{where}: partial rotary embeddings ({meta.get('rope.dimension_count')} of {head_dim} "
                        "dimensions) are not supported; gptedge rotates whole heads")
    window = meta.get("attention.sliding_window")
    return dict(
        block_size=meta.int("context_length"), n_layer=meta.int("block_count"), n_head=n_head, n_embd=n_embd,
        n_kv_head=meta.int("attention.head_count_kv", n_head), head_dim=head_dim,
        bias=False, qkv_bias=meta.has_tensor("blk.0.attn_q.bias") or meta.has_tensor("blk.0.attn_qkv.bias"),
        proj_bias=meta.has_tensor("blk.0.attn_output.bias"), mlp_bias=meta.has_tensor("blk.0.ffn_down.bias"),
        positions="rope", rope_theta=meta.float("rope.freq_base", 10000.0), rope_scaling=_rope_scaling(meta, head_dim),
        norm="rmsnorm", layer_norm_epsilon=meta.float("attention.layer_norm_rms_epsilon", 1e-6), mlp="swiglu",
        intermediate_size=meta.int("feed_forward_length"), qk_norm=meta.has_tensor("blk.0.attn_q_norm.weight"),
        sliding_window=int(window) if window else None,
    )


def gpt2_config(meta: Meta) -> dict[str, Any]:
    n_embd = meta.int("embedding_length")
    return dict(
        block_size=meta.int("context_length"), n_layer=meta.int("block_count"), n_head=meta.int("attention.head_count"),
        n_embd=n_embd, bias=True, intermediate_size=meta.int("feed_forward_length", 4 * n_embd),
        gelu_approximate="tanh", layer_norm_epsilon=meta.float("attention.layer_norm_epsilon", 1e-5),
    )


@dataclass(frozen=True)
class GGUFArch:
    family: str  # gptedge's name for the family (bundle provenance, `info`)
    config: Callable[[Meta], dict[str, Any]]  # metadata -> GPTConfig arguments (vocab and tying added by the loader)
    weights: WeightMap
    rope_permuted: bool = False  # attn_q / attn_k rows in llama.cpp's rotary order (its Llama converter permutes)


ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", llama_config, LLAMA_WEIGHTS, rope_permuted=True),
    "qwen2": GGUFArch("qwen2", llama_config, LLAMA_WEIGHTS),
    "qwen3": GGUFArch("qwen3", llama_config, LLAMA_WEIGHTS),
    "phi3": GGUFArch("phi3", llama_config, PHI3_WEIGHTS),
    "gpt2": GGUFArch("gpt2", gpt2_config, GPT2_WEIGHTS),
}


def unpermute_rows(rows: np.ndarray, n_head: int, head_dim: int) -> np.ndarray:
    """Undo llama.cpp's rotary row order for one of attn_q / attn_k ([n_head * head_dim, ...] rows).

    The converter turns each head's rows [first half, second half] into interleaved pairs; this puts them
    back. Rows are whole (a quantized row's blocks run along the input axis), so it applies to raw blocks too.
    """
    shape = rows.shape
    return rows.reshape(n_head, head_dim // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def supported() -> str:
    return ", ".join(ARCHITECTURES)
