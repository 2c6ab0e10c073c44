"""The quality gate: measure a quantized model against its float source on held-out text.

All through the same Engine code path that serves the bundle:
- perplexity on held-out text (sliding window), and its relative rise: the gate;
- top-1 next-token agreement over that text (both models see the same prefix);
- greedy agreement on the float model's own 64-token greedy continuations of several prompts: at each
  position, does the quantized model pick the float model's token given the same prefix? This is what
  generation exercises, on text the model itself writes, and one early near-tie does not hide the rest;
- the strict version of the same: the identical prefix of free-running greedy continuations (what a
  user sees side by side), reported next to it because a single near-tie flip ends it.
The float model is measured once and compared with each candidate.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from gptedge.runtime import evaluate as ev
from gptedge.runtime.engine import Engine


@dataclass
class EvalSet:
    """Held-out token ids, and the greedy prompts taken from them."""

    token_ids: np.ndarray  # [N] int64
    prompts: list[list[int]]
    greedy_tokens: int  # continuation length per prompt
    window: int | None = None  # sliding-window size (None: the model's context)
    stride: int | None = None


def make_eval_set(token_ids: Sequence[int] | np.ndarray, context_length: int, n_prompts: int = 8,
                  greedy_tokens: int = 64, prompt_tokens: int = 32) -> EvalSet:
    """Prompts of `prompt_tokens` tokens spread evenly over the text; continuations fit the context."""
    ids = np.asarray(token_ids, np.int64)
    prompt_tokens = max(1, min(prompt_tokens, context_length // 4, len(ids) // max(1, n_prompts)))
    greedy_tokens = max(1, min(greedy_tokens, context_length - prompt_tokens))
    starts = np.linspace(0, len(ids) - prompt_tokens, n_prompts).astype(int)
    prompts = [ids[s:s + prompt_tokens].tolist() for s in starts]
    return EvalSet(token_ids=ids, prompts=prompts, greedy_tokens=greedy_tokens)


@dataclass
class Measurement:
    """One model on one EvalSet."""

    scores: ev.TokenScores
    greedy: list[list[int]]  # free-running greedy continuation of each prompt
    forced: list[list[int]]  # argmax along the reference's continuations (its own, for the reference)
    seconds: float

    @property
    def ppl(self) -> float:
        return self.scores.perplexity().ppl


def measure(engine: Engine, data: EvalSet, progress: Callable[[int], None] | None = None,
            reference: Measurement | None = None) -> Measurement:
    """Score the held-out text, decode the greedy continuations, and follow the reference's (progress counts tokens)."""
    start = time.perf_counter()
    scores = ev.score_tokens(engine, data.token_ids, data.window, data.stride, progress)
    greedy = ev.greedy_continuations(engine, data.prompts, data.greedy_tokens)
    if progress is not None:
        progress(len(data.prompts) * data.greedy_tokens)
    followed = greedy if reference is None else reference.greedy
    forced = []
    for prompt, continuation in zip(data.prompts, followed):
        top1 = ev.score_tokens(engine, prompt + continuation).top1  # position i predicts token i + 1
        forced.append(top1[len(prompt) - 1:len(prompt) - 1 + len(continuation)].tolist())
    if progress is not None:
        progress(len(data.prompts) * data.greedy_tokens)
    return Measurement(scores=scores, greedy=greedy, forced=forced, seconds=time.perf_counter() - start)


def work_tokens(data: EvalSet) -> int:
    """Tokens `measure` reports to its progress callback (for sizing a progress bar)."""
    return len(data.token_ids) - 1 + 2 * len(data.prompts) * data.greedy_tokens


@dataclass
class QualityReport:
    float_ppl: float
    quantized_ppl: float
    ppl_increase_pct: float  # 100 * (quantized / float - 1); negative when quantization happens to help
    top1_agreement: float  # fraction of held-out positions with the same argmax
    greedy_agreement: float  # fraction of the reference's greedy tokens the candidate picks given the same prefix
    greedy_prefix: float  # mean identical-prefix fraction of free-running greedy continuations (strict)
    greedy_first_divergence: list[int]  # per prompt: first differing free-running token (= greedy_tokens when none)
    eval_tokens: int
    greedy_prompts: int
    greedy_tokens: int
    max_ppl_increase_pct: float
    passed: bool
    # 95% interval of the perplexity change from the paired per-token log-likelihood differences: how much of the
    # measured change the held-out text's length can vouch for
    ppl_increase_ci_pct: tuple[float, float] = (0.0, 0.0)
    # False when the interval straddles the limit: the text is too short to tell pass from fail
    decided: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("float_ppl", "quantized_ppl", "ppl_increase_pct", "top1_agreement", "greedy_agreement",
                  "greedy_prefix"):
            d[k] = round(d[k], 6)
        d["ppl_increase_ci_pct"] = [round(x, 4) for x in self.ppl_increase_ci_pct]
        return d


def compare(reference: Measurement, candidate: Measurement, data: EvalSet,
            max_ppl_increase_pct: float) -> QualityReport:
    f, q = reference.ppl, candidate.ppl
    rise = 100.0 * (q / f - 1.0)
    low, high = change_interval(reference.scores.nll, candidate.scores.nll)
    free = ev.greedy_agreement(reference.greedy, candidate.greedy)
    followed = np.array(reference.greedy) == np.array(candidate.forced)
    return QualityReport(
        float_ppl=f, quantized_ppl=q, ppl_increase_pct=rise,
        top1_agreement=ev.top1_agreement(reference.scores, candidate.scores),
        greedy_agreement=float(followed.mean()), greedy_prefix=free.prefix,
        greedy_first_divergence=free.first_divergence,
        eval_tokens=int(len(reference.scores.nll)), greedy_prompts=len(data.prompts), greedy_tokens=data.greedy_tokens,
        max_ppl_increase_pct=max_ppl_increase_pct, passed=bool(np.isfinite(q) and rise <= max_ppl_increase_pct),
        ppl_increase_ci_pct=(low, high), decided=not low <= max_ppl_increase_pct <= high,
    )


def change_interval(reference_nll: np.ndarray, candidate_nll: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """95% interval of the perplexity change (percent): the mean per-token NLL difference +- z standard errors,
    the tokens paired (both models scored the same ones), as exp(mean difference) is the perplexity ratio."""
    diff = np.asarray(candidate_nll, np.float64) - np.asarray(reference_nll, np.float64)
    diff = diff[np.isfinite(diff)]
    if len(diff) < 2:
        return (float("nan"), float("nan"))
    mean, error = diff.mean(), z * diff.std(ddof=1) / np.sqrt(len(diff))
    return 100.0 * (float(np.exp(mean - error)) - 1.0), 100.0 * (float(np.exp(mean + error)) - 1.0)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def format_table(float_label: str, float_ppl: float, float_bytes: int,
                 rows: Sequence[tuple[str, QualityReport, int]], chosen: str | None = None) -> str:
    """A plain-text table: the float reference, then each candidate (label, report, model bytes)."""
    header = ("model", "perplexity", "change", "top-1 agree", "greedy agree", "model size", "gate")
    lines = [(float_label, f"{float_ppl:.4f}", "-", "-", "-", _mb(float_bytes), "reference")]
    for label, r, size in rows:
        lines.append((
            label, f"{r.quantized_ppl:.4f}", f"{r.ppl_increase_pct:+.2f}%", f"{100 * r.top1_agreement:.1f}%",
            f"{100 * r.greedy_agreement:.1f}% ({100 * r.greedy_prefix:.1f}%)",
            f"{_mb(size)} ({100 * size / float_bytes:.0f}%)",
            ("pass" if r.passed else "FAIL") + ("  <- chosen" if label == chosen else ""),
        ))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:  # label left, numbers right, gate column as is
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) if i < len(row) - 1 else cell
                         for i, (cell, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    first = rows[0][1] if rows else None
    notes = []
    if first is not None:
        notes.append(f"held-out text: {first.eval_tokens:,} tokens scored. greedy: {first.greedy_prompts} prompts x "
                     f"{first.greedy_tokens} tokens of the {float_label.split()[0]} model's greedy output, share of "
                     "its tokens the candidate also picks (in brackets: identical prefix of free-running output). "
                     f"gate: perplexity may rise at most {first.max_ppl_increase_pct:g}%")
    return "\n".join([fmt(header), rule, *map(fmt, lines), *notes])
