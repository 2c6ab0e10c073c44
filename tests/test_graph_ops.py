"""DirectML bundles use only operators ONNX Runtime's DirectML execution provider implements (opset <= 18).

The allow-list below is taken from onnxruntime's DirectML kernel registration table
(onnxruntime/core/providers/dml/DmlExecutionProvider/src/Operators/OperatorRegistration.cpp):
ai.onnx ops registered at a version <= 18 (plus SimplifiedLayerNormalization, which onnxruntime
registers in the ai.onnx domain), and the com.microsoft ops GroupQueryAttention (fp16/fp32,
registered with past -> present aliasing, i.e. the in-place KV buffer), SkipLayerNormalization and
SkipSimplifiedLayerNormalization (DmlOperatorSkipLayerNormalization<simplified>). DirectML has no kernel
for ai.onnx Attention (opset 23) or ai.onnx Gelu (opset 20), so they are absent on purpose.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from gptedge.export.exporter import export_bundle
from gptedge.runtime.bundle import read_spec

DML_ONNX_OPS = {
    "Abs", "Add", "And", "ArgMax", "Cast", "Concat", "ConstantOfShape", "Cos", "CumSum", "Div", "Equal", "Erf", "Exp",
    "Expand", "Gather", "GatherElements", "GatherND", "Gemm", "Greater", "GreaterOrEqual", "Identity",
    "LayerNormalization", "Less", "LessOrEqual", "Log", "MatMul", "Max", "Min", "Mul", "Neg", "Not", "Or", "Pow",
    "Range", "Reciprocal", "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape", "ScatterElements", "ScatterND",
    "Shape", "Sigmoid", "Sin", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "Transpose",
    "Trilu", "Unsqueeze", "Where", "SimplifiedLayerNormalization",
}
DML_MS_OPS = {"GroupQueryAttention", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}
NOT_ON_DML = {"Attention", "Gelu"}  # ai.onnx ops without a DirectML kernel


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    import torch

    from gptedge.train.checkpoint import save_checkpoint
    from gptedge.train.model import GPT, GPTConfig
    from gptedge.train.presets import llama_style
    from gptedge.train.tokenizer import train_tokenizer

    tok = train_tokenizer(["def f(x):\n    return x * 2\n"] * 20, 280)
    torch.manual_seed(0)
    # gpt2: exact GELU, the Erf path, which must not become ai.onnx Gelu; llama: RMSNorm, SwiGLU, RoPE, 1 KV head
    # (fp16 GroupQueryAttention with rotary wants head_dim a multiple of 16)
    extra = dict(gelu_approximate="none") if request.param == "gpt2" else llama_style(32, 1)
    model = GPT(GPTConfig(block_size=48, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_embd=32, **extra))
    return request.param, save_checkpoint(tmp_path_factory.mktemp("dml") / "ckpt", model, {}, tok.to_str(), None)


@pytest.fixture(scope="module", params=["inplace", "concat"])
def dml_bundle(request, checkpoint, tmp_path_factory) -> tuple[str, str, Path]:
    kv = request.param
    family, path = checkpoint
    return family, kv, export_bundle(path, tmp_path_factory.mktemp("dml") / kv, target="dml", kv=kv, progress=False)


def test_dml_bundle_uses_only_directml_ops(dml_bundle) -> None:
    family, kv, bundle = dml_bundle
    model = onnx.load(bundle / "model.onnx", load_external_data=False)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    assert opsets["ai.onnx"] <= 18
    ops = {(n.domain or "ai.onnx", n.op_type) for n in model.graph.node}
    onnx_ops = {op for domain, op in ops if domain == "ai.onnx"}
    ms_ops = {op for domain, op in ops if domain == "com.microsoft"}
    assert {domain for domain, _ in ops} <= {"ai.onnx", "com.microsoft"}
    assert onnx_ops <= DML_ONNX_OPS, f"ops DirectML cannot run: {sorted(onnx_ops - DML_ONNX_OPS)}"
    assert ms_ops <= DML_MS_OPS, f"contrib ops DirectML cannot run: {sorted(ms_ops - DML_MS_OPS)}"
    assert not onnx_ops & NOT_ON_DML
    if family == "gpt2":
        assert "Erf" in onnx_ops  # the exact GELU was decomposed, not emitted as Gelu
    skip = "SkipLayerNormalization" if family == "gpt2" else "SkipSimplifiedLayerNormalization"
    if kv == "inplace":
        assert ms_ops == {"GroupQueryAttention", skip}  # the residual adds fused into the norms
    else:  # portable: standard ops only
        assert ms_ops == set() and set(opsets) == {"ai.onnx"} and "SimplifiedLayerNormalization" not in onnx_ops


def test_dml_bundle_is_fp16_and_verified(dml_bundle) -> None:
    _, kv, bundle = dml_bundle
    spec = read_spec(bundle)
    assert (spec.target, spec.dtype, spec.kv_cache.dtype, spec.kv_cache.update) == ("dml", "fp16", "fp16", kv)
    v = spec.verification
    assert max(v["max_abs_diff_prefill"], v["max_abs_diff_decode"]) <= v["tolerance"]
    assert v["greedy_mismatches_beyond_tolerance"] == 0
