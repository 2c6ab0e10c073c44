"""The Model API on a real exported bundle: parity with PyTorch, streaming, stops, context, batching,
scoring, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptedge.errors import BundleError, ContextLengthError, GptEdgeError, UsageError
from gptedge.runtime import CancelToken, Model
from gptedge.runtime.generator import kv_capacity


def torch_greedy(gpt, ids: list[int], n: int) -> list[int]:
    return gpt.generate_greedy(torch.tensor([ids]), n)[0, len(ids):].tolist()


# -- loading --------------------------------------------------------------------------------------------------
def test_load_describes_the_bundle(runtime_model: Model, runtime_bundle: Path) -> None:
    spec = json.loads((runtime_bundle / "gptedge.json").read_text())
    assert runtime_model.provider == "cpu"
    assert runtime_model.context_length == spec["architecture"]["context_length"] == 128
    assert runtime_model.eos_id == spec["special_tokens"]["eos_id"]
    assert runtime_model.engine.inplace
    assert "provider='cpu'" in repr(runtime_model)


# -- parity with PyTorch --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["def add(a, b):", "你好", "x"])
def test_greedy_matches_pytorch(runtime_model: Model, runtime_gpt, prompt: str) -> None:
    ids = runtime_model.encode(prompt)
    result = runtime_model.generate(prompt, temperature=0.0, max_new_tokens=40, stop_token_ids=())
    assert result.token_ids == torch_greedy(runtime_gpt, ids, 40)
    assert result.finish_reason == "length" and result.prompt_tokens == len(ids)


def test_greedy_to_the_end_of_the_context_matches_pytorch(runtime_model: Model, runtime_gpt) -> None:
    ids = runtime_model.encode("Hello world! " * 3)
    n = runtime_model.context_length - len(ids)
    result = runtime_model.generate(ids, temperature=0.0, max_new_tokens=n, stop_token_ids=())
    assert len(result.token_ids) == n
    assert result.token_ids == torch_greedy(runtime_gpt, ids, n)[:n]


def test_token_id_prompt_equals_text_prompt(runtime_model: Model) -> None:
    text = "The quick brown fox"
    a = runtime_model.generate(text, temperature=0.7, seed=5, max_new_tokens=12)
    b = runtime_model.generate(runtime_model.encode(text), temperature=0.7, seed=5, max_new_tokens=12)
    assert a.token_ids == b.token_ids and a.text == b.text


# -- streaming ---------------------------------------------------------------------------------------------------------
def test_stream_equals_generate_and_reports_timings(runtime_model: Model) -> None:
    kw = dict(temperature=1.0, seed=123, max_new_tokens=30, stop_token_ids=())
    stream = runtime_model.stream("Hello", **kw)
    pieces = list(stream)
    result = runtime_model.generate("Hello", **kw)
    assert "".join(pieces) == result.text == stream.result.text
    assert result.text == runtime_model.decode(result.token_ids)
    t = result.timings
    assert t.prompt_tokens == len(runtime_model.encode("Hello")) and t.generated_tokens == 30
    assert 0 < t.ttft_s < t.total_s and t.decode_tokens_per_s > 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.text(alphabet=st.sampled_from(list("ab 你好世界表情😀🎉🚀ñü\n")), min_size=1, max_size=12),
    seed=st.integers(0, 2**31),
    temperature=st.sampled_from([0.8, 1.5, 3.0]),
)
def test_stream_pieces_never_split_characters(runtime_model: Model, prompt: str, seed: int, temperature: float) -> None:
    """At high temperature the byte-level model emits split multi-byte characters;
    pieces stay whole and join exactly."""
    stream = runtime_model.stream(prompt, temperature=temperature, seed=seed, max_new_tokens=24, stop_token_ids=())
    pieces = list(stream)
    full = runtime_model.decode(stream.result.token_ids)
    assert "".join(pieces) == full
    for piece in pieces[:-1]:  # only the final flush may hold an unfinished character (as decode does)
        assert not piece.endswith("\ufffd") or full.count("\ufffd") > 0
        piece.encode("utf-8")  # no lone surrogates


def test_stream_splits_multibyte_characters_correctly(runtime_model: Model) -> None:
    """Feed a CJK/emoji prompt's own tokens through the streaming path: the pieces rebuild the text exactly."""
    from gptedge.runtime.decoding import TextPipe

    text = "你好，世界。😀🎉🚀 mixed ñ"
    ids = runtime_model.encode(text)
    assert any("\ufffd" in runtime_model.decode([i]) for i in ids)  # the tokenizer does split characters
    pipe = TextPipe(runtime_model.tokenizer, ())
    pieces = [pipe.add(i)[0] for i in ids] + [pipe.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


# -- stopping ----------------------------------------------------------------------------------------------------------
def test_stop_string_across_tokens_is_cut(runtime_model: Model) -> None:
    kw = dict(temperature=0.0, max_new_tokens=40, stop_token_ids=())
    full = runtime_model.generate("def add(a, b):", **kw)
    stop = full.text[10:14]
    assert len(stop) == 4
    result = runtime_model.generate("def add(a, b):", stop_strings=[stop], **kw)
    assert result.finish_reason == "stop_string"
    assert result.text == full.text[: full.text.index(stop)]
    assert stop not in result.text
    streamed = "".join(runtime_model.stream("def add(a, b):", stop_strings=[stop], **kw))
    assert streamed == result.text


def test_stop_token_id_ends_without_emitting_it(runtime_model: Model) -> None:
    full = runtime_model.generate("Hello", temperature=0.0, max_new_tokens=20, stop_token_ids=())
    stop = full.token_ids[5]
    first = full.token_ids.index(stop)
    result = runtime_model.generate("Hello", temperature=0.0, max_new_tokens=20, stop_token_ids=[stop])
    assert result.finish_reason == "eos"
    assert result.token_ids == full.token_ids[:first]


def test_eos_is_the_default_stop_token(runtime_model: Model) -> None:
    assert runtime_model.sampling_params().stop_token_ids == (runtime_model.eos_id,)
    assert runtime_model.sampling_params(stop_token_ids=()).stop_token_ids == ()


def test_length_finish(runtime_model: Model) -> None:
    result = runtime_model.generate("Hello", temperature=0.0, max_new_tokens=7, stop_token_ids=())
    assert result.finish_reason == "length" and len(result.token_ids) == 7


# -- context -----------------------------------------------------------------------------------------------------------
def test_context_overflow_is_an_error_or_truncates_left(runtime_model: Model, runtime_gpt) -> None:
    ids = (runtime_model.encode("Hello world! The quick brown fox. ") * 20)[:120]
    with pytest.raises(ContextLengthError, match="truncate='left'"):
        runtime_model.generate(ids, temperature=0.0, max_new_tokens=20)
    result = runtime_model.generate(ids, temperature=0.0, max_new_tokens=20, truncate="left", stop_token_ids=())
    kept = ids[-(128 - 20):]
    assert result.prompt_tokens == len(kept) and result.finish_reason == "length"
    assert result.token_ids == torch_greedy(runtime_gpt, kept, 20)


def test_default_budget_stops_at_the_context(runtime_model: Model) -> None:
    ids = runtime_model.encode("Hello world! " * 30)[:120]
    result = runtime_model.generate(ids, temperature=0.0, stop_token_ids=())  # default max_new_tokens 128
    assert result.finish_reason == "context" and len(result.token_ids) == 128 - 120


def test_kv_buffer_is_sized_to_the_request(runtime_model: Model) -> None:
    assert kv_capacity(10, 128) == 64 and kv_capacity(65, 128) == 128 and kv_capacity(64, 1024) == 64
    engine = runtime_model.engine
    engine.clear_pool()
    runtime_model.generate("Hello", temperature=0.0, max_new_tokens=10)
    assert list(engine._pool) == [(1, 64)]  # not the whole 128-position context
    cache = engine._pool[(1, 64)][0]
    assert cache.values[0].shape()[2] == 64


# -- batching ----------------------------------------------------------------------------------------------------------
def test_batch_equals_one_by_one(runtime_model: Model) -> None:
    prompts = ["def add(a, b):", "x", "你好，世界。😀", "The quick brown fox jumps over"]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=9, top_k=20)):
        batch = runtime_model.generate_batch(prompts, max_new_tokens=16, stop_token_ids=(), **kw)
        single = [runtime_model.generate(p, max_new_tokens=16, stop_token_ids=(), **kw) for p in prompts]
        assert [b.token_ids for b in batch] == [s.token_ids for s in single]
        assert [b.text for b in batch] == [s.text for s in single]
        assert all(b.finish_reason == "length" for b in batch)


def test_batch_rows_stop_independently(runtime_model: Model) -> None:
    prompts = ["Hello", "def add(a, b):"]
    single = [runtime_model.generate(p, temperature=0.0, max_new_tokens=12, stop_token_ids=()) for p in prompts]
    stop = single[0].token_ids[3]
    batch = runtime_model.generate_batch(prompts, temperature=0.0, max_new_tokens=12, stop_token_ids=[stop])
    expected = [runtime_model.generate(p, temperature=0.0, max_new_tokens=12, stop_token_ids=[stop]) for p in prompts]
    assert [(b.token_ids, b.finish_reason) for b in batch] == [(e.token_ids, e.finish_reason) for e in expected]
    assert batch[0].finish_reason == "eos"


def test_batch_rows_keep_their_own_budgets(runtime_model: Model) -> None:
    """Default budgets are cut per row at the context: a long prompt does not shorten a short one's answer."""
    prompts = [runtime_model.encode("Hello world! " * 30)[:120], runtime_model.encode("Hi")]
    batch = runtime_model.generate_batch(prompts, temperature=0.0, stop_token_ids=())
    single = [runtime_model.generate(p, temperature=0.0, stop_token_ids=()) for p in prompts]
    assert [(b.token_ids, b.finish_reason) for b in batch] == [(s.token_ids, s.finish_reason) for s in single]
    assert [len(b.token_ids) for b in batch] == [8, 128 - len(prompts[1])]


# -- cancellation ------------------------------------------------------------------------------------------------------
def test_closing_a_stream_cancels_and_returns_the_buffer(runtime_model: Model) -> None:
    engine = runtime_model.engine
    engine.clear_pool()
    stream = runtime_model.stream("Hello", temperature=1.0, seed=1, max_new_tokens=100, stop_token_ids=())
    cache_count = lambda: sum(len(v) for v in engine._pool.values())  # noqa: E731
    got = [next(stream) for _ in range(3)]
    assert cache_count() == 0  # in use
    stream.close()
    assert cache_count() == 1  # back in the pool
    assert stream.result.finish_reason == "cancelled"
    assert stream.result.text == "".join(got) and 3 <= len(stream.result.token_ids) < 100


def test_cancel_token(runtime_model: Model) -> None:
    token = CancelToken()
    seen = []
    stream = runtime_model.stream("Hello", temperature=1.0, seed=2, max_new_tokens=100, stop_token_ids=(), cancel=token)
    for piece in stream:
        seen.append(piece)
        if len(seen) == 5:
            token.cancel()
    assert stream.result.finish_reason == "cancelled"
    assert len(stream.result.token_ids) < 100
    early = runtime_model.generate("Hello", cancel=token)  # already cancelled: nothing generated
    assert early.finish_reason == "cancelled" and early.token_ids == []


# -- scoring -----------------------------------------------------------------------------------------------------------
def test_next_tokens_match_pytorch(runtime_model: Model, runtime_gpt) -> None:
    prompt = "def add(a, b):"
    rows = runtime_model.next_tokens(prompt, 5)
    with torch.no_grad():
        logits, _, _ = runtime_gpt(torch.tensor([runtime_model.encode(prompt)]))
    probs = torch.softmax(logits[0, -1].double(), -1)
    top = torch.topk(probs, 5)
    assert [r[1] for r in rows] == top.indices.tolist()
    np.testing.assert_allclose([r[2] for r in rows], top.values.numpy(), rtol=1e-4)
    assert rows[0][0] == runtime_model.decode([rows[0][1]], skip_special_tokens=False)
    assert rows[0][1] == runtime_model.generate(prompt, temperature=0.0, max_new_tokens=1,
                                                stop_token_ids=()).token_ids[0]


def test_perplexity_matches_pytorch_and_slides(runtime_model: Model, runtime_gpt) -> None:
    text = "Hello world! The quick brown fox jumps over the lazy dog."
    ids = runtime_model.encode(text)
    with torch.no_grad():
        logits, loss, _ = runtime_gpt(torch.tensor([ids[:-1]]), targets=torch.tensor([ids[1:]]))
    assert runtime_model.perplexity(text) == pytest.approx(math.exp(loss.item()), rel=1e-4)
    long = ("def add(a, b):\n    return a + b\n" * 40)
    ids = runtime_model.encode(long)
    assert len(ids) > 2 * runtime_model.context_length
    window = runtime_model.context_length
    # PyTorch oracle for the documented sliding window: `window` tokens of context, advancing by window // 2,
    # every token after the first scored once, in the first window that holds it (with the most context).
    nll, first, end = [], 1, min(window + 1, len(ids))
    while True:
        begin = max(0, end - 1 - window)
        with torch.no_grad():
            x = torch.tensor([ids[begin:end - 1]])
            logits, _, _ = runtime_gpt(x, targets=torch.tensor([ids[begin + 1:end]]))
            logp = torch.log_softmax(logits[0].double(), dim=-1)
        nll += [-logp[t - 1 - begin, ids[t]].item() for t in range(first, end)]
        if end == len(ids):
            break
        first, end = end, min(end + window // 2, len(ids))
    assert len(nll) == len(ids) - 1
    assert runtime_model.perplexity(long) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)


# -- the optimized-graph cache -----------------------------------------------------------------------------------------
def test_graph_cache_hit_gives_identical_logits(runtime_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GPTEDGE_CACHE", str(tmp_path / "cache"))
    first = Model.load(runtime_bundle, provider="cpu", threads=1)
    second = Model.load(runtime_bundle, provider="cpu", threads=1)
    assert (first.session_info.cache, second.session_info.cache) == ("miss", "hit")
    cached_files = sorted(p.name for p in (tmp_path / "cache" / "graphs").glob("*/*"))
    assert cached_files == ["model.onnx", "model.onnx.data"]
    prompt = runtime_model_prompt = "The quick brown fox"
    assert first.next_tokens(prompt, 8) == second.next_tokens(runtime_model_prompt, 8)
    kw = dict(temperature=0.0, max_new_tokens=30, stop_token_ids=())
    assert first.generate(prompt, **kw).token_ids == second.generate(prompt, **kw).token_ids
    off = Model.load(runtime_bundle, provider="cpu", threads=1, cache=False)
    assert off.session_info.cache == "off"


def test_unwritable_cache_still_loads(runtime_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("GPTEDGE_CACHE", str(blocker))
    model = Model.load(runtime_bundle, provider="cpu", threads=1)
    assert model.session_info.cache.startswith("failed")
    assert len(model.generate("Hello", temperature=0.0, max_new_tokens=3, stop_token_ids=()).token_ids) == 3


def test_corrupt_cache_entry_is_rebuilt(runtime_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GPTEDGE_CACHE", str(tmp_path))
    Model.load(runtime_bundle, provider="cpu", threads=1)
    [entry] = (tmp_path / "graphs").iterdir()
    (entry / "model.onnx").write_bytes(b"\x08garbage")
    model = Model.load(runtime_bundle, provider="cpu", threads=1)
    assert model.session_info.cache == "miss"
    assert Model.load(runtime_bundle, provider="cpu", threads=1).session_info.cache == "hit"


def test_cache_is_bounded_least_recently_used_first_and_can_be_off(runtime_bundle: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    import os

    from gptedge.runtime.providers import prune_cache

    graphs = tmp_path / "graphs"
    for i, name in enumerate(["old", "used-recently", "newer"]):
        (graphs / name).mkdir(parents=True)
        (graphs / name / "model.onnx").write_bytes(b"x" * 1000)
        os.utime(graphs / name, (1000 + i, 1000 + i))
    os.utime(graphs / "used-recently", (5000, 5000))  # a hit touches its entry
    (graphs / ".tmp-being-written").mkdir()
    assert prune_cache(graphs, 2500, keep=graphs / "old") == [graphs / "newer"]  # the kept entry survives
    assert prune_cache(graphs, 1000) == [graphs / "old"]
    assert sorted(p.name for p in graphs.iterdir()) == [".tmp-being-written", "used-recently"]
    monkeypatch.setenv("GPTEDGE_CACHE", str(tmp_path / "real"))
    monkeypatch.setenv("GPTEDGE_CACHE_MAX_MB", "0")
    assert Model.load(runtime_bundle, provider="cpu", threads=1).session_info.cache == "off"
    assert not (tmp_path / "real" / "graphs").exists()
    monkeypatch.setenv("GPTEDGE_CACHE_MAX_MB", "0.0001")  # smaller than any graph: written, then pruned
    assert Model.load(runtime_bundle, provider="cpu", threads=1).session_info.cache == "miss"
    # the new one stays
    assert [p for p in (tmp_path / "real" / "graphs").iterdir() if not p.name.startswith(".")] != []


# -- bad input ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompt, kwargs, match",
    [
        ("", {}, "prompt is empty"),
        ([], {}, "prompt is empty"),
        ([1, 99999], {}, "outside this model's vocabulary"),
        (["a"], {}, "token ids"),
        ("Hi", {"temperature": -1.0}, "temperature"),
        ("Hi", {"top_p": 0.0}, "top_p"),
        ("Hi", {"top_p": 1.5}, "top_p"),
        ("Hi", {"top_k": -1}, "top_k"),
        ("Hi", {"max_new_tokens": 0}, "max_new_tokens"),
        ("Hi", {"stop_strings": [""]}, "non-empty"),
        ("Hi", {"temprature": 0.5}, "unknown sampling option"),
        ("Hi", {"truncate": "right"}, "truncate"),
        ("Hi", {"max_new_tokens": 500}, "context"),
    ],
)
def test_bad_generation_arguments(runtime_model: Model, prompt, kwargs, match) -> None:
    with pytest.raises(UsageError, match=match):
        runtime_model.generate(prompt, **kwargs)


def test_bad_load_arguments(runtime_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown provider"):
        Model.load(runtime_bundle, provider="tpu")
    with pytest.raises(UsageError, match="threads"):
        Model.load(runtime_bundle, threads=0)
    with pytest.raises(BundleError, match="not a bundle folder"):
        Model.load(tmp_path / "missing")
    with pytest.raises(BundleError, match="no gptedge.json"):
        Model.load(tmp_path)


@pytest.fixture
def bundle_copy(runtime_bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(runtime_bundle, dest)
    return dest


def test_tampered_checksum_is_refused(bundle_copy: Path) -> None:
    data = bundle_copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="does not match its sha256"):
        Model.load(bundle_copy)


def test_tampering_after_a_verified_load_is_caught(bundle_copy: Path) -> None:
    """The verified-checksum record skips re-hashing only while every file's stat is unchanged."""
    Model.load(bundle_copy)
    Model.load(bundle_copy)  # served by the record
    data = bundle_copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[7] ^= 0x01
    data.write_bytes(bytes(raw))  # same size, same inode
    with pytest.raises(BundleError, match="does not match its sha256"):
        Model.load(bundle_copy)


def test_corrupted_model_is_refused_even_without_verification(bundle_copy: Path) -> None:
    model = bundle_copy / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(BundleError):
        Model.load(bundle_copy, verify=False)


def test_unknown_format_version_is_refused(bundle_copy: Path) -> None:
    spec_path = bundle_copy / "gptedge.json"
    spec = json.loads(spec_path.read_text())
    spec["format_version"] = 99
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(BundleError, match="format version 99"):
        Model.load(bundle_copy)


def test_errors_share_one_base(runtime_model: Model) -> None:
    with pytest.raises(GptEdgeError):
        runtime_model.next_tokens("Hi", 0)


def test_on_token_sees_every_sampled_id_in_order(runtime_model):
    seen: list[int] = []
    result = runtime_model.generate("def f(x):", max_new_tokens=10, temperature=0.0, stop_token_ids=(),
                                    on_token=seen.append)
    assert seen == result.token_ids and len(seen) == 10


@pytest.mark.parametrize("chunk", [1, 7, 16, 33, 1000])
def test_chunked_prefill_gives_the_logits_of_one_run(runtime_model, chunk):
    from gptedge.runtime.generator import prefill

    engine = runtime_model.engine
    ids = runtime_model.encode("def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 2)[:60]
    whole, parts = engine.new_cache(1, 64), engine.new_cache(1, 64)
    expected = engine.forward(whole, np.asarray(ids)[None, :])[0, -1].copy()
    got = prefill(engine, parts, ids, chunk=chunk)
    assert int(parts.lengths[0]) == len(ids)
    np.testing.assert_allclose(got, expected, atol=1e-5)
