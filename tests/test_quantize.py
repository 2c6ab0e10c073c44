"""gptedge.quantize on a tiny exported GPT: each recipe, the LM head choice, the quality gate, bad input.

The float bundle is conftest's runtime_bundle (a random GPT with scaled-up weights, exported by
gptedge.export), so perplexity and agreement react to quantization error measurably.
"""

from __future__ import annotations

import re
import sysconfig
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gptedge.cli import main as cli_main
from gptedge.errors import BundleError, OutputExistsError, QuantizeError
from gptedge.quantize import quantize_bundle, recipes
from gptedge.quantize.quantizer import AUTO, build_quantized_model
from gptedge.quantize.texts import read_text
from gptedge.runtime import Model
from gptedge.runtime import evaluate as ev
from gptedge.runtime.bundle import MODEL_NAME, read_spec, write_spec
from gptedge.runtime.engine import Engine
from gptedge.runtime.traits import TRAITS, quantization_kind


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    """About 5 KB of Python source: plenty of tokens for the gate, cheap to score."""
    src = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")[:5000]
    path = tmp_path_factory.mktemp("text") / "heldout.py"
    path.write_text(src, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def int8_bundle(runtime_bundle, heldout, tmp_path_factory):
    """method=auto with the LM head left to gptedge: both ways built and measured."""
    lines: list[str] = []
    out = quantize_bundle(runtime_bundle, tmp_path_factory.mktemp("q") / "int8", eval_text=heldout, progress=False,
                          log=lines.append)
    return out, lines


@pytest.fixture
def int2_weight(monkeypatch) -> str:
    """A harmful recipe for the gate tests (2-bit weight-only blocks), registered in the method table by the test."""
    method = recipes.Method("int2-weight", 2, "weight", "weight-only INT2 blocks (tests only: too coarse for a gate)")
    monkeypatch.setitem(recipes.METHODS, method.name, method)
    return method.name


def op_counts(bundle: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(bundle / MODEL_NAME), load_external_data=False).graph.node)


def model_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.iterdir() if p.name.startswith(MODEL_NAME))


def retarget(bundle: Path, dest: Path, **changes) -> Path:
    """A copy of `bundle` whose gptedge.json says something else (target, quantization...)."""
    dest.mkdir()
    for f in bundle.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    write_spec(dest, replace(read_spec(bundle), files={}, **changes))
    return dest


def test_auto_picks_int8_and_records_everything(int8_bundle, runtime_bundle):
    out, lines = int8_bundle
    assert any("method auto -> int8 for a cpu bundle" in line for line in lines)
    spec, source = read_spec(out), read_spec(runtime_bundle)
    q = spec.quantization
    # INT8 blocks of 64, scales searched against the calibration text's activations
    assert (q["method"], q["kind"], q["bits"], q["block_size"], q["accuracy_level"]) == ("int8", "weight", 8, 64, 4)
    assert q["rounding"]["calibration_positions"] > 0 and q["calibration"]["method"] == "input Hessians"
    assert len(q["quantized_nodes"]) == 4 * source.architecture.n_layer
    assert q["float_nodes"] == [] and q["position_embedding"]["storage"] == "int8 blocks (GatherBlockQuantized)"
    # the LM head was measured both ways and the quantized one kept (it passes the gate)
    assert set(q["lm_head"]["measured"]) == {"quantized", "float"}
    assert q["lm_head"]["quantized"] and q["lm_head"]["bits"] == 8
    assert "GatherBlockQuantized" in q["embedding"]["storage"] and q["embedding"]["tied_to_lm_head"]
    quality = q["quality"]
    assert quality["passed"] and abs(quality["ppl_increase_pct"]) < 2.0
    assert quality["top1_agreement"] > 0.9 and quality["greedy_agreement"] > 0.5
    assert quality["eval_tokens"] >= 1000 and quality["greedy_prompts"] == 8
    # provenance names the float model it came from; files and tokenizer are the bundle's own
    assert spec.provenance["quantized_from"]["files_sha256"][MODEL_NAME] == source.files[MODEL_NAME]
    assert spec.files["tokenizer.json"] == source.files["tokenizer.json"]
    assert sorted(p.name for p in out.iterdir()) == ["gptedge.json", "model.onnx", "model.onnx.data", "tokenizer.json"]
    table = "\n".join(lines)
    assert "<- chosen" in table and "int8, LM head int8" in table and "int8, LM head fp32" in table


def test_int8_graph_is_weight_only_int8_with_a_shared_embedding(int8_bundle, runtime_bundle):
    out, _ = int8_bundle
    ops = op_counts(out)
    n_layer = read_spec(out).architecture.n_layer
    assert ops["MatMulNBits"] == 4 * n_layer + 1  # the blocks + the LM head
    assert ops["GatherBlockQuantized"] == 2 and ops["Gemm"] == 0 and ops["Gather"] == 0  # token + position tables
    assert ops["GroupQueryAttention"] == n_layer  # attention stays as exported (float)
    assert model_bytes(out) < 0.45 * model_bytes(runtime_bundle)
    model = onnx.load(str(out / MODEL_NAME), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    assert "lm_head.weight" not in inits and "transformer.wte.weight" not in inits  # no float copy of the tied matrix


def test_quantized_bundle_records_its_kind_for_the_runtime(int8_bundle):
    """gptedge.json names the recipe's kind, which is what the runtime checks each provider's INT8 kernels against."""
    q = read_spec(int8_bundle[0]).quantization
    assert q["kind"] == recipes.METHODS[q["method"]].kind == quantization_kind(q) == "weight"


def test_quantized_bundle_loads_and_generates(int8_bundle, runtime_model, heldout):
    """The INT8 bundle, loaded like any bundle, continues real text as the float model does."""
    out, _ = int8_bundle
    model = Model.load(out, provider="cpu", threads=1, cache=False)
    ids = runtime_model.encode(heldout.read_text(encoding="utf-8"))
    prompts = [ids[start:start + length] for start, length in ((0, 5), (40, 12), (200, 30), (500, 9), (900, 50),
                                                                (1200, 3), (1500, 20), (1700, 64))]
    q = ev.greedy_continuations(model.engine, prompts, 16)
    f = ev.greedy_continuations(runtime_model.engine, prompts, 16)
    assert len({tuple(row) for row in f}) > 4  # varied continuations, not one repeated token
    # Along the float model's continuations (one early near-tie does not derail the rest), the INT8 model picks
    # the same token almost everywhere, and every first token
    followed = [ev.score_tokens(model.engine, p + c).top1[len(p) - 1:len(p) - 1 + len(c)] for p, c in zip(prompts, f)]
    assert np.mean(np.array(followed) == np.array(f)) >= 0.9
    assert [row[0] for row in q] == [row[0] for row in f]
    result = model.generate(prompts[2], temperature=0.0, max_new_tokens=16, stop_token_ids=())
    assert result.token_ids == q[2] and result.text == model.decode(q[2])


def test_shared_embedding_reads_the_head_blocks_exactly(runtime_bundle, tmp_path):
    """GatherBlockQuantized (CPU/CUDA) and the standard-op dequantizing gather (DirectML) give the same rows."""
    spec = read_spec(runtime_bundle)
    logits = {}
    for target in ("cpu", "dml"):
        folder = tmp_path / target
        details = build_quantized_model(runtime_bundle / MODEL_NAME, replace(spec, target=target), "int8-weight",
                                        folder, accuracy_level=0)
        assert ("GatherBlockQuantized" in details["embedding"]["storage"]) == TRAITS[target].gather_block_quantized
        engine = Engine(ort.InferenceSession(str(folder / MODEL_NAME), providers=["CPUExecutionProvider"]), spec)
        logits[target] = ev.next_token_logits(engine, [[1, 2, 3, 4, 5], [7, 8]])
    np.testing.assert_allclose(logits["cpu"], logits["dml"], atol=1e-5)
    assert op_counts(tmp_path / "dml")["GatherBlockQuantized"] == 0


@pytest.mark.parametrize("method,ops", [
    ("int8-dynamic", {"DynamicQuantizeLinear", "MatMulInteger"}),
    ("int8-static", {"QuantizeLinear", "DequantizeLinear"}),
    ("int4-weight", {"MatMulNBits"}),
])
def test_each_recipe_passes_its_gate_and_runs(method, ops, runtime_bundle, heldout, tmp_path):
    out = quantize_bundle(runtime_bundle, tmp_path / method, method=method, eval_text=heldout, calibration=heldout,
                          quantize_lm_head=True, progress=False, log=lambda _: None)  # the default 2% gate
    spec = read_spec(out)
    assert spec.quantization["method"] == method and spec.quantization["quality"]["passed"]
    assert spec.quantization["kind"] == recipes.METHODS[method].kind == quantization_kind(spec.quantization)
    assert ops <= set(op_counts(out))
    if method == "int8-static":
        assert spec.quantization["calibration"]["windows"] >= 8
    if method == "int4-weight":
        assert spec.quantization["bits"] == 4 and spec.quantization["block_size"] == 32
        assert model_bytes(out) < 0.3 * model_bytes(runtime_bundle)
    quality = spec.quantization["quality"]
    assert quality["top1_agreement"] > (0.7 if method == "int4-weight" else 0.9)
    model = Model.load(out, provider="cpu", threads=1, cache=False)
    text = heldout.read_text(encoding="utf-8")[:1500]
    float_ppl = Model.load(runtime_bundle, provider="cpu", threads=1).perplexity(text)
    assert model.perplexity(text) == pytest.approx(float_ppl, rel=0.05)  # the loaded bundle is the gated one


def test_float_head_keeps_one_copy_of_the_tied_matrix(runtime_bundle, tmp_path):
    """quantize_dynamic rewrites every Gemm onto a transposed weight copy; the float head must stay one Gemm."""
    spec = read_spec(runtime_bundle)
    build_quantized_model(runtime_bundle / MODEL_NAME, spec, "int8-dynamic", tmp_path, quantize_lm_head=False)
    model = onnx.load(str(tmp_path / MODEL_NAME), load_external_data=False)
    V, C = spec.architecture.vocab_size, spec.architecture.n_embd
    float_tables = [t.name for t in model.graph.initializer if list(t.dims) in ([V, C], [C, V])]
    assert len(float_tables) == 1
    assert [n.op_type for n in model.graph.node if float_tables[0] in n.input] == ["Gather", "Gemm"]


def test_concat_kv_bundles_quantize_too(runtime_checkpoint, heldout, tmp_path):
    """The standard-ops graph ("concat" KV): calibration feeds empty pasts and a mask instead of zero buffers."""
    from gptedge.export.exporter import export_bundle

    bundle = export_bundle(runtime_checkpoint, tmp_path / "concat", kv="concat", progress=False)
    out = quantize_bundle(bundle, tmp_path / "static", method="int8-static", calibration=heldout, eval_text=heldout,
                          quantize_lm_head=True, max_ppl_increase=10.0, progress=False, log=lambda _: None)
    spec = read_spec(out)
    assert spec.kv_cache.update == "concat" and spec.quantization["quality"]["passed"]
    assert {"QuantizeLinear", "MatMulNBits", "GatherBlockQuantized"} <= set(op_counts(out))
    assert spec.quantization["quality"]["top1_agreement"] > 0.9


def test_static_calibrates_on_the_held_out_split_of_the_only_text(runtime_bundle, heldout, tmp_path):
    lines = []
    out = quantize_bundle(runtime_bundle, tmp_path / "static", method="int8-static", calibration=heldout,
                          quantize_lm_head=False, max_ppl_increase=10.0, progress=False, log=lines.append)
    q = read_spec(out).quantization
    assert "first 75% calibrates" in q["eval"]["note"] and not q["lm_head"]["quantized"]
    assert "Gemm" in op_counts(out)  # the float head stays a Gemm on the float table


def test_gate_fails_a_harmful_setting_and_writes_nothing(runtime_bundle, heldout, tmp_path, int2_weight):
    out = tmp_path / "broken"
    lines = []
    with pytest.raises(QuantizeError, match="quality gate failed.*nothing was written"):
        quantize_bundle(runtime_bundle, out, method=int2_weight, eval_text=heldout, quantize_lm_head=True,
                        block_size=64, progress=False, log=lines.append)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary folders left behind
    assert "FAIL" in "\n".join(lines)


def test_gate_threshold_decides(runtime_bundle, heldout, tmp_path, int2_weight):
    """The same harmful setting passes when the user allows a huge rise: the gate is the threshold, nothing else."""
    out = quantize_bundle(runtime_bundle, tmp_path / "allowed", method=int2_weight, eval_text=heldout,
                          quantize_lm_head=True, block_size=64, max_ppl_increase=1e6, progress=False,
                          log=lambda _: None)
    quality = read_spec(out).quantization["quality"]
    assert quality["passed"] and quality["ppl_increase_pct"] > 2.0


def test_cli_quantizes_and_prints_the_table(runtime_bundle, heldout, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(["quantize", str(runtime_bundle), str(out), "--method", "int8-weight", "--eval-text", str(heldout),
                     "--no-quantize-lm-head", "--float-embeddings", "--block-size", "32", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "perplexity" in printed and "<- chosen" in printed
    q = read_spec(out).quantization
    assert q["block_size"] == 32 and not q["lm_head"]["quantized"] and q["lm_head"]["choice"] == "user"
    assert q["embedding"]["storage"] == q["position_embedding"]["storage"] == "float table"
    assert set(q["float_nodes"]) == {q["lm_head"]["node"], q["embedding"]["node"], *q["position_embedding"]["nodes"]}
    assert op_counts(out)["Gather"] == 2


def test_cli_error_is_one_line(runtime_bundle, tmp_path, capsys):
    code = cli_main(["quantize", str(runtime_bundle), str(tmp_path / "x"), "--method", "int9", "--eval-text",
                     "some text"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and "unknown method 'int9'" in err


def test_errors_for_bad_input(runtime_bundle, int8_bundle, heldout, tmp_path):
    not_bundle = tmp_path / "empty"
    not_bundle.mkdir()
    with pytest.raises(BundleError, match="not a gptedge bundle"):
        quantize_bundle(not_bundle, tmp_path / "o1", eval_text=heldout)
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_bundle(int8_bundle[0], tmp_path / "o2", eval_text=heldout)
    with pytest.raises(QuantizeError, match="unknown method"):
        quantize_bundle(runtime_bundle, tmp_path / "o3", method="fp8", eval_text=heldout)
    with pytest.raises(QuantizeError, match="calibration text is too short"):
        quantize_bundle(runtime_bundle, tmp_path / "o4", method="int8-static", calibration="def f(): pass",
                        eval_text=heldout)
    with pytest.raises(QuantizeError, match="too short for the quality gate"):
        quantize_bundle(runtime_bundle, tmp_path / "o6", method="int8-weight", eval_text="x = 1")
    with pytest.raises(QuantizeError, match="block size"):
        quantize_bundle(runtime_bundle, tmp_path / "o7", method="int8-weight", eval_text=heldout, block_size=48)
    with pytest.raises(QuantizeError, match="exceeds the model width"):
        quantize_bundle(runtime_bundle, tmp_path / "o7", method="int8-weight", eval_text=heldout, block_size=128)
    with pytest.raises(QuantizeError, match="overlaps"):
        quantize_bundle(runtime_bundle, runtime_bundle / "inside", eval_text=heldout)
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(OutputExistsError):
        quantize_bundle(runtime_bundle, existing, eval_text=heldout)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))


@pytest.mark.parametrize("target,method", [("cuda", "int8-dynamic"), ("cuda", "int8-static"), ("dml", "int8-static"),
                                           ("dml", "int8-dynamic")])
def test_method_the_target_cannot_run(runtime_bundle, heldout, tmp_path, target, method):
    """The refusal names the recipe, the target, the reason from the provider's row in runtime/traits.py, and
    what runs there instead."""
    bundle = retarget(runtime_bundle, tmp_path / target, target=target)
    why = re.escape(TRAITS[target].int8_kernels[recipes.METHODS[method].kind])
    with pytest.raises(QuantizeError, match=f"{method} cannot run on a {target} bundle .*: {why}; "
                                            "use one of: int8, int4, int8-weight, int4-weight$"):
        quantize_bundle(bundle, tmp_path / "out", method=method, eval_text=heldout)


def test_where_a_recipe_runs_is_the_provider_table(monkeypatch):
    """A provider row without (or with) a kind's kernels changes what the quantizer allows; no names are compared."""
    cpu, cuda = TRAITS["cpu"], TRAITS["cuda"]
    no_dynamic = {**cpu.int8_kernels, "dynamic": "no kernels in this test"}
    monkeypatch.setitem(TRAITS, "cpu", replace(cpu, int8_kernels=no_dynamic))
    with pytest.raises(QuantizeError, match="int8-dynamic cannot run on a cpu bundle .*: no kernels in this test"):
        recipes.get_method("int8-dynamic", "cpu")
    assert "int8-dynamic" not in recipes.runnable_methods("cpu")
    monkeypatch.setitem(TRAITS, "cuda", replace(cuda, int8_kernels={**cuda.int8_kernels, "dynamic": None}))
    assert recipes.get_method("int8-dynamic", "cuda").kind == "dynamic"
    assert recipes.runnable_methods("cuda") == ["int8", "int4", "int8-weight", "int8-dynamic", "int4-weight"]


def test_auto_has_a_runnable_choice_for_every_provider():
    """A provider row added to runtime/traits.py without an `auto` choice here fails this, not a user's run."""
    assert set(AUTO) == set(TRAITS)
    for target, (name, _) in AUTO.items():
        assert recipes.get_method(name, target).name == name


def test_read_text_takes_files_folders_globs_and_literal_text(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("beta")
    (tmp_path / "sub" / ".hidden").write_text("hidden")
    (tmp_path / "sub" / "blob.bin").write_bytes(b"\0\1\2")
    text, what = read_text([str(tmp_path / "a.txt"), str(tmp_path / "sub"), str(tmp_path / "*.txt"), "gamma delta"])
    assert text.split("\n\n") == ["gamma delta", "alpha", "beta", "alpha"]
    assert "1 literal text" in what
    assert read_text("x" * 10, max_bytes=4)[0] == "x" * 10  # literal text is never cut
    assert len(read_text(str(tmp_path / "a.txt"), max_bytes=3)[0]) == 3


def test_a_pattern_that_matches_nothing_is_an_error_not_text(tmp_path):
    from gptedge.errors import DataError

    with pytest.raises(DataError, match=r"the pattern '.*heldout/\*\.py' matches no files"):
        read_text(str(tmp_path / "heldout" / "*.py"))
    assert read_text("a * b")[0] == "a * b"  # a sentence with a star is still text
