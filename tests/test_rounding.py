"""The rounding recipes' parts, each held to the property it is chosen for, and the int4 ladder end to end.

On correlated inputs (real activations are), GPTQ's error feedback keeps the layer's output closer than the
best per-block rounding, which beats round-to-nearest; importance-weighted search rounds the channels that
carry the most energy more carefully. The int4 ladder stops at the first rung that passes and records them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import stdlib_text
from gptedge.quantize import quantize_bundle
from gptedge.quantize import rounding as R
from gptedge.runtime.bundle import read_spec

RNG = np.random.default_rng(0)
W = (RNG.standard_normal((96, 128)) * 0.05).astype(np.float32)
# Correlated inputs whose channels differ in scale, as a transformer's do
X = (RNG.standard_normal((4096, 16)) @ RNG.standard_normal((16, 128)) * np.linspace(0.2, 3.0, 128)).astype(np.float32)
H = (X.T @ X).astype(np.float64)


def _weighted(w, q, importance):
    return float((importance * (q.dequantize() - w) ** 2).sum())


def test_search_beats_round_to_nearest_and_importance_weights_what_matters() -> None:
    importance = np.diag(H) / len(X)
    for bits, symmetric in ((4, False), (4, True), (8, True)):
        rtn = R.round_to_nearest(W, bits, symmetric=symmetric)
        found = R.searched(W, bits, symmetric=symmetric)
        weighted = R.searched(W, bits, symmetric=symmetric, importance=importance)
        assert np.mean((found.dequantize() - W) ** 2) < np.mean((rtn.dequantize() - W) ** 2)
        assert _weighted(W, weighted, importance) <= _weighted(W, found, importance)


def test_gptq_keeps_the_output_closest() -> None:
    errors = {name: R.output_error(W, q, H) for name, q in (
        ("rtn", R.round_to_nearest(W, 4, symmetric=False)), ("searched", R.searched(W, 4)),
        ("gptq", R.gptq(W, H, 4)), ("gptq act-order", R.gptq(W, H, 4, act_order=True)))}
    assert errors["gptq"] < errors["searched"] < errors["rtn"]
    assert errors["gptq act-order"] < errors["searched"]


def test_blocks_hold_what_the_kernel_computes() -> None:
    """Integers in range, integer zero points, and a last partial block (a width of 100 in blocks of 32) padded."""
    w = W[:, :100]
    q = R.searched(w, 4)
    assert q.shape == (96, 100) and q.packed.shape == (96, 4, 16) and q.zeros.dtype == np.uint8
    assert q.zeros.max() <= 15 and q.zero_points().shape == (96, 2)
    values = np.stack([q.packed & 15, q.packed >> 4], axis=-1).reshape(96, 4, 32).astype(np.float32)
    by_hand = ((values - q.zeros[..., None]) * q.scales[..., None]).reshape(96, 128)[:, :100]
    assert np.array_equal(q.dequantize(), by_hand)  # (q - z) * d, low nibble first: what MatMulNBits computes
    assert np.mean((by_hand - w) ** 2) < 0.02 * np.mean(w ** 2)
    with pytest.raises(ValueError, match="whole blocks"):
        R.gptq(w, H[:100, :100], 4)


def test_int4_ladder_stops_at_the_first_rung_that_passes(runtime_bundle: Path, tmp_path: Path) -> None:
    held = stdlib_text(tmp_path, 20000)
    out = quantize_bundle(runtime_bundle, tmp_path / "q", method="int4", eval_text=held, progress=False,
                          log=lambda _: None)
    q = read_spec(out).quantization
    assert q["method"] == "int4" and q["bits"] == 4 and q["symmetric"] is False
    assert q["lm_head"]["bits"] == 8 and q["rounding"]["method"] == "GPTQ with act-order"
    assert q["ladder"][-1]["passed"] and not any(rung["passed"] for rung in q["ladder"][:-1])
    assert q["quality"]["max_ppl_increase_pct"] == 5.0 and q["ladder"][0]["candidate"].endswith("blocks of 64")
