"""A local Hugging Face GPT-2 folder -> `gptedge.train.model.GPT` + a tokenizer. Nothing is downloaded.

Reads what `save_pretrained` writes: config.json, weights (model.safetensors,
pytorch_model.bin, or their sharded `.index.json` forms) and tokenizer files
(tokenizer.json, or the slow tokenizer's vocab.json + merges.txt, converted here
the way transformers' GPT2Converter does). `transformers` itself is not needed.

GPT-2 stores its projections as Conv1D, weight [in, out]; ours are nn.Linear,
[out, in], so those four matrices per layer are transposed. Config flags that
change the arithmetic in ways our GPT does not implement are refused rather than
silently ignored: a model that exports but computes something else is worse than
an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from gptedge.errors import CheckpointError
from gptedge.train.model import GPT, GPTConfig

SUPPORTED_MODEL_TYPES = {"gpt2": "GPT2LMHeadModel"}
ARCHITECTURES = {"GPT2LMHeadModel", "GPT2Model"}
# HF activation name -> nn.GELU(approximate=...). gelu_fast is the same tanh formula written differently.
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}
# Flags whose non-default value changes the computation: (name, value our GPT implements, default if absent).
REQUIRED_FLAGS = (
    ("scale_attn_weights", True, True),
    ("scale_attn_by_inverse_layer_idx", False, False),
    ("reorder_and_upcast_attn", False, False),
    ("add_cross_attention", False, False),
)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older transformers saved; not weights
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
GENERATION_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")


@dataclass
class HFSource:
    model: GPT  # fp32, eval mode
    tokenizer: Tokenizer
    tokenizer_file: Path | None  # the folder's tokenizer.json, copied verbatim; None when converted
    special_tokens: dict[str, Any]
    generation_defaults: dict[str, Any]
    weight_files: list[Path] = field(default_factory=list)
    model_type: str = "gpt2"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable or not JSON ({exc}); restore the file") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; restore the file")
    return data


def is_hf_folder(path: str | Path) -> bool:
    """True for a folder whose config.json looks like a transformers config (has model_type or architectures)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and ("model_type" in data or "architectures" in data)


def model_type(hf: dict[str, Any]) -> str:
    mt = hf.get("model_type")
    if mt is None and set(hf.get("architectures") or []) & ARCHITECTURES:
        mt = "gpt2"
    return str(mt)


def gpt_config(hf: dict[str, Any], where: Path) -> GPTConfig:
    """Our GPTConfig for a transformers GPT-2 config, or a CheckpointError naming what cannot be mapped."""
    mt = model_type(hf)
    if mt not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise CheckpointError(f"{where}: model_type {mt!r} is not supported; gptedge exports these Hugging Face model types: {supported}")
    archs = set(hf.get("architectures") or [])
    if archs and not archs & ARCHITECTURES:
        raise CheckpointError(f"{where}: architectures {sorted(archs)} is not a GPT-2 language model; export a GPT2LMHeadModel")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise CheckpointError(
            f"{where}: activation_function {activation!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
        )
    for name, wanted, default in REQUIRED_FLAGS:
        if hf.get(name, default) != wanted:
            raise CheckpointError(f"{where}: {name}={hf.get(name)!r} is not supported (gptedge's GPT computes {name}={wanted}); this model cannot be exported")
    try:
        n_embd, n_layer, n_head = int(hf.get("n_embd", 768)), int(hf.get("n_layer", 12)), int(hf.get("n_head", 12))
        n_inner = hf.get("n_inner")
        if n_inner is not None and int(n_inner) != 4 * n_embd:
            raise CheckpointError(f"{where}: n_inner={n_inner} is not supported (gptedge's MLP is 4 * n_embd = {4 * n_embd} wide)")
        return GPTConfig(
            block_size=int(hf.get("n_positions", hf.get("n_ctx", 1024))),
            vocab_size=int(hf.get("vocab_size", 50257)),
            n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=0.0, bias=True,
            gelu_approximate=ACTIVATIONS[activation],
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: config.json has invalid sizes ({exc}); restore the file") from exc


def weight_files(folder: Path) -> list[Path]:
    """The weight files to read, in preference order: safetensors before pickled torch files."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        shards = sorted(set(_read_json(path).get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{path} lists no weight files; restore the checkpoint")
        files = [folder / s for s in shards]
        missing = [f.name for f in files if not f.is_file() or f.parent != folder]
        if missing:
            raise CheckpointError(f"{path} names shards that are missing from {folder}: {', '.join(missing[:3])}")
        return files
    raise CheckpointError(f"{folder} has no weights; expected one of {', '.join(WEIGHT_FILES)}")


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # weights_only=True: tensors and plain containers only; a pickle that tries to run code is refused.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors have no common base class
        raise CheckpointError(f"{path} could not be read as weights ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); it is damaged or not a torch/safetensors file") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors; it is not a transformers weight file")
    return state


def convert_state_dict(hf_state: dict[str, torch.Tensor], config: GPTConfig, tied: bool, where: Path) -> dict[str, torch.Tensor]:
    """HF GPT-2 names and Conv1D layouts -> `GPT.state_dict()` names and nn.Linear layouts (fp32)."""
    out: dict[str, torch.Tensor] = {}
    head = None
    for name, tensor in hf_state.items():
        if name == "lm_head.weight":
            head = tensor
            continue
        key = name.removeprefix("transformer.")
        if key.endswith(BUFFERS):
            continue
        tensor = tensor.to(torch.float32)
        if key.endswith(CONV1D):
            tensor = tensor.t()
        out[f"transformer.{key}"] = tensor.contiguous()
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(out))
    extra = sorted(set(out) - set(expected))
    wrong = sorted(k for k in set(out) & set(expected) if tuple(out[k].shape) != expected[k])
    if missing or extra or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)) if keys
        )
        raise CheckpointError(f"{where}: the weights do not match config.json as a GPT-2 ({detail}); the folder is damaged or not a GPT2LMHeadModel")
    wte = out["transformer.wte.weight"]
    if head is not None and not torch.equal(head.to(torch.float32), wte):
        raise CheckpointError(f"{where}: lm_head.weight differs from the token embedding; gptedge's GPT ties them, so this model cannot be exported")
    if head is None and not tied:
        raise CheckpointError(f"{where}: tie_word_embeddings is false but no lm_head.weight was saved; the checkpoint is incomplete")
    return out


def _expected_shapes(c: GPTConfig) -> dict[str, tuple[int, ...]]:
    C, V, T = c.n_embd, c.vocab_size, c.block_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C),
                                          "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (C,), p + "ln_1.bias": (C,), p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
            p + "attn.c_attn.weight": (3 * C, C), p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
            p + "mlp.c_fc.weight": (4 * C, C), p + "mlp.c_fc.bias": (4 * C,),
            p + "mlp.c_proj.weight": (C, 4 * C), p + "mlp.c_proj.bias": (C,),
        })
    return shapes


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(folder: Path) -> tuple[Tokenizer, Path | None]:
    """tokenizer.json when present, else vocab.json + merges.txt built into a byte-level BPE like GPT-2's."""
    tok_json = folder / "tokenizer.json"
    if tok_json.is_file():
        try:
            return Tokenizer.from_file(str(tok_json)), tok_json
        except Exception as exc:  # tokenizers raises a bare Exception for parse errors
            raise CheckpointError(f"{tok_json} is not a valid tokenizer.json ({exc}); restore it") from exc
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise CheckpointError(
            f"{folder} has no tokenizer files; it needs tokenizer.json, or vocab.json + merges.txt "
            "(save the tokenizer with save_pretrained into the same folder)"
        )
    tok_config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    try:
        bpe = models.BPE.from_file(str(vocab), str(merges), dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    except Exception as exc:
        raise CheckpointError(f"{vocab} / {merges} are not a valid BPE vocabulary ({exc}); restore them") from exc
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(tok_config.get("add_prefix_space", False)))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [_token_text(tok_config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
    specials += [_token_text(v) for v in (tok_config.get("added_tokens_decoder") or {}).values()]
    if (folder / "special_tokens_map.json").is_file():
        specials += [_token_text(v) for v in _read_json(folder / "special_tokens_map.json").values()]
    specials = sorted({s for s in specials if s})
    if specials:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok, None


def special_tokens(folder: Path, hf: dict[str, Any], tok: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """bos/eos/pad ids and strings: ids from config.json, strings from the tokenizer files, each filling the other."""
    tok_config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            tok_config = {**_read_json(folder / name), **tok_config}
    out: dict[str, Any] = {}
    for kind in ("bos", "eos", "pad"):
        tid = hf.get(f"{kind}_token_id")
        text = _token_text(tok_config.get(f"{kind}_token"))
        if isinstance(tid, list):  # newer configs allow several eos ids; the first is the canonical one
            tid = tid[0] if tid else None
        if tid is None and text is not None:
            tid = tok.token_to_id(text)
        if isinstance(tid, int) and 0 <= tid < vocab_size:
            out[f"{kind}_id"] = tid
            out[kind] = tok.id_to_token(tid) if text is None or tok.token_to_id(text) != tid else text
    return out


def load_hf_gpt2(folder: str | Path) -> HFSource:
    """Read a local transformers GPT-2 folder into our GPT (fp32, eval) with its tokenizer and special tokens."""
    folder = Path(folder)
    hf = _read_json(folder / "config.json")
    config = gpt_config(hf, folder)
    tok, tok_file = load_tokenizer(folder)
    if tok.get_vocab_size(with_added_tokens=True) > config.vocab_size:
        raise CheckpointError(
            f"{folder}: the tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens but the model only "
            f"{config.vocab_size} embeddings; the tokenizer files belong to another model"
        )
    files = weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_load_file(f))
    weights = convert_state_dict(state, config, bool(hf.get("tie_word_embeddings", True)), folder)
    with torch.device("meta"):  # no random init of weights that are about to be replaced (seconds for GPT-2 sizes)
        model = GPT(config)
    model.load_state_dict(weights, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced wte's parameter: tie the head again
    model.eval().requires_grad_(False)
    gen: dict[str, Any] = {}
    if (folder / "generation_config.json").is_file():
        raw = _read_json(folder / "generation_config.json")
        gen = {k: raw[k] for k in GENERATION_KEYS if k in raw}
    return HFSource(
        model=model, tokenizer=tok, tokenizer_file=tok_file,
        special_tokens=special_tokens(folder, hf, tok, config.vocab_size),
        generation_defaults=gen, weight_files=files, model_type=model_type(hf),
    )
