"""`export_bundle`: a gptedge checkpoint (a LoRA run's adapters merged), a local Hugging Face model folder or a
GGUF file -> a verified bundle: a text-generation graph over a KV cache, or an embedding graph (pooled vectors,
gptedge.export.embeddings).

Order of work, so that bad input fails fast and nothing half-done is ever visible:
  1. check the options and that the output may be written (cheap);
  2. load the source (CheckpointError for anything that is not a supported model);
  3. in a temporary folder next to the destination: trace the graph, save it with
     external weights, write tokenizer.json, run ONNX Runtime against PyTorch (a GGUF's quantized
     blocks are then kept and checked against the dequantized model, gptedge.export.stored);
  4. write gptedge.json (checksums of every file) last, then rename the folder into place.
A verification failure raises ExportError and the temporary folder is removed.

Default dtype per target: cpu -> fp32 (CPU kernels are fastest and exact in fp32),
cuda -> fp16 (GroupQueryAttention on CUDA runs fp16/bf16 only), dml -> fp16 (GPUs
behind DirectML are built for fp16; GroupQueryAttention runs fp32 and fp16 there).
"""

from __future__ import annotations

import copy
import datetime as _dt
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

from gptedge.errors import CheckpointError, UsageError
from gptedge.export.source import Source
from gptedge.runtime.bundle import (
    DTYPES,
    KV_UPDATES,
    MODEL_NAME,
    TARGETS,
    TOKENIZER_NAME,
    Architecture,
    BundleSpec,
    KVCacheSpec,
    sha256_file,
    write_spec,
)
from gptedge.runtime.chat import DEFAULT_TEMPLATE
from gptedge.runtime.traits import TRAITS

EOT = "<|endoftext|>"


class Progress:
    """Stage lines on stderr with timings ("export: tracing the graph ... 4.2 s"); silent when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.seconds: dict[str, float] = {}

    def note(self, text: str) -> None:
        if self.enabled:
            print(f"export: {text}", file=sys.stderr, flush=True)

    @contextmanager
    def stage(self, key: str, text: str) -> Iterator[None]:
        if self.enabled:
            print(f"export: {text} ...", end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if self.enabled:
                print(" failed", file=sys.stderr, flush=True)
            raise
        self.seconds[key] = round(time.perf_counter() - start, 3)
        if self.enabled:
            print(f" {self.seconds[key]:.1f} s", file=sys.stderr, flush=True)


def _gptedge_special_tokens(tok) -> dict[str, Any]:
    """gptedge models separate documents with <|endoftext|>: it both starts (bos) and ends (eos) a text, as in GPT-2."""
    tid = tok.token_to_id(EOT)
    return {} if tid is None else {"bos_id": tid, "bos": EOT, "eos_id": tid, "eos": EOT}


# Names for points of the model space that have one: (positions, norm, mlp) -> family.
FAMILY_NAMES = {("learned", "layernorm", "gelu"): "gpt2", ("rope", "rmsnorm", "swiglu"): "llama"}


def family_name(config) -> str:
    """A name for people; "custom" for points of the space no family is known by."""
    return FAMILY_NAMES.get((config.positions, config.norm, config.mlp), "custom")


def load_source(path: str | Path) -> Source:
    """Load a gptedge checkpoint, a local Hugging Face model folder or a GGUF file; CheckpointError for anything
    else."""
    from gptedge.export import gguf, hf
    from gptedge.train import checkpoint
    from gptedge.train.tokenizer import load_tokenizer

    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a gptedge checkpoint folder, a local Hugging Face model "
                              "folder (gpt2, llama, mistral, qwen2, qwen3, phi3) or a GGUF file")
    if gguf.is_gguf(path):
        return gguf.load_gguf(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file but not a GGUF model; pass a GGUF file, or the folder that holds "
                              "config.json and the weights")
    if checkpoint.is_checkpoint(path):
        from gptedge.train.lora import merge_lora

        model, meta = checkpoint.load_checkpoint(path)
        model = merge_lora(model)  # a LoRA run's adapters become part of the weights the bundle is verified on
        tok = load_tokenizer(path / checkpoint.TOKENIZER)
        facts = meta.get("source") or {}  # a fine-tuned import keeps what its bundle needs
        return Source(
            kind="gptedge-checkpoint", path=path.resolve(), model=model.eval().requires_grad_(False), tokenizer=tok,
            tokenizer_file=path / checkpoint.TOKENIZER,
            special_tokens=facts.get("special_tokens") or _gptedge_special_tokens(tok),
            generation_defaults=facts.get("generation_defaults") or {},
            weight_files=[path / checkpoint.WEIGHTS], family=facts.get("family") or family_name(model.config),
            chat_template=facts["chat_template"] if "chat_template" in facts else DEFAULT_TEMPLATE,
        )
    if hf.is_hf_folder(path):
        return hf.load_hf(path)
    raise CheckpointError(
        f"{path} is neither a gptedge checkpoint (config.json with \"format\": \"gptedge-checkpoint\" + "
        "model.safetensors) nor a Hugging Face model folder (config.json with model_type + weights); "
        "pass one of those, or a GGUF file"
    )


def _check_options(target: str, dtype: str | None, kv: str, genai: bool = False) -> str:
    if target not in TARGETS:
        raise UsageError(f"target {target!r} is not one of {', '.join(TARGETS)}")
    traits = TRAITS[target]
    dtype = dtype or traits.default_dtype
    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if kv not in KV_UPDATES:
        raise UsageError(f"kv {kv!r} is not one of {', '.join(KV_UPDATES)}")
    if kv == "inplace" and dtype not in traits.gqa_dtypes:
        raise UsageError(f"{traits.ort_name}'s GroupQueryAttention runs {' / '.join(traits.gqa_dtypes)} only: "
                         f"use --dtype {traits.default_dtype} for --target {target}, "
                         f"or --kv concat for a {dtype} {target} bundle")
    if genai and kv != "inplace":
        raise UsageError("--genai needs the in-place KV graph (onnxruntime-genai shares one buffer per layer); "
                         "drop --kv concat")
    return dtype


def _context(max_context: int | None, config) -> int:
    """The positions the bundle serves: all the model computes exactly, or fewer when asked."""
    exact = config.exact_context
    if max_context is None:
        return exact
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
        raise UsageError(f"max_context must be a positive integer, not {max_context!r}")
    if max_context > config.block_size:
        raise UsageError(
            f"--max-context {max_context} exceeds the model's block size {config.block_size} (the positions it was "
            f"built for); use at most {config.block_size}"
        )
    if max_context > exact:
        why = (f"its sliding window of {config.sliding_window} positions" if exact == config.sliding_window
               else f"its rotary scaling's short context of {exact} positions")
        raise UsageError(
            f"--max-context {max_context} is longer than this model computes exactly ({why}; gptedge does not "
            f"approximate past it); use at most {exact}"
        )
    return max_context


def export_model(model, context: int, dtype: str):
    """A copy of `model` cut to `context` positions (the position or rotary tables), in `dtype`."""
    import torch

    m = copy.deepcopy(model)  # deepcopy keeps a tied lm_head tied to wte
    if context < m.config.block_size:
        if "wpe" in m.transformer:
            m.transformer.wpe = torch.nn.Embedding.from_pretrained(m.transformer.wpe.weight[:context].clone(),
                                                                   freeze=True)
        m.config = replace(m.config, block_size=context)
        m.build_rope()
    m = m.to(torch.float16 if dtype == "fp16" else torch.float32).eval().requires_grad_(False)
    return m


def model_details(config) -> dict[str, Any]:
    """What `gptedge info` shows about the model space point (the runtime itself needs none of it)."""
    keys = ("positions", "norm", "mlp", "intermediate_size", "tie_embeddings", "qkv_bias", "proj_bias", "mlp_bias",
            "qk_norm", "layer_norm_epsilon")
    out: dict[str, Any] = {k: getattr(config, k) for k in keys}
    if config.positions == "rope":
        out["rope_theta"] = config.rope_theta
        scaling = dict(config.rope_scaling or {})
        scaling.pop("long_factor", None)  # lists of D/2 numbers: kept in the checkpoint, not worth a screen
        scaling.pop("short_factor", None)
        scaling.pop("factors", None)
        out["rope_scaling"] = scaling or None
    if config.sliding_window:
        out["sliding_window"] = config.sliding_window
    return out


def _final_stats(path: Path, traced):
    """The node counts of the graph as written (a kept-blocks graph has more nodes than the traced one)."""
    import onnx

    from gptedge.export.graph import GraphStats, op_counts

    proto = onnx.load(str(path), load_external_data=False)
    return GraphStats(traced.seconds, len(proto.graph.node), op_counts(proto))


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    from gptedge import __version__

    return {"gptedge": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def export_bundle(
    source: str | Path,
    out_dir: str | Path,
    *,
    target: str = "cpu",
    dtype: str | None = None,
    max_context: int | None = None,
    kv: str = "inplace",
    genai: bool = False,
    dequantize: bool = False,
    eval_text: Any = None,
    embeddings: bool | None = None,
    pooling: str | None = None,
    normalize: bool | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Export `source` to a verified bundle folder `out_dir` and return its path.

    target: "cpu" | "cuda" | "dml"; dtype: "fp32" | "fp16" (default: fp32 for cpu, fp16 for cuda and dml);
    max_context: positions the bundle serves (<= the model's block size; default: all of them);
    kv: "inplace" (GroupQueryAttention, shared KV buffer; default) or "concat" (standard ops only).
    genai: also write the graph and config onnxruntime-genai runs (gptedge.quantize.genai), checked against
    model.onnx; in-place bundles only.
    dequantize: a quantized source (GGUF) is written as its float model instead of keeping its blocks.
    eval_text: held-out text for a quantized source's gate (files, folders, globs or text; default: built-in
    English prose, gptedge.quantize.texts.builtin_text).
    embeddings: write an embedding bundle (pooled vectors, gptedge.export.embeddings) instead of a generation
    one; default: when the folder carries sentence-transformers' modules.json. pooling ("last", "mean",
    "first") and normalize override what the folder says.
    Raises UsageError, CheckpointError, OutputExistsError, ExportError (verification) or GptEdgeError
    (unwritable output); in every case nothing is written.
    """
    from gptedge.atomic import atomic_output_dir, check_output_dir
    from gptedge.export.embeddings import embedding_settings, export_embedding_graph, verify_embeddings
    from gptedge.export.graph import OPSET, attention_kernel, export_graph, io_spec
    from gptedge.export.verify import verify
    from gptedge.quantize.genai import add_genai

    dtype = _check_options(target, dtype, kv, genai)
    source, out_dir = Path(source), Path(out_dir)
    if embeddings is None:
        embeddings = (source / "modules.json").is_file()
    if embeddings and genai:
        raise UsageError("an embedding bundle has no onnxruntime-genai graph; drop --genai", field="genai")
    settings = embedding_settings(source, pooling, normalize) if embeddings else None
    check_output_dir(source, out_dir, force)
    log = Progress(progress)
    started = time.perf_counter()
    with log.stage("load", f"loading {source}"):
        src = load_source(source)
    config = src.model.config
    context = _context(max_context, config)
    arch = Architecture(
        family=src.family, n_layer=config.n_layer, n_head=config.n_head, n_kv_head=config.n_kv_head,
        head_dim=config.head_dim, n_embd=config.n_embd, vocab_size=config.vocab_size, context_length=context,
        details=model_details(config),
    )
    spec = BundleSpec(
        architecture=arch, dtype=dtype, target=target, io=io_spec(kv),
        kv_cache=KVCacheSpec(update=kv, layout="BNSH", dtype=dtype),
        special_tokens=src.special_tokens, generation_defaults=src.generation_defaults, chat_template=src.chat_template,
    )
    if settings is not None:
        spec.task, spec.embedding = "embedding", {**settings, "dimensions": config.n_embd}
        kernel = "sdpa (standard ops, pooled)"
    else:
        kernel = attention_kernel(kv, config, target)
    log.note(f"attention: {kernel}")
    with atomic_output_dir(out_dir, force=force) as tmp:
        model = export_model(src.model, context, dtype)
        with log.stage("trace", f"tracing the graph (dynamo, opset {OPSET}, "
                                f"{'embeddings' if settings else f'kv={kv}'}, {dtype}) and saving it"):
            if settings is not None:
                stats = export_embedding_graph(model, settings, tmp / MODEL_NAME)
            else:
                stats = export_graph(model, kv, tmp / MODEL_NAME, context_length=context, target=target)
        del model
        if src.tokenizer_file is not None:
            shutil.copyfile(src.tokenizer_file, tmp / TOKENIZER_NAME)
        else:
            src.tokenizer.save(str(tmp / TOKENIZER_NAME))
        ids = src.tokenizer.encode("def main():\n    print('hello, world')\n").ids
        if settings is not None:
            with log.stage("verify", "verifying the vectors against PyTorch in ONNX Runtime (padded batch, alone)"):
                texts = [ids, ids[: max(2, len(ids) // 3)], src.tokenizer.encode("The quick brown fox.").ids or ids]
                spec.verification = verify_embeddings(src.model, settings, tmp / MODEL_NAME, texts)
        else:
            with log.stage("verify", "verifying against PyTorch in ONNX Runtime (batch 2, prefill + decode)"):
                spec.verification = verify(src.model, tmp / MODEL_NAME, spec, token_ids=ids)
        if src.stored is not None and src.stored.quantized and not dequantize and settings is None:
            from gptedge.export.stored import keep_stored_quantization

            with log.stage("keep", "keeping the file's quantized blocks, checked against the dequantized model"):
                spec.quantization, summary = keep_stored_quantization(tmp, spec, src, ids, eval_text=eval_text)
            log.note(summary)
            stats = _final_stats(tmp / MODEL_NAME, stats)
        if genai:
            with log.stage("genai", "writing the onnxruntime-genai graph and config, checked against model.onnx"):
                add_genai(tmp, spec, ids)
        with log.stage("checksum", "writing gptedge.json (sha256 of every file)"):
            spec.provenance = {
                # The source's name and its files' checksums identify it; its local path would ship the
                # developer's folders inside every app that embeds the bundle.
                "source": src.path.name,
                **({"source_types": src.stored.types()} if src.stored is not None else {}),
                "source_kind": src.kind,
                "source_sha256": {f.name: sha256_file(f) for f in src.weight_files},
                "tools": _versions(),
                "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "opset": OPSET,
                "attention_kernel": kernel,
                "graph_nodes": stats.nodes,
                "graph_op_types": stats.op_types,
                "export_seconds": round(time.perf_counter() - started, 3),
            }
            write_spec(tmp, spec)
    out = out_dir.expanduser().resolve()
    sizes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    v = spec.verification
    checked = (f"cosine to PyTorch >= {v['min_cosine']:.6f} over {v['texts']} texts" if settings is not None else
               f"max |diff| prefill {v['max_abs_diff_prefill']:.2e}, decode {v['max_abs_diff_decode']:.2e}, "
               f"greedy agreement {v['greedy_agreement']:.0%} over {v['greedy_compared']} tokens")
    log.note(f"wrote {out} ({sizes / 1e6:.1f} MB, {stats.nodes} nodes) in {time.perf_counter() - started:.1f} s; "
             + checked)
    return out
