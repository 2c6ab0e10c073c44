"""Check an untrusted model.onnx before onnxruntime touches it, without the `onnx` package.

A model file names its external weight files by relative path and declares each
tensor's shape. A hostile file can point those paths outside the bundle folder
(reading any file the user can read) or declare shapes that would need
terabytes. This module walks the protobuf wire format directly (the runtime does
not depend on `onnx`) and refuses both before any allocation happens.

It also reads what a bundle's gptedge.json must agree with, so that check runs before a session
exists too: the graph's declared inputs and outputs (ValueInfoProto: name 1, type 2 -> tensor_type 1
-> shape 2 -> dim 1 -> dim_value 1 | dim_param 2) and the tables its top-level Gather nodes index with
the graph input `position_ids` (NodeProto: input 1, op_type 4).

Only the fields that can hold tensors are followed:
ModelProto.graph(7), .functions(25) -> GraphProto.node(1), .initializer(5), .sparse_initializer(15);
NodeProto.attribute(5) -> AttributeProto.t(5), .g(6), .tensors(10), .graphs(11),
.sparse_tensor(22), .sparse_tensors(23);
FunctionProto.node(7); SparseTensorProto.values(1), .indices(2);
TensorProto.dims(1), .data_type(2), .name(8), .raw_data(9), .external_data(13), .data_location(14).
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

from gptedge.errors import BundleError

# ONNX TensorProto.DataType -> bits per element (strings are variable: None).
_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 8: None, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64,
         14: 64, 15: 128, 16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4}


@dataclass
class TensorInfo:
    name: str = ""
    dims: list[int] = field(default_factory=list)
    data_type: int = 0
    raw_bytes: int = 0  # length of inline raw_data
    encoded_bytes: int = 0  # length of the whole TensorProto message (bounds what typed inline data can hold)
    external: dict[str, str] = field(default_factory=dict)  # location, offset, length

    @property
    def nbytes(self) -> int | None:
        bits = _BITS.get(self.data_type)
        if bits is None:
            return None
        count = 1
        for d in self.dims:
            count *= d
        return (count * bits + 7) // 8


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise BundleError("model.onnx is truncated or not an ONNX file; re-export or re-copy the bundle")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise BundleError("model.onnx has a malformed field; it is not a valid ONNX file")


def _fields(buf: memoryview):
    """Yield (field_number, wire_type, value) where value is an int or a memoryview slice."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise BundleError("model.onnx is truncated or not an ONNX file; re-export or re-copy the bundle")
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise BundleError(f"model.onnx uses protobuf wire type {wire}, which ONNX never writes; "
                              "it is not a valid model")
        if pos > end:
            raise BundleError("model.onnx is truncated or not an ONNX file; re-export or re-copy the bundle")
        yield number, wire, value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _tensor(buf: memoryview) -> TensorInfo:
    info = TensorInfo(encoded_bytes=len(buf))
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 0:
            info.dims.append(_signed64(value))
        elif number == 1 and wire == 2:  # packed dims
            pos = 0
            while pos < len(value):
                d, pos = _varint(value, pos)
                info.dims.append(_signed64(d))
        elif number == 2 and wire == 0:
            info.data_type = value
        elif number == 8 and wire == 2:
            info.name = bytes(value).decode("utf-8", "replace")
        elif number == 9 and wire == 2:
            info.raw_bytes = len(value)
        elif number == 13 and wire == 2:
            entry = {n: bytes(v).decode("utf-8", "replace") for n, w, v in _fields(value) if w == 2}
            info.external[entry.get(1, "")] = entry.get(2, "")
    return info


@dataclass
class GraphScan:
    """What the scan read: every tensor (checked), the graph's declared inputs / outputs, and position tables."""

    tensors: list[TensorInfo] = field(default_factory=list)
    inputs: dict[str, list] = field(default_factory=dict)  # name -> dims (ints, or strings for symbolic axes)
    outputs: dict[str, list] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)  # input / output name -> element type (TensorProto enum)
    gathers: list[tuple[str, str]] = field(default_factory=list)  # (table, indices) of top-level Gather nodes

    def gathered_by(self, indices: str) -> list[list[int]]:
        """Dims of the initializers a top-level Gather indexes with `indices`
        (a position table has one row a position)."""
        dims = {t.name: t.dims for t in self.tensors}
        return [dims[table] for table, idx in self.gathers if idx == indices and table in dims]


def _value_info(buf: memoryview) -> tuple[str, list, int]:
    """(name, dims, element type: onnx.TensorProto's enum, 0 when undeclared) of a graph input or output."""
    name, dims, elem = "", [], 0
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 2:
            name = bytes(value).decode("utf-8", "replace")
        elif number == 2 and wire == 2:  # TypeProto
            for n1, w1, tensor_type in _fields(value):
                if n1 == 1 and w1 == 2:
                    for n2, w2, field_value in _fields(tensor_type):
                        if n2 == 1 and w2 == 0:
                            elem = field_value
                        elif n2 == 2 and w2 == 2:
                            dims = [_dim(d) for n3, w3, d in _fields(field_value) if n3 == 1 and w3 == 2]
    return name, dims, elem


def _dim(buf: memoryview) -> int | str:
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 0:
            return _signed64(value)
        if number == 2 and wire == 2:
            return bytes(value).decode("utf-8", "replace")
    return "?"


def _node(buf: memoryview) -> tuple[str, list[str]]:
    op, inputs = "", []
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 2:
            inputs.append(bytes(value).decode("utf-8", "replace"))
        elif number == 4 and wire == 2:
            op = bytes(value).decode("utf-8", "replace")
    return op, inputs


def _walk_main_graph(buf: memoryview, scan: GraphScan) -> None:
    for number, wire, value in _fields(buf):
        if number == 7 and wire == 2:  # ModelProto.graph
            for n, w, v in _fields(value):
                if w != 2:
                    continue
                if n in (11, 12):  # GraphProto.input / output
                    name, dims, elem = _value_info(v)
                    (scan.inputs if n == 11 else scan.outputs)[name] = dims
                    scan.types[name] = elem
                elif n == 1:
                    op, inputs = _node(v)
                    if op == "Gather" and len(inputs) >= 2:
                        scan.gathers.append((inputs[0], inputs[1]))


def _walk(buf: memoryview, kind: str, out: list[TensorInfo]) -> None:
    for number, wire, value in _fields(buf):
        if wire != 2:
            continue
        child = {
            "model": {7: "graph", 25: "function"},
            "graph": {1: "node", 5: "tensor", 15: "sparse"},
            "function": {7: "node"},
            "node": {5: "attribute"},
            "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
            "sparse": {1: "tensor", 2: "tensor"},
        }[kind].get(number)
        if child == "tensor":
            out.append(_tensor(value))
        elif child is not None:
            _walk(value, child, out)


def scan_model(model_path: str | os.PathLike[str], max_bytes: int = 1 << 40) -> list[TensorInfo]:
    """Return every tensor the model declares, after refusing unsafe or impossible ones (see scan_graph)."""
    return scan_graph(model_path, max_bytes).tensors


def scan_graph(model_path: str | os.PathLike[str], max_bytes: int = 1 << 40) -> GraphScan:
    """Every tensor the model declares, its graph inputs / outputs and Gathers,
    after refusing unsafe or impossible ones.

    Refuses: external data outside the model's folder or missing; an external range past the end of
    its file; inline or external data whose size disagrees with the declared shape; any tensor whose
    declared size exceeds `max_bytes` or negative dimensions.
    """
    model_path = Path(model_path)
    folder = model_path.resolve().parent
    if not model_path.is_file() or model_path.stat().st_size == 0:
        raise BundleError(f"{model_path} is missing or empty; re-export or re-copy the bundle")
    problem = None
    scan = GraphScan()
    with open(model_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            _walk(view, "model", scan.tensors)
            _walk_main_graph(view, scan)
        except BundleError as exc:
            # Raise after the mmap is closed: the traceback's frames hold slices of it, and closing an
            # mmap with live slices raises BufferError, which would hide this message.
            problem = str(exc)
        finally:
            view.release()
    if problem is not None:
        raise BundleError(problem)
    for t in scan.tensors:
        _check_tensor(t, folder, max_bytes)
    return scan


def _check_tensor(t: TensorInfo, folder: Path, max_bytes: int) -> None:
    label = t.name or "<unnamed>"
    if any(d < 0 for d in t.dims):
        raise BundleError(f"model.onnx tensor {label} declares a negative dimension {t.dims}; "
                          "refusing a corrupt or hostile model")
    expected = t.nbytes
    if expected is not None and expected > max_bytes:
        raise BundleError(f"model.onnx tensor {label} declares shape {t.dims} ({expected / 2**30:.0f} GiB); "
                          "refusing to load it")
    if t.raw_bytes and expected is not None and t.raw_bytes != expected:
        raise BundleError(f"model.onnx tensor {label}: {t.raw_bytes} bytes stored for a declared {expected}; "
                          "the model is corrupt")
    if not t.raw_bytes and not t.external and math.prod(t.dims) > 2 * t.encoded_bytes:
        # Typed inline data (float_data, int64_data...) takes at least half a byte per element (4-bit types).
        raise BundleError(f"model.onnx tensor {label} declares shape {t.dims} but stores {t.encoded_bytes} bytes "
                          "inline; refusing a corrupt or hostile model")
    if not t.external:
        return
    location = t.external.get("location", "")
    target = (folder / location).resolve()
    if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
        raise BundleError(f"model.onnx tensor {label} reads external data from {location!r}, "
                          "outside the bundle folder; refusing an unsafe model")
    if not target.is_file():
        raise BundleError(f"model.onnx needs external data file {location!r}, which is missing; "
                          "copy the whole bundle folder")
    try:
        offset = int(t.external.get("offset", "0") or 0)
        length = int(t.external["length"]) if t.external.get("length") else (expected or 0)
    except ValueError as exc:
        raise BundleError(f"model.onnx tensor {label} has a malformed external-data offset or length") from exc
    if expected is not None and length != expected:
        raise BundleError(f"model.onnx tensor {label}: external length {length} disagrees with its declared shape "
                          f"{t.dims}; the model is corrupt")
    if offset < 0 or offset + length > target.stat().st_size:
        raise BundleError(f"model.onnx tensor {label} reads past the end of {location!r}; "
                          "the external data file is truncated, re-copy the bundle")
