"""Bundles that onnxruntime-genai runs: its Python package (the same C++ core as its C#, C++ and Java APIs) loads
`export --genai` / `quantize` bundles and its greedy ids equal gptedge's on the same bundle, for GPT-2 and Llama
families, fp32, INT8 (with and without the int8 KV cache) and INT4."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import stdlib_text
from gptedge.errors import BundleError, QuantizeError, UsageError
from gptedge.export.exporter import export_bundle
from gptedge.quantize import quantize_bundle
from gptedge.quantize.genai import GENAI_CONFIG_NAME, GENAI_FILES, GENAI_MODEL_NAME, has_genai
from gptedge.runtime import Model
from gptedge.runtime.bundle import read_spec

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install -e .[dev])")

STEPS = 32
PROMPTS = ["def add(a, b):\n    return", "hello", "for i in range(10):", "The quick brown fox"]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return stdlib_text(tmp_path_factory.mktemp("text"), 5000)


@pytest.fixture(scope="module")
def bundles(runtime_checkpoint, text, tmp_path_factory) -> dict[str, Path]:
    """family-precision -> bundle with the genai files: GPT-2 (a gptedge checkpoint) and Llama (a transformers
    folder with grouped heads, llama3 rope scaling and biases), each fp32, INT8, INT8 with the int8 KV cache and
    INT4."""
    from test_families import save_family

    root = tmp_path_factory.mktemp("genai")
    sources = {"gpt2": runtime_checkpoint, "llama": save_family(root / "llama-hf", "llama")}
    out = {}
    for family, source in sources.items():
        fp32 = out[f"{family}-fp32"] = export_bundle(source, root / f"{family}-fp32", genai=True, progress=False)
        for method in ("int8-weight", "int4-weight"):
            out[f"{family}-{method[:4]}"] = quantize_bundle(
                fp32, root / f"{family}-{method}", method=method, eval_text=text, max_ppl_increase=50.0,
                progress=False, log=lambda _: None)
        out[f"{family}-int8-kv8"] = quantize_bundle(  # the int8 KV cache: genai allocates what the graph declares
            fp32, root / f"{family}-int8-kv8", method="int8-weight", eval_text=text, max_ppl_increase=50.0,
            kv_cache="int8", progress=False, log=lambda _: None)
    return out


def genai_greedy(bundle: Path, prompt: list[int], steps: int) -> list[int]:
    """Greedy ids from onnxruntime-genai, fed token ids (its tokenizer is checked separately)."""
    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt, np.int32))
    ids = []
    while not generator.is_done():
        generator.generate_next_token()
        ids.append(int(generator.get_next_tokens()[0]))
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2-fp32", "gpt2-int8", "gpt2-int4", "gpt2-int8-kv8", "llama-fp32", "llama-int8",
                                  "llama-int4", "llama-int8-kv8"])
def test_genai_greedy_ids_equal_gptedge(bundles, kind: str) -> None:
    bundle = bundles[kind]
    assert has_genai(bundle)
    model = Model.load(bundle, provider="cpu", threads=1)
    stops = set(model.stop_ids)
    compared = 0
    for prompt in PROMPTS:
        ids = model.encode(prompt)
        ours = model.generate(ids, max_new_tokens=STEPS, temperature=0.0)
        theirs = genai_greedy(bundle, ids, STEPS)
        if theirs and theirs[-1] in stops:  # genai returns the stop id it ended on; gptedge's result leaves it out
            theirs = theirs[:-1]
            assert ours.finish_reason == "eos"
        assert theirs == ours.token_ids, prompt
        compared += len(theirs)
    assert compared >= 2 * STEPS  # most prompts ran their 32 steps: the comparison is not vacuous


def test_genai_files_are_checksummed_checked_and_share_the_weights(bundles) -> None:
    bundle = bundles["llama-int4"]
    spec = read_spec(bundle)
    assert set(GENAI_FILES) <= set(spec.files)
    check = spec.verification["genai"]
    assert check["max_abs_diff"] < 1e-3 and check["decode_steps"] > 0
    graph = onnx.load(str(bundle / GENAI_MODEL_NAME), load_external_data=False)
    locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}  # the same weight file model.onnx reads: stored once
    # Only the rewiring nodes are new: the genai graph is the size of model.onnx's graph, a few KB more.
    assert (bundle / GENAI_MODEL_NAME).stat().st_size < (bundle / "model.onnx").stat().st_size + 8_000
    assert {i.name for i in graph.graph.input} >= {"input_ids", "attention_mask", "past_key_0"}
    config = json.loads((bundle / GENAI_CONFIG_NAME).read_text(encoding="utf-8"))
    decoder, arch = config["model"]["decoder"], spec.architecture
    assert (decoder["num_key_value_heads"], decoder["num_attention_heads"]) == (arch.n_kv_head, arch.n_head)
    assert config["search"]["past_present_share_buffer"] is True


def test_quantize_carries_genai_over_or_drops_it_when_asked(bundles, text, tmp_path: Path) -> None:
    assert all(has_genai(bundles[k]) for k in ("gpt2-int8", "gpt2-int4", "llama-int8"))  # carried over by default
    assert "genai" in read_spec(bundles["gpt2-int8"]).verification  # and checked again on the quantized graph
    out = quantize_bundle(bundles["gpt2-fp32"], tmp_path / "q", method="int8-weight", eval_text=text,
                          max_ppl_increase=50.0, genai=False, progress=False, log=lambda _: None)
    assert not any((out / name).exists() for name in GENAI_FILES) and "genai" not in read_spec(out).verification


def test_concat_bundles_are_refused_before_any_work(runtime_checkpoint, runtime_bundle, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--genai needs the in-place KV graph"):
        export_bundle(runtime_checkpoint, tmp_path / "c", kv="concat", genai=True, progress=False)
    assert not (tmp_path / "c").exists()
    concat = export_bundle(runtime_checkpoint, tmp_path / "c", kv="concat", progress=False)
    with pytest.raises(QuantizeError, match="in-place KV bundles only"):
        quantize_bundle(concat, tmp_path / "q", eval_text="x " * 600, genai=True, progress=False, log=lambda _: None)
    assert not (tmp_path / "q").exists()


def test_a_miswired_genai_graph_fails_the_check(runtime_bundle, tmp_path: Path) -> None:
    """The check is measured, not assumed: a genai graph whose rewiring is wrong (seqlens_k one too high) fails."""
    import shutil

    from gptedge.quantize import genai

    bundle = Path(shutil.copytree(runtime_bundle, tmp_path / "b"))
    spec = read_spec(bundle)
    genai.write_genai_files(bundle, spec)
    graph = onnx.load(str(bundle / GENAI_MODEL_NAME), load_external_data=False)
    graph.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["two"], value_ints=[2]))
    sub = next(n for n in graph.graph.node if n.op_type == "Sub")
    sub.input[1] = "two"  # seqlens_k = sum(mask) - 2: one position short, so the last key is never attended
    onnx.save(graph, str(bundle / GENAI_MODEL_NAME))
    with pytest.raises(BundleError, match="differ from model.onnx's by"):
        genai.check_genai_graph(bundle, spec, model_ids(bundle))
    sub.op_type = "Add"  # seqlens_k = sum(mask) + 1: past the total length, which onnxruntime refuses to run
    onnx.save(graph, str(bundle / GENAI_MODEL_NAME))
    with pytest.raises(BundleError, match="does not run the way model.onnx does"):
        genai.check_genai_graph(bundle, spec, model_ids(bundle))


def model_ids(bundle: Path) -> list[int]:
    return Model.load(bundle, provider="cpu", threads=1).encode("def add(a, b):\n    return a + b\n")
