"""Fine-tuning a model gptedge imports: chat data, LoRA and full training, one verified bundle at the end.

The proof that it learns: a small Llama-family Hugging Face folder (random init, its own ChatML template) is
taught a made-up fact from a few dozen paraphrased conversations; before, a held-out paraphrase is not answered
with it; after, the exported and INT8-quantized bundle answers it. Both LoRA and full fine-tuning, in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from finetune_data import HELD_OUT, conversations, write_chats  # noqa: E402
from gptedge.errors import DataError, UsageError  # noqa: E402
from gptedge.export.exporter import export_bundle  # noqa: E402
from gptedge.quantize.quantizer import quantize_bundle  # noqa: E402
from gptedge.runtime import Model  # noqa: E402
from gptedge.train.trainer import TrainConfig, train  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random Llama-family folder with a byte-level BPE, ChatML special tokens and a chat template."""
    folder = tmp_path_factory.mktemp("base")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [json.dumps(r) for r in conversations()] + [HELD_OUT, "The quick brown fox jumps over the lazy dog."]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                      special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    end = tok.token_to_id("<|im_end|>")
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   bos_token_id=0, eos_token_id=end, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": "<|endoftext|>"}))
    return folder


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_chats(tmp_path_factory.mktemp("data") / "chats.jsonl", conversations())


def answer(bundle: Path) -> str:
    model = Model.load(bundle, provider="cpu", threads=1)
    return model.chat([{"role": "user", "content": HELD_OUT}], temperature=0, max_new_tokens=16).text


def finetune(base: Path, chats: Path, out: Path, **options) -> Path:
    settings = dict(steps=60, batch_size=8, block_size=64, eval_every=0, eval_batches=1, warmup=5, threads=1,
                    progress=False, cache_dir=str(out.parent / "cache"))
    config = TrainConfig(out=str(out), data=[str(chats)], init_from=str(base), **{**settings, **options})
    return train(config, log=lambda m: None)


@pytest.mark.parametrize("options", [dict(lr=3e-3), dict(lora_rank=8, lora_alpha=32.0, lr=1e-2)],
                         ids=["full", "lora"])
def test_fine_tuning_teaches_a_fact_that_the_int8_bundle_answers(base: Path, chats: Path, tmp_path: Path,
                                                                  options: dict) -> None:
    before = export_bundle(base, tmp_path / "before", progress=False)
    assert "Blimpton" not in answer(before)
    run = finetune(base, chats, tmp_path / "run", **options)
    meta = json.loads((run / "config.json").read_text())
    assert meta["source"]["chat_template"] == CHATML and meta["source"]["kind"] == "huggingface-llama"
    if "lora_rank" in options:
        assert meta["lora"]["rank"] == 8 and (run / "adapter.safetensors").stat().st_size < 200_000
    fp32 = export_bundle(run, tmp_path / "fp32", progress=False)  # adapters merged, verified against PyTorch
    int8 = quantize_bundle(fp32, tmp_path / "int8", "int8", eval_text=chats.read_text(), progress=False)
    assert "Blimpton" in answer(int8)
    spec = json.loads((int8 / "gptedge.json").read_text())
    assert spec["special_tokens"]["eos_id"] == Tokenizer.from_file(str(base / "tokenizer.json")).token_to_id(
        "<|im_end|>")


def test_adapters_load_back_onto_their_base_and_refuse_another(base: Path, chats: Path, tmp_path: Path) -> None:
    first = finetune(base, chats, tmp_path / "a", lora_rank=4, lr=1e-2, steps=5)
    more = finetune(base, chats, tmp_path / "b", adapter=str(first / "adapter.safetensors"), lr=1e-2, steps=5)
    assert json.loads((more / "config.json").read_text())["lora"]["rank"] == 4
    with pytest.raises(UsageError, match="was trained with rank 4"):
        finetune(base, chats, tmp_path / "c", adapter=str(first / "adapter.safetensors"), lora_rank=8, steps=1)


def test_a_lora_run_resumes_exactly(base: Path, chats: Path, tmp_path: Path) -> None:
    """Stopped half-way and resumed, a LoRA run ends where the uninterrupted run ends: the same adapters (the only
    weights that train), the same losses, the same optimizer state; the frozen base stays the imported weights."""
    from safetensors.torch import load_file

    from gptedge.train.checkpoint import load_trainer_state
    from gptedge.train.trainer import iter_metrics

    options = dict(lora_rank=4, lora_alpha=8.0, lr=1e-2, steps=8, eval_every=3)
    full = finetune(base, chats, tmp_path / "full", **options)
    half = finetune(base, chats, tmp_path / "half", stop_after=5, **options)
    assert json.loads((half / "config.json").read_text())["step"] == 5
    resumed = train(TrainConfig(out=str(half), resume=str(half), threads=1, progress=False,
                                cache_dir=str(tmp_path / "cache")), log=lambda m: None)
    a, b = load_file(str(full / "adapter.safetensors")), load_file(str(resumed / "adapter.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert any(v.abs().max().item() > 0 for k, v in b.items() if "lora_b" in k.lower())  # the adapters did train
    loss = lambda f: [r["loss"] for r in iter_metrics(f) if "loss" in r]  # noqa: E731
    assert loss(full) == loss(resumed) and len(loss(full)) == 8
    sa, sb = load_trainer_state(full), load_trainer_state(resumed)
    assert sa["sampler"] == sb["sampler"]
    assert all(torch.equal(sa["optimizer"]["state"][i]["exp_avg_sq"], sb["optimizer"]["state"][i]["exp_avg_sq"])
               for i in sa["optimizer"]["state"])
    assert len(sb["optimizer"]["state"]) == len(a)  # the optimizer holds the adapters alone, not the frozen base


@pytest.mark.parametrize("line, message", [
    ("{oops", "chats.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "chats.jsonl:2: the conversation has no assistant turn"),
    ('{"messages": [{"role": "user", "content": "' + "word " * 80 + '"}, {"role": "assistant", "content": "ok"}]}',
     "chats.jsonl:2: this example is .* tokens, longer than the training window of 64"),
])
def test_chat_data_that_does_not_fit_names_the_line(base: Path, tmp_path: Path, line: str, message: str) -> None:
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps(conversations()[0]) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        finetune(base, data, tmp_path / "run", steps=1)


def test_a_gguf_file_fine_tunes_like_its_folder(base: Path, chats: Path, tmp_path: Path) -> None:
    """A Q8_0 GGUF of the same model (dequantized by the GGUF reader) starts a LoRA run; its template and stop
    token come from the file's metadata."""
    pytest.importorskip("gguf")
    from gguf_util import write_gguf

    model = transformers.LlamaForCausalLM.from_pretrained(base)
    gguf_path = tmp_path / "base.gguf"
    write_gguf(model, Tokenizer.from_file(str(base / "tokenizer.json")), gguf_path, "llama", "Q8_0",
               eot="<|im_end|>", chat_template=CHATML)
    run = finetune(gguf_path, chats, tmp_path / "run", lora_rank=8, lora_alpha=32.0, lr=1e-2)
    meta = json.loads((run / "config.json").read_text())
    assert meta["source"]["kind"] == "gguf-llama" and meta["source"]["chat_template"] == CHATML
    assert "Blimpton" in answer(export_bundle(run, tmp_path / "fp32", progress=False))
