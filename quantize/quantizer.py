"""`quantize_bundle`: a float bundle in, a quantized bundle out, or nothing and a reason.

    from gptedge.quantize import quantize_bundle
    quantize_bundle("model-fp32/", "model-int8/", method="auto", eval_text="heldout.txt")

Order of work: check everything that can be checked cheaply (bundle, method vs target, options,
texts, output path), then build each candidate in a scratch folder inside the output's temporary
folder, measure it against the float bundle on held-out text, and only when the gate passes rename
the folder into place (gptedge.json written last). When the LM head choice is left to gptedge, both ways are built and measured
and the quantized head is kept when it passes the gate.
"""

from __future__ import annotations

import copy
import glob
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from gptedge.atomic import atomic_output_dir
from gptedge.errors import OutputExistsError, QuantizeError
from gptedge.quantize import gate
from gptedge.quantize.methods import METHODS, check_block_size, default_block_size, get_method
from gptedge.runtime.bundle import MODEL_NAME, TOKENIZER_NAME, BundleSpec, read_spec, write_spec

DEFAULT_MAX_PPL_INCREASE = 2.0  # percent
MIN_EVAL_TOKENS = 128
MIN_CALIBRATION_TOKENS = 128
MAX_TEXT_BYTES = 4_000_000  # read at most this much text (files are read in order until the cap)
HELD_OUT_FRACTION = 0.25  # of the only text given, when int8-static must calibrate on the rest

# The method `--method auto` picks per target, and why. CPU: benchmarks/quantize_methods.py on a
# GPT-2-124M-shaped bundle, 2 AVX2 cores, interleaved in one process (2026-11-29): decode tok/s
# int8-weight 110 (block 128) / 92 (block 32), int8-static 86, int8-dynamic 81, fp32 38; prefill of 128
# tokens 145 / 196, 101, 90, 189 ms. Quality on the trained "small" demo model: held-out perplexity
# within 0.02% of fp32 for all three, top-1 agreement 99.1% / 98.0% / 99.0%.
# CUDA / DirectML: MatMulNBits is the INT8 recipe their providers run fused.
AUTO: dict[str, tuple[str, str]] = {
    "cpu": ("int8-weight", "fastest INT8 decode on CPU (110 tok/s vs 86 int8-static and 81 int8-dynamic on a GPT-2-124M shape, "
                           "2 cores) and the smallest file, at equal perplexity; int8-dynamic prefills long prompts ~1.6x faster"),
    "cuda": ("int8-weight", "the one INT8 recipe with fused CUDA kernels (MatMulNBits); dynamic INT8 has none on CUDA"),
    "dml": ("int8-weight", "the one INT8 recipe DirectML runs fused (MatMulNBits: dequantize + GEMM)"),
}

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Text inputs


def read_text(values: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], max_bytes: int = MAX_TEXT_BYTES) -> tuple[str, str]:
    """Text from files, folders (recursively, hidden entries skipped), globs, or literal text; plus a description.

    A value that names no existing file, folder or glob match is taken as the text itself.
    Reading stops at `max_bytes`. Binary files (with NUL bytes) are skipped.
    """
    items = [values] if isinstance(values, (str, os.PathLike)) else list(values)
    files: list[Path] = []
    literal: list[str] = []
    for item in items:
        s = os.fspath(item)
        if "\n" in s or "\0" in s or len(s) > 4096:  # text, not a path: never stat or glob it
            literal.append(s)
            continue
        path = Path(s).expanduser()
        try:
            if path.is_file():
                files.append(path)
                continue
            if path.is_dir():
                files += sorted(p for p in path.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(path).parts))
                continue
        except OSError:  # e.g. a name too long for the filesystem: it is text
            pass
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(s), recursive=True)) if any(c in s for c in "*?[") else []
        if matches:
            files += [m for m in matches if m.is_file()]
        else:
            literal.append(s)
    parts, total, used = list(literal), sum(len(t.encode()) for t in literal), 0
    for f in files:
        if total >= max_bytes:
            break
        data = f.read_bytes()[: max_bytes - total]
        if b"\0" in data:
            continue
        parts.append(data.decode("utf-8", errors="replace"))
        total += len(data)
        used += 1
    what = []
    if used:
        what.append(f"{used} file{'s' * (used != 1)}")
    if literal:
        what.append(f"{len(literal)} literal text{'s' * (len(literal) != 1)} (not existing paths)")
    return "\n\n".join(parts), f"{', '.join(what) or 'nothing'}, {total:,} bytes"


@dataclass
class Texts:
    eval_ids: np.ndarray
    calibration_ids: np.ndarray | None
    note: str


def _texts(tokenizer: Any, calibration, eval_text, need_calibration: bool, max_eval_tokens: int) -> Texts:
    def encode(text: str) -> np.ndarray:
        return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int64)

    if calibration is None and eval_text is None:
        raise QuantizeError("the quality gate needs held-out text: pass --eval-text FILE (text the model was not trained "
                            "on, e.g. the validation part of your corpus) or --calibration FILE")
    cal = None
    if calibration is not None:
        text, cal_desc = read_text(calibration)
        cal = encode(text)
    if eval_text is not None:
        text, eval_desc = read_text(eval_text)
        held = encode(text)
        note = f"held-out text: --eval-text ({eval_desc})"
        if need_calibration and cal is None:  # calibrate on the first part of the only text given
            cut = int(len(held) * (1 - HELD_OUT_FRACTION))
            cal, held = held[:cut], held[cut:]
            note += f"; its first {100 * (1 - HELD_OUT_FRACTION):.0f}% calibrates, the rest is held out"
    elif need_calibration:
        cut = int(len(cal) * (1 - HELD_OUT_FRACTION))
        cal, held = cal[:cut], cal[cut:]
        note = f"calibration text ({cal_desc}): first {100 * (1 - HELD_OUT_FRACTION):.0f}% calibrates, the rest is held out"
    else:
        held, cal = cal, None
        note = f"held-out text: --calibration ({cal_desc}; nothing is calibrated by this method)"
    if need_calibration and len(cal) < MIN_CALIBRATION_TOKENS:
        raise QuantizeError(f"calibration text is too short: {len(cal)} tokens, int8-static needs at least "
                            f"{MIN_CALIBRATION_TOKENS}; pass more text with --calibration")
    if len(held) < MIN_EVAL_TOKENS:
        raise QuantizeError(f"held-out text is too short for the quality gate: {len(held)} tokens, at least {MIN_EVAL_TOKENS} "
                            "needed; pass more text with --eval-text (or --calibration)")
    return Texts(held[:max_eval_tokens], cal, note)


# ---------------------------------------------------------------------------------------------
# Building one candidate


@dataclass
class Candidate:
    label: str
    quantize_lm_head: bool
    folder: Path  # holds model.onnx (+ model.onnx.data)
    details: dict[str, Any]
    model_bytes: int
    report: gate.QualityReport | None = None


def model_bytes(folder: Path) -> int:
    """Bytes of the model files (model.onnx and its external data), not the tokenizer or spec."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith(MODEL_NAME))


def build_quantized_model(
    source_model: Path, spec: BundleSpec, method: str, out_folder: Path, *, bits: int | None = None,
    block_size: int | None = None, quantize_lm_head: bool = True, float_embeddings: bool = False,
    calibration_windows: list[np.ndarray] | None = None, accuracy_level: int | None = None,
    on_calibration_batch: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Write the quantized model.onnx (+ .data) of `method` into `out_folder`; return what was done.

    block_size: weights per scale of blockwise weights (default: methods.DEFAULT_BLOCK_SIZE for the bits).
    accuracy_level: MatMulNBits compute precision (default: 4 = int8 compute on a cpu target, unset elsewhere).
    """
    import onnx

    from gptedge.quantize import methods as M

    recipe = METHODS[method]
    bits = bits or recipe.bits
    head_bits = bits if recipe.kind == "weight" else 8
    block_size = block_size or default_block_size(head_bits, spec.architecture.n_embd)
    if accuracy_level is None:
        accuracy_level = 4 if spec.target == "cpu" else None
    out_folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(source_model))
    M.name_nodes(model)
    roles = M.find_roles(model, spec)
    if not roles.block_matmuls:
        raise QuantizeError(f"{source_model} has no MatMul with a constant weight to quantize; is it a gptedge export?")
    if spec.target == "dml":  # DirectML's MatMulNBits needs whole blocks along K
        inits = {t.name: list(t.dims) for t in model.graph.initializer}
        ks = {inits[n.input[1]][0] for n in model.graph.node if n.name in roles.block_matmuls} | {spec.architecture.n_embd}
        if any(k % block_size for k in ks):
            raise QuantizeError(f"DirectML's MatMulNBits needs the block size to divide every input width {sorted(ks)}; "
                                f"{block_size} does not: choose a smaller --block-size")
    head_q = bool(quantize_lm_head and roles.lm_head)
    gather_mode = "dequant" if spec.target == "dml" else "gather"  # no GatherBlockQuantized kernel on DirectML
    embedding = "float"
    if head_q:
        mode = "float" if float_embeddings else (gather_mode if head_bits in (4, 8) else "gather")
        embedding = M.quantize_lm_head(model, roles, bits=head_bits, block_size=block_size, accuracy_level=accuracy_level, embedding=mode)
    # Position embeddings: INT8 blocks (a 4-bit position table saves little and costs quality).
    positions = [] if float_embeddings else [g for g in roles.float_gathers if M.quantize_table(model, g, bits=8, block_size=block_size, mode=gather_mode)]
    if recipe.kind == "weight":
        model = M.quantize_weight_only(model, roles, bits=bits, block_size=block_size, accuracy_level=accuracy_level)
        M.ensure_ms_opset(model)
        M.save_model(model, out_folder / MODEL_NAME)
    else:
        M.ensure_ms_opset(model)
        float_head = next((copy.deepcopy(n) for n in model.graph.node if n.name == roles.lm_head and n.op_type == "Gemm"), None)
        with tempfile.TemporaryDirectory(prefix="prep-", dir=out_folder.parent) as prep:
            prepared, raw = Path(prep) / MODEL_NAME, Path(prep) / "raw" / MODEL_NAME
            raw.parent.mkdir()
            M.save_model(model, prepared)
            del model
            if recipe.kind == "dynamic":
                M.quantize_dynamic_int8(prepared, raw, roles)
            else:
                M.quantize_static_int8(prepared, raw, roles, M.calibration_feeds(spec, calibration_windows or []), on_calibration_batch)
            result = onnx.load(str(raw))
            if float_head is not None:
                M.restore_gemm(result, float_head)
            M.remove_unused_initializers(result)
            M.save_model(result, out_folder / MODEL_NAME)
    blockwise = recipe.kind == "weight" or head_q  # block size / accuracy level apply to MatMulNBits weights only
    float_nodes = [*roles.other_matmuls, *(g for g in roles.float_gathers if g not in positions)]
    float_nodes += [roles.lm_head] if roles.lm_head and not head_q else []
    float_nodes += [roles.embedding] if roles.embedding and embedding == "float" else []
    return {
        "method": method,
        "bits": bits,
        "block_size": block_size if blockwise else None,
        "symmetric": True,
        "accuracy_level": accuracy_level if blockwise else None,
        "quantized_nodes": roles.block_matmuls,
        "float_nodes": float_nodes,
        "lm_head": {"node": roles.lm_head, "quantized": head_q, "bits": head_bits if head_q else None,
                    "format": "MatMulNBits" if head_q else "float"},
        "embedding": {"node": roles.embedding, "tied_to_lm_head": roles.tied, "storage": {
            "gather": f"shares the LM head's int{head_bits} blocks (GatherBlockQuantized)",
            "dequant": f"shares the LM head's int{head_bits} blocks (standard-op dequantizing Gather)",
            "float": "float table"}[embedding]},
        "position_embedding": {"nodes": roles.float_gathers,
                               "storage": f"int8 blocks ({'GatherBlockQuantized' if gather_mode == 'gather' else 'standard-op dequantizing Gather'})"
                               if positions else "float table"},
    }


# ---------------------------------------------------------------------------------------------
# The whole command


def resolve_method(method: str, target: str, log: Log) -> str:
    if method == "auto":
        name, why = AUTO[target]
        log(f"method auto -> {name} for a {target} bundle: {why}")
        return name
    get_method(method, target)
    return method


def _engine(model_path: Path, spec: BundleSpec, log: Log | None = None):
    """An Engine on the best provider here that runs the bundle; fallbacks are logged once, as one line."""
    from gptedge.runtime.model import make_engine
    from gptedge.runtime.providers import choose_provider, create_session

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice = choose_provider("auto", spec)
        session, info = create_session(model_path, choice, threads=None, key=None)
    if log is not None:
        for w in caught:
            log(f"note: the quality gate runs on {info.choice.name}: {w.message}".replace("gptedge: ", ""))
    return make_engine(session, spec, info.choice)


def _measure(engine, data: gate.EvalSet, label: str, show: bool, reference: gate.Measurement | None = None) -> gate.Measurement:
    from tqdm.auto import tqdm

    with tqdm(total=gate.work_tokens(data), desc=f"measuring {label}", unit="tok", disable=not show, leave=False) as bar:
        return gate.measure(engine, data, bar.update, reference)


def _calibration_windows(ids: np.ndarray, context: int, max_windows: int = 32, length: int = 128) -> list[np.ndarray]:
    length = min(length, context)
    n = max(1, min(max_windows, len(ids) // length))
    starts = np.linspace(0, len(ids) - length, n).astype(int)
    return [ids[s:s + length] for s in starts]


def _check_out(source: Path, out: Path, force: bool) -> None:
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise QuantizeError(f"the output folder {out} overlaps the input bundle {source}; choose another folder")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force (force=True) to replace it, or choose another folder")


def quantize_bundle(
    bundle: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    method: str = "auto",
    *,
    calibration: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    eval_text: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    max_ppl_increase: float | None = DEFAULT_MAX_PPL_INCREASE,
    quantize_lm_head: bool | None = None,
    float_embeddings: bool = False,
    block_size: int | None = None,
    max_eval_tokens: int = 4096,
    force: bool = False,
    progress: bool = True,
    log: Log | None = None,
    _bits: int | None = None,
) -> Path:
    """Quantize the float bundle `bundle` into `out_dir` and return `out_dir`.

    method: "auto" (the fastest INT8 recipe for the bundle's target) or one of METHODS.
    calibration / eval_text: text, or files / folders / globs of text. int8-static calibrates on
      `calibration`; the gate measures on `eval_text`, else on the calibration text (its last quarter
      when int8-static calibrates on the rest). One of the two is required.
    max_ppl_increase: the gate, in percent: fail when held-out perplexity rises more than this (None: 2%).
    quantize_lm_head: True / False, or None to build both, measure both, and keep the quantized head
      when it passes the gate. A quantized head's blocks also serve the tied token embedding.
    float_embeddings: keep the token and position embedding tables float (by default the token embedding
      reads the quantized head's blocks and the position table is stored as INT8 blocks).
    block_size: weights per scale of blockwise (MatMulNBits) weights, a power of two >= 16 (default: 128 for
      INT8, 32 for INT4, see methods.DEFAULT_BLOCK_SIZE; halved until it divides n_embd).
    max_eval_tokens: cap on held-out tokens scored per model.
    Raises QuantizeError (bad option, method the target cannot run, short text, gate failed),
    BundleError (not a bundle), OutputExistsError; in every failure nothing is written.
    """
    log = log or _stderr
    source = Path(bundle)
    spec = read_spec(source)
    if spec.quantization:
        raise QuantizeError(f"{source} is already quantized ({spec.quantization.get('method')}); quantize the float bundle it came from")
    name = resolve_method(method, spec.target, log)
    recipe = get_method(name, spec.target)
    if spec.dtype != "fp32" and recipe.kind != "weight":
        raise QuantizeError(f"{name} needs an fp32 bundle and this one is {spec.dtype}; use int8-weight or int4-weight")
    width = spec.architecture.n_embd
    default_block = default_block_size((_bits or recipe.bits) if recipe.kind == "weight" else 8, width)
    block = check_block_size(default_block if block_size is None else block_size)
    if block > width:
        raise QuantizeError(f"block size {block} exceeds the model width n_embd={width}: every block would be "
                            f"mostly padding; choose --block-size {default_block}")
    if width % block:
        log(f"note: n_embd={width} is not a multiple of the block size {block}, so the embedding tables stay "
            "float (a larger file); a block size dividing n_embd avoids that")
    max_ppl_increase = DEFAULT_MAX_PPL_INCREASE if max_ppl_increase is None else max_ppl_increase
    if not isinstance(max_ppl_increase, (int, float)) or not math.isfinite(max_ppl_increase) or max_ppl_increase < 0:
        raise QuantizeError(f"max_ppl_increase must be a percentage >= 0, got {max_ppl_increase!r}")
    if not isinstance(max_eval_tokens, int) or max_eval_tokens < MIN_EVAL_TOKENS:
        raise QuantizeError(f"max_eval_tokens must be an integer >= {MIN_EVAL_TOKENS}, got {max_eval_tokens!r}")
    out = Path(out_dir)
    _check_out(source, out, force)

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(source / TOKENIZER_NAME))
    texts = _texts(tokenizer, calibration, eval_text, recipe.kind == "static", max_eval_tokens)
    arch = spec.architecture
    data = gate.make_eval_set(texts.eval_ids, arch.context_length)
    log(texts.note)
    windows = _calibration_windows(texts.calibration_ids, arch.context_length) if recipe.kind == "static" else None

    started = time.perf_counter()
    reference_engine = _engine(source / MODEL_NAME, spec, log)
    measured_on = reference_engine.device
    reference = _measure(reference_engine, data, f"{spec.dtype} reference", progress)
    del reference_engine
    float_bytes = model_bytes(source)
    heads = [True, False] if quantize_lm_head is None else [bool(quantize_lm_head)]
    head_bits = (_bits or recipe.bits) if recipe.kind == "weight" else 8  # dynamic/static keep the head blockwise INT8
    # Everything is built inside the output's temporary folder, so a failed gate, a full disk or a killed
    # process leaves at most a .tmp-gptedge-* folder, which the next run removes.
    with atomic_output_dir(out, force=force) as tmp:
        scratch = tmp / ".scratch"
        candidates = []
        for head in heads:
            label = f"{name}, LM head {f'int{head_bits}' if head else spec.dtype}"
            folder = scratch / ("head-quantized" if head else "head-float")
            details = _build(source, spec, name, folder, _bits, block, head, float_embeddings, windows, progress)
            cand = Candidate(label, head, folder, details, model_bytes(folder))
            measured = _measure(_engine(folder / MODEL_NAME, spec), data, label, progress, reference)
            cand.report = gate.compare(reference, measured, data, float(max_ppl_increase))
            candidates.append(cand)
        passing = [c for c in candidates if c.report.passed]
        chosen = passing[0] if passing else None
        log(gate.format_table(f"{spec.dtype} (source)", reference.ppl, float_bytes,
                              [(c.label, c.report, c.model_bytes) for c in candidates], chosen.label if chosen else None))
        if chosen is None:
            worst = min(candidates, key=lambda c: c.report.ppl_increase_pct)
            raise QuantizeError(
                f"quality gate failed: perplexity rose {worst.report.ppl_increase_pct:+.2f}% with {worst.label} "
                f"(limit {max_ppl_increase:g}%); nothing was written. Try int8-weight, a smaller --block-size, "
                "--no-quantize-lm-head, or raise --max-ppl-increase")
        record = _record(chosen, candidates, quantize_lm_head, texts, data, windows, float_bytes, time.perf_counter() - started)
        record["eval"]["provider"] = measured_on
        for f in chosen.folder.iterdir():
            shutil.move(str(f), tmp / f.name)
        shutil.rmtree(scratch)  # before write_spec, which checksums every file in the folder
        shutil.copy2(source / TOKENIZER_NAME, tmp / TOKENIZER_NAME)
        write_spec(tmp, _output_spec(spec, record))
    log(f"wrote {out} ({chosen.label}: {chosen.model_bytes / 1e6:.2f} MB of model files, "
        f"{100 * chosen.model_bytes / float_bytes:.0f}% of the source's)")
    return out


def _build(source, spec, name, folder, bits, block, head, float_embeddings, windows, show) -> dict[str, Any]:
    from tqdm.auto import tqdm

    with tqdm(total=len(windows) if windows else 0, desc="calibrating", unit="window", disable=not (show and windows), leave=False) as bar:
        return build_quantized_model(source / MODEL_NAME, spec, name, folder, bits=bits, block_size=block,
                                     quantize_lm_head=head, float_embeddings=float_embeddings,
                                     calibration_windows=windows, on_calibration_batch=lambda: bar.update(1))


def _record(chosen: Candidate, candidates: list[Candidate], asked: bool | None, texts: Texts, data: gate.EvalSet,
            windows, float_bytes: int, seconds: float) -> dict[str, Any]:
    record = dict(chosen.details)
    record["lm_head"] = {
        **record["lm_head"],
        "choice": "user" if asked is not None else "auto: quantized when it passes the gate, measured both ways",
        "measured": {("quantized" if c.quantize_lm_head else "float"): {**c.report.to_dict(), "model_bytes": c.model_bytes}
                     for c in candidates},
    }
    record["quality"] = chosen.report.to_dict()
    record["eval"] = {"note": texts.note, "tokens": int(len(data.token_ids)), "window": data.window, "stride": data.stride}
    if windows:
        record["calibration"] = {"windows": len(windows), "tokens_per_window": int(len(windows[0])), "method": "MinMax"}
    record["model_bytes"] = chosen.model_bytes
    record["source_model_bytes"] = float_bytes
    record["seconds"] = round(seconds, 1)
    return record


def _output_spec(spec: BundleSpec, record: dict[str, Any]) -> BundleSpec:
    import onnx
    import onnxruntime

    from gptedge import __version__

    source_files = {k: v for k, v in spec.files.items() if k.startswith(MODEL_NAME)}
    provenance = {
        **spec.provenance,
        "quantized_from": {"files_sha256": source_files, "tokenizer_sha256": spec.files.get(TOKENIZER_NAME),
                           "dtype": spec.dtype, "verification": spec.verification},
        "quantize_tools": {"gptedge": __version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__},
        "quantized_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return replace(spec, quantization=record, provenance=provenance, verification={}, files={})


__all__ = ["quantize_bundle", "build_quantized_model", "read_text", "AUTO", "DEFAULT_MAX_PPL_INCREASE"]
