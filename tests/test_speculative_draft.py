"""Speculative decoding with a draft model, and speculative sampling: exact in both.

Greedy gives plain greedy's tokens (the target as its own draft: everything accepted; a perturbed copy
of it: many rejections); sampling gives plain sampling's distribution, checked by a chi-square test on
the joint distribution of the first three tokens against the exact one, a test shown to catch wrong
acceptance rules.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import gptedge.runtime.speculative as speculative
from gptedge.errors import ContextLengthError, UsageError
from gptedge.runtime import Model
from gptedge.runtime.decoding import CancelToken, Decoding, GenerationResult
from gptedge.runtime.draft import check_tokenizer, stream_draft
from gptedge.runtime.sampling import TokenDistribution, token_distribution
from gptedge.runtime.speculative import PAUSE, Pacer, accept_proposal, residual

PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "Hello world! The quick brown fox",
    "你好，世界。😀 你好",
    "x",
    "print(add(1, 2))\nprint(",
]
DRAFT_PADDING = 13  # the draft's embedding has this many rows more than its tokenizer has tokens
DRAFT_CONTEXT = 64


@pytest.fixture(scope="module")
def draft_bundle(runtime_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runtime model with noise on its matrices (it agrees with it about half the time), a padded
    embedding and a shorter context: a draft that differs in everything a draft may differ in."""
    import dataclasses

    import torch

    from gptedge.export.exporter import export_bundle
    from gptedge.train.checkpoint import TOKENIZER, load_checkpoint, save_checkpoint
    from gptedge.train.model import GPT

    source = load_checkpoint(runtime_checkpoint)[0]
    n_text = source.config.vocab_size
    config = dataclasses.replace(source.config, vocab_size=n_text + DRAFT_PADDING, block_size=DRAFT_CONTEXT)
    draft = GPT(config).eval()
    weights = source.state_dict()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            w = weights[name]
            if p.shape[0] > w.shape[0]:  # the padded embedding
                p[:n_text] = w
                p[n_text:] = torch.randn(p[n_text:].shape, generator=g) * 0.08
            else:
                p.copy_(w[: p.shape[0]])  # the position table: its first DRAFT_CONTEXT rows
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.015)
    root = tmp_path_factory.mktemp("draft")
    ckpt = save_checkpoint(root / "ckpt", draft, {}, (runtime_checkpoint / TOKENIZER).read_text(), None)
    return export_bundle(ckpt, root / "bundle", target="cpu", progress=False)


@pytest.fixture(scope="module")
def draft_model(draft_bundle: Path) -> Model:
    return Model.load(draft_bundle, provider="cpu", threads=1)


def draft_run(model: Model, prompt, draft: Model, **kw) -> GenerationResult:
    """A generation with `draft` proposing at every step (no fallback to plain steps), through the public pieces."""
    seq = Decoding(model.tokenizer, model.prompt_ids(prompt), model.sampling_params(**kw))
    pieces = list(stream_draft(model.engine, seq, draft.engine, fallback=False))
    assert "".join(pieces) == seq.result.text
    return seq.result


# -- the acceptance rule on hand-written distributions -----------------------------------------------------------
CASES = [  # (p, q): overlapping, q wider than p, disjoint supports, q == p
    ([0.5, 0.3, 0.2, 0.0], [0.2, 0.2, 0.3, 0.3]),
    ([0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]),
    ([0.6, 0.4, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]),
    ([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]),
]


@pytest.mark.parametrize("p, q", CASES)
def test_accepting_or_drawing_the_residual_gives_p_exactly(p, q) -> None:
    """Summed over proposals x ~ q: accept x with min(1, p/q), else the residual; each outcome's probability is p."""
    p, q = np.array(p), np.array(q)
    total = np.zeros_like(p)
    for x in np.flatnonzero(q):
        a = min(1.0, p[x] / q[x])
        total[x] += q[x] * a
        total += q[x] * (1 - a) * residual(p, int(x), q)
    np.testing.assert_allclose(total, p, atol=1e-12)
    for x in range(p.size):  # a point-mass proposal (prompt lookup): accepted with p(x), else p without x
        np.testing.assert_allclose(p[x] * np.eye(p.size)[x] + (1 - p[x]) * residual(p, x), p, atol=1e-12)


@pytest.mark.parametrize("p, q", CASES)
def test_accept_proposal_draws_follow_p(p, q) -> None:
    p, q = np.array(p), np.array(q)
    rng = np.random.default_rng(0)
    n = 6000
    tokens, kept = [], 0
    for x in rng.choice(p.size, size=n, p=q):
        token, accepted = accept_proposal(p, int(x), q, rng)
        assert token == x or not accepted
        kept += accepted
        tokens.append(token)
    stat, limit = chi_square([(t,) for t in tokens], {(i,): float(v) for i, v in enumerate(p) if v > 0})
    assert stat < limit
    assert abs(kept / n - np.minimum(p, q).sum()) < 0.03  # the acceptance rate is sum(min(p, q))


def test_a_tiny_or_rounded_residual_still_draws_from_p() -> None:
    p = np.array([0.5, 0.5])
    np.testing.assert_array_equal(residual(p, 0, p * (1 + 1e-17)), p)
    assert accept_proposal(np.array([0.0, 1.0]), 0, None, np.random.default_rng(0)) == (1, False)


# -- greedy: the same tokens -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("max_new_tokens", [1, 7, 30])
def test_greedy_with_a_draft_is_plain_greedy(runtime_model: Model, draft_model: Model, prompt: str,
                                             max_new_tokens: int) -> None:
    kw = dict(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=())
    plain = runtime_model.generate(prompt, **kw)
    for draft in (runtime_model, draft_model):
        for fast in (draft_run(runtime_model, prompt, draft, **kw), runtime_model.generate(prompt, speculative=draft,
                                                                                             **kw)):
            assert (fast.token_ids, fast.text, fast.finish_reason) == (plain.token_ids, plain.text,
                                                                       plain.finish_reason)
            assert fast.timings.accepted <= fast.timings.proposed


def test_stops_and_budget_inside_an_accepted_run_end_where_plain_decoding_ends(runtime_model: Model,
                                                                              draft_model: Model) -> None:
    prompt = PROMPTS[0]
    full = runtime_model.generate(prompt, temperature=0.0, max_new_tokens=30, stop_token_ids=())
    assert len(set(full.token_ids)) > 1
    stop_text = full.text[len(full.text) // 2:][:3]
    for extra in (dict(stop_strings=(stop_text,)), dict(stop_token_ids=(full.token_ids[20],)),
                  dict(repetition_penalty=1.3, stop_token_ids=()), dict(max_new_tokens=13, stop_token_ids=())):
        kw = {"temperature": 0.0, "max_new_tokens": 30, **extra}
        plain = runtime_model.generate(prompt, **kw)
        for draft in (runtime_model, draft_model):
            fast = draft_run(runtime_model, prompt, draft, **kw)
            assert (fast.token_ids, fast.text, fast.finish_reason) == (plain.token_ids, plain.text,
                                                                       plain.finish_reason)


def test_the_model_as_its_own_draft_is_always_right_and_a_perturbed_one_often_wrong(runtime_model: Model,
                                                                                  draft_model: Model) -> None:
    kw = dict(temperature=0.0, max_new_tokens=30, stop_token_ids=())
    same = draft_run(runtime_model, PROMPTS[1], runtime_model, **kw)
    assert same.timings.proposed > 20 and same.timings.accepted >= same.timings.proposed - 1
    other = [draft_run(runtime_model, p, draft_model, **kw).timings for p in PROMPTS]
    proposed, accepted = sum(t.proposed for t in other), sum(t.accepted for t in other)
    assert proposed > 50 and 0 < accepted < 0.9 * proposed


# -- sampling: the same distribution -----------------------------------------------------------------------------
SAMPLING = dict(temperature=1.0, top_k=3, repetition_penalty=1.2, max_new_tokens=4, stop_token_ids=())
RUNS = 2000


def chi_square(samples: list[tuple[int, ...]], exact: dict[tuple[int, ...], float]) -> tuple[float, float]:
    """(Pearson's statistic of `samples` against `exact`, its 0.999 quantile): cells expected fewer than 5 times
    are pooled; a sample `exact` gives probability 0 makes the statistic infinite."""
    counts: dict[tuple[int, ...], int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    if not set(counts) <= set(exact):
        return math.inf, 0.0
    n = len(samples)
    big = [c for c in exact if exact[c] * n >= 5]
    rest = [c for c in exact if exact[c] * n < 5]
    observed = [counts.get(c, 0) for c in big] + ([sum(counts.get(c, 0) for c in rest)] if rest else [])
    expected = [exact[c] * n for c in big] + ([n * sum(exact[c] for c in rest)] if rest else [])
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    df = len(observed) - 1
    if df == 0:  # one possible outcome, and every sample is it
        return 0.0, 1.0
    return stat, df * (1 - 2 / (9 * df) + 3.0902 * math.sqrt(2 / (9 * df))) ** 3  # Wilson-Hilferty, z(0.999)


def exact_joint(model: Model, ids: list[int], depth: int) -> dict[tuple[int, ...], float]:
    """The exact distribution of the first `depth` tokens plain sampling with SAMPLING draws, by enumeration."""
    params = model.sampling_params(**SAMPLING)
    vocab = model.tokenizer.get_vocab_size()
    out: dict[tuple[int, ...], float] = {}

    def walk(prefix: list[int], prob: float) -> None:
        if len(prefix) == depth:
            out[tuple(prefix)] = prob
            return
        cache = model.engine.new_cache(1, len(ids) + depth)
        row = model.engine.forward(cache, np.asarray(ids + prefix, np.int64)[None, :])[0, -1]
        model.engine.release(cache)
        p = token_distribution(row[:vocab], params, ids + prefix).probs()
        for token in np.flatnonzero(p):
            walk(prefix + [int(token)], prob * p[token])

    walk([], 1.0)
    return out


@pytest.fixture(scope="module")
def sampling_case(runtime_model: Model) -> tuple[list[int], dict[tuple[int, ...], float]]:
    """A prompt of the model's own (looping) greedy text, so lookups find proposals, and the exact joint
    distribution of the first three sampled tokens."""
    ids = runtime_model.generate(PROMPTS[1], temperature=0.0, max_new_tokens=40, stop_token_ids=()).token_ids
    return ids, exact_joint(runtime_model, ids, 3)


def sampled(model: Model, ids: list[int], how, runs: int = RUNS) -> tuple[list[tuple[int, ...]], int, int]:
    """The first three tokens of `runs` seeded generations, and the proposals made and accepted."""
    samples, proposed, accepted = [], 0, 0
    for seed in range(runs):
        if how == "lookup":
            result = model.generate(ids, speculative="lookup", seed=seed, **SAMPLING)
        else:
            result = draft_run(model, ids, how, seed=seed, **SAMPLING)
        samples.append(tuple(result.token_ids[:3]))
        proposed += result.timings.proposed
        accepted += result.timings.accepted
    return samples, proposed, accepted


@pytest.mark.parametrize("how", ["lookup", "draft"])
def test_speculative_sampling_has_plain_sampling_distribution(runtime_model: Model, draft_model: Model,
                                                             sampling_case, how: str) -> None:
    ids, exact = sampling_case
    samples, proposed, accepted = sampled(runtime_model, ids, draft_model if how == "draft" else how)
    assert proposed > RUNS and 0.1 * proposed < accepted < 0.9 * proposed  # both branches of the rule ran
    stat, limit = chi_square(samples, exact)
    assert stat < limit, (stat, limit)


def test_the_chi_square_test_catches_wrong_acceptance_rules(runtime_model: Model, draft_model: Model,
                                                            sampling_case, monkeypatch) -> None:
    ids, exact = sampling_case

    def always_accept(p, token, q, rng):
        return token, True

    def resample_from_p(p, token, q, rng):  # a classic bug: on rejection draw from p, not from max(0, p - q)
        if rng.random() * (1.0 if q is None else q[token]) < p[token]:
            return token, True
        return TokenDistribution(None, p, p.size).draw(rng), False

    for wrong, runs in ((always_accept, 200), (resample_from_p, 500)):
        monkeypatch.setattr(speculative, "accept_proposal", wrong)
        stat, limit = chi_square(sampled(runtime_model, ids, draft_model, runs)[0], exact)
        assert stat > 2 * limit, (wrong.__name__, stat, limit)


def test_seeded_speculative_sampling_repeats(runtime_model: Model, draft_model: Model) -> None:
    kw = dict(temperature=0.9, top_p=0.9, max_new_tokens=30, stop_token_ids=())
    for how in ("lookup", draft_model, runtime_model):
        first = runtime_model.generate(PROMPTS[0], speculative=how, seed=7, **kw)
        assert runtime_model.generate(PROMPTS[0], speculative=how, seed=7, **kw).token_ids == first.token_ids
        assert runtime_model.generate(PROMPTS[0], speculative=how, seed=8, **kw).token_ids != first.token_ids
    first = draft_run(runtime_model, PROMPTS[0], draft_model, seed=7, **kw)
    assert first.timings.proposed > 10
    assert draft_run(runtime_model, PROMPTS[0], draft_model, seed=7, **kw).token_ids == first.token_ids


# -- pacing, streaming, errors ------------------------------------------------------------------------------------
def test_pacer_falls_back_to_plain_steps_while_proposing_does_not_pay() -> None:
    pacer = Pacer(cost=0.1, timed=False)
    assert pacer.proposals(room=5) == 2
    pacer.record(proposed=2, accepted=2, committed=3, seconds=1.0)
    assert pacer.proposals(room=5) == 4 and pacer.proposals(room=1) == 1  # doubles, capped by the budget
    for _ in range(3):
        pacer.record(proposed=3, accepted=0, committed=1, seconds=1.0)
    assert pacer.proposals(room=5) == 0  # accepted too rarely to pay for the draft and the verify step
    for _ in range(PAUSE):
        pacer.record(proposed=0, accepted=0, committed=1, seconds=1.0)
    assert pacer.proposals(room=5) == 2  # tried again
    while pacer.proposals(room=5):
        pacer.record(proposed=pacer.proposals(room=5), accepted=0, committed=1, seconds=1.0)
    for _ in range(2 * PAUSE - 1):  # a second fallback in a row pauses twice as long
        pacer.record(proposed=0, accepted=0, committed=1, seconds=1.0)
        assert pacer.proposals(room=5) == 0
    pacer.record(proposed=0, accepted=0, committed=1, seconds=1.0)
    assert pacer.proposals(room=5) == 2
    timed = Pacer(cost=0.1, timed=True)
    assert timed.proposals(room=5) == 0  # first measures plain steps
    timed.record(0, 0, 1, 0.010)
    timed.record(0, 0, 1, 0.010)
    timed.record(2, 2, 3, 0.020)  # 6.7 ms a token against 10: pays
    assert timed.proposals(room=5) == 4
    timed.record(4, 1, 2, 0.060)  # 30 ms a token: stop
    assert timed.proposals(room=5) == 0
    assert Pacer(cost=1.0, timed=False, fallback=False).proposals(room=5) == 2


def test_streaming_pieces_join_to_the_text_and_cancel_works(runtime_model: Model, draft_model: Model) -> None:
    kw = dict(temperature=0.8, seed=3, max_new_tokens=30, stop_token_ids=())
    stream = runtime_model.stream(PROMPTS[2], speculative=draft_model, **kw)
    assert "".join(stream) == stream.result.text
    stream = runtime_model.stream(PROMPTS[1], speculative=draft_model, **kw)
    next(stream)
    stream.close()
    assert stream.result.finish_reason == "cancelled"
    cancel, seen = CancelToken(), []
    stream = runtime_model.stream(PROMPTS[1], speculative=runtime_model, cancel=cancel, temperature=0.0,
                                  max_new_tokens=30, stop_token_ids=(),
                                  on_token=lambda t: seen.append(t) or (len(seen) == 5 and cancel.cancel()))
    list(stream)
    assert stream.result.finish_reason == "cancelled" and 5 <= len(stream.result.token_ids) < 30


def swapped_tokenizer(tokenizer):
    """The same tokenizer with the ids of two tokens exchanged: as many tokens, different ids."""
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    return Tokenizer.from_str(json.dumps(data)), (a, b)


def test_a_draft_with_another_tokenizer_or_a_short_context_is_refused(runtime_model: Model, draft_model: Model,
                                                                      runtime_bundle: Path) -> None:
    from tokenizers import Tokenizer

    from conftest import RUNTIME_TEXTS
    from gptedge.train.tokenizer import train_tokenizer

    fake = SimpleNamespace(tokenizer=train_tokenizer(RUNTIME_TEXTS * 4, 300), folder=Path("other"))
    with pytest.raises(UsageError, match=r"draft model other has a tokenizer of \d+ tokens and the model \d+;"):
        check_tokenizer(runtime_model, fake)
    swapped, pair = swapped_tokenizer(runtime_model.tokenizer)
    with pytest.raises(UsageError, match="another tokenizer than the model") as caught:
        check_tokenizer(runtime_model, SimpleNamespace(tokenizer=swapped, folder=Path("other")))
    assert any(f"token {t!r} is id" in str(caught.value) for t in pair), caught.value
    check_tokenizer(runtime_model, SimpleNamespace(tokenizer=Tokenizer.from_file(str(runtime_bundle /
                                                                                      "tokenizer.json"))))
    impostor = Model(draft_model.engine, swapped, draft_model.spec, Path("impostor"), draft_model.session_info, 0.0)
    with pytest.raises(UsageError, match="another tokenizer"):
        runtime_model.generate("x", speculative=impostor, temperature=0.0, max_new_tokens=4)
    with pytest.raises(ContextLengthError, match=f"the draft model's context holds {DRAFT_CONTEXT}"):
        runtime_model.generate("x", speculative=draft_model, max_new_tokens=DRAFT_CONTEXT)
    for bad in ("draft", 3, draft_model.engine):
        with pytest.raises(UsageError, match="speculative must be None, 'lookup' or a loaded draft Model"):
            runtime_model.generate("x", speculative=bad)


# -- the command line ------------------------------------------------------------------------------------------
def test_cli_draft_prints_the_same_text_and_refuses_bad_drafts(capsys, tmp_path: Path, runtime_bundle: Path,
                                                              draft_bundle: Path, runtime_model: Model) -> None:
    from gptedge.cli import main
    from gptedge.runtime.bundle import sha256_file

    args = ["generate", str(runtime_bundle), PROMPTS[4], "--temperature", "0", "--max-new-tokens", "20",
            "--provider", "cpu", "--stats"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--draft", str(draft_bundle)]) == 0
    out, err = capsys.readouterr()
    assert out == plain and "draft accepted" in err

    other = tmp_path / "other-tokenizer"
    shutil.copytree(draft_bundle, other)
    (other / "tokenizer.json").write_text(swapped_tokenizer(runtime_model.tokenizer)[0].to_str())
    spec = json.loads((other / "gptedge.json").read_text())
    spec["files"]["tokenizer.json"] = sha256_file(other / "tokenizer.json")
    (other / "gptedge.json").write_text(json.dumps(spec))
    for extra, message in ((["--draft", str(other)], "another tokenizer"),
                           (["--draft", str(draft_bundle), "--lookup"], "--lookup and --draft exclude each other"),
                           (["--draft", str(tmp_path / "missing")], "is not a bundle folder"),
                           (["--draft", str(draft_bundle), "--max-new-tokens", "100"], "(option --max-new-tokens)")):
        assert main([*args, *extra]) != 0
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
