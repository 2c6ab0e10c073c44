"""Quantized embedding bundles, gated on what retrieval needs rather than perplexity.

An embedding bundle has no logits, so the generation gate cannot judge it. What an app relies on is that a
quantized vector points where the float one does and that searches rank the same passages first. The held-out
text is cut into passages (paragraphs, else runs of sentences); each passage's first sentence is a query. The
gate embeds both with the float and the quantized graph and requires

- the lowest cosine between a passage's float and quantized vectors to be at least `min_cosine` (default 0.99),
- each query's nearest passage under the quantized vectors to be its nearest under the float ones for at least
  `min_top1` of the queries (default 0.95; the top-5 overlap is reported too).

Weight-only recipes only (int8-weight, int4-weight; "auto" is int8-weight): the calibrated recipes read the
logits of a generation graph. As with every gptedge quantization, a failed gate writes nothing.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gptedge.atomic import atomic_output_dir, check_output_dir
from gptedge.errors import QuantizeError
from gptedge.runtime.bundle import MODEL_NAME, TOKENIZER_NAME, BundleSpec, write_spec

METHODS = ("int8-weight", "int4-weight")
MIN_COSINE, MIN_TOP1 = 0.99, 0.95
MIN_PASSAGES = 8
MAX_PASSAGES = 256


def passages(text: str, max_chars: int = 400) -> list[str]:
    """The text as passages of at most about `max_chars`: paragraphs, long ones cut at sentence ends."""
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        current = ""
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
            if current and len(current) + len(sentence) > max_chars:
                out.append(current)
                current = ""
            current = f"{current} {sentence}".strip()
        if len(current) >= 40:
            out.append(current)
    return out[:MAX_PASSAGES]


def query_of(passage: str) -> str:
    """A passage's first sentence (at most 20 words): what a user searching for it might type."""
    first = re.split(r"(?<=[.!?])\s+", passage)[0]
    return " ".join(first.split()[:20])


def _vectors(model_path: Path, source: Path, spec: BundleSpec, texts: list[str]) -> np.ndarray:
    from tokenizers import Tokenizer

    from gptedge.export.verify import session
    from gptedge.runtime.embedder import EmbeddingModel

    model = EmbeddingModel(session(model_path), Tokenizer.from_file(str(source / TOKENIZER_NAME)), spec,
                           source, None, 0.0)  # type: ignore[arg-type]
    return model.embed(texts, truncate=True).astype(np.float64)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def retrieval_report(float_p: np.ndarray, quant_p: np.ndarray, float_q: np.ndarray, quant_q: np.ndarray,
                     min_cosine: float, min_top1: float) -> dict[str, Any]:
    """Cosines of passage vectors, and how often the quantized vectors rank the same passage first."""
    cos = (_unit(float_p) * _unit(quant_p)).sum(1)
    ranks_f = np.argsort(-(_unit(float_q) @ _unit(float_p).T), axis=1)
    ranks_q = np.argsort(-(_unit(quant_q) @ _unit(quant_p).T), axis=1)
    top1 = float((ranks_f[:, 0] == ranks_q[:, 0]).mean())
    k = min(5, ranks_f.shape[1])
    top5 = float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ranks_f, ranks_q)]))
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "top1_agreement": top1,
            "top5_overlap": top5, "passages": int(len(cos)), "queries": int(len(ranks_f)),
            "limits": {"min_cosine": min_cosine, "min_top1": min_top1},
            "passed": bool(cos.min() >= min_cosine and top1 >= min_top1)}


def quantize_embedding_bundle(source: Path, out: Path, spec: BundleSpec, method: str, text: tuple[str, str],
                              *, block_size: int | None, force: bool, min_cosine: float = MIN_COSINE,
                              min_top1: float = MIN_TOP1, log: Callable[[str], None]) -> Path:
    """Quantize an embedding bundle with a weight-only recipe, gated on retrieval (see the module docstring)."""
    from gptedge.quantize.build import build_quantized_model

    method = "int8-weight" if method == "auto" else method
    if method not in METHODS:
        raise QuantizeError(f"embedding bundles quantize with {' or '.join(METHODS)} (the calibrated recipes read "
                            f"a generation graph's logits), not {method!r}")
    check_output_dir(source, out, force, error=QuantizeError)
    body, note = text
    found = passages(body)
    if len(found) < MIN_PASSAGES:
        raise QuantizeError(f"the held-out text gives {len(found)} passages; the retrieval gate needs at least "
                            f"{MIN_PASSAGES}: pass more text with --eval-text")
    queries = [query_of(p) for p in found]
    started = time.perf_counter()
    float_p, float_q = (_vectors(source / MODEL_NAME, source, spec, t) for t in (found, queries))
    with atomic_output_dir(out, force=force) as tmp:
        scratch = tmp / "candidate"
        details = build_quantized_model(source / MODEL_NAME, spec, method, scratch, block_size=block_size,
                                        quantize_lm_head=False, float_embeddings=True)
        quant_p, quant_q = (_vectors(scratch / MODEL_NAME, source, spec, t) for t in (found, queries))
        report = retrieval_report(float_p, quant_p, float_q, quant_q, min_cosine, min_top1)
        log(f"{method}: min cosine {report['min_cosine']:.5f} (limit {min_cosine}), top-1 agreement "
            f"{report['top1_agreement']:.1%} (limit {min_top1:.0%}), top-5 overlap {report['top5_overlap']:.1%} over "
            f"{report['queries']} queries and {report['passages']} passages")
        if not report["passed"]:
            raise QuantizeError(f"quality gate failed: {method} moves the vectors too far (min cosine "
                                f"{report['min_cosine']:.5f}, top-1 agreement {report['top1_agreement']:.1%}); "
                                "nothing was written. Try int8-weight or a smaller --block-size")
        for f in scratch.iterdir():
            shutil.move(str(f), tmp / f.name)
        scratch.rmdir()
        shutil.copy2(source / TOKENIZER_NAME, tmp / TOKENIZER_NAME)
        from gptedge.quantize.quantizer import _output_spec, model_bytes

        record = {**details, "quality": report, "eval": {"note": note, "gate": "retrieval"},
                  "model_bytes": model_bytes(tmp), "source_model_bytes": model_bytes(source),
                  "seconds": round(time.perf_counter() - started, 1)}
        write_spec(tmp, _output_spec(spec, record))
    return out
