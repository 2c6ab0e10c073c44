"""Run decoder-only models exported by Hugging Face Optimum through the same sampler.

An Optimum export (`optimum-cli export onnx --task text-generation-with-past`, or `main_export`) is a
folder with `model.onnx` taking `input_ids`, `attention_mask`, (`position_ids`) and
`past_key_values.{i}.key/value` [B, n_kv_head, P, head_dim], returning `logits` [B, S, V] and
`present.{i}.key/value` [B, n_kv_head, P+S, head_dim], plus `config.json` and `tokenizer.json`.

That is exactly the "concat" graph contract of `gptedge.runtime.bundle`, so this module only
synthesizes a `BundleSpec` (names read from the graph itself, sizes from config.json) and the
ordinary `Engine` runs it. The price of Optimum's layout is a copy of the whole cache per step
(present is a new tensor); export with `gptedge export` for the in-place cache.

There is no gptedge.json, so no checksums: the safety scan of model.onnx still runs, and the
optimized-graph cache is not used (it is keyed by checksums).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gptedge.errors import BundleError
from gptedge.runtime.bundle import MODEL_NAME, SPEC_NAME, TOKENIZER_NAME, Architecture, BundleSpec, IOSpec, KVCacheSpec
from gptedge.runtime.onnx_scan import scan_model

_KV_DTYPES = {"tensor(float)": "fp32", "tensor(float16)": "fp16"}
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


def is_optimum_folder(folder: Path) -> bool:
    """A folder with model.onnx + config.json and no gptedge.json."""
    return (folder.is_dir() and (folder / MODEL_NAME).is_file() and (folder / "config.json").is_file()
            and not (folder / SPEC_NAME).exists())


def _config(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{folder / 'config.json'} is not readable JSON ({exc}); "
                          "re-export the model with Optimum") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{folder / 'config.json'} does not hold a JSON object")
    return data


def _first(config: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    raise BundleError(f"config.json has none of {keys}; this does not look like a decoder-only model's config")


def architecture(config: dict[str, Any]) -> Architecture:
    """Sizes from a transformers config (GPT-2 names first, then the generic ones)."""
    n_layer = _first(config, "n_layer", "num_hidden_layers")
    n_head = _first(config, "n_head", "num_attention_heads")
    n_embd = _first(config, "n_embd", "hidden_size")
    n_kv = config.get("num_key_value_heads") or n_head
    context = _first(config, "n_positions", "max_position_embeddings", "n_ctx")
    head_dim = config.get("head_dim") or (
        n_embd // n_head if isinstance(n_embd, int) and isinstance(n_head, int) and n_head else 0)
    arch = Architecture(str(config.get("model_type", "unknown")), n_layer, n_head, n_kv, head_dim, n_embd,
                        _first(config, "vocab_size"), context)
    arch.validate()
    return arch


def spec_from_graph(config: dict[str, Any], inputs: dict[str, str], outputs: list[str]) -> BundleSpec:
    """A "concat" BundleSpec for an Optimum graph with these inputs {name: type} and outputs."""
    arch = architecture(config)
    layers = {int(m.group(1)) for name in inputs if (m := _PAST.match(name))}
    if layers != set(range(arch.n_layer)):
        raise BundleError(
            f"{MODEL_NAME} has no past_key_values.{{i}}.key/value inputs for all {arch.n_layer} layers; export it with "
            "Optimum's task text-generation-with-past"
        )
    expected = {"input_ids", "attention_mask", "position_ids"} | {
        f"past_key_values.{i}.{kv}" for i in range(arch.n_layer) for kv in ("key", "value")}
    extra = sorted(set(inputs) - expected)
    if extra or "attention_mask" not in inputs or "logits" not in outputs:
        raise BundleError(
            f"{MODEL_NAME} is not a plain Optimum decoder-with-past (unexpected inputs {extra}, or no "
            "attention_mask/logits); export it with `optimum-cli export onnx --task text-generation-with-past` "
            "(no merged decoder)"
        )
    kv_type = inputs["past_key_values.0.key"]
    if kv_type not in _KV_DTYPES:
        raise BundleError(f"{MODEL_NAME}'s KV inputs are {kv_type}; only float32 and float16 are supported")
    present_key = "present.{layer}.key" if "present.0.key" in outputs else None
    if present_key is None:
        raise BundleError(f"{MODEL_NAME} returns no present.{{i}}.key/value outputs; "
                          "export it with text-generation-with-past")
    io = IOSpec(
        input_ids="input_ids", position_ids="position_ids" if "position_ids" in inputs else "", seqlens_k=None,
        total_sequence_length=None, attention_mask="attention_mask", logits_index=None, logits="logits",
        past_key="past_key_values.{layer}.key", past_value="past_key_values.{layer}.value",
        present_key="present.{layer}.key", present_value="present.{layer}.value",
    )
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    special = {k: v for k, v in {"eos_id": eos, "bos_id": config.get("bos_token_id"),
                                  "pad_id": config.get("pad_token_id", eos)}.items() if isinstance(v, int)}
    dtype = _KV_DTYPES[kv_type]
    return BundleSpec(
        architecture=arch, dtype=dtype, target="cpu", io=io, kv_cache=KVCacheSpec(update="concat", dtype=dtype),
        special_tokens=special, provenance={"source": "huggingface optimum export"},
    )


def load(folder: Path, provider: str, threads: int | None, spin: bool | None = None):
    """`Model.load`'s work for an Optimum folder: scan, session, synthesized spec, the same Engine.

    Returns (engine, tokenizer, spec, session info).
    """
    from gptedge.runtime.loading import load_tokenizer, make_engine
    from gptedge.runtime.providers import choose_provider, create_session

    config = _config(folder)
    model_path = folder / MODEL_NAME
    scan_model(model_path)
    provisional = spec_for_provider_choice(config)
    choice = choose_provider(provider, provisional)
    session, info = create_session(model_path, choice, threads, key=None, spin=spin)
    spec = spec_from_graph(config, {i.name: i.type for i in session.get_inputs()},
                           [o.name for o in session.get_outputs()])
    tokenizer = load_tokenizer(folder / TOKENIZER_NAME, spec.architecture.vocab_size)
    return make_engine(session, spec, info.choice), tokenizer, spec, info


def spec_for_provider_choice(config: dict[str, Any]) -> BundleSpec:
    """A spec from config.json alone (no graph read) for choosing the provider before a session exists: concat KV
    and fp32, which every provider runs; `spec_from_graph` replaces it once the session names the graph's IO."""
    return BundleSpec(architecture=architecture(config), kv_cache=KVCacheSpec(update="concat"))
