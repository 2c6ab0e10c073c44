"""Sampling: hand-written vectors where the kept set is known, plus property tests."""

from __future__ import annotations

import dataclasses
import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gptedge.errors import UsageError
from gptedge.runtime.sampling import (
    SamplingParams,
    apply_penalties,
    apply_temperature,
    filter_logits,
    log_softmax,
    min_p_filter,
    sample_next,
    softmax,
    top_k_filter,
    top_p_filter,
)

INF = np.inf
PROPS = settings(max_examples=100, deadline=None)


def kept(row: np.ndarray) -> list[int]:
    return np.flatnonzero(row > -INF).tolist()


def logits_of(probs: list[float]) -> np.ndarray:
    return np.log(np.array(probs, dtype=np.float64))


# Rows mixing ordinary values, exact ties, masked entries, NaN and float32/float64 extremes.
_ELEMENT = st.one_of(
    st.floats(-40, 40, allow_nan=False),
    st.sampled_from([-INF, INF, np.nan, 0.0, 1.0, 1e30, -1e30, 3.4e38, -3.4e38, 1e308, -1e308]),
)
rows = hnp.arrays(np.float64, st.integers(1, 48), elements=_ELEMENT)


def has_candidate(x: np.ndarray) -> bool:
    return bool(np.any(x > -INF))  # NaN > -inf is False


# ----------------------------------------------------------------------------- params


def test_default_params_are_valid_and_normalise_sequences():
    p = SamplingParams(stop_token_ids=[50256, 0], stop_strings="\n\n")
    assert p.stop_token_ids == (50256, 0)
    assert p.stop_strings == ("\n\n",)
    assert SamplingParams(stop_token_ids=7).stop_token_ids == (7,)
    assert not SamplingParams().greedy and SamplingParams(temperature=0).greedy
    assert not SamplingParams().penalized and SamplingParams(presence_penalty=0.5).penalized
    hash(p)  # frozen and hashable
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("temperature", -0.1, ">= 0"),
        ("temperature", math.nan, ">= 0"),
        ("temperature", math.inf, ">= 0"),
        ("temperature", "hot", ">= 0"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_p", math.nan, "(0, 1]"),
        ("top_k", -1, ">= 0"),
        ("top_k", 2.5, "integer"),
        ("top_k", True, "integer"),
        ("min_p", 1.0, "[0, 1)"),
        ("min_p", -0.01, "[0, 1)"),
        ("max_new_tokens", 0, ">= 1"),
        ("repetition_penalty", 0.0, "> 0"),
        ("repetition_penalty", -1.0, "> 0"),
        ("presence_penalty", math.inf, "finite"),
        ("frequency_penalty", math.nan, "finite"),
        ("stop_strings", ("ok", ""), "non-empty"),
        ("stop_token_ids", (1, "2"), "integer"),
        ("stop_token_ids", (1.0,), "integer"),
        ("stop_token_ids", (-1,), "non-negative"),
        ("seed", -3, ">= 0"),
    ],
)
def test_bad_params_raise_usage_error_naming_the_allowed_values(field, value, says):
    with pytest.raises(UsageError) as info:
        SamplingParams(**{field: value})
    assert field in str(info.value)
    assert says in str(info.value)


def test_replace_revalidates():
    with pytest.raises(UsageError, match="top_p"):
        dataclasses.replace(SamplingParams(), top_p=0.0)


# ----------------------------------------------------------------------------- softmax


def test_softmax_known_values_and_dtype():
    p = softmax(np.array([0.0, math.log(3.0)], dtype=np.float32))
    assert p.dtype == np.float64
    np.testing.assert_allclose(p, [0.25, 0.75], rtol=1e-6)
    np.testing.assert_allclose(log_softmax([0.0, math.log(3.0)]), np.log([0.25, 0.75]), rtol=1e-12)


def test_softmax_extremes_never_nan():
    np.testing.assert_array_equal(softmax([1e308, 1e308, -1e308]), [0.5, 0.5, 0.0])
    np.testing.assert_array_equal(softmax([-INF, 0.0, -INF]), [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(softmax([INF, 5.0, INF]), [0.5, 0.0, 0.5])
    np.testing.assert_array_equal(softmax([np.nan, 0.0]), [0.0, 1.0])
    np.testing.assert_array_equal(log_softmax([-INF, 0.0, 1e308]), [-INF, -1e308, 0.0])
    with pytest.raises(UsageError, match="-inf or NaN"):
        softmax([-INF, np.nan])


def test_softmax_batched_rows():
    x = np.array([[0.0, 0.0], [1000.0, 0.0], [-INF, 3.0]])
    p = softmax(x)
    np.testing.assert_allclose(p.sum(-1), 1.0)
    np.testing.assert_allclose(p[0], [0.5, 0.5])
    np.testing.assert_array_equal(p[2], [0.0, 1.0])
    np.testing.assert_allclose(np.exp(log_softmax(x)), p, atol=1e-300)


@PROPS
@given(rows)
def test_softmax_property_no_nan_sums_to_one(x):
    assume(has_candidate(x))
    p = softmax(x)
    assert not np.isnan(p).any()
    assert p.sum() == pytest.approx(1.0)
    assert not np.isnan(log_softmax(x)).any()


# ----------------------------------------------------------------------------- penalties, temperature


def test_penalties_hand_written():
    x = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    rep = apply_penalties(x, [0, 1, 1], repetition_penalty=2.0)
    np.testing.assert_array_equal(rep, [1.0, -4.0, 1.0, 0.5])  # positive / 2, negative * 2, unseen untouched
    pf = apply_penalties(x, np.array([0, 1, 1]), presence_penalty=0.5, frequency_penalty=0.25)
    np.testing.assert_array_equal(pf, [2.0 - 0.75, -2.0 - 1.0, 1.0, 0.5])
    both = apply_penalties(x, [1, 1, 1], repetition_penalty=1.5, frequency_penalty=1.0)
    np.testing.assert_array_equal(both, [2.0, -3.0 - 3.0, 1.0, 0.5])
    np.testing.assert_array_equal(x, [2.0, -2.0, 1.0, 0.5])  # input untouched
    np.testing.assert_array_equal(apply_penalties(x, [], repetition_penalty=3.0), x)


def test_penalties_reject_foreign_ids():
    with pytest.raises(UsageError, match="outside"):
        apply_penalties(np.zeros(4), [4], repetition_penalty=1.2)
    with pytest.raises(UsageError, match="outside"):
        apply_penalties(np.zeros(4), [-1], repetition_penalty=1.2)
    with pytest.raises(UsageError, match="repetition_penalty"):
        apply_penalties(np.zeros(4), [1], repetition_penalty=0.0)


@PROPS
@given(
    rows,
    st.lists(st.integers(0, 47), max_size=20),
    st.floats(0.01, 100),
    st.floats(-100, 100),
    st.floats(-100, 100),
)
def test_penalties_never_produce_nan(x, history, rep, presence, frequency):
    history = [i for i in history if i < x.size]
    out = apply_penalties(x, history, rep, presence, frequency)
    assert not np.isnan(out).any()
    seen = np.zeros(x.size, bool)
    seen[history] = True
    np.testing.assert_array_equal(out[~seen], np.where(np.isnan(x), -INF, x)[~seen])


def test_temperature():
    np.testing.assert_array_equal(apply_temperature(np.array([1.0, -2.0, -INF]), 0.5), [2.0, -4.0, -INF])
    with pytest.raises(UsageError, match="greedy"):
        apply_temperature(np.zeros(2), 0.0)


# ----------------------------------------------------------------------------- top-k


def test_top_k_hand_written():
    x = np.array([1.0, 5.0, 3.0, 4.0, 2.0])
    assert kept(top_k_filter(x, 2)) == [1, 3]
    assert kept(top_k_filter(x, 3)) == [1, 2, 3]
    assert kept(top_k_filter(x, 0)) == [0, 1, 2, 3, 4]
    assert kept(top_k_filter(x, 9)) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(top_k_filter(x, 2)[[1, 3]], [5.0, 4.0])  # kept logits unchanged


def test_top_k_ties_at_boundary_keep_lowest_ids_exactly_k():
    x = np.array([1.0, 3.0, 3.0, 3.0, 0.0, 3.0])
    assert kept(top_k_filter(x, 2)) == [1, 2]
    assert kept(top_k_filter(x, 4)) == [1, 2, 3, 5]
    assert kept(top_k_filter(x, 5)) == [0, 1, 2, 3, 5]
    assert kept(top_k_filter(np.array([-INF, 1.0, -INF]), 2)) == [1]


@PROPS
@given(rows, st.integers(1, 50))
def test_top_k_property(x, k):
    assume(has_candidate(x))
    out = top_k_filter(x, k)
    clean = np.where(np.isnan(x), -INF, x)
    keep = out > -INF
    assert keep.sum() == min(k, int((clean > -INF).sum()))
    dropped = clean[~keep & (clean > -INF)]
    if dropped.size:
        boundary = out[keep].min()
        assert dropped.max() <= boundary
        tied_dropped = np.flatnonzero(~keep & (clean == boundary))
        tied_kept = np.flatnonzero(keep & (clean == boundary))
        if tied_dropped.size:
            assert tied_kept.max() < tied_dropped.min()


@PROPS
@given(rows, st.integers(0, 2**32 - 1))
def test_top_k_1_is_greedy(x, seed):
    assume(has_candidate(x))
    greedy = sample_next(x, SamplingParams(temperature=0), None)
    assert sample_next(x, SamplingParams(top_k=1), np.random.default_rng(seed)) == greedy
    assert greedy == kept(top_k_filter(x, 1))[0]


# ----------------------------------------------------------------------------- top-p


def test_top_p_hand_written():
    x = logits_of([0.1, 0.5, 0.15, 0.25])
    assert kept(top_p_filter(x, 0.4)) == [1]
    assert kept(top_p_filter(x, 0.7)) == [1, 3]
    assert kept(top_p_filter(x, 0.8)) == [1, 2, 3]
    assert kept(top_p_filter(x, 0.95)) == [0, 1, 2, 3]
    assert kept(top_p_filter(x, 1.0)) == [0, 1, 2, 3]
    assert kept(top_p_filter(x, 1e-9)) == [1]  # the top token always stays


def test_top_p_ties_keep_lowest_ids():
    x = np.zeros(4)  # four tokens at 0.25
    assert kept(top_p_filter(x, 0.3)) == [0, 1]
    assert kept(top_p_filter(x, 0.6)) == [0, 1, 2]
    assert kept(top_p_filter(np.array([0.0, 2.0, 0.0, 2.0]), 0.6)) == [1, 3]


def _reference_top_p(x: np.ndarray, p: float) -> list[int]:
    """Full stable sort by (prob desc, id asc) over the finite entries; the obvious way."""
    ids = np.flatnonzero(x > -INF)
    f = x[ids]
    with np.errstate(over="ignore"):
        e = np.exp(f - f.max())
    probs = e / e.sum()
    order = np.lexsort((ids, -probs))
    cs = np.cumsum(probs[order])
    nonzero = int((probs > 0).sum())
    cut = min(int(np.searchsorted(cs, p, side="left")) + 1, nonzero)
    return sorted(ids[order[:cut]].tolist())


@PROPS
@given(rows, st.floats(0.01, 0.999))
def test_top_p_keeps_exactly_the_minimal_prefix(x, p):
    x = np.where(np.isnan(x) | (x == INF), -INF, x)
    assume(has_candidate(x))
    got = kept(top_p_filter(x, p))
    assert got == _reference_top_p(x, p)
    probs = softmax(x)
    mass = probs[got].sum()
    assert mass >= p - 1e-9 or len(got) == int((probs > 0).sum())
    assert mass - probs[got].min() < p + 1e-9  # dropping the least likely kept token falls below p
    dropped = np.setdiff1d(np.flatnonzero(probs > 0), got)
    if dropped.size:
        assert probs[dropped].max() <= probs[got].min() * (1 + 1e-12)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("scale", [0.2, 3.0, 12.0])
def test_top_p_large_vocab_matches_full_sort(p, scale):
    """V = 50257 exercises every partial-selection size (64 ... full) of the fast path."""
    x = np.random.default_rng(7).standard_normal(50257) * scale
    x[::97] = x[0]  # plenty of exact ties
    assert kept(top_p_filter(x, p)) == _reference_top_p(x, p)


# ----------------------------------------------------------------------------- min-p


def test_min_p_hand_written():
    x = logits_of([0.5, 0.3, 0.15, 0.05])
    assert kept(min_p_filter(x, 0.25)) == [0, 1, 2]  # threshold 0.125
    assert kept(min_p_filter(x, 0.5)) == [0, 1]  # threshold 0.25
    assert kept(min_p_filter(x, 0.05)) == [0, 1, 2, 3]
    assert kept(min_p_filter(x, 0.99)) == [0]
    assert kept(min_p_filter(x, 0.0)) == [0, 1, 2, 3]


@PROPS
@given(rows, st.floats(0.0, 0.999))
def test_min_p_keeps_exactly_those_above_threshold(x, min_p):
    assume(has_candidate(x))
    keep = min_p_filter(x, min_p) > -INF
    probs = softmax(x)
    thr = min_p * probs.max()
    assert keep[np.argmax(probs)]
    assert keep[(probs >= thr * (1 + 1e-9)) & (probs > 0)].all()
    assert not keep[probs < thr * (1 - 1e-9)].any()


# ----------------------------------------------------------------------------- pipeline and draws


def test_pipeline_order_top_k_renormalises_before_top_p():
    x = logits_of([0.4, 0.3, 0.2, 0.1])
    # After top-k=2 the survivors have 0.571 and 0.429, so top-p=0.55 keeps only token 0;
    # top-p on the raw distribution would have kept two tokens.
    assert kept(filter_logits(x, SamplingParams(top_k=2, top_p=0.55))) == [0]
    assert kept(top_p_filter(x, 0.55)) == [0, 1]


def test_pipeline_temperature_before_top_p_and_penalties_first():
    x = logits_of([0.6, 0.4])
    assert kept(filter_logits(x, SamplingParams(top_p=0.55))) == [0]
    assert kept(filter_logits(x, SamplingParams(top_p=0.55, temperature=10.0))) == [0, 1]  # 0.510 < 0.55
    # A strong repetition penalty on token 0 flips the greedy choice.
    params = SamplingParams(temperature=0, repetition_penalty=4.0)
    assert sample_next(np.array([2.0, 1.0]), params, None, history=[0]) == 1
    assert sample_next(np.array([2.0, 1.0]), params, None) == 0  # no history: no penalty


def test_greedy_lowest_id_on_ties_and_ignores_rng():
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    greedy = SamplingParams(temperature=0)
    assert sample_next(np.array([1.0, 3.0, 3.0]), greedy, rng) == 1
    assert sample_next(np.array([np.nan, 1.0, np.nan]), greedy, None) == 1
    assert sample_next(np.array([5.0, INF, INF]), greedy, None) == 1
    assert rng.bit_generator.state == state
    with pytest.raises(UsageError, match="nothing to sample"):
        sample_next(np.array([-INF, np.nan]), greedy, None)
    with pytest.raises(UsageError, match="rng"):
        sample_next(np.zeros(3), SamplingParams(), None)
    with pytest.raises(UsageError, match="shape"):
        sample_next(np.zeros((2, 3)), greedy, None)


@PROPS
@given(
    rows,
    st.integers(0, 2**32 - 1),
    st.sampled_from([0.0, 0.3, 1.0, 2.5]),
    st.integers(0, 6),
    st.sampled_from([1.0, 0.9, 0.5, 0.05]),
    st.sampled_from([0.0, 0.1, 0.5]),
    st.sampled_from([1.0, 1.3, 0.5]),
    st.lists(st.integers(0, 47), max_size=10),
)
def test_sampled_token_is_valid_and_was_kept(x, seed, temperature, top_k, top_p, min_p, rep, history):
    assume(has_candidate(x))
    history = [i for i in history if i < x.size]
    params = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=rep, frequency_penalty=0.2
    )
    allowed = filter_logits(x, params, history)
    assert not np.isnan(allowed).any()
    token = sample_next(x, params, np.random.default_rng(seed), history)
    assert isinstance(token, int) and 0 <= token < x.size
    assert allowed[token] > -INF


def test_same_seed_same_sequence_and_one_draw_per_token():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((64, 5000)).astype(np.float32) * 2
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, min_p=0.02, seed=1234)

    def run(p: SamplingParams) -> list[int]:
        g = p.make_rng()
        return [sample_next(row, p, g, history=logits.argmax(-1)[:i]) for i, row in enumerate(logits)]

    first = run(params)
    assert run(params) == first
    assert run(dataclasses.replace(params, seed=4321)) != first
    # Exactly one uniform per sampled token: the generator ends where 64 draws leave it.
    g, ref = params.make_rng(), params.make_rng()
    for row in logits:
        sample_next(row, params, g)
    ref.random(64)
    assert g.bit_generator.state == ref.bit_generator.state


@pytest.mark.parametrize("vocab", [3, 10_000])  # 10k takes the blocked inverse-CDF path
def test_draw_frequencies_follow_the_distribution(vocab):
    x = np.full(vocab, -INF)
    if vocab == 3:
        x[:] = logits_of([0.5, 0.3, 0.2])
        expect = {0: 0.5, 1: 0.3, 2: 0.2}
    else:
        x[:] = 0.0
        x[: vocab // 2] = math.log(3.0)  # first half holds 3/4 of the mass
        x[vocab - 1] = -INF  # a masked token is never drawn
    rng = np.random.default_rng(5)
    draws = np.array([sample_next(x, SamplingParams(), rng) for _ in range(3000)])
    if vocab == 3:
        for token, prob in expect.items():
            assert abs(np.mean(draws == token) - prob) < 0.025
    else:
        assert abs(np.mean(draws < vocab // 2) - 0.75) < 0.025
        assert (draws != vocab - 1).all()
        assert len(np.unique(draws)) > 1500


def test_sampling_extreme_logits_stays_within_survivors():
    rng = np.random.default_rng(0)
    x = np.array([1e308, -1e308, 1e308, 5.0, -INF, np.nan], dtype=np.float64)
    for temperature in (1e-3, 1.0, 1e3):
        for _ in range(50):
            assert sample_next(x, SamplingParams(temperature=temperature), rng) in (0, 2)
    x32 = np.array([3.4e38, 3.4e38, -3.4e38], dtype=np.float32)
    assert {sample_next(x32, SamplingParams(temperature=1e-6), rng) for _ in range(50)} <= {0, 1}


def test_greedy_without_penalties_reads_the_row_as_it_is() -> None:
    """The no-copy greedy path picks what the full path picks: first maximum, NaN never, +inf first, and an
    all -inf (or NaN) row is still the clear error."""
    from gptedge.runtime.sampling import SamplingParams, sample_next

    greedy = SamplingParams(temperature=0.0)
    rng = np.random.default_rng(0)
    for _ in range(200):
        row = rng.normal(size=64).astype(np.float32)
        row[rng.integers(0, 64, 3)] = rng.choice([np.nan, -np.inf, np.inf, row.max()], 3)
        finite = np.where(np.isnan(row), -np.inf, row).astype(np.float64)
        assert sample_next(row, greedy, None) == int(np.argmax(finite))
    with pytest.raises(UsageError, match="nothing to sample"):
        sample_next(np.full(8, np.nan, np.float32), greedy, None)
    with pytest.raises(UsageError, match="nothing to sample"):
        sample_next(np.full(8, -np.inf, np.float32), greedy, None)
