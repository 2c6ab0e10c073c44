"""Models whose embedding is padded past the tokenizer (common in checkpoints) never emit an id without text."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def padded_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    import torch

    from conftest import RUNTIME_TEXTS
    from gptedge.export.exporter import export_bundle
    from gptedge.train.checkpoint import save_checkpoint
    from gptedge.train.model import GPT, GPTConfig
    from gptedge.train.tokenizer import train_tokenizer

    tok = train_tokenizer(RUNTIME_TEXTS * 4, 300)
    n_text = tok.get_vocab_size()
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=n_text + 37, n_layer=1, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        # Make the padded rows the most likely tokens everywhere: the final LayerNorm's output leans
        # along its bias, and the padded rows point the same way. An unmasked sampler would pick them.
        model.transformer.ln_f.bias.fill_(0.3)
        model.transformer.wte.weight[n_text:] = 0.3
    root = tmp_path_factory.mktemp("padded")
    ckpt = save_checkpoint(root / "ckpt", model, {}, tok.to_str(), None)
    return export_bundle(ckpt, root / "bundle", progress=False), n_text


def test_generation_samples_only_ids_the_tokenizer_can_spell(padded_bundle):
    from gptedge.runtime import Model

    bundle, n_text = padded_bundle
    model = Model.load(bundle, provider="cpu", threads=1)
    assert model.spec.architecture.vocab_size == n_text + 37
    assert model.next_tokens("def f(x):", 1)[0][1] >= n_text  # the raw distribution does favour padding
    greedy = model.generate("def f(x):", max_new_tokens=12, temperature=0.0, stop_token_ids=())
    sampled = model.generate("def f(x):", max_new_tokens=12, temperature=1.5, seed=3, stop_token_ids=())
    batch = model.generate_batch(["def", "import os"], max_new_tokens=6, temperature=0.0, stop_token_ids=())
    for ids in [greedy.token_ids, sampled.token_ids, *(r.token_ids for r in batch)]:
        assert ids and max(ids) < n_text
