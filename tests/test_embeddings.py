"""Embedding bundles: pooled vectors equal transformers' (cosine >= 0.99999), served and refused properly.

A random Qwen3 folder carrying sentence-transformers' files (last-token pooling, Normalize, query prompt) is
exported without options and must be detected as an embedding model; a Llama folder is exported with
--pooling mean. Vectors come from the runtime in shuffled, length-sorted batches and are compared one by one
with transformers' hidden states pooled the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from gptedge.errors import ContextLengthError, UsageError  # noqa: E402
from gptedge.export.exporter import export_bundle  # noqa: E402
from gptedge.runtime import Model  # noqa: E402
from gptedge.runtime.bundle import read_spec  # noqa: E402
from test_families import save_family  # noqa: E402

TEXTS = ["def add(a, b):\n    return a + b", "hello", "for i in range(10):\n    print(i)", "the cat sat", "x",
         "import os\nimport sys\n\nprint(os.getcwd(), sys.argv)"]
QUERY = "Instruct: find code\nQuery: "


def sentence_transformers_files(folder: Path, mode: str = "pooling_mode_lasttoken") -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 96, mode: True}))
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": QUERY,
                                                                                      "document": ""}}))


def reference(folder: Path, model_type: str, texts: list[str], pooling: str, normalize: bool) -> np.ndarray:
    """transformers' final hidden states, pooled over each text alone."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = getattr(transformers, "AutoModelForCausalLM").from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok.encode(text, add_special_tokens=True).ids])
            hidden = model.model(ids).last_hidden_state[0]  # [S, C], after the final norm
            vec = {"last": hidden[-1], "mean": hidden.mean(0), "first": hidden[0]}[pooling]
            out.append(torch.nn.functional.normalize(vec, dim=-1) if normalize else vec)
    return torch.stack(out).double().numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("embed")
    folder = save_family(root / "hf", "qwen3")
    sentence_transformers_files(folder)
    return folder, export_bundle(folder, root / "bundle", progress=False)


def test_a_sentence_transformers_folder_exports_as_an_embedding_bundle(qwen3) -> None:
    folder, bundle = qwen3
    spec = read_spec(bundle)
    assert spec.task == "embedding" and spec.embedding["pooling"] == "last" and spec.embedding["normalize"]
    assert spec.embedding["prompts"]["query"] == QUERY and spec.embedding["dimensions"] == 96
    assert spec.verification["min_cosine"] >= 0.99999
    model = Model.load(bundle, provider="cpu", threads=1)
    order = [3, 0, 5, 1, 4, 2]  # batches are sorted by length inside; the output keeps the caller's order
    ours = model.embed([TEXTS[i] for i in order], batch_size=4)
    ref = reference(folder, "qwen3", [TEXTS[i] for i in order], "last", True)
    assert ours.shape == (6, 96) and ours.dtype == np.float32
    assert cosines(ours, ref).min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    queried = model.embed(["add numbers"], prompt="query")
    assert cosines(queried, reference(folder, "qwen3", [QUERY + "add numbers"], "last", True)).min() >= 0.99999
    short = model.embed(TEXTS[:2], dimensions=32)
    assert short.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)


def test_mean_pooling_from_the_options(tmp_path: Path) -> None:
    folder = save_family(tmp_path / "hf", "llama")
    bundle = export_bundle(folder, tmp_path / "b", embeddings=True, pooling="mean", normalize=False, progress=False)
    ours = Model.load(bundle, provider="cpu", threads=1).embed(TEXTS, batch_size=3)
    assert cosines(ours, reference(folder, "llama", TEXTS, "mean", False)).min() >= 0.99999


def test_embedding_inputs_are_checked(qwen3) -> None:
    model = Model.load(qwen3[1], provider="cpu", threads=1)
    too_long = "word " * 200
    with pytest.raises(ContextLengthError, match="more than the model's context"):
        model.embed([too_long])
    assert model.embed([too_long], truncate=True).shape == (1, 96)
    for bad, field in (([], "input"), (["a", 3], "input"), ("a", "input")):
        with pytest.raises(UsageError) as info:
            model.embed(bad)
        assert info.value.field == field
    with pytest.raises(UsageError, match="not one of this model's prompts"):
        model.embed(["a"], prompt="passage")
    with pytest.raises(UsageError, match="dimensions"):
        model.embed(["a"], dimensions=1000)


def test_the_server_answers_embeddings_through_the_openai_client(qwen3) -> None:
    import httpx
    import openai

    from serve_util import live_server, wait_ready

    folder, bundle = qwen3
    with live_server(bundle) as (url, state):
        wait_ready(url, timeout=60)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.embeddings.create(model="tiny", input=TEXTS[:3])  # the client asks for base64
        ref = reference(folder, "qwen3", TEXTS[:3], "last", True)
        got = np.array([d.embedding for d in reply.data])
        assert cosines(got, ref).min() >= 0.99999 and [d.index for d in reply.data] == [0, 1, 2]
        assert reply.usage.prompt_tokens == sum(len(state.models["tiny"].model.encode(t)) for t in TEXTS[:3])
        floats = httpx.post(url + "/v1/embeddings", json={"input": "hello", "encoding_format": "float",
                                                          "dimensions": 16}, timeout=30).json()
        assert len(floats["data"][0]["embedding"]) == 16
        ids = state.models["tiny"].model.encode("hello")
        by_ids = client.embeddings.create(model="tiny", input=[ids])
        assert cosines(np.array([by_ids.data[0].embedding]), ref[1:2]).min() >= 0.99999
        for body, param in (({"input": []}, "input"), ({"input": ["a", 3]}, "input"),
                            ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
                            ({"input": "a", "dimensions": 4096}, "dimensions"),
                            ({"input": "word " * 200}, "input")):
            bad = httpx.post(url + "/v1/embeddings", json=body, timeout=30)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
        chat = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                          timeout=30)
        assert chat.status_code == 400 and "embedding model" in chat.json()["error"]["message"]
        listed = client.models.list().data[0]
        assert listed.capabilities == ["embedding"] and listed.context_length == 64


def test_tokenize_detokenize_and_metrics(runtime_bundle: Path) -> None:
    import httpx

    from serve_util import live_server, wait_ready

    with live_server(runtime_bundle) as (url, state):
        wait_ready(url)
        model = state.models["tiny"].model
        tokens = httpx.post(url + "/tokenize", json={"content": "def add(a, b):"}, timeout=30).json()["tokens"]
        assert tokens == model.encode("def add(a, b):")
        pieces = httpx.post(url + "/tokenize", json={"content": "def add", "with_pieces": True}, timeout=30).json()
        assert "".join(p["piece"] for p in pieces["tokens"]) == "def add"
        text = httpx.post(url + "/detokenize", json={"tokens": tokens}, timeout=30).json()["content"]
        assert text == "def add(a, b):"
        assert httpx.post(url + "/detokenize", json={"tokens": [-1]}, timeout=30).status_code == 400
        done = httpx.post(url + "/v1/completions", json={"prompt": "def", "max_tokens": 5, "temperature": 0,
                                                         "ignore_eos": True}, timeout=60)
        assert done.status_code == 200
        httpx.post(url + "/v1/completions", json={"prompt": "def", "max_tokens": -1}, timeout=30)
        metrics = httpx.get(url + "/metrics", timeout=30).text
        assert 'gptedge_requests_total{path="/v1/completions",status="200"} 1' in metrics
        assert 'gptedge_requests_total{path="/v1/completions",status="400"} 1' in metrics
        assert 'gptedge_generated_tokens_total{model="tiny"} 5' in metrics
        assert 'gptedge_time_to_first_token_seconds_count{model="tiny"} 1' in metrics
        assert 'gptedge_queue_waiting{model="tiny"} 0' in metrics and "gptedge_kv_bytes_in_use" in metrics


def test_the_command_line_embeds_and_refuses_the_other_kind(qwen3, runtime_bundle: Path, capsys) -> None:
    from gptedge.cli import main

    bundle = qwen3[1]
    assert main(["embed", str(bundle), "hello", "the cat sat", "--threads", "1", "--dimensions", "8"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and all(len(r["embedding"]) == 8 for r in rows)
    assert main(["generate", str(bundle), "hi", "--threads", "1"]) != 0
    assert "embedding bundle: use gptedge embed" in capsys.readouterr().err
    assert main(["embed", str(runtime_bundle), "hi", "--threads", "1"]) != 0
    assert "--embeddings" in capsys.readouterr().err


def test_quantized_embedding_bundles_are_gated_on_retrieval(qwen3, tmp_path: Path) -> None:
    from gptedge.errors import QuantizeError
    from gptedge.quantize.quantizer import quantize_bundle

    folder, bundle = qwen3
    out = quantize_bundle(bundle, tmp_path / "int8", "auto", progress=False, log=lambda m: None)
    q = read_spec(out).quantization
    assert q["method"] == "int8-weight" and q["quality"]["passed"] and q["quality"]["min_cosine"] >= 0.99
    assert q["quality"]["queries"] >= 8 and q["eval"]["gate"] == "retrieval"
    vectors = Model.load(out, provider="cpu", threads=1).embed(TEXTS)
    assert cosines(vectors, reference(folder, "qwen3", TEXTS, "last", True)).min() >= 0.99
    with pytest.raises(QuantizeError, match="quality gate failed"):  # a random 4-bit model cannot keep rankings
        quantize_bundle(bundle, tmp_path / "int4", "int4-weight", block_size=32, progress=False, log=lambda m: None)
    assert not (tmp_path / "int4").exists()
    with pytest.raises(QuantizeError, match="embedding bundles quantize with"):
        quantize_bundle(bundle, tmp_path / "x", "int8-static", progress=False, log=lambda m: None)
