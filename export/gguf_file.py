"""A GGUF file, read as untrusted input: every count, length, offset and size is checked before it is used.

GGUF (llama.cpp's format, version 2 or 3, little-endian): a header (magic, version, tensor and key counts),
typed key/value metadata, one info record per tensor (name, dims, type, offset), padding to the alignment,
then the tensor data. The `gguf` package (llama.cpp's own) gives the type table, the block sizes and the
numpy dequantizers; its reader trusts the file (it loops over a declared array length and reads past the
end as empty arrays), so the header is walked here, with each step bounded by the bytes left. The data is
then memory-mapped: a tensor is a read-only view into the file, and nothing is copied until it is used.

Anything malformed is a `GGUFError` naming the problem in one line; the memory used is bounded by the size
of the file's header, whatever its counts claim.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptedge.errors import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml tensors have at most four dimensions
MAX_NESTING = 2  # arrays of arrays appear in the wild (an array of token-type arrays); deeper is not GGUF
# Value types: id -> (name, struct format); strings (8) and arrays (9) are read by hand.
SCALARS = {0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"), 4: ("uint32", "<I"),
           5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"), 10: ("uint64", "<Q"), 11: ("int64", "<q"),
           12: ("float64", "<d")}
STRING, ARRAY = 8, 9
# Scalar arrays are read in one numpy call; their element dtypes:
ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
                11: "<i8", 12: "<f8"}


class GGUFError(CheckpointError):
    """A GGUF file is malformed, truncated or holds something gptedge cannot import."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the innermost (contiguous) dimension
    type_id: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        """Row-major shape, outermost first ([rows, columns] for a matrix stored as ggml's [columns, rows])."""
        return tuple(reversed(self.shape))


class GGUFFile:
    """The metadata and tensor table of one GGUF file, checked; tensor data as views into the mapped file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, 2)
                if size == 0:
                    raise GGUFError(f"{self.path} is empty; it is not a GGUF file")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise GGUFError(f"{self.path} cannot be read ({exc.strerror or exc}); check the path") from exc
        self.size = size
        self._pos = 0
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._read_header()

    # -- bounded primitives ----------------------------------------------------------------------
    def _fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}; the file is damaged or not a GGUF model")

    def _take(self, n: int, what: str) -> memoryview:
        if n < 0 or self._pos + n > self.size:
            raise self._fail(f"{what} at byte {self._pos} runs past the end of the file ({self.size} bytes)")
        view = memoryview(self._map)[self._pos:self._pos + n]
        self._pos += n
        return view

    def _unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self._take(struct.calcsize(fmt), what))[0]

    def _string(self, what: str) -> str:
        length = self._unpack("<Q", f"the length of {what}")
        raw = self._take(length, f"{what} ({length} bytes)")
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self._fail(f"{what} at byte {self._pos - length} is not UTF-8") from None

    def _value(self, type_id: int, key: str, depth: int = 0) -> Any:
        if type_id in SCALARS:
            return self._unpack(SCALARS[type_id][1], f"the value of {key!r}")
        if type_id == STRING:
            return self._string(f"the value of {key!r}")
        if type_id != ARRAY:
            raise self._fail(f"metadata key {key!r} has unknown value type {type_id}")
        if depth >= MAX_NESTING:
            raise self._fail(f"metadata key {key!r} nests arrays more than {MAX_NESTING} deep")
        item = self._unpack("<I", f"the element type of {key!r}")
        count = self._unpack("<Q", f"the length of {key!r}")
        if item in ARRAY_DTYPES:  # one bounded read for the whole array
            dtype = np.dtype(ARRAY_DTYPES[item])
            if count > (self.size - self._pos) // dtype.itemsize:
                raise self._fail(f"array {key!r} claims {count} elements, more than the file holds")
            values = np.frombuffer(self._take(count * dtype.itemsize, f"array {key!r}"), dtype).copy()
            return values.astype(bool) if item == 7 else values
        # Strings and arrays take at least 8 bytes each: a count the rest of the file cannot hold is refused at once.
        if item not in (STRING, ARRAY) or count > (self.size - self._pos) // 8:
            raise self._fail(f"array {key!r} has element type {item} and claims {count} elements, "
                             "more than the file holds" if item in (STRING, ARRAY) else
                             f"array {key!r} has unknown element type {item}")
        return [self._value(item, key, depth + 1) for _ in range(count)]

    # -- the header ------------------------------------------------------------------------------
    def _read_header(self) -> None:
        if bytes(self._take(4, "the magic number")) != MAGIC:
            raise GGUFError(f"{self.path} does not start with the GGUF magic; it is not a GGUF file")
        version = self._unpack("<I", "the version")
        if version not in VERSIONS:
            detail = " (big-endian files are not supported)" if version & 0xFFFF == 0 else ""
            raise self._fail(f"GGUF version {version} is not supported{detail}; gptedge reads versions 2 and 3")
        tensor_count = self._unpack("<Q", "the tensor count")
        kv_count = self._unpack("<Q", "the metadata count")
        # Each metadata entry takes >= 12 bytes (key length + type), each tensor info >= 24: bound the loops.
        if kv_count > (self.size - self._pos) // 12 or tensor_count > (self.size - self._pos) // 24:
            raise self._fail(f"it claims {kv_count} metadata entries and {tensor_count} tensors, "
                             "more than the file holds")
        for _ in range(kv_count):
            key = self._string("a metadata key")
            type_id = self._unpack("<I", f"the value type of {key!r}")
            if key in self.metadata:
                raise self._fail(f"metadata key {key!r} appears twice")
            self.metadata[key] = self._value(type_id, key)
        infos = [self._tensor_info() for _ in range(tensor_count)]
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self._fail(f"general.alignment={alignment!r} is not a power of two")
        data_start = -(-self._pos // alignment) * alignment
        self._place(infos, data_start, alignment)

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string("a tensor name")
        n_dims = self._unpack("<I", f"the dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self._fail(f"tensor {name!r} has {n_dims} dimensions (ggml allows 1 to {MAX_DIMS})")
        shape = struct.unpack(f"<{n_dims}Q", self._take(8 * n_dims, f"the shape of {name!r}"))
        type_id = self._unpack("<I", f"the type of {name!r}")
        offset = self._unpack("<Q", f"the data offset of {name!r}")
        return name, tuple(shape), type_id, offset

    def _place(self, infos: list[tuple[str, tuple[int, ...], int, int]], data_start: int, alignment: int) -> None:
        """Turn tensor infos into checked byte ranges: known type, whole blocks, inside the file, no overlaps."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        spans = []
        for name, shape, type_id, offset in infos:
            if name in self.tensors:
                raise self._fail(f"tensor {name!r} appears twice")
            try:
                qtype = GGMLQuantizationType(type_id)
                block, block_bytes = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise self._fail(f"tensor {name!r} has unknown type id {type_id}") from None
            elements = 1
            for dim in shape:
                if dim < 1:
                    raise self._fail(f"tensor {name!r} has a zero dimension in {list(shape)}")
                elements *= dim  # Python ints: no overflow; the size check below bounds it
            if shape[0] % block:
                raise self._fail(f"tensor {name!r} ({qtype.name}) has rows of {shape[0]} values, "
                                 f"not whole blocks of {block}")
            nbytes = elements // block * block_bytes
            start = data_start + offset
            if offset % alignment:
                raise self._fail(f"tensor {name!r} starts at data offset {offset}, not a multiple of {alignment}")
            if start + nbytes > self.size:
                raise self._fail(f"tensor {name!r} ({nbytes} bytes at byte {start}) runs past the end of the file "
                                 f"({self.size} bytes)")
            self.tensors[name] = TensorInfo(name, shape, type_id, start, nbytes)
            spans.append((start, start + nbytes, name))
        spans.sort()
        for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
            if start < end:
                raise self._fail(f"tensors {first!r} and {second!r} overlap")

    # -- reading ---------------------------------------------------------------------------------
    def type_name(self, name: str) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.tensors[name].type_id).name

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view [rows..., bytes per row] into the mapped file (no copy)."""
        info = self.tensors[name]
        rows = info.numpy_shape[:-1]
        data = np.frombuffer(self._map, np.uint8, count=info.nbytes, offset=info.offset)
        return data.reshape(*rows, -1) if rows else data

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32, row-major (`numpy_shape`), by the gguf package's dequantizers."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensors[name]
        qtype = GGMLQuantizationType(info.type_id)
        try:
            values = dequantize(self.raw(name), qtype)
        except NotImplementedError:
            raise GGUFError(f"{self.path}: tensor {name!r} is stored as {qtype.name}, which the gguf package cannot "
                            "dequantize; convert the model to another type with llama-quantize") from None
        values = np.asarray(values, np.float32).reshape(info.numpy_shape)
        return values if values.flags.writeable else values.copy()  # F32 tensors come back as views of the file
