"""A local Hugging Face model folder -> `gptedge.train.model.GPT` + its tokenizer. Nothing is downloaded.

Reads what `save_pretrained` writes: config.json, weights (model.safetensors,
pytorch_model.bin, or their sharded `.index.json` forms), tokenizer files (tokenizer.json
as it is, or the slow tokenizer's vocab.json + merges.txt, converted here the way
transformers' GPT2Converter does), generation_config.json and the chat template.
`transformers` itself is not needed. Which model types are supported, and how each maps
onto `GPT`, is the data in `gptedge.export.hf_families`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Collection, Iterable

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from gptedge.errors import CheckpointError
from gptedge.export.hf_families import FAMILIES, HFFamily, WeightMap, supported
from gptedge.export.source import Source
from gptedge.train.model import GPT, GPTConfig

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
GENERATION_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")


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
    if mt is None:
        archs = set(hf.get("architectures") or [])
        mt = next((name for name, fam in FAMILIES.items() if archs & set(fam.architectures)), None)
    return str(mt)


def family(hf: dict[str, Any], where: Path) -> HFFamily:
    mt = model_type(hf)
    if mt not in FAMILIES:
        raise CheckpointError(f"{where}: model_type {mt!r} is not supported; "
                              f"gptedge exports these Hugging Face model types: {supported()}")
    fam = FAMILIES[mt]
    archs = set(hf.get("architectures") or [])
    if archs and not archs & set(fam.architectures):
        raise CheckpointError(f"{where}: architectures {sorted(archs)} is not a {mt} language model; export a "
                              f"{fam.architectures[0]}")
    return fam


def gpt_config(hf: dict[str, Any], where: Path) -> GPTConfig:
    """Our GPTConfig for a transformers config, or a CheckpointError naming what cannot be mapped."""
    fam = family(hf, where)
    try:
        return GPTConfig(dropout=0.0, **fam.config(hf, where))
    except (TypeError, ValueError, KeyError) as exc:
        detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise CheckpointError(f"{where}: config.json has invalid sizes or settings ({detail}); "
                              "restore the file") from exc


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
        raise CheckpointError(f"{path} could not be read as weights ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); "
                              "it is damaged or not a torch/safetensors file") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors; it is not a transformers weight file")
    return state


def weight_sources(config: GPTConfig, wmap: WeightMap, expected: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Each of our weight names -> the source tensors (names after `wmap.base` is removed) concatenated into it."""
    sources: dict[str, tuple[str, ...]] = {k: (v,) for k, v in wmap.globals.items()}
    sources["lm_head.weight"] = (wmap.head,)
    for i in range(config.n_layer):
        for ours, theirs in wmap.per_layer.items():
            sources[f"transformer.h.{i}.{ours}"] = tuple(wmap.layer.format(i=i) + t for t in theirs)
    return {key: sources.get(key, ()) for key in expected}


def convert_state_dict(available: Collection[str], load: Callable[[str], torch.Tensor], config: GPTConfig,
                       wmap: WeightMap, expected: dict[str, tuple[int, ...]], where: Path,
                       described_by: str = "config.json") -> dict[str, torch.Tensor]:
    """Source names and layouts -> `GPT.state_dict()` names and layouts (fp32), following `wmap`.

    `available` names the source tensors (after `wmap.base` is removed) and `load` reads one, so a source
    can be read one tensor at a time (a GGUF file is dequantized tensor by tensor, never held twice).
    `expected` holds our names and shapes. Every source tensor must be used and every one of ours made.
    """
    available = {n for n in available if not n.endswith(wmap.ignored)}
    embedding = wmap.globals["transformer.wte.weight"]
    aliases = {}
    if config.tie_embeddings and embedding not in available and wmap.head in available:
        aliases[embedding] = wmap.head  # some converters store a tied matrix under the head's name only
    present = available | set(aliases)
    sources = weight_sources(config, wmap, expected)
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for key, names in sources.items():
        if not names or any(n not in present for n in names):
            missing += [n for n in names if n not in present] or [key]
            continue
        parts = [load(aliases.get(n, n)).to(torch.float32) for n in names]
        tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        if key.endswith(wmap.transposed):
            tensor = tensor.t()
        out[key] = tensor.contiguous()
    used = {n for names in sources.values() for n in names}
    extra = sorted(available - used - ({wmap.head} if config.tie_embeddings else set()))
    wrong = sorted(k for k in out if tuple(out[k].shape) != expected[k])
    if missing or extra or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", extra),
                                ("wrong shape",
                                 [f"{k} {tuple(out[k].shape)} ({described_by} implies {expected[k]})" for k in wrong]))
            if keys
        )
        raise CheckpointError(f"{where}: the weights do not match {described_by} ({detail}); the file is damaged, or "
                              f"its {described_by} belongs to another model")
    if (config.tie_embeddings and wmap.head in available and embedding not in aliases
            and not torch.equal(load(wmap.head).to(torch.float32), out["transformer.wte.weight"])):
        raise CheckpointError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from the token "
                              "embedding; set tie_word_embeddings to false in config.json "
                              "if the head is its own matrix")
    return out


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
    if (folder / "tokenizer.model").is_file() and not vocab.is_file():
        raise CheckpointError(
            f"{folder} has only a SentencePiece tokenizer.model; gptedge reads tokenizer.json (the fast tokenizer). "
            "Write one once with transformers' AutoTokenizer (needs transformers and sentencepiece): "
            f"AutoTokenizer.from_pretrained('{folder}').save_pretrained('{folder}')"
        )
    if not (vocab.is_file() and merges.is_file()):
        raise CheckpointError(
            f"{folder} has no tokenizer files; it needs tokenizer.json, or vocab.json + merges.txt "
            "(save the tokenizer with save_pretrained into the same folder)"
        )
    tok_config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    try:
        bpe = models.BPE.from_file(str(vocab), str(merges), dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False)
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


def chat_template(folder: Path) -> str | None:
    """The Jinja chat template: chat_template.jinja, else tokenizer_config.json's `chat_template` (text only)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if (folder / "tokenizer_config.json").is_file():
        template = _read_json(folder / "tokenizer_config.json").get("chat_template")
        if isinstance(template, str):
            return template
        if isinstance(template, list):  # several named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if isinstance(named.get("default"), str):
                return named["default"]
    return None


def generation(folder: Path, hf: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """Sampling defaults and every stop id (eos_token_id may be a list: Llama 3 stops on any of three)."""
    raw = _read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    defaults = {k: raw[k] for k in GENERATION_KEYS if k in raw}
    value = raw.get("eos_token_id", hf.get("eos_token_id"))  # generation_config.json wins, as in transformers
    stops: list[int] = []
    for tid in value if isinstance(value, list) else [value]:
        if isinstance(tid, int) and not isinstance(tid, bool) and tid not in stops:
            stops.append(tid)
    return defaults, stops


def load_hf(folder: str | Path) -> Source:
    """Read a local transformers folder of a supported model type into our GPT (fp32, eval) with its tokenizer."""
    folder = Path(folder)
    hf = _read_json(folder / "config.json")
    fam = family(hf, folder)
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
    wmap = fam.weights
    state = {name.removeprefix(wmap.base) if name != wmap.head else name: tensor for name, tensor in state.items()}
    with torch.device("meta"):  # no random init of weights that are about to be replaced (seconds for 100M+ models)
        model = GPT(config)
    weights = convert_state_dict(state.keys(), state.__getitem__, config, wmap, model.weight_shapes(), folder)
    model.load_state_dict(weights, strict=not config.tie_embeddings, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced wte's parameter: tie the head again
    model.build_rope()  # derived tables were built on the meta device
    model.eval().requires_grad_(False)
    gen, stops = generation(folder, hf)
    specials = special_tokens(folder, hf, tok, config.vocab_size)
    stops = [t for t in stops if 0 <= t < config.vocab_size]
    if len(stops) > 1:
        specials["stop_ids"] = stops
    return Source(
        kind=f"huggingface-{model_type(hf)}", path=folder.resolve(), model=model, tokenizer=tok,
        tokenizer_file=tok_file, special_tokens=specials, generation_defaults=gen, weight_files=files,
        family=model_type(hf), chat_template=chat_template(folder),
    )
