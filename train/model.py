"""The GPT: one readable file, nanoGPT style, with a KV cache for decoding.

Parameter names and shapes follow Hugging Face GPT-2 up to naming and the
transposition of its Conv1D weights (`[in, out]` there, `[out, in]` here), so a
GPT-2 checkpoint maps onto this model one tensor at a time (see
`gptedge.export.hf`).

Shapes in comments: B batch, S new positions in this call, P past positions,
T = P + S, C = n_embd, H = n_head, D = head_dim, V = vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# One layer's cache: (keys, values), each [B, H, P, D].
LayerKV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class GPTConfig:
    # Longest sequence the learned position table covers; also the KV cache's ceiling.
    block_size: int = 256
    # Size of the tokenizer's vocabulary, so the embedding and LM head cover every id.
    vocab_size: int = 4096
    # Depth: more layers buy quality at a linear cost in decode time.
    n_layer: int = 4
    # Attention heads per layer; n_embd must divide by it (head_dim = n_embd / n_head).
    n_head: int = 4
    # Width of the residual stream; most of the parameters scale with its square.
    n_embd: int = 128
    # Dropout during training only; 0 for small data-rich runs and always 0 at export.
    dropout: float = 0.0
    # Biases in Linear and LayerNorm layers; GPT-2 has them, nanoGPT shows they are optional.
    bias: bool = True
    # GELU flavour: GPT-2 uses the tanh approximation ("gelu_new"); "none" is the exact erf form.
    gelu_approximate: str = "tanh"
    # LayerNorm epsilon; GPT-2's value, so imported checkpoints reproduce exactly.
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.gelu_approximate not in ("tanh", "none"):
            raise ValueError(f"gelu_approximate must be 'tanh' or 'none', not {self.gelu_approximate!r}")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPTConfig":
        """Build from a dict, ignoring keys this version does not know (forward compatible)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, S, C] -> q, k, v each [B, H, S, D]."""
        B, S, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        return tuple(t.view(B, S, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, past: LayerKV | None = None) -> tuple[torch.Tensor, LayerKV]:
        B, S, C = x.shape
        q, k, v = self.split_heads(x)  # [B, H, S, D]
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # [B, H, T, D]
            v = torch.cat([past[1], v], dim=2)
        T = k.shape[2]
        dropout_p = self.dropout if self.training else 0.0
        if T == S:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            # With a past the causal mask must be aligned bottom-right: query i sits at absolute
            # position T - S + i. `is_causal=True` aligns top-left and is wrong here.
            mask = torch.ones(S, T, dtype=torch.bool, device=x.device).tril(diagonal=T - S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, S, C)  # [B, S, C]
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu_approximate)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, past: LayerKV | None = None) -> tuple[torch.Tensor, LayerKV]:
        a, present = self.attn(self.ln_1(x), past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden_states(
        self, idx: torch.Tensor, past_kv: list[LayerKV] | None = None
    ) -> tuple[torch.Tensor, list[LayerKV]]:
        """Final-LayerNorm hidden states [B, S, C] and the updated cache (one (k, v) per layer)."""
        B, S = idx.shape
        P = 0 if past_kv is None else past_kv[0][0].shape[2]
        if P + S > self.config.block_size:
            raise ValueError(f"sequence of {P + S} positions exceeds block_size {self.config.block_size}")
        pos = torch.arange(P, P + S, dtype=torch.long, device=idx.device)  # [S]
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # [B, S, C]
        presents: list[LayerKV] = []
        for i, block in enumerate(self.transformer.h):
            x, present = block(x, None if past_kv is None else past_kv[i])
            presents.append(present)
        return self.transformer.ln_f(x), presents

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
        logits = self.lm_head(h)  # [B, S, V]
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
            if sum(t.shape[1] for t in out) >= self.config.block_size:
                break
            logits, _, past = self(nxt, past_kv=past)
        return torch.cat(out, dim=1)
