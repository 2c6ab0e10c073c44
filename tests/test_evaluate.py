"""gptedge.runtime.evaluate against PyTorch: perplexity (single and sliding windows), greedy decoding, logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptedge.errors import UsageError
from gptedge.runtime import evaluate as ev


@pytest.fixture(scope="module")
def engine(runtime_model):
    return runtime_model.engine


@pytest.fixture(scope="module")
def text_ids(runtime_model) -> list[int]:
    rng = np.random.default_rng(3)
    return rng.integers(0, runtime_model.spec.architecture.vocab_size, 300).tolist()


def torch_window_nll(gpt, ids: list[int], window: int, stride: int) -> np.ndarray:
    """The same windows as evaluate._windows, scored by the PyTorch model."""
    nll = np.full(len(ids) - 1, np.nan)
    with torch.no_grad():
        for begin, end, first in ev._windows(len(ids), window, stride):
            logits, _, _ = gpt(torch.tensor(ids[begin:end - 1])[None])
            logp = torch.log_softmax(logits[0].double(), dim=-1)
            for t in range(first, end):
                nll[t - 1] = -logp[t - 1 - begin, ids[t]].item()
    return nll


def test_windows_score_every_token_once_with_bounded_inputs():
    for n, window, stride in [(10, 4, 2), (10, 4, 4), (5, 8, 4), (2, 1, 1), (1000, 128, 37)]:
        spans = ev._windows(n, window, stride)
        targets = [t for begin, end, first in spans for t in range(first, end)]
        assert targets == list(range(1, n))  # each target once, in order
        for begin, end, first in spans:
            assert 0 < end - 1 - begin <= window  # inputs per window
            assert begin <= first - 1  # each target's previous token is inside its window


def test_single_window_perplexity_matches_torch_loss(engine, runtime_gpt, text_ids):
    ids = text_ids[:100]
    result = ev.perplexity(engine, ids)
    with torch.no_grad():
        _, loss, _ = runtime_gpt(torch.tensor(ids[:-1])[None], torch.tensor(ids[1:])[None])
    assert result.tokens == 99
    assert result.nll == pytest.approx(loss.item(), abs=1e-4)
    assert result.ppl == pytest.approx(np.exp(loss.item()), rel=1e-4)


@pytest.mark.parametrize("window,stride", [(128, 64), (64, 64), (50, 7)])
def test_sliding_window_matches_torch(engine, runtime_gpt, text_ids, window, stride):
    scores = ev.score_tokens(engine, text_ids, window=window, stride=stride)
    expected = torch_window_nll(runtime_gpt, text_ids, window, stride)
    np.testing.assert_allclose(scores.nll, expected, atol=1e-4)
    assert scores.perplexity().tokens == len(text_ids) - 1


def test_top1_is_the_argmax_of_torch_logits(engine, runtime_gpt, text_ids):
    ids = text_ids[:80]
    scores = ev.score_tokens(engine, ids)
    with torch.no_grad():
        logits, _, _ = runtime_gpt(torch.tensor(ids[:-1])[None])
    assert (scores.top1 == logits[0].argmax(-1).numpy()).mean() == 1.0
    assert ev.top1_agreement(scores, scores) == 1.0


def test_long_vocab_is_scored_in_chunks(engine, text_ids, monkeypatch):
    """A tiny logits budget forces many forward calls per window; the numbers must not change."""
    whole = ev.score_tokens(engine, text_ids, window=128, stride=64)
    monkeypatch.setattr(ev, "_LOGITS_BYTES", 1)  # chunk = 16 positions
    chunked = ev.score_tokens(engine, text_ids, window=128, stride=64)
    np.testing.assert_allclose(chunked.nll, whole.nll, atol=1e-5)
    assert (chunked.top1 == whole.top1).all()


def test_progress_counts_every_scored_token(engine, text_ids):
    seen = []
    ev.score_tokens(engine, text_ids, window=64, stride=32, progress=seen.append)
    assert sum(seen) == len(text_ids) - 1


def test_greedy_continuation_matches_torch(engine, runtime_gpt, text_ids):
    prompt = text_ids[:9]
    expected = runtime_gpt.generate_greedy(torch.tensor(prompt)[None], 20)[0, len(prompt):].tolist()
    assert ev.greedy_continuation(engine, prompt, 20) == expected


def test_batched_continuations_equal_one_at_a_time(engine, text_ids):
    prompts = [text_ids[:3], text_ids[10:27], text_ids[40:41]]
    batched = ev.greedy_continuations(engine, prompts, 12)
    assert batched == [ev.greedy_continuation(engine, p, 12) for p in prompts]


def test_next_token_logits_match_torch(engine, runtime_gpt, text_ids):
    prompts = [text_ids[:5], text_ids[5:17]]
    logits = ev.next_token_logits(engine, prompts)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            expected, _, _ = runtime_gpt(torch.tensor(prompt)[None])
            np.testing.assert_allclose(logits[row], expected[0, -1].numpy(), atol=1e-4)


def test_greedy_agreement_counts_prefix_and_positions():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    cand = [[1, 2, 9, 4], [5, 6, 7, 8]]
    agreement = ev.greedy_agreement(ref, cand)
    assert agreement.first_divergence == [2, 4]
    assert agreement.prefix == pytest.approx((0.5 + 1.0) / 2)
    assert agreement.positionwise == pytest.approx((0.75 + 1.0) / 2)


@pytest.mark.parametrize("kwargs", [dict(window=0), dict(window=10_000), dict(window=16, stride=17), dict(stride=0)])
def test_bad_window_or_stride_is_a_usage_error(engine, text_ids, kwargs):
    with pytest.raises(UsageError):
        ev.perplexity(engine, text_ids, **kwargs)


def test_bad_token_ids_are_usage_errors(engine):
    with pytest.raises(UsageError, match="at least 2 tokens"):
        ev.perplexity(engine, [1])
    with pytest.raises(UsageError, match="another tokenizer"):
        ev.perplexity(engine, [1, engine.arch.vocab_size])
    with pytest.raises(UsageError):
        ev.greedy_continuation(engine, [], 3)
