"""The seed's worked example end to end: train on Chinese text -> export -> quantize -> `next` table.

In the text the test writes, "我喜欢阅读技术博客" is followed by "的" 90% of the time, by "一" 8% and
by "了" 2%. After training, export and INT8 quantization, the runtime's next-token table must show
"的" first, with each of the top three probabilities within 0.05 of PyTorch's on the same checkpoint.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

PREFIX = "我喜欢阅读技术博客"
ENDINGS = {"的": ["的文章。", "的内容。", "的作者。", "的评论。"], "一": ["一整天。", "一会儿。"], "了": ["了。"]}
FILLER = ["他每天写代码。", "我们一起学习机器学习。", "今天天气很好。", "她在图书馆看书。", "周末我去公园散步。",
          "老师讲解了新的算法。", "这个模型运行在笔记本电脑上。", "小明喜欢踢足球。"]


def corpus(n_prefix: int = 300, seed: int = 0) -> str:
    rng = random.Random(seed)
    counts = {"的": int(n_prefix * 0.90), "一": int(n_prefix * 0.08)}
    counts["了"] = n_prefix - sum(counts.values())
    lines = [PREFIX + rng.choice(ENDINGS[first]) for first, n in counts.items() for _ in range(n)]
    lines += [rng.choice(FILLER) for _ in range(n_prefix)]
    rng.shuffle(lines)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory):
    import torch

    from gptedge.export.exporter import export_bundle
    from gptedge.quantize.quantizer import quantize_bundle
    from gptedge.train.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("worked")
    text = root / "blog.txt"
    text.write_text(corpus(), encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ckpt = train(TrainConfig(
            out=str(root / "ckpt"), data=[str(text)], preset="tiny", n_layer=2, n_head=2, n_embd=64, block_size=32,
            vocab_size=360, steps=250, batch_size=16, lr=3e-3, warmup=20, eval_every=0, cache_dir=str(root / "cache"),
            progress=False,
        ))
    finally:
        torch.set_num_threads(threads)
    fp32 = export_bundle(ckpt, root / "fp32", progress=False)
    int8 = quantize_bundle(fp32, root / "int8", method="int8-weight", eval_text=str(text), progress=False)
    return ckpt, int8


def test_next_token_table_matches_the_text_and_pytorch(pipeline):
    import torch

    from gptedge.runtime import Model
    from gptedge.train.checkpoint import load_checkpoint
    from gptedge.train.tokenizer import load_tokenizer

    ckpt, int8 = pipeline
    table = Model.load(int8, provider="cpu", threads=1).next_tokens(PREFIX, 3)
    assert [text for text, _, _ in table][0] == "的"
    assert {text for text, _, _ in table} == {"的", "一", "了"}

    model, _ = load_checkpoint(ckpt)
    ids = load_tokenizer(Path(ckpt) / "tokenizer.json").encode(PREFIX).ids
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids]))[0][0, -1].double(), dim=-1)
    for text, token_id, p in table:
        print(f"{text}  runtime int8 {p:.3f}  pytorch fp32 {float(probs[token_id]):.3f}")
        assert abs(p - float(probs[token_id])) <= 0.05, (text, p, float(probs[token_id]))
    assert table[0][2] > 0.75  # the model learned "的" is the usual continuation (0.9 in the text)
