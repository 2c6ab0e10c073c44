"""Prompt-lookup speculative decoding gives exactly the plain greedy output, in fewer engine steps.

(Sampling with lookup, and draft models: tests/test_speculative_draft.py.)
"""

from __future__ import annotations

import pytest

from gptedge.errors import UsageError
from gptedge.runtime import Model
from gptedge.runtime.engine import BOUND_STEP_MAX
from gptedge.runtime.speculative import MAX_PROPOSALS, NgramIndex, adapt_length, lookup_proposals

PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "Hello world! The quick brown fox jumps over the lazy dog. Hello world! The quick",
    "你好，世界。我们在测试中文和表情符号。😀🎉🚀 你好，世界。",
    "x",
    "print(add(1, 2))\nprint(add(1, 2))\nprint(",
    "The runtime streams text that never splits a character: 你好 😀\nThe runtime",
]


def test_lookup_proposes_what_followed_the_longest_recent_match() -> None:
    assert lookup_proposals([1, 2, 3, 4, 9, 2, 3], 3) == [4, 9, 2]  # "2 3" was followed by 4 9 2
    assert lookup_proposals([5, 1, 2, 7, 1, 2, 8, 1, 2], 2) == [8, 1]  # the most recent earlier match wins
    assert lookup_proposals([1, 2, 3], 4) == []  # no n-gram repeats
    assert lookup_proposals([4, 4], 3) == [4]
    assert lookup_proposals([7] * 6, 3) == [7, 7] and lookup_proposals([7] * 8, 3) == [7, 7, 7]  # runs: k when there
    assert lookup_proposals([1, 2, 1, 2], 0) == []
    assert lookup_proposals([3, 1, 2, 9, 9, 9, 1, 2], 2, window=5) == []  # the earlier "1 2" is outside the window
    assert lookup_proposals([3, 1, 2, 9, 9, 9, 1, 2], 2, window=8) == [9, 9]


def test_an_index_extended_token_by_token_proposes_what_a_fresh_one_does() -> None:
    """A generation extends one index as tokens are committed; a lookup over the same history built at once agrees."""
    import numpy as np

    tokens = np.random.default_rng(0).integers(0, 4, 400).tolist()
    index = NgramIndex()
    for i, token in enumerate(tokens):
        index.extend([token])
        for k in (1, 3, 8):
            assert index.propose(k) == lookup_proposals(tokens[: i + 1], k), (i, k)


def test_proposal_lengths_double_up_to_what_a_bound_step_holds() -> None:
    assert [adapt_length(k, k, k, MAX_PROPOSALS) for k in (2, 4, 8)] == [4, 8, min(16, MAX_PROPOSALS)]
    assert adapt_length(8, 8, 3, MAX_PROPOSALS) == 3 and adapt_length(8, 8, 0, MAX_PROPOSALS) == 1
    assert MAX_PROPOSALS + 1 <= BOUND_STEP_MAX  # the pending token and every proposal in one bound verify step


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("max_new_tokens", [1, 7, 60])
def test_greedy_output_is_identical_to_plain_decoding(runtime_model: Model, prompt: str, max_new_tokens: int) -> None:
    kw = dict(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=())
    plain = runtime_model.generate(prompt, **kw)
    fast = runtime_model.generate(prompt, speculative="lookup", **kw)
    assert fast.token_ids == plain.token_ids and fast.text == plain.text
    assert fast.finish_reason == plain.finish_reason
    assert fast.timings.accepted <= fast.timings.proposed


def test_stops_inside_an_accepted_run_end_exactly_where_plain_decoding_ends(runtime_model: Model) -> None:
    prompt = PROMPTS[0]
    full = runtime_model.generate(prompt, temperature=0.0, max_new_tokens=60, stop_token_ids=())
    assert len(set(full.token_ids)) > 1
    stop_text = full.text[len(full.text) // 2:][:3]
    for extra in (dict(stop_strings=(stop_text,)), dict(stop_token_ids=(full.token_ids[20],)),
                  dict(repetition_penalty=1.3, stop_token_ids=())):
        kw = dict(temperature=0.0, max_new_tokens=60, **extra)
        plain, fast = runtime_model.generate(prompt, **kw), runtime_model.generate(prompt, speculative="lookup", **kw)
        assert (fast.token_ids, fast.text, fast.finish_reason) == (plain.token_ids, plain.text, plain.finish_reason)


def test_repetitive_output_is_accepted_in_runs(runtime_model: Model) -> None:
    """A random model's greedy output loops, so lookups from it are confirmed: fewer engine steps than tokens."""
    calls = []
    forward = runtime_model.engine.forward
    try:
        runtime_model.engine.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
        result = runtime_model.generate(PROMPTS[1], temperature=0.0, max_new_tokens=80, stop_token_ids=(),
                                        speculative="lookup")
    finally:
        del runtime_model.engine.forward
    assert result.timings.accepted > 20 and len(calls) < len(result.token_ids) / 2


def test_streaming_pieces_join_to_the_text_and_cancel_works(runtime_model: Model) -> None:
    stream = runtime_model.stream(PROMPTS[2], temperature=0.0, max_new_tokens=40, stop_token_ids=(),
                                  speculative="lookup")
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text
    stream = runtime_model.stream(PROMPTS[1], temperature=0.0, max_new_tokens=80, stop_token_ids=(),
                                  speculative="lookup")
    next(stream)
    stream.close()
    assert stream.result.finish_reason == "cancelled"


def test_unknown_modes_are_refused(runtime_model: Model) -> None:
    with pytest.raises(UsageError, match="speculative must be None, 'lookup' or a loaded draft Model"):
        runtime_model.generate("x", temperature=0.0, speculative="draft")


def test_cli_lookup_prints_the_same_text(capsys, runtime_bundle, runtime_model: Model) -> None:
    from gptedge.cli import main

    args = ["generate", str(runtime_bundle), PROMPTS[4], "--temperature", "0", "--max-new-tokens", "30",
            "--provider", "cpu", "--stats"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--lookup"]) == 0
    out, err = capsys.readouterr()
    assert out == plain and "lookup accepted" in err
