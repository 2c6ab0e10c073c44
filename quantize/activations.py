"""What each weight MatMul sees on calibration text: the input Hessian H = X^T X per MatMul input.

The calibration-aware INT4 recipes (quantize.rounding: importance-weighted scale search, GPTQ) need, for
every projection, the inputs it multiplies on real text. The float graph is run on calibration windows with
each block MatMul's input added as a graph output (the graph in memory, the weights read from the bundle), through
the feeds the Engine builds (calibration.calibration_feeds); rows are accumulated into H in float64. The
diagonal of H / rows is the mean square activation per input channel (llama.cpp's imatrix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from gptedge.quantize.calibration import calibration_feeds
from gptedge.quantize.roles import GraphRoles
from gptedge.runtime.bundle import MODEL_NAME, BundleSpec
from gptedge.runtime.traits import TRAITS


class Hessians(dict):
    """MatMul input name -> H [K, K] float64 summed over `rows` calibration positions."""

    rows: int = 0

    def importance(self, name: str) -> np.ndarray:
        """Mean square activation per input channel [K]."""
        return np.diag(self[name]) / max(self.rows, 1)


def collect(model: onnx.ModelProto, roles: GraphRoles, folder: Path, spec: BundleSpec, windows: list[np.ndarray],
            on_window: Callable[[], None] | None = None) -> Hessians:
    """Run the float graph (model.onnx in `folder`) on `windows`; return H per block MatMul input."""
    import onnxruntime as ort

    graph = onnx.load(str(folder / MODEL_NAME), load_external_data=False)
    inputs = sorted({n.input[0] for n in model.graph.node if n.name in roles.block_matmuls})
    declared = {o.name for o in graph.graph.output}
    graph.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                              for name in inputs if name not in declared)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The graph goes in as bytes; its weights stay where they are, read from the source bundle's folder.
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=[TRAITS["cpu"].ort_name])
    hessians = Hessians()
    for feed in calibration_feeds(spec, windows):
        if spec.io.logits_index:  # the head's input is not collected: one position's logits are enough
            feed[spec.io.logits_index] = feed[spec.io.logits_index][:, -1:]
        values = session.run(inputs, feed)
        for name, value in zip(inputs, values):
            x = np.asarray(value, np.float32).reshape(-1, value.shape[-1])
            h = (x.T @ x).astype(np.float64)  # a window's sum in float32, the running total in float64
            hessians[name] = hessians[name] + h if name in hessians else h
        hessians.rows += int(np.prod(values[0].shape[:-1]))
        if on_window is not None:
            on_window()
    return hessians
