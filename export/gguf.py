"""A GGUF file -> `gptedge.train.model.GPT` (its weights dequantized, fp32) + tokenizer + the blocks it keeps.

The model is built the way a Hugging Face folder is (gptedge.export.hf): a config from the file's metadata
and a weight-name mapping (gptedge.export.gguf_families), then every tensor is dequantized one at a time by
the gguf package straight into the model, so the float weights exist once. The float model is what export
verifies its graph against; `kept_blocks` then hands quantize the file's own Q8_0 / Q4_0 / Q4_1 integers
and scales for every projection whose source tensors all hold one of those types, so the bundle computes
the model the file holds rather than a re-quantization of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gptedge.errors import CheckpointError
from gptedge.export.gguf_families import ARCHITECTURES, GGUFArch, Meta, supported, unpermute_rows
from gptedge.export.gguf_file import GGUFError, GGUFFile
from gptedge.export.gguf_tokenizer import build_tokenizer, special_tokens
from gptedge.export.hf import convert_state_dict, weight_sources
from gptedge.export.source import Source
from gptedge.quantize.ggml_blocks import KEPT, BlockWeight, concat_rows, from_ggml, permute_rows
from gptedge.train.model import GPT, GPTConfig

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
               GGMLQuantizationType.F64)
# general.sampling.* -> SamplingParams fields (what llama.cpp's converter records from generation_config.json)
SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
                 "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p",
                 "general.sampling.penalty_repeat": "repetition_penalty"}


def is_gguf(path: str | Path) -> bool:
    """A file whose first four bytes are GGUF's magic (the name is not trusted either way)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return path.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


@dataclass
class GGUFWeights:
    """The file behind an imported model: which tensors make each of our weights, and their stored blocks."""

    file: GGUFFile
    arch: GGUFArch
    config: GPTConfig
    sources: dict[str, tuple[str, ...]]  # our weight name -> GGUF tensors, concatenated along the output rows

    def types(self) -> dict[str, dict[str, int]]:
        """Tensor types the file holds, per kind of tensor (attn_q, ffn_down, token_embd, ...): what `info` shows."""
        out: dict[str, dict[str, int]] = {}
        for name in self.file.tensors:
            kind = name.split(".")[-2] if name.startswith("blk.") else name.rsplit(".", 1)[0]
            kind_types = out.setdefault(kind, {})
            type_name = self.file.type_name(name)
            kind_types[type_name] = kind_types.get(type_name, 0) + 1
        return out

    def permuted_heads(self, name: str) -> int:
        """How many heads' rows llama.cpp permuted in tensor `name` (0: none)."""
        if not self.arch.rope_permuted or not name.startswith("blk."):
            return 0
        return {"attn_q": self.config.n_head, "attn_k": self.config.n_kv_head}.get(name.split(".")[-2], 0)

    def load(self, name: str) -> torch.Tensor:
        """One tensor dequantized to fp32, rows in Hugging Face's order."""
        values = self.file.dequantize(name)
        heads = self.permuted_heads(name)
        if heads:
            values = unpermute_rows(values, heads, self.config.head_dim)
        return torch.from_numpy(np.ascontiguousarray(values))

    @property
    def quantized(self) -> bool:
        """Whether the file stores any tensor quantized (an F32 / F16 file exports as a float bundle)."""
        return any(GGMLQuantizationType(t.type_id) not in FLOAT_TYPES for t in self.file.tensors.values())

    def requantize_bits(self, name: str) -> int | None:
        """The width to round weight `name` to when its blocks cannot be kept: 8 bits for types of 5 bits a
        weight or more, 4 below that; None when every source tensor is float (it stays float)."""
        widths = []
        for n in self.sources.get(name, ()):
            qtype = GGMLQuantizationType(self.file.tensors[n].type_id)
            block, size = GGML_QUANT_SIZES[qtype]
            if qtype not in FLOAT_TYPES:
                widths.append(8 * size / block)
        return None if not widths else (8 if max(widths) >= 5 else 4)

    def blocks(self, name: str) -> BlockWeight | None:
        """Our weight `name` as the file's own blocks, or None when a source tensor is not Q8_0 / Q4_0 / Q4_1
        (or the parts of a packed projection differ in type)."""
        names = self.sources.get(name, ())
        types = {self.file.type_name(n) for n in names}
        if not names or len(types) != 1 or next(iter(types)) not in KEPT:
            return None
        parts = []
        for n in names:
            weight = from_ggml(self.file.raw(n), self.file.type_name(n))
            heads = self.permuted_heads(n)
            if heads:
                weight = permute_rows(weight, unpermute_rows(np.arange(weight.shape[0]), heads, self.config.head_dim))
            parts.append(weight)
        return concat_rows(parts) if len(parts) > 1 else parts[0]


def _generation_defaults(file: GGUFFile) -> dict[str, Any]:
    out = {}
    for key, name in SAMPLING_KEYS.items():
        value = file.metadata.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def load_gguf(path: str | Path) -> Source:
    """Read and check a GGUF file of a supported architecture into our GPT (fp32, eval) with its tokenizer."""
    path = Path(path)
    file = GGUFFile(path)
    arch_name = file.metadata.get("general.architecture")
    if arch_name not in ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {arch_name!r} is not supported; gptedge imports GGUF architectures "
                        f"{supported()}")
    arch = ARCHITECTURES[arch_name]
    if "token_embd.weight" not in file.tensors:
        raise GGUFError(f"{path}: there is no token_embd.weight tensor; the file is incomplete")
    vocab = file.tensors["token_embd.weight"].numpy_shape[0]
    try:
        config = GPTConfig(dropout=0.0, vocab_size=vocab, tie_embeddings=arch.weights.head not in file.tensors,
                           **arch.config(Meta(file, arch_name)))
    except (TypeError, ValueError) as exc:
        raise GGUFError(f"{path}: the metadata describes a model gptedge cannot build ({exc})") from exc
    tok = build_tokenizer(file)
    if tok.get_vocab_size(with_added_tokens=True) > vocab:
        raise GGUFError(f"{path}: the vocabulary has {tok.get_vocab_size(with_added_tokens=True)} tokens but the "
                        f"embedding only {vocab} rows; the file is damaged")
    with torch.device("meta"):
        model = GPT(config)
    expected = model.weight_shapes()
    weights = GGUFWeights(file, arch, config, weight_sources(config, arch.weights, expected))
    try:
        state = convert_state_dict(file.tensors.keys(), weights.load, config, arch.weights, expected, path,
                                   described_by="the file's metadata")
    except CheckpointError as exc:
        raise GGUFError(str(exc)) from None
    model.load_state_dict(state, strict=not config.tie_embeddings, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    model.build_rope()
    model.eval().requires_grad_(False)
    template = file.metadata.get("tokenizer.chat_template")
    return Source(
        kind=f"gguf-{arch_name}", path=path.resolve(), model=model, tokenizer=tok, tokenizer_file=None,
        special_tokens=special_tokens(file, tok, vocab), generation_defaults=_generation_defaults(file),
        weight_files=[path], family=arch.family, chat_template=template if isinstance(template, str) else None,
        stored=weights,
    )
