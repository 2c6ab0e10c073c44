"""Hugging Face GPT-2 folders -> bundles whose greedy tokens equal transformers' own `generate`.

Random-init GPT2LMHeadModels with unusual sizes (odd head counts, a 211-token vocabulary),
saved with save_pretrained: one with safetensors + tokenizer.json and gelu_new, one with
pytorch_model.bin + only the slow tokenizer's vocab.json/merges.txt and exact gelu.
transformers is a test-only dependency; gptedge.export.hf never imports it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from gptedge.errors import CheckpointError  # noqa: E402
from gptedge.export import hf  # noqa: E402
from gptedge.export.exporter import export_bundle  # noqa: E402
from gptedge.export.verify import session  # noqa: E402
from gptedge.runtime.bundle import read_spec  # noqa: E402
from gptedge.runtime.engine import Engine  # noqa: E402
from gptedge.runtime.evaluate import greedy_decode  # noqa: E402

TEXT = ["def add(a, b):\n    return a + b\n", "hello world, the quick brown fox\n",
        "for i in range(10): print(i)\n"] * 20
EOT = "<|endoftext|>"
VOCAB = 211


def small_bpe() -> Tokenizer:
    """A byte-level BPE like GPT-2's with fewer than VOCAB tokens (only the bytes the text uses)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=150, special_tokens=[EOT], show_progress=False))
    assert tok.get_vocab_size() < VOCAB
    return tok


def save_hf(folder: Path, *, seed: int, slow_tokenizer: bool, safetensors: bool, **config) -> Path:
    torch.manual_seed(seed)
    tok = small_bpe()
    eot = tok.token_to_id(EOT)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, bos_token_id=eot, eos_token_id=eot,
                                  initializer_range=0.1, **config)  # larger init: varied, decisive greedy tokens
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(folder, safe_serialization=safetensors)
    if slow_tokenizer:
        tok.model.save(str(folder))  # vocab.json + merges.txt
        slow = transformers.GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
        slow.save_pretrained(folder)  # + tokenizer_config.json, special_tokens_map.json; no tokenizer.json
        assert not (folder / "tokenizer.json").exists()
    else:
        tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (HF folder, exported bundle)."""
    root = tmp_path_factory.mktemp("hf")
    folders = {
        "gelu_new-safetensors": save_hf(root / "a", seed=0, slow_tokenizer=False, safetensors=True,
                                        n_embd=48, n_layer=2, n_head=3, activation_function="gelu_new"),
        "gelu-bin-slowtok": save_hf(root / "b", seed=1, slow_tokenizer=True, safetensors=False,
                                    n_embd=40, n_layer=3, n_head=5, activation_function="gelu"),
    }
    return {name: (folder, export_bundle(folder, root / f"{name}-bundle", progress=False))
            for name, folder in folders.items()}


def right_padded_greedy(bundle: Path, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], list[np.ndarray]]:
    """Free-running greedy decoding of a right-padded batch through the bundle's graph (ONNX Runtime, CPU).

    Returns each row's generated tokens and its logits at every real position (prompt and generated).
    """
    return greedy_decode(Engine(session(bundle / "model.onnx"), read_spec(bundle)), prompts, steps, keep_logits=True)


@pytest.mark.parametrize("name", ["gelu_new-safetensors", "gelu-bin-slowtok"])
def test_greedy_tokens_equal_transformers_generate(hf_models, name: str) -> None:
    folder, bundle = hf_models[name]
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    prompts = [tok.encode("def add(a, b):\n    return").ids, tok.encode("hello").ids,
               tok.encode("for i in range(10):").ids]
    assert len({len(p) for p in prompts}) == 3
    ours = right_padded_greedy(bundle, prompts, 20)[0]
    for prompt, mine in zip(prompts, ours):
        with torch.no_grad():
            gen = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=20, pad_token_id=model.config.eos_token_id)
        theirs = gen[0, len(prompt):].tolist()
        assert len(theirs) >= 5  # a stop at eos after a handful of tokens would make this test weak
        assert mine[: len(theirs)] == theirs
    assert any(len(set(row)) > 2 for row in ours)  # the random model is not stuck on one token


def test_bundle_spec_records_source(hf_models) -> None:
    for name, (folder, bundle) in hf_models.items():
        spec = read_spec(bundle)
        config = json.loads((folder / "config.json").read_text())
        eot = Tokenizer.from_file(str(bundle / "tokenizer.json")).token_to_id(EOT)
        assert spec.special_tokens == {"bos_id": eot, "bos": EOT, "eos_id": eot, "eos": EOT}
        assert spec.provenance["source_kind"] == "huggingface-gpt2"
        weights = "model.safetensors" if "safetensors" in name else "pytorch_model.bin"
        assert list(spec.provenance["source_sha256"]) == [weights]
        a = spec.architecture
        assert (a.n_head, a.n_embd, a.n_layer, a.vocab_size, a.context_length) == (
            config["n_head"], config["n_embd"], config["n_layer"], VOCAB, 64)
        v = spec.verification
        assert v["greedy_match"] and max(v["max_abs_diff_prefill"], v["max_abs_diff_decode"]) <= 1e-4


def test_converted_slow_tokenizer_matches_transformers(hf_models) -> None:
    folder, bundle = hf_models["gelu-bin-slowtok"]
    ours = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    slow = transformers.GPT2Tokenizer.from_pretrained(folder)
    # Only characters the small BPE has seen (it lacks most byte symbols, where slow GPT-2 would emit unk).
    for text in ["def add(a, b):\n    return a + b", f"hello{EOT} world", "  for i in range(10):\n\n", "the brown fox"]:
        assert ours.encode(text).ids == slow.encode(text)
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == slow.decode(slow.encode(text))


def test_export_code_does_not_import_transformers() -> None:
    for module in ("hf.py", "exporter.py", "graph.py", "verify.py"):
        source = (Path(hf.__file__).parent / module).read_text()
        assert "import transformers" not in source and "from transformers" not in source, module


# -- refused configs: a clear CheckpointError ----------------------------------------------------------------------
BASE = dict(model_type="gpt2", vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=2, n_head=3)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mamba"}, r"model_type 'mamba' is not supported; .*gpt2 \(GPT2LMHeadModel\)"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not supported"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn=True is not supported"),
    ({"scale_attn_weights": False}, "scale_attn_weights=False is not supported"),
    ({"activation_function": "relu"}, "activation_function 'relu' is not supported; supported: gelu_new"),
    ({"n_inner": "wide"}, "n_inner='wide' is not an integer"),
    ({"architectures": ["GPT2ForSequenceClassification"]}, "not a gpt2 language model"),
])
def test_refuses_unsupported_configs(change: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=message):
        hf.gpt_config({**BASE, **change}, tmp_path)


@pytest.mark.parametrize("activation, approximate",
                         [("gelu_new", "tanh"), ("gelu_pytorch_tanh", "tanh"), ("gelu", "none")])
def test_maps_config(activation: str, approximate: str, tmp_path: Path) -> None:
    c = hf.gpt_config({**BASE, "activation_function": activation, "layer_norm_epsilon": 1e-6}, tmp_path)
    assert ((c.block_size, c.vocab_size, c.n_head, c.gelu_approximate, c.layer_norm_epsilon)
            == (64, VOCAB, 3, approximate, 1e-6))


def test_untied_head_loads_as_its_own_matrix_and_foreign_tokenizer_is_refused(tmp_path: Path) -> None:
    untied = save_hf(tmp_path / "untied", seed=0, slow_tokenizer=False, safetensors=True, n_embd=48, n_layer=1,
                     n_head=3, tie_word_embeddings=False, n_inner=100)
    model = hf.load_hf(untied).model
    reference = transformers.GPT2LMHeadModel.from_pretrained(untied).eval()
    assert not model.config.tie_embeddings and model.config.intermediate_size == 100
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.allclose(model(ids)[0], reference(ids).logits, atol=1e-5)
    small = tmp_path / "small"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(small)
    small_bpe().save(str(small / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="the tokenizer has .* tokens but the model only 20 embeddings"):
        hf.load_hf(small)
    (small / "model.safetensors").unlink()
    (small / "config.json").write_text(json.dumps({**BASE, "vocab_size": 200}))
    with pytest.raises(CheckpointError, match="has no weights"):
        hf.load_hf(small)


def test_missing_tokenizer_files(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(BASE))
    (folder / "vocab.json").write_text("{}")  # merges.txt missing: not a tokenizer
    with pytest.raises(CheckpointError, match="needs tokenizer.json, or vocab.json \\+ merges.txt"):
        export_bundle(folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
