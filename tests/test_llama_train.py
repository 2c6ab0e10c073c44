"""The Llama-style presets: the same loop, resume and export as GPT-2's, a different point of the model space."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptedge.errors import UsageError
from gptedge.export.exporter import export_bundle
from gptedge.quantize import quantize_bundle
from gptedge.runtime import Model
from gptedge.runtime.bundle import read_spec
from gptedge.train.checkpoint import load_checkpoint, read_config
from gptedge.train.trainer import TrainConfig, resolve_config, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(out: Path, corpus: Path, cache: Path, **overrides) -> TrainConfig:
    settings = dict(out=str(out), data=[str(corpus)], preset="tiny-llama", steps=10, batch_size=4, eval_every=5,
                    eval_batches=2, cache_dir=str(cache), progress=False)
    return TrainConfig(**{**settings, **overrides})


def test_preset_builds_a_llama_style_model_and_resumes_exactly(train_corpus: Path, train_cache: Path,
                                                               tmp_path: Path) -> None:
    full = train(tiny_llama(tmp_path / "full", train_corpus, train_cache))
    half = train(tiny_llama(tmp_path / "half", train_corpus, train_cache, stop_after=5))
    resumed = train(TrainConfig(out=str(half), resume=str(half), cache_dir=str(train_cache), progress=False))
    a, b = load_checkpoint(full)[0], load_checkpoint(resumed)[0]
    c = a.config
    assert (c.positions, c.norm, c.mlp, c.n_head, c.n_kv_head, c.bias) == ("rope", "rmsnorm", "swiglu", 2, 1, False)
    assert read_config(full)["model"]["intermediate_size"] == c.intermediate_size == 176
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) <= 1e-6


def test_trained_llama_exports_quantizes_and_generates(train_corpus: Path, train_cache: Path, tmp_path: Path) -> None:
    ckpt = train(tiny_llama(tmp_path / "ckpt", train_corpus, train_cache, steps=40, batch_size=8, eval_every=20))
    fp32 = export_bundle(ckpt, tmp_path / "fp32", progress=False)
    spec = read_spec(fp32)
    assert spec.architecture.family == "llama" and spec.architecture.n_kv_head == 1
    assert spec.verification["greedy_match"]
    int8 = quantize_bundle(fp32, tmp_path / "int8", method="int8-weight", eval_text=str(train_corpus), progress=False)
    q = read_spec(int8).quantization
    assert q["method"] == "int8-weight" and q["quality"]["passed"] and q["quality"]["ppl_increase_pct"] < 2.0
    model = Model.load(int8, provider="cpu", threads=1)
    result = model.generate("def ", max_new_tokens=16, temperature=0.0, stop_token_ids=())
    assert len(result.token_ids) == 16 and result.text
    # The quantized bundle still follows the float one closely on the text it was gated on.
    float_model = Model.load(fp32, provider="cpu", threads=1)
    text = train_corpus.read_text()[:3000]
    assert abs(model.perplexity(text) / float_model.perplexity(text) - 1) < 0.02


def test_invalid_architecture_options_are_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"n_head \(3\) must be divisible by n_kv_head \(2\)"):
        resolve_config(TrainConfig(out="x", preset="small-llama", n_head=3, n_embd=96))


def test_untied_head_is_saved_and_loaded_as_its_own_matrix(tmp_path: Path) -> None:
    from gptedge.train.checkpoint import save_checkpoint
    from gptedge.train.model import GPT, GPTConfig
    from gptedge.train.presets import llama_style
    from gptedge.train.tokenizer import train_tokenizer

    tok = train_tokenizer(["def f(x):\n    return x\n"] * 10, 270)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_embd=32,
                          tie_embeddings=False, **llama_style(32, 1)))
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "ckpt", model, {}, tok.to_str(), None))[0]
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert loaded.lm_head.weight.data_ptr() != loaded.transformer.wte.weight.data_ptr()
