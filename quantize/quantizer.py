"""`quantize_bundle`: a float bundle in, a quantized bundle out, or nothing and a reason.

    from gptedge.quantize import quantize_bundle
    quantize_bundle("model-fp32/", "model-int8/", method="auto", eval_text="heldout.txt")

Order of work: check everything that can be checked cheaply (bundle, method vs target, options,
texts, output path), then build each candidate in a scratch folder inside the output's temporary
folder, measure it against the float bundle on held-out text, and only when the gate passes rename
the folder into place (gptedge.json written last). When the LM head choice is left to gptedge, both
ways are built and measured and the quantized head is kept when it passes the gate.

What a target's provider can run (fused INT8 kernels per recipe kind, MatMulNBits settings, a
GatherBlockQuantized kernel) is read from gptedge.runtime.traits, never from the target's name.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gptedge.atomic import atomic_output_dir, check_output_dir
from gptedge.errors import QuantizeError
from gptedge.quantize import gate
from gptedge.quantize.build import build_quantized_model, collect_hessians
from gptedge.quantize.recipes import (
    METHODS,
    Method,
    Rung,
    check_block_size,
    default_block_size,
    get_method,
    head_bits,
    runnable_methods,
)
from gptedge.quantize.texts import MIN_EVAL_TOKENS, TextInput, Texts, load_texts, read_text
from gptedge.runtime.bundle import MODEL_NAME, TOKENIZER_NAME, BundleSpec, read_spec, write_spec
from gptedge.runtime.traits import TRAITS

DEFAULT_MAX_PPL_INCREASE = 2.0  # percent, for recipes that do not set their own (recipes.Method.max_ppl_increase)
ROUNDING_WINDOWS, ROUNDING_WINDOW_TOKENS = 128, 256  # calibration the rounding recipes read: 32,768 positions
SCRATCH = ".scratch"  # candidates are built here, inside the output's temporary folder
KV_CALIBRATION_TOKENS = 32_768  # calibration tokens the int8 cache's scales see (prefill only: cheap next to a gate)

# The method `--method auto` picks per target, and why: a provider fact (runtime/traits.py).
AUTO: dict[str, tuple[str, str]] = {name: traits.auto_quantize for name, traits in TRAITS.items()}

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The whole command


@dataclass
class Candidate:
    """One built model waiting for (or holding) its gate report; the first that passes is installed."""

    label: str
    quantize_lm_head: bool
    folder: Path  # holds model.onnx (+ model.onnx.data)
    details: dict[str, Any]
    model_bytes: int
    report: gate.QualityReport | None = None


@dataclass(frozen=True)
class Choice:
    """One candidate to build: the LM head quantized or float and, for a laddered recipe, its rung."""

    head: bool
    rung: Rung | None = None


@dataclass(frozen=True)
class _Job:
    """Everything quantize_bundle checked before any slow work; the steps after the checks read it from here."""

    source: Path
    spec: BundleSpec
    recipe: Method
    block_size: int
    float_embeddings: bool
    max_ppl_increase: float
    texts: Texts
    data: gate.EvalSet
    windows: list[np.ndarray] | None  # calibration windows (static recipes only)
    progress: bool
    genai: bool  # write the onnxruntime-genai graph and config beside the quantized model (gptedge.quantize.genai)
    kv_cache: str | None = None  # "int8": the cache is quantized too (gptedge.quantize.kvcache); None: as the source
    kv_windows: list[np.ndarray] | None = None  # the int8 cache's calibration windows
    rungs: tuple[Rung, ...] = ()  # a laddered recipe's candidates that fit this model (empty: not laddered)

    @property
    def run_spec(self) -> BundleSpec:
        """The spec a candidate runs under: the source's, with the quantized cache when one is built."""
        if self.kv_cache is None:
            return self.spec
        return replace(self.spec, kv_cache=replace(self.spec.kv_cache, dtype=self.kv_cache))


def model_bytes(folder: Path) -> int:
    """Bytes of the model files (model.onnx and its external data), not the tokenizer or spec."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith(MODEL_NAME))


def resolve_method(method: str, target: str, log: Log) -> str:
    """The recipe name `method` stands for on `target`: `auto` is looked up (and the reason logged), others pass."""
    if method == "auto":
        name, why = AUTO[target]
        log(f"method auto -> {name} for a {target} bundle: {why}")
        return name
    return method


def _float_spec(source: Path) -> BundleSpec:
    """The source bundle's spec; a quantized source is refused, since its errors would compound with new ones."""
    spec = read_spec(source)
    if spec.quantization:
        raise QuantizeError(f"{source} is already quantized ({spec.quantization.get('method')}); "
                            "quantize the float bundle it came from")
    return spec


def _recipe(spec: BundleSpec, method: str, log: Log) -> Method:
    """The recipe to build, checked against the target's kernels and the bundle's dtype before any work."""
    recipe = get_method(resolve_method(method, spec.target, log), spec.target)
    if spec.dtype != "fp32" and recipe.needs_fp32:
        others = [name for name in runnable_methods(spec.target) if not METHODS[name].needs_fp32]
        raise QuantizeError(f"{recipe.name} needs an fp32 bundle and this one is {spec.dtype}; "
                            f"use one of: {', '.join(others)}")
    return recipe


def _kv_cache(spec: BundleSpec, kv_cache: str | None) -> str | None:
    """The KV cache dtype to build (None: keep the source's); refused before any work when the bundle cannot have it."""
    from gptedge.quantize.kvcache import QUANTIZED_KV_DTYPES

    if kv_cache is None or kv_cache == spec.kv_cache.dtype:
        return None
    if kv_cache not in QUANTIZED_KV_DTYPES:
        raise QuantizeError(f"--kv-cache {kv_cache!r} is not one of {', '.join(QUANTIZED_KV_DTYPES)} (or the source's "
                            f"{spec.kv_cache.dtype})")
    if spec.kv_cache.update != "inplace":
        raise QuantizeError(f"an {kv_cache} KV cache needs the in-place cache (GroupQueryAttention); this bundle was "
                            "exported with --kv concat: re-export it without that, or drop --kv-cache")
    if kv_cache not in TRAITS[spec.target].quantized_kv or spec.dtype != "fp32":
        where = [n for n, t in TRAITS.items() if kv_cache in t.quantized_kv]
        raise QuantizeError(f"an {kv_cache} KV cache is verified for fp32 bundles of target {' / '.join(where)} only; "
                            f"this bundle is {spec.dtype} for {spec.target}: drop --kv-cache")
    return kv_cache


def _block_size(spec: BundleSpec, recipe: Method, block_size: int | None, log: Log) -> int:
    """The block size to build with: a valid MatMulNBits block no wider than the model. Notes when the embeddings
    must stay float, since that makes the file larger than the user may expect."""
    width = spec.architecture.n_embd
    default_block = default_block_size(head_bits(recipe), width)
    block = check_block_size(default_block if block_size is None else block_size)
    if block > width:
        raise QuantizeError(f"block size {block} exceeds the model width n_embd={width}: every block would be "
                            f"mostly padding; choose --block-size {default_block}")
    if width % block:
        log(f"note: n_embd={width} is not a multiple of the block size {block}, so the embedding tables stay "
            "float (a larger file); a block size dividing n_embd avoids that")
    return block


def _gate_limit(max_ppl_increase: float | None, max_eval_tokens: int, recipe: Method) -> float:
    """The gate's limit in percent (None: the recipe's default), with the eval cap checked: a bad gate is refused
    up front."""
    limit = recipe.max_ppl_increase if max_ppl_increase is None else max_ppl_increase
    if not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit < 0:
        raise QuantizeError(f"max_ppl_increase must be a percentage >= 0, got {limit!r}")
    if not isinstance(max_eval_tokens, int) or max_eval_tokens < MIN_EVAL_TOKENS:
        raise QuantizeError(f"max_eval_tokens must be an integer >= {MIN_EVAL_TOKENS}, got {max_eval_tokens!r}")
    return float(limit)


def _calibration_windows(ids: np.ndarray, context: int, max_windows: int = 32, length: int = 128) -> list[np.ndarray]:
    """Up to `max_windows` prefill windows spread evenly over the calibration text, each within the context."""
    length = min(length, context)
    n = max(1, min(max_windows, len(ids) // length))
    starts = np.linspace(0, len(ids) - length, n).astype(int)
    return [ids[s:s + length] for s in starts]


def _kv_windows(ids: np.ndarray, context: int, length: int = 256, max_tokens: int = KV_CALIBRATION_TOKENS
               ) -> list[np.ndarray]:
    """The calibration text cut into consecutive prefill windows, up to `max_tokens`: a cache scale is a maximum, so
    every calibration token counts (a prefill is cheap next to the static recipe's per-window statistics)."""
    length = min(length, context)
    ids = ids[:max_tokens]
    return [ids[s:s + length] for s in range(0, len(ids), length) if len(ids[s:s + length])]


def _prepare(source: Path, out: Path, *, method: str, calibration: TextInput | None, eval_text: TextInput | None,
             max_ppl_increase: float | None, float_embeddings: bool, block_size: int | None, max_eval_tokens: int,
             genai: bool | None, kv_cache: str | None, force: bool, progress: bool, log: Log) -> _Job:
    """Every check that costs seconds, in order, before minutes of work: a bad option fails fast, writing nothing."""
    from tokenizers import Tokenizer

    spec = _float_spec(source)
    recipe = _recipe(spec, method, log)
    block = _block_size(spec, recipe, block_size, log)
    limit = _gate_limit(max_ppl_increase, max_eval_tokens, recipe)
    kv = _kv_cache(spec, kv_cache)
    check_output_dir(source, out, force, error=QuantizeError)
    genai = _genai(source, spec, genai)
    tokenizer = Tokenizer.from_file(str(source / TOKENIZER_NAME))
    calibrates = recipe.calibrated or kv is not None
    texts = load_texts(tokenizer, calibration, eval_text, calibrates, max_eval_tokens)
    context = spec.architecture.context_length
    data = gate.make_eval_set(texts.eval_ids, context)
    log(texts.note)
    windows = None
    if recipe.rounding:
        windows = _calibration_windows(texts.calibration_ids, context, ROUNDING_WINDOWS, ROUNDING_WINDOW_TOKENS)
    elif recipe.calibrated:
        windows = _calibration_windows(texts.calibration_ids, context)
    kv_windows = _kv_windows(texts.calibration_ids, context) if kv else None
    return _Job(source=source, spec=spec, recipe=recipe, block_size=block, float_embeddings=float_embeddings,
                max_ppl_increase=limit, texts=texts, data=data, windows=windows, progress=progress, genai=genai,
                kv_cache=kv, kv_windows=kv_windows, rungs=_rungs(spec, recipe, block_size))


def _rungs(spec: BundleSpec, recipe: Method, block_size: int | None) -> tuple[Rung, ...]:
    """The recipe's ladder for this model: rungs whose blocks fit its width (an explicit --block-size replaces
    the ladder with that one block size, and the sensitive-tensor rung)."""
    if not recipe.rungs:
        return ()
    if block_size is not None:
        return (Rung(block_size), Rung(block_size, max(r.sensitive_int8 for r in recipe.rungs)))
    return tuple(r for r in recipe.rungs if r.block_size <= spec.architecture.n_embd)


def _genai(source: Path, spec: BundleSpec, asked: bool | None) -> bool:
    """Whether the output carries the onnxruntime-genai files: as asked, else as the source does."""
    from gptedge.quantize.genai import has_genai

    genai = has_genai(source) if asked is None else bool(asked)
    if genai and spec.kv_cache.update != "inplace":
        raise QuantizeError("onnxruntime-genai runs in-place KV bundles only; this bundle was exported with "
                            "--kv concat (re-export it without that, or drop --genai)")
    return genai


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


def _measure(engine, data: gate.EvalSet, label: str, show: bool,
             reference: gate.Measurement | None = None) -> gate.Measurement:
    """gate.measure with a progress bar over the tokens it scores."""
    from tqdm.auto import tqdm

    scored, greedy = len(data.token_ids) - 1, gate.work_tokens(data) - (len(data.token_ids) - 1)
    # The bar counts both kinds of work, so say so: its total is not the summary's "tokens scored".
    with tqdm(total=scored + greedy, desc=f"measuring {label} ({scored:,} scored + {greedy:,} greedy tokens)",
              unit="tok", disable=not show, leave=False) as bar:
        return gate.measure(engine, data, bar.update, reference)


def _measure_reference(job: _Job, log: Log) -> tuple[gate.Measurement, str]:
    """The float bundle, measured once; every candidate is compared with it. Returns it and the device it ran on."""
    engine = _engine(job.source / MODEL_NAME, job.spec, log)
    return _measure(engine, job.data, f"{job.spec.dtype} reference", job.progress), engine.device


def _build(job: _Job, folder: Path, choice: Choice, shared: dict[str, Any]) -> dict[str, Any]:
    """build_quantized_model for one candidate, with a progress bar over the calibration windows; the rounding
    recipes' calibration statistics are collected once and shared by every candidate (`shared`)."""
    from tqdm.auto import tqdm

    windows = job.windows
    if job.recipe.rounding and "hessians" not in shared:
        with tqdm(total=len(windows), desc="calibrating (activations of every projection)", unit="window",
                  disable=not job.progress, leave=False) as bar:
            shared["hessians"] = collect_hessians(job.source / MODEL_NAME, job.spec, windows, lambda: bar.update(1))
    with tqdm(total=len(windows) if windows and not job.recipe.rounding else 0, desc="calibrating", unit="window",
              disable=not (job.progress and windows) or bool(job.recipe.rounding), leave=False) as bar:
        return build_quantized_model(job.source / MODEL_NAME, job.spec, job.recipe.name, folder,
                                     block_size=choice.rung.block_size if choice.rung else job.block_size,
                                     quantize_lm_head=choice.head, float_embeddings=job.float_embeddings,
                                     calibration_windows=windows, on_calibration_batch=lambda: bar.update(1),
                                     hessians=shared.get("hessians"),
                                     sensitive_int8=choice.rung.sensitive_int8 if choice.rung else 0.0)


def _candidate(job: _Job, folder: Path, choice: Choice, reference: gate.Measurement,
               shared: dict[str, Any]) -> Candidate:
    """One way to quantize, built in its own scratch folder and gated against the float reference on the same
    held-out text."""
    label = f"{job.recipe.name}, LM head {f'int{head_bits(job.recipe)}' if choice.head else job.spec.dtype}"
    if choice.rung:
        label += f", {choice.rung.label}"
    if job.kv_cache:
        label += f", KV {job.kv_cache}"
    details = _build(job, folder, choice, shared)
    if job.kv_cache:
        details["kv_cache"] = _quantize_cache(job, folder / MODEL_NAME)
    candidate = Candidate(label, choice.head, folder, details, model_bytes(folder))
    measured = _measure(_engine(folder / MODEL_NAME, job.run_spec), job.data, label, job.progress, reference)
    candidate.report = gate.compare(reference, measured, job.data, job.max_ppl_increase)
    return candidate


def _candidates(job: _Job, scratch: Path, quantize_lm_head: bool | None,
                reference: gate.Measurement) -> list[Candidate]:
    """Build and gate the candidates: a laddered recipe's rungs in order until one passes; otherwise the LM head
    both ways (quantized first) unless the user chose."""
    shared: dict[str, Any] = {}
    if job.rungs:
        out = []
        for i, rung in enumerate(job.rungs):
            out.append(_candidate(job, scratch / f"rung-{i}", Choice(quantize_lm_head is not False, rung), reference,
                                  shared))
            if out[-1].report.passed:
                break
        return out
    heads = [True, False] if quantize_lm_head is None else [bool(quantize_lm_head)]
    return [_candidate(job, scratch / ("head-quantized" if h else "head-float"), Choice(h), reference, shared)
            for h in heads]


def _quantize_cache(job: _Job, model_path: Path) -> dict[str, Any]:
    """Calibrate the cache scales on this candidate's own keys and values (its weights make them), then rewrite it."""
    from tqdm.auto import tqdm

    from gptedge.quantize.kvcache import quantize_kv_cache

    with tqdm(total=len(job.kv_windows), desc="calibrating the KV cache", unit="window", disable=not job.progress,
              leave=False) as bar:
        return quantize_kv_cache(model_path, job.spec, job.kv_windows, _engine(model_path, job.spec),
                                 lambda: bar.update(1))


def _choose(job: _Job, candidates: list[Candidate], reference: gate.Measurement, float_bytes: int,
            log: Log) -> Candidate:
    """The first candidate that passes (the quantized head is built first, so it wins when it passes). The table
    is printed either way; when none passes, QuantizeError, and nothing is written."""
    passing = [c for c in candidates if c.report.passed]
    chosen = passing[0] if passing else None
    log(gate.format_table(f"{job.spec.dtype} (source)", reference.ppl, float_bytes,
                          [(c.label, c.report, c.model_bytes) for c in candidates], chosen.label if chosen else None))
    deciding = chosen or candidates[-1]
    if not deciding.report.decided:
        low, high = deciding.report.ppl_increase_ci_pct
        log(f"note: the held-out text is too short to decide: {deciding.label} changed perplexity by "
            f"{deciding.report.ppl_increase_pct:+.2f}% (95% interval {low:+.2f}% to {high:+.2f}%), which straddles "
            f"the limit of {job.max_ppl_increase:g}%; pass more text with --eval-text")
    if chosen is None:
        worst = min(candidates, key=lambda c: c.report.ppl_increase_pct)
        raise QuantizeError(
            f"quality gate failed: perplexity rose {worst.report.ppl_increase_pct:+.2f}% with {worst.label} "
            f"(limit {job.max_ppl_increase:g}%); nothing was written. Try int8-weight, a smaller --block-size, "
            "--no-quantize-lm-head, or raise --max-ppl-increase")
    return chosen


def _record(job: _Job, chosen: Candidate, candidates: list[Candidate], asked: bool | None, float_bytes: int,
            measured_on: str, seconds: float) -> dict[str, Any]:
    """gptedge.json's `quantization`: what was built, both head choices as measured, the gate, its texts and costs."""
    record = dict(chosen.details)
    if job.rungs:
        record["lm_head"] = {**record["lm_head"], "choice": "user" if asked is not None else
                             f"the recipe's: int{head_bits(job.recipe)} (benchmarks/results/quantize-recipes.json)"}
        record["ladder"] = [{"candidate": c.label, **c.report.to_dict(), "model_bytes": c.model_bytes}
                            for c in candidates]
    else:
        record["lm_head"] = {
            **record["lm_head"],
            "choice": "user" if asked is not None else "auto: quantized when it passes the gate, measured both ways",
            "measured": {("quantized" if c.quantize_lm_head else "float"):
                         {**c.report.to_dict(), "model_bytes": c.model_bytes} for c in candidates},
        }
    record["quality"] = chosen.report.to_dict()
    data = job.data
    record["eval"] = {"note": job.texts.note, "tokens": int(len(data.token_ids)), "window": data.window,
                      "stride": data.stride, "provider": measured_on}
    if job.windows:
        record["calibration"] = {"windows": len(job.windows), "tokens_per_window": int(len(job.windows[0])),
                                 "method": "input Hessians" if job.recipe.rounding else "MinMax"}
    record["model_bytes"] = chosen.model_bytes
    record["source_model_bytes"] = float_bytes
    record["seconds"] = round(seconds, 1)
    return record


def _install(job: _Job, chosen: Candidate, tmp: Path, record: dict[str, Any]) -> None:
    """Move the chosen model into the output's temporary folder with the tokenizer; gptedge.json last, after the
    scratch is gone, because write_spec checksums every file in the folder."""
    for f in chosen.folder.iterdir():
        shutil.move(str(f), tmp / f.name)
    shutil.rmtree(tmp / SCRATCH)
    shutil.copy2(job.source / TOKENIZER_NAME, tmp / TOKENIZER_NAME)
    spec = _output_spec(job.spec, record)
    if job.genai:
        from gptedge.quantize.genai import add_genai

        add_genai(tmp, spec, list(job.texts.eval_ids[:64]))
    write_spec(tmp, spec)


def quantize_bundle(
    bundle: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    method: str = "auto",
    *,
    calibration: TextInput | None = None,
    eval_text: TextInput | None = None,
    max_ppl_increase: float | None = None,
    quantize_lm_head: bool | None = None,
    float_embeddings: bool = False,
    block_size: int | None = None,
    max_eval_tokens: int = 4096,
    genai: bool | None = None,
    kv_cache: str | None = None,
    force: bool = False,
    progress: bool = True,
    log: Log | None = None,
) -> Path:
    """Quantize the float bundle `bundle` into `out_dir` and return `out_dir`.

    method: "auto" (the fastest INT8 recipe for the bundle's target) or one of recipes.METHODS.
    calibration / eval_text: text, or files / folders / globs of text. int8-static calibrates on
      `calibration`; the gate measures on `eval_text`, else on the calibration text (its last quarter
      when int8-static calibrates on the rest). One of the two is required.
    max_ppl_increase: the gate, in percent: fail when held-out perplexity rises more than this (None: the recipe's
      default, recipes.METHODS: 2% for INT8 recipes, 5% for int4).
    quantize_lm_head: True / False, or None to build both, measure both, and keep the quantized head
      when it passes the gate. A quantized head's blocks also serve the tied token embedding.
    float_embeddings: keep the token and position embedding tables float (by default the token embedding
      reads the quantized head's blocks and the position table is stored as INT8 blocks).
    block_size: weights per scale of blockwise (MatMulNBits) weights, a power of two >= 16 (default: 128 for
      INT8, 32 for INT4, see recipes.DEFAULT_BLOCK_SIZE; halved until it divides n_embd).
    max_eval_tokens: cap on held-out tokens scored per model.
    genai: write the onnxruntime-genai graph and config too (checked against the quantized model.onnx);
      None: when the source bundle has them.
    kv_cache: "int8" stores the KV cache as int8 with per-channel scales calibrated on the calibration text
      (gptedge.quantize.kvcache): a quarter of the cache memory, faster attention at long positions; the gate
      measures the model with it. None: the source's cache dtype.
    Raises QuantizeError (bad option, method the target cannot run, short text, gate failed),
    BundleError (not a bundle), OutputExistsError; in every failure nothing is written.
    """
    log = log or _stderr
    out = Path(out_dir)
    spec = _float_spec(Path(bundle))
    if spec.task == "embedding":  # no logits to gate on: gated on retrieval instead (quantize/embeddings.py)
        from gptedge.quantize.embeddings import quantize_embedding_bundle
        from gptedge.quantize.texts import builtin_text

        if kv_cache is not None or genai:
            raise QuantizeError("an embedding bundle has no KV cache and no onnxruntime-genai graph; drop "
                                "--kv-cache / --genai")
        text = read_text(eval_text) if eval_text is not None else builtin_text()
        return quantize_embedding_bundle(Path(bundle), out, spec, method, text, block_size=block_size, force=force,
                                         log=log)
    job = _prepare(Path(bundle), out, method=method, calibration=calibration, eval_text=eval_text,
                   max_ppl_increase=max_ppl_increase, float_embeddings=float_embeddings, block_size=block_size,
                   max_eval_tokens=max_eval_tokens, genai=genai, kv_cache=kv_cache, force=force, progress=progress,
                   log=log)
    started = time.perf_counter()
    reference, measured_on = _measure_reference(job, log)
    float_bytes = model_bytes(job.source)
    # Everything is built inside the output's temporary folder, so a failed gate, a full disk or a killed
    # process leaves at most a .tmp-gptedge-* folder, which the next run removes.
    with atomic_output_dir(out, force=force) as tmp:
        candidates = _candidates(job, tmp / SCRATCH, quantize_lm_head, reference)
        chosen = _choose(job, candidates, reference, float_bytes, log)
        seconds = time.perf_counter() - started
        record = _record(job, chosen, candidates, quantize_lm_head, float_bytes, measured_on, seconds)
        _install(job, chosen, tmp, record)
    log(f"wrote {out} ({chosen.label}: {chosen.model_bytes / 1e6:.2f} MB of model files, "
        f"{100 * chosen.model_bytes / float_bytes:.0f}% of the source's)")
    return out


def _output_spec(spec: BundleSpec, record: dict[str, Any]) -> BundleSpec:
    """The source's spec with the quantization record, provenance naming the float files, and no stale checksums."""
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
    record = dict(record)
    kv_record = record.pop("kv_cache", None)
    kv = spec.kv_cache
    if kv_record is not None:
        kv = replace(kv, dtype=kv_record["dtype"], quantization=kv_record)
    return replace(spec, quantization=record, provenance=provenance, verification={}, files={}, kv_cache=kv)


__all__ = ["quantize_bundle", "build_quantized_model", "read_text", "AUTO", "DEFAULT_MAX_PPL_INCREASE"]
