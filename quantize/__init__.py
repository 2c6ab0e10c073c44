"""gptedge.quantize: INT8/INT4 recipes for a bundle, gated by a measured quality check (onnx + onnxruntime, no torch).

`quantize_bundle` is imported on first use, so `gptedge quantize --help` does not load onnx.
"""

from __future__ import annotations

from typing import Any

__all__ = ["quantize_bundle"]


def __getattr__(name: str) -> Any:
    if name == "quantize_bundle":
        from gptedge.quantize.quantizer import quantize_bundle

        return quantize_bundle
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
