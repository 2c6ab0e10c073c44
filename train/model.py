"""The GPT: one readable file, one config that spans GPT-2 and Llama-style decoders.

A model family is a point in the space `GPTConfig` describes, not a file of its own:
positions (learned table | rotary), norm (LayerNorm | RMSNorm), MLP (GELU | SwiGLU),
grouped key/value heads, which projections carry biases, a tied or untied head, and
per-head q/k norms. GPT-2 is `GPTConfig()`; Llama, Qwen2/3, Mistral and Phi-3 are other
points (see `gptedge.export.hf` for the mappings).

The block is written once, as the residual stream it is: `x = x + attn(ln_1(x))`, then
`x = x + mlp(ln_2(x))`. *How* attention is computed is a kernel passed in: `CachedAttention` here
(PyTorch SDPA, for training and as the export reference), and the two ONNX kernels in
`gptedge.export.graph` (GroupQueryAttention over an in-place buffer, or standard ops over a
concatenated cache). Every kernel takes the same q, k, v. How the norms and the GELU are computed is
passed in the same way (`Ops`): PyTorch's modules by default, ONNX Runtime's fused kernels when the
in-place graph is traced (also built in `gptedge.export.graph`).

Parameter names follow Hugging Face GPT-2 (`transformer.h.{i}.attn.c_attn`, ...) so GPT-2
checkpoints map one tensor at a time; q, k and v are one packed projection (q heads, then
k heads, then v heads), and SwiGLU's gate and up projections one packed `c_fc` (gate first).

Shapes in comments: B batch, S new positions in this call, P past positions, T = P + S,
C = n_embd, H = n_head, Hkv = n_kv_head, D = head_dim, I = intermediate_size, V = vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

# One layer's cache: (keys, values), each [B, Hkv, P, D], keys already rotated.
LayerKV = tuple[torch.Tensor, torch.Tensor]

POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
ROPE_SCALINGS = ("linear", "llama3", "longrope", "factors")


@dataclass
class GPTConfig:
    # Longest sequence the model serves: rows of the learned position table, or the rotary tables' length.
    block_size: int = 256
    # Size of the tokenizer's vocabulary, so the embedding and LM head cover every id.
    vocab_size: int = 4096
    # Depth: more layers buy quality at a linear cost in decode time.
    n_layer: int = 4
    # Query heads per layer.
    n_head: int = 4
    # Width of the residual stream; most of the parameters scale with its square.
    n_embd: int = 128
    # Key/value heads (grouped-query attention): each serves n_head / n_kv_head query heads, and the
    # KV cache shrinks by that factor. None: n_head (GPT-2's multi-head attention).
    n_kv_head: int | None = None
    # Width of one head. None: n_embd / n_head. Qwen3 and others declare it, and it may differ.
    head_dim: int | None = None
    # Dropout during training only; 0 for small data-rich runs and always 0 at export.
    dropout: float = 0.0
    # Default for every bias below left at None; GPT-2 has them, Llama has none.
    bias: bool = True
    # Biases on the q/k/v projection (Qwen2 has them while the rest of the model has none).
    qkv_bias: bool | None = None
    # Bias on the attention output projection.
    proj_bias: bool | None = None
    # Biases on the MLP projections.
    mlp_bias: bool | None = None
    # "learned": a position table added to the token embedding (GPT-2); "rope": rotary q/k (Llama).
    positions: str = "learned"
    # Rotary base; larger values reach further (Llama 3: 500000).
    rope_theta: float = 10000.0
    # Rotary frequency scaling: None, or {"type": "linear", "factor"}, {"type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, {"type": "longrope",
    # "short_factor", "attention_factor", "original_max_position_embeddings"} (short contexts only), or
    # {"type": "factors", "factors": [D/2 divisors of the inverse frequencies]} (how GGUF files carry Llama 3's
    # scaling: llama.cpp's rope_freqs tensor).
    rope_scaling: dict[str, Any] | None = None
    # "layernorm" (GPT-2, with weight and bias) or "rmsnorm" (Llama, weight only).
    norm: str = "layernorm"
    # Norm epsilon; the source model's value, so imported checkpoints reproduce exactly.
    layer_norm_epsilon: float = 1e-5
    # "gelu": up, GELU, down (GPT-2); "swiglu": down(silu(gate) * up) (Llama).
    mlp: str = "gelu"
    # MLP hidden width. None: 4 * n_embd (GPT-2).
    intermediate_size: int | None = None
    # GELU flavour: GPT-2 uses the tanh approximation ("gelu_new"); "none" is the exact erf form.
    gelu_approximate: str = "tanh"
    # The LM head reuses the token embedding (GPT-2, SmolLM2, Llama 3.2); False: its own matrix.
    tie_embeddings: bool = True
    # Per-head RMSNorm on q and k before the rotation (Qwen3).
    qk_norm: bool = False
    # Attend to at most this many latest positions (Mistral, Phi-3); None: the whole context.
    # Exact only while sequences are no longer than it: longer ones are refused, not approximated.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), or set head_dim")
            self.head_dim = self.n_embd // self.n_head
        self.n_kv_head = self.n_head if self.n_kv_head is None else self.n_kv_head
        self.intermediate_size = 4 * self.n_embd if self.intermediate_size is None else self.intermediate_size
        for name in ("head_dim", "n_kv_head", "intermediate_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        for name in ("qkv_bias", "proj_bias", "mlp_bias"):
            if getattr(self, name) is None:
                setattr(self, name, self.bias)
        for name, allowed in (("positions", POSITIONS), ("norm", NORMS), ("mlp", MLPS),
                              ("gelu_approximate", ("tanh", "none"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.positions == "rope":
            if self.head_dim % 2:
                raise ValueError(f"rotary positions need an even head_dim, not {self.head_dim}")
            if not self.rope_theta > 0:
                raise ValueError(f"rope_theta must be > 0, not {self.rope_theta!r}")
            if self.rope_scaling is not None and self.rope_scaling.get("type") not in ROPE_SCALINGS:
                raise ValueError(f"rope_scaling type must be one of {', '.join(ROPE_SCALINGS)}, "
                                 f"not {self.rope_scaling.get('type')!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, not {self.sliding_window!r}")

    @property
    def exact_context(self) -> int:
        """The longest sequence this model computes exactly (a sliding window or a short-context RoPE caps it)."""
        limits = [self.block_size, self.sliding_window or self.block_size]
        if self.positions == "rope" and (self.rope_scaling or {}).get("type") == "longrope":
            limits.append(int(self.rope_scaling["original_max_position_embeddings"]))
        return min(limits)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPTConfig":
        """Build from a dict, ignoring keys this version does not know (forward compatible)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------------------------------------
# Rotary positions: one table, used by every kernel (GroupQueryAttention takes it as cos/sin caches)


def rope_inv_freq(c: GPTConfig) -> torch.Tensor:
    """Inverse frequencies [D/2] (fp32) with the config's scaling, computed as transformers computes them."""
    D = c.head_dim
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    s = c.rope_scaling or {}
    kind = s.get("type")
    if kind == "linear":
        inv = inv / float(s["factor"])
    elif kind == "llama3":
        factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        inv = torch.where(medium, smoothed, scaled)
    elif kind == "factors":
        inv = inv / torch.tensor(s["factors"], dtype=torch.float32)
    elif kind == "longrope":  # contexts up to original_max_position_embeddings use the short factors
        inv = 1.0 / (torch.tensor(s["short_factor"], dtype=torch.float32)
                     * c.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    return inv


def rope_tables(c: GPTConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, D/2] (fp32) for positions 0..length-1."""
    inv = rope_inv_freq(c)
    freqs = torch.arange(length, dtype=torch.int64).float()[:, None] * inv[None, :]  # [length, D/2]
    scale = float((c.rope_scaling or {}).get("attention_factor", 1.0))  # longrope scales cos and sin
    return freqs.cos() * scale, freqs.sin() * scale


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves of the last dim (Llama's non-interleaved layout):
    x [..., S, D], cos/sin broadcast to [..., S, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 as Llama's reference does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(c: GPTConfig, dim: int) -> nn.Module:
    if c.norm == "rmsnorm":
        return RMSNorm(dim, c.layer_norm_epsilon)
    return nn.LayerNorm(dim, eps=c.layer_norm_epsilon, bias=c.bias)


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


@dataclass(frozen=True)
class Ops:
    """How the norms and the GELU are computed, handed to the blocks beside the attention kernel.

    `norm(module, x)` applies a norm module (LayerNorm, RMSNorm; the per-head q/k norms too) and `gelu(act, x)`
    the MLP's `nn.GELU`. The default, `TORCH_OPS`, calls the modules: training and the reference every export
    is checked against. `gptedge.export.graph.ort_ops` emits ONNX Runtime's fused kernels instead. The residual
    adds are no op of their own: they stay `x = x + ...` here, and the in-place export folds each into the norm
    after it (`gptedge.export.graph.fuse_residual_norms`).
    """

    norm: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _call
    gelu: Callable[[nn.GELU, torch.Tensor], torch.Tensor] = _call


TORCH_OPS = Ops()


# ---------------------------------------------------------------------------------------------
# The block


class AttentionKernel(Protocol):
    """Attention for layer `layer` from the packed projection qkv [B, S, (H + 2*Hkv)*D]; returns [B, S, H*D].

    `attn.split(qkv)` gives q, k, v (per-head norms applied; `attn.split(qkv, ops)` applies them with a graph's
    ops); a kernel that takes the packed tensor as it is (GroupQueryAttention, when the model has no q/k norms)
    saves the split.
    """

    def __call__(self, layer: int, qkv: torch.Tensor, attn: "CausalSelfAttention") -> torch.Tensor: ...


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.sizes = [c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim]
        self.c_attn = nn.Linear(c.n_embd, sum(self.sizes), bias=c.qkv_bias)  # packed q, k, v
        self.c_proj = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=c.proj_bias)
        self.q_norm = RMSNorm(c.head_dim, c.layer_norm_epsilon) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.layer_norm_epsilon) if c.qk_norm else None
        self.resid_dropout = nn.Dropout(c.dropout)

    def split(self, qkv: torch.Tensor, ops: Ops = TORCH_OPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed [B, S, (H + 2*Hkv)*D] -> q [B, S, H*D], k and v [B, S, Hkv*D] (q/k norms applied, not rotated)."""
        q, k, v = qkv.split(self.sizes, dim=2)
        if self.q_norm is not None:
            B, S, _ = qkv.shape
            q = ops.norm(self.q_norm, q.view(B, S, self.n_head, self.head_dim)).view(B, S, -1)
            k = ops.norm(self.k_norm, k.view(B, S, self.n_kv_head, self.head_dim)).view(B, S, -1)
        return q, k, v

    def heads(self, qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Packed projection -> q [B, H, S, D], k and v [B, Hkv, S, D], q and k rotated when cos/sin are given."""
        B, S, _ = qkv.shape
        q, k, v = self.split(qkv)
        q = q.view(B, S, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cos is not None:
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return q, k, v

    def forward(self, x: torch.Tensor, kernel: AttentionKernel, layer: int) -> torch.Tensor:
        return self.resid_dropout(self.c_proj(kernel(layer, self.c_attn(x), self)))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.swiglu = c.mlp == "swiglu"
        width = c.intermediate_size * (2 if self.swiglu else 1)  # SwiGLU: gate and up packed, gate first
        self.c_fc = nn.Linear(c.n_embd, width, bias=c.mlp_bias)
        self.gelu = nn.GELU(approximate=c.gelu_approximate)
        self.c_proj = nn.Linear(c.intermediate_size, c.n_embd, bias=c.mlp_bias)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, ops: Ops = TORCH_OPS) -> torch.Tensor:
        h = self.c_fc(x)  # [B, S, I] or [B, S, 2I]
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = ops.gelu(self.gelu, h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(c, c.n_embd)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = make_norm(c, c.n_embd)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, kernel: AttentionKernel, layer: int, ops: Ops = TORCH_OPS) -> torch.Tensor:
        x = x + self.attn(ops.norm(self.ln_1, x), kernel, layer)
        x = x + self.mlp(ops.norm(self.ln_2, x), ops)
        return x


# ---------------------------------------------------------------------------------------------
# The PyTorch attention kernel


class CachedAttention:
    """SDPA over an optional past: the kernel for training and for the reference every export is checked against.

    Positions P..P+S-1 for the new tokens; `presents` collects each layer's (k, v) after the call.
    """

    def __init__(self, model: "GPT", past: list[LayerKV] | None, P: int, S: int, device: torch.device) -> None:
        c = model.config
        self.c, self.past, self.P, self.S = c, past, P, S
        self.presents: list[LayerKV] = []
        self.dropout = c.dropout if model.training else 0.0
        self.cos = self.sin = None
        if c.positions == "rope":
            self.cos, self.sin = model.rope_cos[P : P + S], model.rope_sin[P : P + S]  # [S, D/2]
        T = P + S
        # With a past the causal mask must be aligned bottom-right: query i sits at absolute position P + i.
        # `is_causal=True` aligns top-left and is wrong there.
        self.mask = None if P == 0 else torch.ones(S, T, dtype=torch.bool, device=device).tril(diagonal=P)

    def __call__(self, layer: int, qkv: torch.Tensor, attn: CausalSelfAttention) -> torch.Tensor:
        c = self.c
        B, S, _ = qkv.shape
        q, k, v = attn.heads(qkv, self.cos, self.sin)  # [B, H, S, D], [B, Hkv, S, D] x 2
        if self.past is not None:
            k = torch.cat([self.past[layer][0], k], dim=2)  # [B, Hkv, T, D]
            v = torch.cat([self.past[layer][1], v], dim=2)
        self.presents.append((k, v))
        gqa = c.n_kv_head != c.n_head
        if self.mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=self.dropout, enable_gqa=gqa)
        return y.transpose(1, 2).reshape(B, S, c.n_head * c.head_dim)  # [B, S, H*D]


# ---------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        c = self.config = config
        parts: dict[str, nn.Module] = dict(wte=nn.Embedding(c.vocab_size, c.n_embd))
        if c.positions == "learned":
            parts["wpe"] = nn.Embedding(c.block_size, c.n_embd)
        parts.update(drop=nn.Dropout(c.dropout), h=nn.ModuleList([Block(c) for _ in range(c.n_layer)]),
                     ln_f=make_norm(c, c.n_embd))
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        if c.positions == "rope":
            self.register_buffer("rope_cos", torch.empty(0), persistent=False)  # [block_size, D/2]
            self.register_buffer("rope_sin", torch.empty(0), persistent=False)
            self.build_rope()
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    def build_rope(self) -> None:
        """(Re)compute the rotary tables: they are derived from the config, never saved
        (call after a meta-device build)."""
        if self.config.positions == "rope":
            cos, sin = rope_tables(self.config, self.config.block_size)
            self.rope_cos, self.rope_sin = cos, sin

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """State-dict names and shapes of the tensors a file must hold: a tied head is the embedding's tensor."""
        tied = {"lm_head.weight"} if self.config.tie_embeddings else set()
        return {k: tuple(v.shape) for k, v in self.state_dict().items() if k not in tied}

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding and "wpe" in self.transformer else n

    # The three stages every graph shares; only the attention kernel and the ops differ between them.
    def embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token (+ learned position) embeddings [B, S, C]; positions [S] or [B, S] are ignored by rotary models."""
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(positions)
        return self.transformer.drop(x)

    def blocks(self, x: torch.Tensor, kernel: AttentionKernel, ops: Ops = TORCH_OPS) -> torch.Tensor:
        """Every block, then the final norm: [B, S, C] -> [B, S, C]."""
        for i, block in enumerate(self.transformer.h):
            x = block(x, kernel, i, ops)
        return ops.norm(self.transformer.ln_f, x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [..., V]; F.linear on the [V, C] matrix (the embedding itself when tied)."""
        return F.linear(h, self.lm_head.weight)

    def hidden_states(
        self, idx: torch.Tensor, past_kv: list[LayerKV] | None = None
    ) -> tuple[torch.Tensor, list[LayerKV]]:
        """Final-norm hidden states [B, S, C] and the updated cache (one (k, v) per layer)."""
        B, S = idx.shape
        P = 0 if past_kv is None else past_kv[0][0].shape[2]
        if P + S > self.config.exact_context:
            raise ValueError(f"sequence of {P + S} positions exceeds the model's context {self.config.exact_context}")
        kernel = CachedAttention(self, past_kv, P, S, idx.device)
        pos = torch.arange(P, P + S, dtype=torch.long, device=idx.device)  # [S]
        return self.blocks(self.embed(idx, pos), kernel), kernel.presents

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        past_kv: list[LayerKV] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[LayerKV]]:
        """Logits [B, S, V], the mean cross-entropy against `targets` (ignore_index -100) or None, and the cache.

        `past_kv` continues a sequence: the new tokens take positions P..P+S-1.
        """
        h, presents = self.hidden_states(idx, past_kv)
        logits = self.head(h)  # [B, S, V]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss, presents

    @torch.no_grad()
    def generate_greedy(self, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Reference greedy decoding with the KV cache: prefill once, then one token per step."""
        logits, _, past = self(idx)
        out = [idx]
        for _ in range(max_new_tokens):
            nxt = logits[:, -1, :].argmax(dim=-1, keepdim=True)  # [B, 1]
            out.append(nxt)
            if sum(t.shape[1] for t in out) >= self.config.exact_context:
                break
            logits, _, past = self(nxt, past_kv=past)
        return torch.cat(out, dim=1)
