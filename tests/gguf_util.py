"""GGUF files written inside the tests, the way llama.cpp's converter (convert_hf_to_gguf.py) writes them.

`write_gguf` takes a random-init transformers model and its tokenizer and writes a GGUF of one tensor type
with the `gguf` package: llama.cpp's tensor names and metadata keys, Llama's q/k rows permuted into its
rotary order, GPT-2's Conv1D weights transposed, 1-D tensors in F32 as the converter keeps them. It returns
the transformers state dict with every written weight replaced by what the file holds (dequantized by the
gguf package, mapped back to transformers' layout): the reference a faithful import must reproduce.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

gguf = __import__("pytest").importorskip("gguf")

LLAMA_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate_proj.bias": "ffn_gate.bias", "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.bias": "ffn_down.bias",
}
GPT2_NAMES = {
    "ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias", "ln_2.weight": "ffn_norm.weight",
    "ln_2.bias": "ffn_norm.bias", "attn.c_attn.weight": "attn_qkv.weight", "attn.c_attn.bias": "attn_qkv.bias",
    "attn.c_proj.weight": "attn_output.weight", "attn.c_proj.bias": "attn_output.bias",
    "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_fc.bias": "ffn_up.bias", "mlp.c_proj.weight": "ffn_down.weight",
    "mlp.c_proj.bias": "ffn_down.bias",
}
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gpt2": "gpt2"}
CONTROL = 3


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rows [first half, second half] -> interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str, model_type: str) -> str | None:
    if model_type == "gpt2":
        globals_ = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
                    "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
                    "lm_head.weight": "output.weight"}
        prefix, names = "transformer.h.", GPT2_NAMES
    else:
        globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}
        prefix, names = "model.layers.", LLAMA_NAMES
    if hf_name in globals_:
        return globals_[hf_name]
    if not hf_name.startswith(prefix):
        return None
    layer, _, rest = hf_name[len(prefix):].partition(".")
    return f"blk.{layer}.{names[rest]}" if rest in names else None


def _metadata(w, arch: str, cfg, model_type: str) -> None:
    w.add_uint32(f"{arch}.block_count", cfg.num_hidden_layers if model_type != "gpt2" else cfg.n_layer)
    if model_type == "gpt2":
        w.add_uint32(f"{arch}.context_length", cfg.n_positions)
        w.add_uint32(f"{arch}.embedding_length", cfg.n_embd)
        w.add_uint32(f"{arch}.feed_forward_length", cfg.n_inner or 4 * cfg.n_embd)
        w.add_uint32(f"{arch}.attention.head_count", cfg.n_head)
        w.add_float32(f"{arch}.attention.layer_norm_epsilon", cfg.layer_norm_epsilon)
        return
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_uint32(f"{arch}.context_length", cfg.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", cfg.hidden_size)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", cfg.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.num_key_value_heads)
    w.add_uint32(f"{arch}.attention.key_length", head_dim)
    w.add_uint32(f"{arch}.attention.value_length", head_dim)
    w.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        w.add_string(f"{arch}.rope.scaling.type", "linear")
        w.add_float32(f"{arch}.rope.scaling.factor", scaling["factor"])
    elif kind == "llama3":  # the converter writes the per-frequency factors as a tensor (llama.py)
        w.add_tensor("rope_freqs.weight", _llama3_factors(cfg.rope_theta, head_dim, scaling))
    elif kind == "longrope":  # phi.py: both factor lists as tensors, the attention factor in the metadata
        original = cfg.original_max_position_embeddings
        scale = cfg.max_position_embeddings / original
        w.add_uint32(f"{arch}.rope.scaling.original_context_length", original)
        w.add_float32(f"{arch}.rope.scaling.attn_factor",
                      math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        w.add_tensor("rope_factors_long.weight", np.array(scaling["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(scaling["short_factor"], np.float32))


def _llama3_factors(theta: float, dim: int, s: dict) -> np.ndarray:
    """convert_hf_to_gguf's rope_freqs for Llama 3 scaling: one divisor per rotary frequency."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high, old = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                              s["original_max_position_embeddings"])
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def _tokenizer(w, tok, vocab_size: int, eot: str, add_bos: bool) -> None:
    import json

    model = json.loads(tok.to_str())["model"]
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    tokens = [by_id.get(i, f"<unused{i}>") for i in range(vocab_size)]
    types = [CONTROL if t == eot else (5 if i not in by_id else 1) for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt-2")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", tok.token_to_id(eot))
    w.add_uint32("tokenizer.ggml.eos_token_id", tok.token_to_id(eot))
    w.add_bool("tokenizer.ggml.add_bos_token", add_bos)


def write_gguf(model, tok, path: Path, model_type: str, qtype: str = "F32", eot: str = "<|endoftext|>",
               chat_template: str | None = None, add_bos: bool = False) -> dict[str, torch.Tensor]:
    """Write `model` (transformers, random init) as a GGUF of `qtype`; return its state dict as the file holds it."""
    cfg = model.config
    arch = ARCH[model_type]
    qt = gguf.GGMLQuantizationType[qtype]
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tied = getattr(cfg, "tie_word_embeddings", True)
    w = gguf.GGUFWriter(str(path), arch)
    _metadata(w, arch, cfg, model_type)
    _tokenizer(w, tok, state["model.embed_tokens.weight" if model_type != "gpt2" else "transformer.wte.weight"]
               .shape[0], eot, add_bos)
    if chat_template:
        w.add_string("tokenizer.chat_template", chat_template)
    n_head = cfg.n_head if model_type == "gpt2" else cfg.num_attention_heads
    n_kv = n_head if model_type == "gpt2" else cfg.num_key_value_heads
    held: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        target = _gguf_name(name, model_type)
        if name == "lm_head.weight" and tied:
            continue
        assert target is not None or name.endswith("rotary_emb.inv_freq"), f"no GGUF name for {name}"
        if target is None:
            continue
        heads = 0
        if arch == "llama" and ".attn_q." in target:
            heads = n_head
        elif arch == "llama" and ".attn_k." in target:
            heads = n_kv
        transposed = model_type == "gpt2" and value.ndim == 2 and ".h." in name  # Conv1D [in, out] -> [out, in]
        array = value.T.copy() if transposed else value
        array = _permute(array, heads) if heads else array
        kind = qt if array.ndim == 2 and array.shape[-1] % 32 == 0 else gguf.GGMLQuantizationType.F32
        data = gguf.quants.quantize(np.ascontiguousarray(array, np.float32), kind)
        w.add_tensor(target, data, raw_dtype=kind)
        back = gguf.quants.dequantize(data, kind).reshape(array.shape).astype(np.float32)
        back = _unpermute(back, heads) if heads else back
        held[name] = torch.from_numpy(np.ascontiguousarray(back.T if transposed else back))
    if tied and "lm_head.weight" in state:
        held["lm_head.weight"] = held["model.embed_tokens.weight" if model_type != "gpt2" else "transformer.wte.weight"]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def reference(model, held: dict[str, torch.Tensor]):
    """`model` with every weight replaced by what the GGUF file holds."""
    model.load_state_dict({**model.state_dict(), **held})
    return model.eval()
