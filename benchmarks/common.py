"""Shared pieces of the benchmark scripts: the workload, model folders, and process measurements.

The workload follows the peer measurements the project started from, so that rows are
comparable with the peers measured there: batch 1, a 128-token prompt of random
ids from numpy.random.default_rng(0), exactly 128 new greedy tokens (EOS
ignored), 2 intra-op threads everywhere, each row in a fresh process.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

HERE = Path(__file__).resolve().parent
THREADS = 2
PROMPT_LEN = 128
NEW_TOKENS = 128
LONG_POSITION = 900  # decode speed is measured again around this position
LONG_NEW_TOKENS = 32


def pin_threads(threads: int = THREADS) -> None:
    """Same thread counts for every library, set before any of them is imported."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def prompt_ids(length: int, vocab_size: int, seed: int = 0) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab_size - 1, length).tolist()


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """VmHWM: this process's own peak. (ru_maxrss is not: Linux carries the parent's peak across fork+exec,
    so every row started by the orchestrator would report the orchestrator's peak.)"""
    return _status_mb("VmHWM")


def rss_mb() -> float:
    return _status_mb("VmRSS")


@dataclass
class Timed:
    tokens: list[int]
    times: list[float]  # perf_counter after each token became available
    start: float

    @property
    def ttft_ms(self) -> float:
        return (self.times[0] - self.start) * 1000

    @property
    def decode_tps(self) -> float:
        n = len(self.times)
        return (n - 1) / (self.times[-1] - self.times[0]) if n > 1 else float("nan")

    def per_token_tps(self) -> list[float]:
        return [1.0 / (b - a) for a, b in zip(self.times, self.times[1:])]


def timed(stream: Callable[[], Iterable[int]]) -> Timed:
    """Run a token-id generator, stamping each id as it arrives.

    Peers whose API is not an iterator (HF generate, gptedge's on_token callback) hand over ids that
    carry a `stamp` attribute: the moment the id was really chosen, which is used instead.
    """
    start = time.perf_counter()
    tokens, times = [], []
    for token in stream():
        times.append(getattr(token, "stamp", None) or time.perf_counter())
        tokens.append(int(token))
    return Timed(tokens, times, start)


def files_mb(paths: Iterable[Path]) -> float:
    return sum(p.stat().st_size for p in paths if p.is_file()) / 1e6


# The instruction sets that decide which kernels onnxruntime (MLAS) and llama.cpp (ggml) pick on x86.
SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512vbmi",
              "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
VERSIONED = ("gptedge", "numpy", "onnxruntime", "onnxruntime-genai", "tokenizers", "torch", "transformers",
             "optimum-onnx", "llama-cpp-python")


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())


def cpu_flags() -> list[str]:
    """The SIMD flags (SIMD_FLAGS) this CPU advertises, from /proc/cpuinfo."""
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return []
    have = set(line.split(":", 1)[1].split())
    return [f for f in SIMD_FLAGS if f in have]


def versions() -> dict[str, str]:
    """Installed versions of the libraries a result depends on (read, never typed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    """Where a result was measured: recorded in every results file (`machine` is the one-line form)."""
    return {"machine": f"{cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cpus": os.cpu_count(), "threads": THREADS,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions()}


def emit(result: dict) -> None:
    """Rows report one JSON line on stdout, last, for the orchestrator to read."""
    sys.stdout.write("ROW " + json.dumps(result) + "\n")
    sys.stdout.flush()


# -- model folders ----------------------------------------------------------------------------

GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
# Llama-family shapes on random weights: (a) sized like GPT-2 124M, (b) SmolLM2-135M's own shape.
LLAMA_SHAPES = {
    "llama-124m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                       intermediate_size=3072, vocab_size=50257, max_position_embeddings=1024,
                       tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=1024,
                         tie_word_embeddings=True, rope_theta=100000.0),
}


def context_of(config) -> int:
    """The trained context of a transformers config, GPT-2 or Llama naming."""
    return getattr(config, "n_positions", None) or config.max_position_embeddings


def synthetic_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of exactly `vocab_size` entries (last one <|endoftext|>).

    It exists because converters demand a tokenizer; benchmarks feed token ids. Merges are byte
    pairs, so every merged token is a valid two-symbol string of the byte alphabet.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = []
    for a in alphabet:
        for b in alphabet:
            if len(vocab) >= vocab_size - 1:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def save_hf_tokenizer(tok, folder: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(folder)


def make_random_gpt2(folder: Path, seed: int = 0, **shape) -> Path:
    """A random-init GPT-2 (torch.manual_seed(seed)) saved with save_pretrained, as the peers were measured."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if (folder / "config.json").exists():
        return folder
    shape = {**GPT2_SMALL, **shape}
    torch.manual_seed(seed)
    eos = shape["vocab_size"] - 1
    config = GPT2Config(**shape, bos_token_id=eos, eos_token_id=eos)
    model = GPT2LMHeadModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_ctx"] = shape["n_positions"]  # llama.cpp's converter reads it
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    save_hf_tokenizer(synthetic_tokenizer(shape["vocab_size"]), folder)
    return folder


def make_random_llama(folder: Path, shape: dict, seed: int = 0) -> Path:
    """A random-init LlamaForCausalLM (torch.manual_seed(seed)) saved with save_pretrained + a synthetic tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(seed)
    eos = shape["vocab_size"] - 1
    model = LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=eos, eos_token_id=eos)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    save_hf_tokenizer(synthetic_tokenizer(shape["vocab_size"]), folder)
    return folder


def gptedge_checkpoint_to_hf(checkpoint: Path, folder: Path) -> Path:
    """Write a gptedge checkpoint as a Hugging Face GPT-2 folder, so the peers can run the same weights."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    from transformers import GPT2Config

    from gptedge.train.checkpoint import load_checkpoint

    if (folder / "config.json").exists():
        return folder
    model, _ = load_checkpoint(checkpoint)
    c = model.config
    if not c.bias:
        raise SystemExit("the peers' GPT-2 code needs biases; benchmark a checkpoint trained with bias=True")
    sd = model.state_dict()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    hf = {}
    for name, tensor in sd.items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        hf[name] = tensor.t().contiguous() if name.endswith(conv1d) else tensor.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(hf, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    config = GPT2Config(
        n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, vocab_size=c.vocab_size, n_positions=c.block_size,
        activation_function="gelu_new" if c.gelu_approximate == "tanh" else "gelu",
        layer_norm_epsilon=c.layer_norm_epsilon, bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True,
    )
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_ctx"] = c.block_size
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    save_hf_tokenizer(tok, folder)
    del torch
    return folder
