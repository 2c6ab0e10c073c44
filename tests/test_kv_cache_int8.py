"""`quantize --kv-cache int8`: the KV cache stored as int8 with calibrated per-channel scales.

The same recipe is built with and without the int8 cache (identical weights), so what differs is the cache
alone: its graph, its record, its memory, and logits that stay close to the fp32 cache's at every decode
position, for GPT-2 (learned positions) and Llama (rotary keys, grouped heads). The rotary scale is checked
where it matters: keys calibrated at positions 0..15 must still fit their scale when they sit at position 40+.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import stdlib_text
from gptedge.errors import QuantizeError
from gptedge.export.exporter import export_bundle
from gptedge.quantize import quantize_bundle
from gptedge.quantize.kvcache import QMAX, _pair_norm, calibrate
from gptedge.runtime import Model
from gptedge.runtime.batcher import Batcher
from gptedge.runtime.bundle import read_spec
from gptedge.runtime.decoding import Decoding
from gptedge.runtime.generator import decode_step, prefill
from gptedge.runtime.providers import incompatibility

PROMPTS = ["def add(a, b):\n    return", "hello", "for i in range(10):"]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return stdlib_text(tmp_path_factory.mktemp("text"), 8000)


@pytest.fixture(scope="module")
def bundles(runtime_checkpoint, text, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """family -> {"fp32", "w8" (int8-weight), "kv8" (int8-weight + int8 KV cache)}."""
    from test_families import save_family

    root = tmp_path_factory.mktemp("kv8")
    sources = {"gpt2": runtime_checkpoint, "llama": save_family(root / "llama-hf", "llama")}
    out = {}
    for family, source in sources.items():
        fp32 = export_bundle(source, root / f"{family}-fp32", progress=False)
        out[family] = {"fp32": fp32}
        for label, kv in (("w8", None), ("kv8", "int8")):
            out[family][label] = quantize_bundle(fp32, root / f"{family}-{label}", method="int8-weight",
                                                 eval_text=text, max_ppl_increase=50.0, quantize_lm_head=False,
                                                 kv_cache=kv, progress=False, log=lambda _: None)
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_int8_cache_graph_and_record(bundles, family: str) -> None:
    folder = bundles[family]["kv8"]
    spec = read_spec(folder)
    assert spec.kv_cache.dtype == "int8" and spec.kv_cache.update == "inplace"
    record = spec.kv_cache.quantization
    assert record["granularity"] == "per_channel" and record["calibration"]["windows"] > 0
    assert len(record["max_abs"]["keys"]) == len(record["max_abs"]["values"]) == spec.architecture.n_layer
    assert "kv_cache" not in spec.quantization and spec.quantization["quality"]["passed"]
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    pasts = set(spec.io.past_names(spec.architecture.n_layer))
    assert {i.type.tensor_type.elem_type for i in model.graph.input if i.name in pasts} == {onnx.TensorProto.INT8}
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == spec.architecture.n_layer
    channels = spec.architecture.n_kv_head * spec.architecture.head_dim
    inits = {i.name: i for i in model.graph.initializer}
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["k_quant_type"] == attrs["v_quant_type"] == b"PER_CHANNEL" and attrs["kv_cache_bit_width"] == 8
        scales = [onnx.numpy_helper.to_array(inits[name]) for name in node.input[12:14]]
        assert all(s.shape == (channels,) and (s > 0).all() for s in scales)
    # The weights are the int8-weight bundle's, stored once: only the graph differs.
    w8 = bundles[family]["w8"]
    assert (folder / "model.onnx.data").read_bytes() == (w8 / "model.onnx.data").read_bytes()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_int8_cache_logits_follow_the_fp32_cache(bundles, family: str) -> None:
    """Teacher-forced decode over the whole context: each step's logits beside the same weights' fp32-cache logits.

    (On these random-init models with large weights the typical difference is 2-4% of the logit range, from int8
    rounding; a wrong scale layout or a saturating scale gives tens of percent.)"""
    w8 = Model.load(bundles[family]["w8"], provider="cpu", threads=1)
    kv8 = Model.load(bundles[family]["kv8"], provider="cpu", threads=1)
    assert kv8.engine.bytes_per_position * 4 == w8.engine.bytes_per_position
    context = w8.context_length
    unseen = w8.encode((Path(sysconfig.get_paths()["stdlib"]) / "string.py").read_text(encoding="utf-8"))
    for start, prompt in enumerate(PROMPTS):
        ids = w8.encode(prompt)
        follow = unseen[300 * start:][:context - len(ids)]  # text neither calibration nor the gate saw
        caches = [m.engine.new_cache(1, context) for m in (w8, kv8)]
        rows = [prefill(m.engine, c, ids).copy() for m, c in zip((w8, kv8), caches)]
        worst, agree = 0.0, 0
        for token in follow[:-1]:
            scale = float(np.abs(rows[0]).max())
            worst = max(worst, float(np.abs(rows[0] - rows[1]).max()) / scale)
            agree += int(rows[0].argmax() == rows[1].argmax())
            rows = [decode_step(m.engine, c, token).copy() for m, c in zip((w8, kv8), caches)]
        assert worst < 0.1, f"{prompt!r}: int8 cache logits differ by {worst:.3f} of the logit range"
        assert agree >= 0.9 * (len(follow) - 1)


def test_rotary_key_scales_hold_at_later_positions(bundles) -> None:
    """Layer-0 keys depend on the token alone before the rotation, so the same tokens later in the context are the
    calibrated keys rotated further: the pair-norm scale covers them; a channel's own maximum would not."""
    model = Model.load(bundles["llama"]["fp32"], provider="cpu", threads=1)
    engine = model.engine
    a = engine.arch
    window = np.arange(3, 19)  # 16 tokens at positions 0..15
    half = a.head_dim // 2
    scales = calibrate(engine, [window], [half] * a.n_layer)
    naive = calibrate(engine, [window], [0] * a.n_layer)  # per-channel maxima, as if keys were not rotated
    late = np.concatenate([np.full(40, 2), window])
    cache = engine.new_cache(1, len(late))
    engine.forward(cache, late[None, :])
    keys = cache.values[0].numpy()[0, :, 40:len(late), :].transpose(1, 0, 2).reshape(len(window), -1)
    assert (np.abs(keys) / scales.keys[0] <= QMAX * (1 + 1e-4)).all()
    assert (np.abs(keys) / naive.keys[0] > QMAX * 1.05).any()  # the test would catch a scale that ignores rotation


def test_pair_norm_is_rotation_invariant() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 8))
    theta = rng.uniform(0, 2 * np.pi, 2)
    rotated = x.copy()
    for i in range(2):  # rotate-half pairs (i, i + 2) of the first 4 channels; channels 4..7 are not rotary
        c, s = np.cos(theta[i]), np.sin(theta[i])
        rotated[..., i], rotated[..., i + 2] = c * x[..., i] - s * x[..., i + 2], s * x[..., i] + c * x[..., i + 2]
    np.testing.assert_allclose(_pair_norm(rotated, 2)[..., :4], _pair_norm(x, 2)[..., :4])
    np.testing.assert_array_equal(_pair_norm(x, 2)[..., 4:], np.abs(x[..., 4:]))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_int8_cache_batch_and_batcher_match_solo_runs(bundles, family: str) -> None:
    model = Model.load(bundles[family]["kv8"], provider="cpu", threads=1)
    kws = [dict(temperature=0.8, seed=i, max_new_tokens=12, stop_token_ids=()) for i in range(len(PROMPTS))]
    solo = [model.generate(p, **kw) for p, kw in zip(PROMPTS, kws)]
    assert [r.token_ids for r in model.generate_batch(PROMPTS, temperature=0.8, seed=0, max_new_tokens=12,
                                                      stop_token_ids=())][0] == solo[0].token_ids
    batcher = Batcher(model.engine, rows=3)
    results = [None] * len(PROMPTS)
    try:
        events = []
        for i, (p, kw) in enumerate(zip(PROMPTS, kws)):
            done = threading.Event()
            seq = Decoding(model.tokenizer, model.prompt_ids(p), model.sampling_params(**kw))
            batcher.submit(seq, lambda step: None,
                           lambda result, error, i=i, done=done: (results.__setitem__(i, result), done.set()))
            events.append(done)
        assert all(e.wait(30) for e in events)
    finally:
        batcher.close()
    assert [r.token_ids for r in results] == [r.token_ids for r in solo]


def test_kv_cache_choices_are_checked_before_any_work(bundles, runtime_checkpoint, text, tmp_path) -> None:
    fp32 = bundles["gpt2"]["fp32"]
    with pytest.raises(QuantizeError, match="not one of"):
        quantize_bundle(fp32, tmp_path / "a", eval_text=text, kv_cache="int4", progress=False, log=lambda _: None)
    concat = export_bundle(runtime_checkpoint, tmp_path / "concat", kv="concat", progress=False)
    with pytest.raises(QuantizeError, match="--kv concat"):
        quantize_bundle(concat, tmp_path / "b", eval_text=text, kv_cache="int8", progress=False, log=lambda _: None)
    fp16 = export_bundle(runtime_checkpoint, tmp_path / "fp16", dtype="fp16", progress=False)
    with pytest.raises(QuantizeError, match="verified for fp32 bundles"):
        quantize_bundle(fp16, tmp_path / "c", method="int8-weight", eval_text=text, kv_cache="int8", progress=False,
                        log=lambda _: None)
    assert not any(p.name in "abc" for p in tmp_path.iterdir())
    # The CLI offers the one choice there is; argparse refuses others with its usage line, exit status 2.
    proc = subprocess.run([sys.executable, "-m", "gptedge", "quantize", str(fp32), str(tmp_path / "d"),
                           "--eval-text", str(text), "--kv-cache", "fp8"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'fp8'" in proc.stderr and "Traceback" not in proc.stderr


def test_int8_cache_runs_only_where_verified(bundles) -> None:
    spec = read_spec(bundles["gpt2"]["kv8"])
    assert incompatibility("cpu", spec) is None
    for provider in ("cuda", "dml"):
        why = incompatibility(provider, replace(spec, target=provider))
        assert why and "verified on cpu only" in why and "without --kv-cache" in why


def test_info_shows_the_int8_cache(bundles) -> None:
    proc = subprocess.run([sys.executable, "-m", "gptedge", "info", str(bundles["llama"]["kv8"])],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("kv cache"))
    assert "int8" in line and "per-channel scales" in line
    assert json.loads((bundles["llama"]["kv8"] / "gptedge.json").read_text())["kv_cache"]["dtype"] == "int8"


def test_a_reused_prompt_prefix_gives_the_cold_tokens_with_an_int8_cache(bundles) -> None:
    """Stored keys and values are the int8 cache's own bytes: a warm generation is the cold one."""
    model = Model.load(bundles["llama"]["kv8"], provider="cpu", threads=1)
    prompt = list(range(5, 45))
    cold = model.generate(prompt + [50, 51, 52], max_new_tokens=16, temperature=0, cache_prompt=False).token_ids
    model.generate(prompt + [60, 61], max_new_tokens=4, temperature=0)  # stores the shared prefix
    warm = model.generate(prompt + [50, 51, 52], max_new_tokens=16, temperature=0)
    assert model.prefix_store.hits == 1 and model.prefix_store.reused_tokens == len(prompt)
    assert warm.token_ids == cold
