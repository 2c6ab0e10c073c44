"""Quantized embedding bundles, gated on what retrieval needs rather than perplexity.

An embedding bundle has no logits, so the generation gate cannot judge it. What an app relies on is that a
quantized vector points where the float one does and that searches still find what they found. The held-out
text is cut into passages (paragraphs, else runs of sentences); each passage's first sentence is a query. The
gate embeds both with the float and the quantized graph and requires

- the lowest cosine between a passage's float and quantized vectors to be at least `min_cosine` (0.99),
- recall@1 (a query finds its own passage first) to fall by at most `max_recall_drop` (2 points).

How the two rankings agree is reported beside it (top-1, top-5 overlap, and top-1 over the queries where the
float ranking is decisive): on near-ties a ranking flips for any change, and that is not a loss for the app.

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
MIN_COSINE = 0.99  # lowest cosine of a passage's quantized vector to its float one
MAX_RECALL_DROP = 0.02  # recall@1 (a query finds its own passage first) may fall by at most 2 points
DECISIVE = 0.005  # a float ranking whose best passage leads by less is a near-tie, reported apart
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
                     min_cosine: float, max_recall_drop: float) -> dict[str, Any]:
    """Cosines of passage vectors; how often each query finds its own passage first (recall@1) with float and
    with quantized vectors; and how the two rankings agree (top-1, top-5 overlap, and top-1 where the float
    ranking is decisive: its best passage ahead of the next by at least DECISIVE in cosine)."""
    cos = (_unit(float_p) * _unit(quant_p)).sum(1)
    sim_f, sim_q = _unit(float_q) @ _unit(float_p).T, _unit(quant_q) @ _unit(quant_p).T
    ranks_f, ranks_q = np.argsort(-sim_f, axis=1), np.argsort(-sim_q, axis=1)
    own = np.arange(len(ranks_f))
    recall_f, recall_q = float((ranks_f[:, 0] == own).mean()), float((ranks_q[:, 0] == own).mean())
    same = ranks_f[:, 0] == ranks_q[:, 0]
    top2 = np.sort(sim_f, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) >= DECISIVE
    k = min(5, ranks_f.shape[1])
    top5 = float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ranks_f, ranks_q)]))
    drop = recall_f - recall_q
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "recall_at_1_float": recall_f,
            "recall_at_1": recall_q, "top1_agreement": float(same.mean()),
            "top1_agreement_decisive": float(same[decisive].mean()) if decisive.any() else 1.0,
            "decisive_queries": int(decisive.sum()), "top5_overlap": top5, "passages": int(len(cos)),
            "queries": int(len(ranks_f)), "limits": {"min_cosine": min_cosine, "max_recall_drop": max_recall_drop},
            "passed": bool(cos.min() >= min_cosine and drop <= max_recall_drop)}


def quantize_embedding_bundle(source: Path, out: Path, spec: BundleSpec, method: str, text: tuple[str, str],
                              *, block_size: int | None, force: bool, min_cosine: float = MIN_COSINE,
                              max_recall_drop: float = MAX_RECALL_DROP, log: Callable[[str], None]) -> Path:
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
        report = retrieval_report(float_p, quant_p, float_q, quant_q, min_cosine, max_recall_drop)
        log(f"{method}: min cosine {report['min_cosine']:.5f} (limit {min_cosine}), recall@1 "
            f"{report['recall_at_1']:.1%} against {report['recall_at_1_float']:.1%} float (may drop "
            f"{max_recall_drop:.0%}), top-1 agreement {report['top1_agreement']:.1%} "
            f"({report['top1_agreement_decisive']:.1%} of {report['decisive_queries']} decisive queries), top-5 "
            f"overlap {report['top5_overlap']:.1%}; {report['queries']} queries, {report['passages']} passages")
        if not report["passed"]:
            raise QuantizeError(f"quality gate failed: {method} moves the vectors too far (min cosine "
                                f"{report['min_cosine']:.5f}, recall@1 {report['recall_at_1']:.1%} against "
                                f"{report['recall_at_1_float']:.1%}); "
                                "nothing was written. Try " + ("int8-weight or " if method != "int8-weight" else "")
                                + "a smaller --block-size")
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
