"""Shared fixtures. Training fixtures are named train_*."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

_TRAIN_MODULES = ["json/encoder.py", "json/decoder.py", "textwrap.py", "string.py", "bisect.py", "heapq.py"]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small matrices run fastest on one thread, and the machine is shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def train_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 90 KB of Python source (a few of this interpreter's stdlib modules) in one text file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    path = tmp_path_factory.mktemp("train-corpus") / "corpus.txt"
    path.write_text("".join((stdlib / m).read_text(encoding="utf-8") for m in _TRAIN_MODULES), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A token/tokenizer cache folder private to this test session."""
    return tmp_path_factory.mktemp("train-cache")


# ---------------------------------------------------------------------------------------------------------
# Runtime fixtures (runtime_*): one tiny random GPT, exported once per session with the real exporter.

RUNTIME_TEXTS = [
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Hello world! The quick brown fox jumps over the lazy dog.\n",
    "你好，世界。我们在测试中文和表情符号。😀🎉🚀 Ünïcödé ñ\n",
    "The runtime streams text that never splits a character: 你好 😀\n",
]


@pytest.fixture(scope="session", autouse=True)
def runtime_graph_cache(tmp_path_factory: pytest.TempPathFactory):
    """Point the optimized-graph cache at a private folder, so tests never touch ~/.cache/gptedge."""
    import os

    path = tmp_path_factory.mktemp("graph-cache")
    old = os.environ.get("GPTEDGE_CACHE")
    os.environ["GPTEDGE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("GPTEDGE_CACHE", None)
    else:
        os.environ["GPTEDGE_CACHE"] = old


def make_runtime_checkpoint(dest: Path, block_size: int = 128, seed: int = 0) -> Path:
    """A random-init GPT (weights scaled up so greedy output varies) + a byte-level BPE tokenizer, as a checkpoint."""
    import torch

    from gptedge.train.checkpoint import save_checkpoint
    from gptedge.train.model import GPT, GPTConfig
    from gptedge.train.tokenizer import train_tokenizer

    tok = train_tokenizer(RUNTIME_TEXTS * 4, 320)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4,
                          n_embd=64)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    return save_checkpoint(dest, model, {}, tok.to_str(), None)


@pytest.fixture(scope="session")
def runtime_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_runtime_checkpoint(tmp_path_factory.mktemp("runtime") / "ckpt")


@pytest.fixture(scope="session")
def runtime_bundle(runtime_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint exported by gptedge.export (target cpu, fp32, in-place KV, context 128)."""
    from gptedge.export.exporter import export_bundle

    return export_bundle(runtime_checkpoint, tmp_path_factory.mktemp("runtime") / "bundle", target="cpu",
                         progress=False)


@pytest.fixture(scope="session")
def runtime_gpt(runtime_checkpoint: Path):
    """The PyTorch model behind runtime_bundle (the reference for parity tests)."""
    from gptedge.train.checkpoint import load_checkpoint

    return load_checkpoint(runtime_checkpoint)[0]


@pytest.fixture(scope="session")
def runtime_model(runtime_bundle: Path):
    from gptedge.runtime import Model

    return Model.load(runtime_bundle, provider="cpu", threads=1)


def stdlib_text(dest: Path, chars: int, module: str = "textwrap.py") -> Path:
    """The first `chars` characters of a standard-library module as a held-out text file (never trained on)."""
    path = dest / "heldout.py"
    path.write_text((Path(sysconfig.get_paths()["stdlib"]) / module).read_text(encoding="utf-8")[:chars],
                    encoding="utf-8")
    return path
