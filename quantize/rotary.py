"""Rotary tables as nodes: the graph computes cos and sin [positions, D/2] from the D/2 inverse frequencies.

A rotary model's kernels read two tables, cos and sin of position x frequency for every position the
bundle serves. Stored, they are two float matrices in the file for a long-context model's every position;
computed by a Range, a Mul and a Cos / Sin over constant inputs, they cost nothing at run time (ONNX
Runtime folds constant subgraphs into initializers when it builds the session) and nothing on disk. The
values are the ones `gptedge.train.model.rope_tables` computes (float32 positions times float32
frequencies, then cos / sin, then the scaling's attention factor, then the export dtype), and every export
is verified against PyTorch after this rewrite, as before it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TABLES = ("rope_cos", "rope_sin")  # the exported graph's initializer names (gptedge.export.graph)
INV_FREQ = "rope_inv_freq"  # [1, D/2] float32, what the computed tables are made from


def compute_tables(model: onnx.ModelProto, inv_freq: np.ndarray, attention_factor: float = 1.0) -> bool:
    """Replace the stored tables with the nodes that compute them; False when the graph stores none (a model
    without rotary positions) or when they are not [positions, len(inv_freq)] (left as they are)."""
    graph = model.graph
    stored = {t.name: t for t in graph.initializer if t.name in TABLES}
    if len(stored) != len(TABLES):
        return False
    length, half = (int(d) for d in stored[TABLES[0]].dims)
    if half != len(inv_freq) or any(list(t.dims) != [length, half] for t in stored.values()):
        return False
    dtype = stored[TABLES[0]].data_type
    for table in stored.values():
        graph.initializer.remove(table)
    consts = {
        "rope.start": np.array(0.0, np.float32),
        "rope.limit": np.array(float(length), np.float32),
        "rope.delta": np.array(1.0, np.float32),
        "rope.axes": np.array([1], np.int64),
        INV_FREQ: np.asarray(inv_freq, np.float32).reshape(1, half),
    }
    if attention_factor != 1.0:
        consts["rope.attention_factor"] = np.array(attention_factor, np.float32)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    nodes = [
        helper.make_node("Range", ["rope.start", "rope.limit", "rope.delta"], ["rope.positions"], name="rope/Range"),
        helper.make_node("Unsqueeze", ["rope.positions", "rope.axes"], ["rope.column"], name="rope/Unsqueeze"),
        helper.make_node("Mul", ["rope.column", INV_FREQ], ["rope.angles"], name="rope/Mul"),  # [positions, D/2]
    ]
    for table, op in zip(TABLES, ("Cos", "Sin")):
        value = f"{table}.raw"
        nodes.append(helper.make_node(op, ["rope.angles"], [value], name=f"rope/{op}"))
        if attention_factor != 1.0:
            nodes.append(helper.make_node("Mul", [value, "rope.attention_factor"], [f"{table}.scaled"],
                                          name=f"rope/{op}/Mul"))
            value = f"{table}.scaled"
        if dtype == TensorProto.FLOAT:
            nodes.append(helper.make_node("Identity", [value], [table], name=f"rope/{op}/Identity"))
        else:
            nodes.append(helper.make_node("Cast", [value], [table], to=dtype, name=f"rope/{op}/Cast"))
    for node in reversed(nodes):  # first in the graph: they read only constants, everything else may read them
        graph.node.insert(0, node)
    return True


def table_width(model: onnx.ModelProto, name: str) -> int | None:
    """The last dim (D/2) of rotary table `name`, stored or computed by `compute_tables`; None if neither."""
    dims = {init.name: init.dims for init in model.graph.initializer if init.name in (name, INV_FREQ)}
    if name in dims:
        return int(dims[name][-1])
    return int(dims[INV_FREQ][-1]) if name in TABLES and INV_FREQ in dims else None
