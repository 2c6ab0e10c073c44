"""A decoder exported by Hugging Face Optimum runs through gptedge's Engine and sampler,
token for token like transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("optimum.exporters.onnx", reason="optimum-onnx is not installed")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from gptedge.errors import BundleError  # noqa: E402
from gptedge.runtime import Model  # noqa: E402
from gptedge.runtime.optimum import is_optimum_folder  # noqa: E402

TEXTS = ["Hello world! The quick brown fox jumps over the lazy dog.\n", "def add(a, b):\n    return a + b\n",
         "你好，世界。😀\n"]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    """A random tiny GPT-2 + byte-level tokenizer saved with save_pretrained, exported by optimum's main_export."""
    from optimum.exporters.onnx import main_export
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from gptedge.train.tokenizer import EOT, train_tokenizer

    root = tmp_path_factory.mktemp("optimum")
    tok = train_tokenizer(TEXTS * 4, 300)
    eos = tok.token_to_id(EOT)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=eos, eos_token_id=eos, initializer_range=0.2)
    model = GPT2LMHeadModel(config).eval()
    src = root / "hf"
    model.save_pretrained(src)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT).save_pretrained(src)
    out = root / "onnx"
    main_export(str(src), output=str(out), task="text-generation-with-past", device="cpu", do_validation=False)
    return src, out, model


def test_optimum_folder_is_detected_and_loaded(hf_models) -> None:
    _, out, model = hf_models
    assert is_optimum_folder(out)
    loaded = Model.load(out, provider="cpu")
    assert loaded.spec.kv_cache.update == "concat" and loaded.spec.io.logits_index is None
    assert loaded.spec.io.past_key == "past_key_values.{layer}.key"
    assert loaded.context_length == 64 and loaded.spec.architecture.n_layer == 2
    assert loaded.eos_id == model.config.eos_token_id


@pytest.mark.parametrize("prompt", ["Hello world!", "def add(a, b):", "你好"])
def test_optimum_greedy_equals_transformers(hf_models, prompt: str) -> None:
    _, out, model = hf_models
    loaded = Model.load(out, provider="cpu")
    ids = loaded.encode(prompt)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                             pad_token_id=model.config.eos_token_id)
    ref_new = ref[0, len(ids):].tolist()
    if ref_new and ref_new[-1] == loaded.eos_id:
        ref_new = ref_new[:-1]  # gptedge does not output the stop token
    result = loaded.generate(ids, temperature=0.0, max_new_tokens=24)
    assert result.token_ids == ref_new


def test_optimum_speculative_decoding_winds_the_concat_cache_back(hf_models) -> None:
    """A concat cache forgets rejected proposals from its arrays (not only its length): plain greedy tokens."""
    _, out, _ = hf_models
    loaded = Model.load(out, provider="cpu")
    kw = dict(temperature=0.0, max_new_tokens=30, stop_token_ids=())
    for prompt in ["Hello world! The quick brown fox. Hello world!", "def add(a, b):"]:
        plain = loaded.generate(prompt, **kw)
        for how in ("lookup", loaded):
            fast = loaded.generate(prompt, speculative=how, **kw)
            assert fast.token_ids == plain.token_ids


def test_optimum_next_tokens_and_batch(hf_models) -> None:
    _, out, model = hf_models
    loaded = Model.load(out, provider="cpu")
    ids = loaded.encode("The quick brown fox")
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
    rows = loaded.next_tokens(ids, 3)
    assert [r[1] for r in rows] == torch.topk(probs, 3).indices.tolist()
    prompts = ["Hello world!", "x", "def add(a, b):"]
    kw = dict(temperature=0.0, max_new_tokens=10, stop_token_ids=())
    assert ([r.token_ids for r in loaded.generate_batch(prompts, **kw)]
            == [loaded.generate(p, **kw).token_ids for p in prompts])


def test_optimum_folder_without_tokenizer_is_refused(hf_models, tmp_path: Path) -> None:
    import shutil

    _, out, _ = hf_models
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json"):
        Model.load(copy)
