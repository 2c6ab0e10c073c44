"""Every head size exports, verifies and decodes like transformers, with an fp32 and an int8 KV cache.

onnxruntime's CPU GroupQueryAttention rotates q and k itself only for head sizes that are a multiple of 16;
a kernel change once made models with other head sizes (llama2.c's stories260K has 8) fail to export. Here a
random Llama of each head size goes through the real exporter, and the bundle's greedy tokens and logits are
held to transformers' own forward; then the same graph with an int8 cache (calibrated as `quantize --kv-cache
int8` does) must still give transformers' greedy tokens. The kernel each export chose is checked against the
provider's traits: the fused rotary where it runs, the graph's own rotation where it does not.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer  # noqa: E402

from gptedge.export.exporter import export_bundle  # noqa: E402
from gptedge.export.verify import session  # noqa: E402
from gptedge.quantize.kvcache import quantize_kv_cache  # noqa: E402
from gptedge.runtime.bundle import read_spec  # noqa: E402
from gptedge.runtime.engine import Engine  # noqa: E402
from gptedge.runtime.evaluate import greedy_decode  # noqa: E402
from gptedge.runtime.traits import TRAITS  # noqa: E402
from test_families import FAMILIES, save_family  # noqa: E402

HEAD_SIZES = [8, 24, 40, 64, 80, 96, 128]
# Llama at every size; Qwen3 (per-head q/k norms before the rotation) at the size its kernel cannot rotate.
CASES = [("llama", d) for d in HEAD_SIZES] + [("qwen3", 8)]
STEPS = 16
PROMPTS = ["def add(a, b):\n    return", "hello", "for i in range(10):"]


def _greedy(bundle: Path, spec, prompts: list[list[int]]) -> tuple[list[list[int]], list[np.ndarray]]:
    return greedy_decode(Engine(session(bundle / "model.onnx"), spec), prompts, STEPS, keep_logits=True)


def _int8_cache_copy(bundle: Path, dest: Path, windows: list[list[int]]):
    """A copy of `bundle` whose graph stores the cache as int8 (scales calibrated on `windows`), and its spec."""
    shutil.copytree(bundle, dest)
    spec = read_spec(dest)
    engine = Engine(session(dest / "model.onnx"), spec)
    record = quantize_kv_cache(dest / "model.onnx", spec, [np.array(w, np.int64) for w in windows], engine)
    return replace(spec, kv_cache=replace(spec.kv_cache, dtype="int8", quantization=record))


@pytest.mark.parametrize("family, head_dim", CASES, ids=[f"{f}-{d}" for f, d in CASES])
def test_head_size_exports_and_decodes_like_transformers(tmp_path: Path, family: str, head_dim: int) -> None:
    folder = save_family(tmp_path / "hf", family, seed=head_dim, num_hidden_layers=2, hidden_size=96,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, intermediate_size=96,
                         rope_scaling=None)
    bundle = export_bundle(folder, tmp_path / "bundle", progress=False)
    spec = read_spec(bundle)
    assert spec.architecture.head_dim == head_dim and spec.verification["greedy_match"]
    fused = TRAITS["cpu"].rotates_in_kernel(head_dim)
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 2
    rotary = {onnx.helper.get_attribute_value(a) for n in attention for a in n.attribute if a.name == "do_rotary"}
    assert rotary == ({1} if fused else set())  # the kernel rotates exactly where the traits say it can
    assert ("inside the kernel" in spec.provenance["attention_kernel"]) == fused

    reference = getattr(transformers, FAMILIES[family][1]).from_pretrained(folder).eval()
    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    prompts = [tok.encode(p).ids for p in PROMPTS]
    tokens, rows = _greedy(bundle, spec, prompts)
    for prompt, mine, logits in zip(prompts, tokens, rows):
        with torch.no_grad():
            theirs = reference(torch.tensor([prompt + mine])).logits[0].numpy()
        assert theirs[len(prompt) - 1: -1].argmax(-1).tolist() == mine
        assert np.abs(logits - theirs).max() <= 1e-4
    assert any(len(set(row)) > 3 for row in tokens)  # varied tokens: the comparison means something

    # The int8 cache, calibrated on the sequences it will hold (as quantize calibrates on text like the eval's).
    int8_spec = _int8_cache_copy(bundle, tmp_path / "kv8", [p + t for p, t in zip(prompts, tokens)])
    int8_tokens, int8_rows = _greedy(tmp_path / "kv8", int8_spec, prompts)
    for prompt, mine, logits in zip(prompts, int8_tokens, int8_rows):
        with torch.no_grad():
            theirs = reference(torch.tensor([prompt + mine])).logits[0].numpy()
        error = np.abs(logits - theirs).max()
        assert error <= 0.02 * np.abs(theirs).max()  # int8 rounding of the cache, not a wrong cache
        assert theirs[len(prompt) - 1: -1].argmax(-1).tolist() == mine


def test_benchmark_shapes_keep_the_fused_rotary() -> None:
    """The benchmarked Llama shapes (SmolLM2's 576 / 9 heads, the 124M Llama's 768 / 12: head size 64) and
    128-wide heads rotate inside the kernel."""
    for head_dim in (64, 128):
        assert TRAITS["cpu"].rotates_in_kernel(head_dim)
