"""The three onnxruntime.quantization tools the recipes call, with the settings gptedge relies on.

Each quantizes the blocks' weight MatMuls only (GraphRoles.block_matmuls): the LM head and embeddings
are handled by gptedge.quantize.surgery, attention and float MatMuls stay as exported. onnxruntime is
imported inside each function so `gptedge quantize --help` does not load it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx

from gptedge.quantize.roles import GraphRoles
from gptedge.quantize.surgery import remove_unused_initializers
from gptedge.runtime.traits import TRAITS


def quantize_weight_only(model: onnx.ModelProto, roles: GraphRoles, *, bits: int, block_size: int,
                         accuracy_level: int | None) -> onnx.ModelProto:
    """Blocks' weight MatMuls -> MatMulNBits (symmetric, `block_size` weights per scale)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with _quiet_ort_logs():
        quantizer = MatMulNBitsQuantizer(
            model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
            nodes_to_include=roles.block_matmuls, op_types_to_quantize=("MatMul",),
            nodes_to_exclude=[*roles.other_matmuls, *([roles.lm_head] if roles.lm_head else [])],
        )
        quantizer.process()
    result = quantizer.model.model
    remove_unused_initializers(result)
    return result


def quantize_dynamic_int8(model_path: Path, out_path: Path, roles: GraphRoles) -> None:
    """Blocks' weight MatMuls -> per-channel INT8 (MatMulInteger + DynamicQuantizeLinear)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_ort_logs():
        quantize_dynamic(
            model_path, out_path, op_types_to_quantize=["MatMul"], nodes_to_quantize=roles.block_matmuls,
            per_channel=True, reduce_range=False, weight_type=QuantType.QInt8, use_external_data_format=True,
            extra_options={"MatMulConstBOnly": True},
        )


def quantize_static_int8(model_path: Path, out_path: Path, roles: GraphRoles, feeds: Iterable[dict[str, np.ndarray]],
                         on_batch: Callable[[], None] | None = None) -> None:
    """Blocks' weight MatMuls -> QDQ INT8 (per-channel weights, MinMax activation ranges from `feeds`).

    Calibration runs on the CPU provider: the only one the static recipe targets (runtime/traits.py).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self):
            feed = next(self._it, None)
            if feed is not None and on_batch is not None:
                on_batch()
            return feed

    with _quiet_ort_logs():
        quantize_static(
            model_path, out_path, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
            nodes_to_quantize=roles.block_matmuls, per_channel=True, reduce_range=False,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, use_external_data_format=True,
            calibrate_method=CalibrationMethod.MinMax, calibration_providers=[TRAITS["cpu"].ort_name],
            extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True, "ActivationSymmetric": False},
        )


class _quiet_ort_logs:
    """ORT's quantization tools log every node at INFO and nag about pre-processing; keep the terminal readable."""

    def __enter__(self):
        self._levels = [(lg, lg.level) for lg in (logging.getLogger(), logging.getLogger("onnxruntime"))]
        for lg, _ in self._levels:
            lg.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc) -> None:
        for lg, level in self._levels:
            lg.setLevel(level)
