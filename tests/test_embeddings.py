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
