"""The bundle: one self-describing folder that a loader with numpy + onnxruntime + tokenizers can run.

    model.onnx (+ model.onnx.data)   the graph, weights usually external
    tokenizer.json                   Hugging Face tokenizers format
    gptedge.json                     everything a loader needs (this module's `BundleSpec`)
    genai_model.onnx, genai_config.json, tokenizer_config.json
                                     optional (`export --genai`): what onnxruntime-genai loads; the graph
                                     reads the same model.onnx.data

The graph contract (format_version 1), declared here once and read by export,
quantize and runtime alike:

kv_cache.update == "inplace" (GroupQueryAttention; the default):
    inputs   input_ids [B, S] int64, position_ids [B, S] int64,
             seqlens_k [B] int32 (= tokens in the cache after this call - 1, per row),
             total_sequence_length [] int32 (= max over rows of tokens after this call),
             logits_index [B, K] int64 (which of the S positions get logits; K=1 for generation, S for perplexity),
             past_key_{i} / past_value_{i} [B, n_kv_head, capacity, head_dim]
    outputs  logits [B, K, V], present_key_{i} / present_value_{i} (same shape as past: bind the SAME
             OrtValue as past and present and the step writes the new keys in place).
    Rows of a batch are right-padded; each row's real length is carried by seqlens_k.

kv_cache.update == "concat" (standard ops, portable):
    inputs   input_ids, position_ids, attention_mask [B, P+S] int64 (1 = real token), logits_index,
             past_key_{i} / past_value_{i} [B, n_kv_head, P, head_dim]
    outputs  logits [B, K, V], present_key_{i} / present_value_{i} [B, n_kv_head, P+S, head_dim].
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gptedge.errors import BundleError, UsageError
from gptedge.runtime.traits import PROVIDER_NAMES

FORMAT_VERSION = 1
SPEC_NAME = "gptedge.json"
MODEL_NAME = "model.onnx"
TOKENIZER_NAME = "tokenizer.json"
# Written with `export --genai` (gptedge.quantize.genai): the graph and config onnxruntime-genai runs.
GENAI_MODEL_NAME = "genai_model.onnx"
GENAI_CONFIG_NAME = "genai_config.json"
TARGETS = PROVIDER_NAMES  # a bundle is built for one provider (gptedge.runtime.traits)
DTYPES = ("fp32", "fp16")
# A KV cache can also be int8 (gptedge.quantize.kvcache: calibrated per-channel scales, in-place graphs only).
KV_DTYPES = (*DTYPES, "int8")
TASKS = ("generation", "embedding")
POOLINGS = ("last", "mean", "first")  # how an embedding bundle pools its hidden states
KV_UPDATES = ("inplace", "concat")
# Anything bigger than this in gptedge.json's dimensions is a hostile or broken file, not a model.
_MAX_DIM = 1 << 22


@dataclass(frozen=True)
class Architecture:
    family: str  # a name for people ("gpt2", "llama", "qwen3", ...); the runtime never branches on it
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_embd: int
    vocab_size: int
    context_length: int  # positions the model was trained for; the KV capacity ceiling
    # The model-space point as the exporter saw it (positions, rope, norm, mlp, ...):
    # shown by `info`, never read to run.
    details: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("family", "details"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= _MAX_DIM:
                raise BundleError(f"{SPEC_NAME}: architecture.{f.name}={value!r} is not a plausible size; "
                                  "the bundle is corrupt, re-export it")
        if not isinstance(self.family, str) or not isinstance(self.details, dict):
            raise BundleError(f"{SPEC_NAME}: architecture.family must be text and details an object; "
                              "the bundle is corrupt, re-export it")
        if self.n_head % self.n_kv_head:
            raise BundleError(f"{SPEC_NAME}: n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}; "
                              "the bundle is corrupt, re-export it")


@dataclass(frozen=True)
class IOSpec:
    """Graph input/output names. The per-layer KV names come from one template each."""

    input_ids: str = "input_ids"
    position_ids: str = "position_ids"
    seqlens_k: str | None = "seqlens_k"
    total_sequence_length: str | None = "total_sequence_length"
    attention_mask: str | None = None
    logits_index: str | None = "logits_index"
    logits: str = "logits"
    past_key: str = "past_key_{layer}"
    past_value: str = "past_value_{layer}"
    present_key: str = "present_key_{layer}"
    present_value: str = "present_value_{layer}"

    def past_names(self, n_layer: int) -> list[str]:
        """Interleaved [key_0, value_0, key_1, ...], the order the graph declares them."""
        return [t.format(layer=i) for i in range(n_layer) for t in (self.past_key, self.past_value)]

    def present_names(self, n_layer: int) -> list[str]:
        return [t.format(layer=i) for i in range(n_layer) for t in (self.present_key, self.present_value)]


@dataclass(frozen=True)
class KVCacheSpec:
    update: str = "inplace"  # "inplace": past and present share one buffer; "concat": present = past ++ new
    layout: str = "BNSH"  # [batch, kv heads, positions, head_dim]
    dtype: str = "fp32"  # KV_DTYPES; "int8" is written by `quantize --kv-cache int8`
    quantization: dict[str, Any] | None = None  # int8: how its scales were calibrated (the scales live in the graph)


@dataclass
class BundleSpec:
    architecture: Architecture
    dtype: str = "fp32"
    target: str = "cpu"
    io: IOSpec = field(default_factory=IOSpec)
    kv_cache: KVCacheSpec = field(default_factory=KVCacheSpec)
    special_tokens: dict[str, Any] = field(default_factory=dict)  # bos_id, eos_id, pad_id, eos, ...
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None  # method, bits, block_size, excluded nodes, quality report
    verification: dict[str, Any] = field(default_factory=dict)  # measured diffs against PyTorch
    provenance: dict[str, Any] = field(default_factory=dict)  # source hash, tool versions, time
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    chat_template: str | None = None  # the source model's Jinja chat template, as text (None: none shipped)
    task: str = "generation"  # TASKS: "generation" (logits over a KV cache) or "embedding" (pooled vectors)
    # Embedding bundles: pooling ("last", "mean", "first"), normalize, dimensions, prompts {name: prefix}, source
    embedding: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    @property
    def pad_id(self) -> int:
        """The token that fills a batch's shorter rows (never attended to): the pad id, else eos, else 0."""
        return int(self.special_tokens.get("pad_id", self.special_tokens.get("eos_id")) or 0)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BundleSpec":
        try:
            arch = Architecture(**data["architecture"])
            io = IOSpec(**data.get("io", {}))
            kv = KVCacheSpec(**data.get("kv_cache", {}))
            rest = {f.name: data[f.name]
                    for f in fields(cls) if f.name in data and f.name not in ("architecture", "io", "kv_cache")}
            spec = cls(architecture=arch, io=io, kv_cache=kv, **rest)
        except (KeyError, TypeError) as exc:
            raise BundleError(f"{SPEC_NAME} is missing or has unexpected fields ({exc}); "
                              "re-export the bundle with this gptedge version") from exc
        spec.validate()
        return spec

    def validate(self) -> None:
        self.architecture.validate()
        if self.dtype not in DTYPES:
            raise BundleError(f"{SPEC_NAME}: dtype {self.dtype!r} is not one of {DTYPES}")
        if self.target not in TARGETS:
            raise BundleError(f"{SPEC_NAME}: target {self.target!r} is not one of {TARGETS}")
        if self.kv_cache.update not in KV_UPDATES:
            raise BundleError(f"{SPEC_NAME}: kv_cache.update {self.kv_cache.update!r} is not one of {KV_UPDATES}")
        if self.kv_cache.dtype not in KV_DTYPES:
            raise BundleError(f"{SPEC_NAME}: kv_cache.dtype {self.kv_cache.dtype!r} is not one of {KV_DTYPES}; "
                              "the bundle is corrupt, re-export it")
        if self.kv_cache.dtype not in DTYPES and self.kv_cache.update != "inplace":
            raise BundleError(f"{SPEC_NAME}: a {self.kv_cache.dtype} KV cache needs kv_cache.update 'inplace'; "
                              "the bundle is corrupt, re-export it")
        self._validate_fields()

    def _validate_fields(self) -> None:
        """Types of the free-form fields, so a hand-edited gptedge.json fails here and not mid-generation."""
        required = ("input_ids", "logits", "past_key", "past_value", "present_key", "present_value")
        for f in fields(IOSpec):
            name = getattr(self.io, f.name)
            ok = isinstance(name, str) and bool(name) or (name in (None, "") and f.name not in required)
            if ok and isinstance(name, str) and "{" in name:
                ok = f.name.startswith(("past_", "present_")) and name.replace("{layer}", "").count("{") == 0
            if not ok:
                raise BundleError(f"{SPEC_NAME}: io.{f.name}={name!r} is not a graph name (templates may only use "
                                  "{layer}); re-export the bundle")
        for name in ("special_tokens", "generation_defaults", "verification", "provenance", "files"):
            if not isinstance(getattr(self, name), dict):
                raise BundleError(f"{SPEC_NAME}: {name} must be a JSON object; the bundle is corrupt, re-export it")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise BundleError(f"{SPEC_NAME}: chat_template must be text or null; the bundle is corrupt, re-export it")
        if self.task not in TASKS:
            raise BundleError(f"{SPEC_NAME}: task {self.task!r} is not one of {TASKS}; re-export the bundle")
        if self.task == "embedding":
            e = self.embedding
            if not (isinstance(e, dict) and e.get("pooling") in POOLINGS and isinstance(e.get("normalize"), bool)
                    and e.get("dimensions") == self.architecture.n_embd and isinstance(e.get("prompts", {}), dict)):
                raise BundleError(f"{SPEC_NAME}: an embedding bundle needs embedding.pooling (one of {POOLINGS}), "
                                  "normalize and dimensions (the model's width); re-export the bundle")
        if self.quantization is not None and not isinstance(self.quantization, dict):
            raise BundleError(f"{SPEC_NAME}: quantization must be a JSON object or null; "
                              "the bundle is corrupt, re-export it")
        vocab = self.architecture.vocab_size
        for key, value in self.special_tokens.items():
            values = value if key == "stop_ids" and isinstance(value, list) else [value]
            if key.endswith(("_id", "_ids")) and not all(
                    isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab for v in values):
                raise BundleError(f"{SPEC_NAME}: special_tokens.{key}={value!r} is not a token id in [0, {vocab}) "
                                  "(or a list of them); re-export the bundle")
        from gptedge.runtime.sampling import SamplingParams  # numpy only; imported here to keep this module light

        known = {f.name for f in fields(SamplingParams)}
        try:
            SamplingParams(**{k: v for k, v in self.generation_defaults.items() if k in known and v is not None})
        except UsageError as exc:
            raise BundleError(f"{SPEC_NAME}: generation_defaults are invalid ({exc}); fix or remove them, "
                              "or re-export the bundle") from exc


_ONNX_TYPES = {"fp32": 1, "fp16": 10, "int8": 3}  # onnx.TensorProto's element types, without importing onnx


def check_graph(spec: BundleSpec, inputs: dict[str, list], outputs: dict[str, list],
                position_tables: list[list[int]], types: dict[str, int] | None = None) -> None:
    """Refuse a gptedge.json whose sizes or names disagree with the graph it describes.

    gptedge.json holds the checksums, so nothing checks it but this: without it, a hand-edited
    n_layer or head size makes the engine allocate KV buffers for the wrong model (terabytes for
    absurd values) and onnxruntime fail mid-generation. `inputs`/`outputs` map graph names to their
    declared shapes (ints, or strings for symbolic axes); `position_tables` are the dims of the tables
    the graph indexes with its position ids (one row per position: the context cannot be longer);
    `types` their element types (TensorProto's enum; 0 or absent: not declared), which must be the
    KV cache's dtype. Runs on what the scanner read, before onnxruntime sees the file.
    """
    a, io = spec.architecture, spec.io
    if spec.task == "embedding":
        _check_embedding_graph(spec, inputs, outputs)
        return
    problems = []
    layers = 0
    while layers < len(inputs) and io.past_key.format(layer=layers) in inputs:
        layers += 1
    if layers != a.n_layer:
        problems.append(f"n_layer={a.n_layer} but the graph has {layers} layers of {io.past_key!r} inputs")
    for name in (io.input_ids, io.position_ids, io.seqlens_k, io.total_sequence_length, io.attention_mask,
                 io.logits_index):
        if name and name not in inputs:
            problems.append(f"no graph input {name!r}")
    if layers:
        kv = inputs.get(io.past_key.format(layer=0), [])
        if (len(kv) == 4 and (kv[1], kv[3]) != (a.n_kv_head, a.head_dim)
                and all(isinstance(d, int) for d in (kv[1], kv[3]))):
            problems.append(f"n_kv_head={a.n_kv_head}, head_dim={a.head_dim} but the KV inputs are {kv}")
        declared = (types or {}).get(io.past_key.format(layer=0), 0)
        if declared and declared != _ONNX_TYPES[spec.kv_cache.dtype]:
            named = {v: k for k, v in _ONNX_TYPES.items()}.get(declared, f"type {declared}")
            problems.append(f"kv_cache.dtype={spec.kv_cache.dtype} but the graph's KV inputs are {named}")
    logits = outputs.get(io.logits)
    if logits is None:
        problems.append(f"no graph output {io.logits!r}")
    elif logits and isinstance(logits[-1], int) and logits[-1] != a.vocab_size:
        problems.append(f"vocab_size={a.vocab_size} but the logits have {logits[-1]} entries")
    for table in position_tables:
        if table and a.context_length > table[0]:
            problems.append(f"context_length={a.context_length} but a position table has {table[0]} rows")
    if problems:
        raise BundleError(f"{SPEC_NAME} does not match model.onnx ({'; '.join(problems)}); "
                          "the bundle is corrupt or mixed up, re-export it")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checksum_files(folder: str | os.PathLike[str]) -> dict[str, str]:
    """sha256 of every file in the folder except gptedge.json itself (which holds the result)."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != SPEC_NAME
    }


def write_spec(folder: str | os.PathLike[str], spec: BundleSpec) -> None:
    """Fill `spec.files` with the folder's checksums and write gptedge.json (call last, inside the temp folder)."""
    spec.files = checksum_files(folder)
    Path(folder, SPEC_NAME).write_text(spec.to_json(), encoding="utf-8")


def _inside(folder: Path, relative: str) -> Path:
    """Resolve `relative` under `folder`, refusing anything that escapes it (.., absolute paths, links out)."""
    candidate = (folder / relative).resolve()
    if Path(relative).is_absolute() or not candidate.is_relative_to(folder.resolve()):
        raise BundleError(f"bundle file {relative!r} points outside the bundle folder {folder}; "
                          "refusing to load an unsafe bundle")
    return candidate


def read_spec(folder: str | os.PathLike[str], verify_checksums: bool = True) -> BundleSpec:
    """Read and check gptedge.json: known format version, plausible sizes, files present and unmodified."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder} is not a bundle folder (it does not exist or is a file); "
                          "pass the folder that `gptedge export` wrote")
    spec_path = folder / SPEC_NAME
    if not spec_path.is_file():
        raise BundleError(f"{folder} has no {SPEC_NAME}; it is not a gptedge bundle (export one with `gptedge export`)")
    try:
        data = json.loads(spec_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{spec_path} is not valid JSON ({exc}); the bundle is corrupt, re-export it") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{spec_path} does not hold a JSON object; the bundle is corrupt, re-export it")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{folder}: bundle format version {version!r} is not supported by this gptedge (it reads version "
            f"{FORMAT_VERSION}); re-export the bundle or upgrade gptedge"
        )
    spec = BundleSpec.from_dict(data)
    for name in (MODEL_NAME, TOKENIZER_NAME):
        if name not in spec.files:
            raise BundleError(f"{SPEC_NAME} lists no checksum for {name}; the bundle is incomplete, re-export it")
    for relative, expected in spec.files.items():
        path = _inside(folder, relative)
        if not path.is_file():
            raise BundleError(f"bundle file {relative} is missing from {folder}; copy the whole bundle folder")
        if verify_checksums and sha256_file(path) != expected:
            raise BundleError(f"bundle file {relative} does not match its sha256 in {SPEC_NAME}: "
                              "it was modified or corrupted; re-export or re-copy the bundle")
    return spec


EMBEDDING_INPUTS, EMBEDDING_OUTPUT = ("input_ids", "attention_mask"), "embeddings"


def _check_embedding_graph(spec: BundleSpec, inputs: dict[str, list], outputs: dict[str, list]) -> None:
    problems = [f"no graph input {name!r}" for name in EMBEDDING_INPUTS if name not in inputs]
    shape = outputs.get(EMBEDDING_OUTPUT)
    if shape is None:
        problems.append(f"no graph output {EMBEDDING_OUTPUT!r}")
    elif shape and isinstance(shape[-1], int) and shape[-1] != spec.architecture.n_embd:
        problems.append(f"n_embd={spec.architecture.n_embd} but the vectors have {shape[-1]} entries")
    if problems:
        raise BundleError(f"{SPEC_NAME} does not match model.onnx ({'; '.join(problems)}); "
                          "the bundle is corrupt or mixed up, re-export it")
