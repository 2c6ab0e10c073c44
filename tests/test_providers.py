"""Provider choice, session options, and the CUDA / DirectML paths (skipped where onnxruntime lacks them)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from gptedge.errors import UsageError
from gptedge.runtime.bundle import Architecture, BundleSpec, KVCacheSpec
from gptedge.runtime.providers import BRIEF_SPIN_US, choose_provider, physical_cores, session_options

CPU, CUDA, DML = "CPUExecutionProvider", "CUDAExecutionProvider", "DmlExecutionProvider"
HAS_CUDA = CUDA in ort.get_available_providers()
HAS_DML = DML in ort.get_available_providers()


def spec(dtype: str = "fp32", target: str = "cpu", kv: str = "inplace", quantization=None) -> BundleSpec:
    arch = Architecture("gpt2", 2, 4, 4, 16, 64, 320, 128)
    return BundleSpec(architecture=arch, dtype=dtype, target=target, kv_cache=KVCacheSpec(update=kv, dtype=dtype),
                      quantization=quantization)


def choose(requested, s, available):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice = choose_provider(requested, s, available)
    return choice, [str(w.message) for w in caught]


def test_auto_prefers_cuda_then_dml_then_cpu() -> None:
    fp16 = spec("fp16", "cuda")
    assert choose("auto", fp16, [CUDA, DML, CPU]) == (choose_provider("cuda", fp16, [CUDA, CPU]), [])
    assert choose("auto", fp16, [CUDA, DML, CPU])[0].name == "cuda"
    assert choose("auto", fp16, [DML, CPU])[0].name == "dml"
    assert choose("auto", spec(), [CPU])[0].name == "cpu"


def test_auto_skips_cuda_for_an_fp32_gqa_bundle_silently() -> None:
    choice, warned = choose("auto", spec("fp32"), [CUDA, CPU])
    assert choice.name == "cpu" and warned == []
    assert choose("auto", spec("fp32"), [CUDA, DML, CPU])[0].name == "dml"  # DML runs fp32 GQA
    assert choose("auto", spec("fp32", kv="concat"), [CUDA, CPU])[0].name == "cuda"  # standard ops run anywhere


def test_auto_warns_when_the_bundles_own_target_is_missing() -> None:
    choice, warned = choose("auto", spec("fp16", "cuda"), [CPU])
    assert choice.name == "cpu"
    assert len(warned) == 1 and "built for cuda" in warned[0] and "onnxruntime-gpu" in warned[0]


def test_unavailable_provider_falls_back_with_the_reason() -> None:
    choice, warned = choose("cuda", spec("fp16", "cuda"), [CPU])
    assert choice.name == "cpu" and "not available" in warned[0] and "onnxruntime-gpu" in warned[0]
    choice, warned = choose("dml", spec(), [CPU])
    assert choice.name == "cpu" and "onnxruntime-directml" in warned[0]


def test_fp32_gqa_bundle_on_cuda_falls_back_to_cpu() -> None:
    choice, warned = choose("cuda", spec("fp32"), [CUDA, CPU])
    assert choice.name == "cpu" and "fp16 only" in warned[0] and "--target cuda" in warned[0]
    for quantization in ({"method": "int8-dynamic", "kind": "dynamic"}, {"method": "int8-dynamic"}):  # recorded, legacy
        choice, warned = choose("cuda", spec("fp32", quantization=quantization, kv="concat"), [CUDA, CPU])
        assert choice.name == "cpu" and "DynamicQuantizeMatMul" in warned[0]
    choice, _ = choose("cuda", spec("fp32", quantization={"method": "int8-weight", "kind": "weight"}, kv="concat"),
                       [CUDA, CPU])
    assert choice.name == "cuda"


def test_explicit_choices() -> None:
    cuda, warned = choose("cuda", spec("fp16", "cuda"), [CUDA, CPU])
    assert (cuda.name, cuda.device, cuda.serialize_runs, warned) == ("cuda", "cuda", False, [])
    assert cuda.ort_providers == [CUDA, CPU]
    dml, _ = choose("dml", spec("fp16", "dml"), [DML, CPU])
    assert (dml.name, dml.serialize_runs) == ("dml", True)
    cpu, warned = choose("cpu", spec("fp16", "cuda"), [CUDA, CPU])
    assert cpu.name == "cpu" and "slower" in warned[0]
    with pytest.raises(UsageError, match="unknown provider 'gpu'"):
        choose_provider("gpu", spec(), [CPU])


def test_session_options() -> None:
    cpu = choose_provider("cpu", spec(), [CPU])
    so = session_options(cpu, threads=3)
    assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 1
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.enable_mem_pattern
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"  # the brief spin
    assert so.get_session_config_entry("session.intra_op.spin_duration_us") == str(BRIEF_SPIN_US)
    unbounded = session_options(cpu, 2, spin=True)
    assert unbounded.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    with pytest.raises(RuntimeError, match="spin_duration_us"):  # onnxruntime's own: until the next step
        unbounded.get_session_config_entry("session.intra_op.spin_duration_us")
    assert session_options(cpu, 2, spin=False).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(cpu, None).intra_op_num_threads == (physical_cores() or 0)
    dml = choose_provider("dml", spec(), [DML, CPU])
    assert not session_options(dml, None).enable_mem_pattern
    with pytest.raises(UsageError, match="threads"):
        session_options(cpu, threads=-2)


def test_physical_cores_is_plausible() -> None:
    import os

    cores = physical_cores()
    assert cores is None or 1 <= cores <= (os.cpu_count() or 1)


def test_missing_provider_at_load_falls_back_to_cpu(runtime_bundle: Path) -> None:
    if HAS_CUDA:
        pytest.skip("this machine has CUDA; the fallback is covered by the unit tests")
    from gptedge.runtime import Model

    with pytest.warns(RuntimeWarning, match="not available"):
        model = Model.load(runtime_bundle, provider="cuda")
    assert model.provider == "cpu"
    assert len(model.generate("Hi", temperature=0.0, max_new_tokens=3, stop_token_ids=()).token_ids) == 3


# -- CUDA --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cuda_bundle(runtime_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAS_CUDA:
        pytest.skip("onnxruntime has no CUDAExecutionProvider here")
    from gptedge.export.exporter import export_bundle

    return export_bundle(runtime_checkpoint, tmp_path_factory.mktemp("cuda") / "bundle", target="cuda", progress=False)


@pytest.fixture(scope="module")
def cuda_model(cuda_bundle: Path):
    from gptedge.runtime import Model

    model = Model.load(cuda_bundle, provider="cuda")
    if model.provider != "cuda":
        pytest.fail("CUDAExecutionProvider is listed but the session fell back to CPU: "
                    f"{model.session_info.choice.reason}")
    return model


@pytest.mark.cuda
def test_cuda_keeps_kv_on_the_device(cuda_model) -> None:
    engine = cuda_model.engine
    assert engine.device == "cuda" and cuda_model.spec.dtype == "fp16"
    cache = engine.new_cache(1, 64)
    try:
        assert all(v.device_name().lower() == "cuda" for v in cache.values)
        logits = engine.forward(cache, np.array([[1, 2, 3]], np.int64))
        assert logits.shape == (1, 1, cuda_model.spec.architecture.vocab_size) and np.isfinite(logits).all()
    finally:
        engine.release(cache)


@pytest.mark.cuda
def test_cuda_matches_the_cpu_fp32_bundle(cuda_model, runtime_model) -> None:
    for prompt in ("def add(a, b):", "你好，世界。"):
        gpu = {t: p for _, t, p in cuda_model.next_tokens(prompt, 20)}
        cpu = {t: p for _, t, p in runtime_model.next_tokens(prompt, 20)}
        common = set(gpu) & set(cpu)
        assert len(common) >= 15
        assert max(abs(gpu[t] - cpu[t]) for t in common) < 5e-3
    kw = dict(temperature=0.0, max_new_tokens=20, stop_token_ids=())
    gpu_tokens = cuda_model.generate("def add(a, b):", **kw).token_ids
    cpu_tokens = runtime_model.generate("def add(a, b):", **kw).token_ids
    assert gpu_tokens[:5] == cpu_tokens[:5]  # fp16 may flip a near-tie later on


@pytest.mark.cuda
def test_cuda_batch_and_threads_equal_single_runs(cuda_model) -> None:
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["def add(a, b):", "x", "你好，世界。😀", "The quick brown fox"]
    kw = dict(temperature=0.0, max_new_tokens=16, stop_token_ids=())
    single = [cuda_model.generate(p, **kw).token_ids for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda p: cuda_model.generate(p, **kw).token_ids, prompts))
    assert threaded == single
    batch = [r.token_ids for r in cuda_model.generate_batch(prompts, **kw)]
    agree = np.mean([a == b for a, b in zip(batch, single)])
    assert agree >= 0.75, (batch, single)  # fp16 GEMMs of another batch shape may flip a near-tie


@pytest.mark.cuda
def test_cuda_fp32_bundle_falls_back_to_cpu(runtime_bundle: Path) -> None:
    if not HAS_CUDA:
        pytest.skip("onnxruntime has no CUDAExecutionProvider here")
    from gptedge.runtime import Model

    with pytest.warns(RuntimeWarning, match="fp16 only"):
        model = Model.load(runtime_bundle, provider="cuda")
    assert model.provider == "cpu"


# -- DirectML ----------------------------------------------------------------------------------------------------------
@pytest.mark.dml
def test_dml_runs_serialized_and_matches_cpu(runtime_bundle: Path, runtime_model) -> None:
    if not HAS_DML:
        pytest.skip("onnxruntime has no DmlExecutionProvider here")
    from gptedge.runtime import Model

    model = Model.load(runtime_bundle, provider="dml")
    assert model.provider == "dml" and model.engine._run_lock is not None
    assert not model.engine.session.get_session_options().enable_mem_pattern
    kw = dict(temperature=0.0, max_new_tokens=12, stop_token_ids=())
    assert (model.generate("def add(a, b):", **kw).token_ids[:5]
            == runtime_model.generate("def add(a, b):", **kw).token_ids[:5])


def test_spin_policy_through_the_argument_the_environment_and_the_cli(runtime_bundle, monkeypatch) -> None:
    """A brief spin unless asked otherwise: Model.load(spin=True/False), $GPTEDGE_SPIN=1/0, --spin/--no-spin."""
    from gptedge.runtime import Model
    from gptedge.runtime.cli import add_arguments

    def spinning(model) -> tuple[str, str]:
        options = model.engine.session.get_session_options()
        try:
            duration = options.get_session_config_entry("session.intra_op.spin_duration_us")
        except RuntimeError:  # not set: onnxruntime spins (when allowed) until the next step
            duration = "-"
        return options.get_session_config_entry("session.intra_op.allow_spinning"), duration

    brief = ("1", str(BRIEF_SPIN_US))
    monkeypatch.delenv("GPTEDGE_SPIN", raising=False)
    assert spinning(Model.load(runtime_bundle, provider="cpu", threads=1)) == brief
    assert spinning(Model.load(runtime_bundle, provider="cpu", threads=1, spin=True)) == ("1", "-")
    assert spinning(Model.load(runtime_bundle, provider="cpu", threads=1, spin=False)) == ("0", "-")
    monkeypatch.setenv("GPTEDGE_SPIN", "1")
    assert spinning(Model.load(runtime_bundle, provider="cpu", threads=1)) == ("1", "-")
    assert spinning(Model.load(runtime_bundle, provider="cpu", threads=1, spin=False)) == ("0", "-")
    monkeypatch.setenv("GPTEDGE_SPIN", "0")
    assert spinning(Model.load(runtime_bundle, provider="cpu", threads=1)) == ("0", "-")
    monkeypatch.setenv("GPTEDGE_SPIN", "")
    assert spinning(Model.load(runtime_bundle, provider="cpu", threads=1)) == brief
    with pytest.raises(UsageError, match="spin must be True, False or None"):
        Model.load(runtime_bundle, spin="yes")
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser, "generate")
    assert parser.parse_args([str(runtime_bundle), "hi", "--spin"]).spin is True
    assert parser.parse_args([str(runtime_bundle), "hi", "--no-spin"]).spin is False
    assert parser.parse_args([str(runtime_bundle), "hi"]).spin is None


def test_small_models_default_to_one_thread(runtime_bundle, tmp_path) -> None:
    """A tiny model's step is per-operator overhead: one intra-op thread unless the caller asks for more."""
    from gptedge.runtime import Model
    from gptedge.runtime.providers import SINGLE_THREAD_MAX_BYTES, default_threads, physical_cores

    def threads(model) -> int:
        return model.engine.session.get_session_options().intra_op_num_threads

    assert default_threads(runtime_bundle / "model.onnx") == 1
    assert threads(Model.load(runtime_bundle, provider="cpu")) == 1
    assert threads(Model.load(runtime_bundle, provider="cpu", threads=2)) == 2
    big = tmp_path / "model.onnx"
    big.write_bytes(b"x")
    with open(tmp_path / "model.onnx.data", "wb") as f:  # sparse: the size counts, not the disk
        f.truncate(SINGLE_THREAD_MAX_BYTES)
    assert default_threads(big) == physical_cores()
