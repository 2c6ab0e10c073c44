"""A GGUF file is untrusted input: every malformed file is a one-line GGUFError, and nothing is written.

Structural damage (magic, version, counts, lengths, offsets, sizes, types, duplicates) is made with a raw
writer here, byte by byte; damage that only a model reader sees (a missing tensor, a shape the metadata
contradicts, an architecture gptedge does not import) is made by rewriting a valid file with the gguf package.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gguf_util import write_gguf  # noqa: E402
from gptedge.errors import CheckpointError  # noqa: E402
from gptedge.export.exporter import export_bundle  # noqa: E402
from gptedge.export.gguf_file import GGUFError, GGUFFile  # noqa: E402

U32, STR, ARR = 4, 8, 9


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_u32(key: str, value: int) -> bytes:
    return s(key) + struct.pack("<II", U32, value)


def kv_str(key: str, value: str) -> bytes:
    return s(key) + struct.pack("<I", STR) + s(value)


def info(name: str, dims: tuple[int, ...], type_id: int, offset: int) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", type_id,
                                                                                                       offset)


def raw_gguf(kvs: list[bytes], infos: list[bytes], data: bytes = b"", *, magic: bytes = b"GGUF", version: int = 3,
             counts: tuple[int, int] | None = None) -> bytes:
    """A GGUF byte string from parts; `counts` (tensors, metadata) can lie about what follows."""
    n_tensors, n_kv = counts if counts is not None else (len(infos), len(kvs))
    head = magic + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % 32) + data


ARCH = [kv_str("general.architecture", "llama")]
ONE = [info("token_embd.weight", (32, 4), 0, 0)]
DATA = np.zeros(128, np.float32).tobytes()

# name -> (file bytes, what the message must name)
STRUCTURAL = {
    "empty file": (b"", "empty"),
    "bad magic": (b"GGML" + bytes(60), "magic"),
    "version 1": (raw_gguf(ARCH, ONE, DATA, version=1), "version 1"),
    "big-endian": (raw_gguf(ARCH, ONE, DATA, version=3 << 24), "big-endian"),
    "truncated header": (raw_gguf(ARCH, ONE, DATA)[:60], "past the end"),
    "truncated data": (raw_gguf(ARCH, ONE, DATA)[:-64], "runs past the end"),
    "absurd tensor count": (raw_gguf(ARCH, ONE, DATA, counts=(1 << 60, 1)), "more than the file holds"),
    "absurd metadata count": (raw_gguf(ARCH, ONE, DATA, counts=(1, 1 << 62)), "more than the file holds"),
    "string length past the end": (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 40) + bytes(64),
                                   "runs past the end"),
    "array length past the end": (raw_gguf([s("a") + struct.pack("<IIQ", ARR, U32, 1 << 50)], []),
                                  "more than the file holds"),
    "unknown value type": (raw_gguf([s("a") + struct.pack("<I", 99) + bytes(8)], []), "unknown value type 99"),
    "arrays nested too deep": (raw_gguf([s("a") + struct.pack("<IIQ", ARR, ARR, 1) + struct.pack("<IQ", ARR, 1)
                                         + struct.pack("<IQ", U32, 1) + bytes(4)], []), "nests arrays"),
    "non-UTF-8 key": (raw_gguf([s(b"\xff\xfe") + struct.pack("<II", U32, 1)], []), "not UTF-8"),
    "duplicate key": (raw_gguf(ARCH + ARCH, ONE, DATA), "appears twice"),
    "no dimensions": (raw_gguf(ARCH, [info("token_embd.weight", (), 0, 0)], DATA), "0 dimensions"),
    "seven dimensions": (raw_gguf(ARCH, [info("token_embd.weight", (1,) * 7, 0, 0)], DATA), "7 dimensions"),
    "unknown tensor type": (raw_gguf(ARCH, [info("token_embd.weight", (32, 4), 200, 0)], DATA), "unknown type id 200"),
    "offset past the end": (raw_gguf(ARCH, [info("token_embd.weight", (32, 4), 0, 1 << 40)], DATA), "past the end"),
    "dimensions that overflow": (raw_gguf(ARCH, [info("token_embd.weight", (1 << 62, 1 << 62, 8), 0, 0)], DATA),
                                 "past the end"),
    "zero dimension": (raw_gguf(ARCH, [info("token_embd.weight", (32, 0), 0, 0)], DATA), "zero dimension"),
    "overlapping tensors": (raw_gguf(ARCH, [info("token_embd.weight", (32, 4), 0, 0), info("b", (32,), 0, 64)],
                                     DATA), "overlap"),
    "duplicate tensor": (raw_gguf(ARCH, [info("x", (32,), 0, 0), info("x", (32,), 0, 128)], DATA + DATA),
                         "appears twice"),
    "unaligned offset": (raw_gguf(ARCH, [info("token_embd.weight", (8,), 0, 4)], DATA), "not a multiple of 32"),
    "rows not whole blocks": (raw_gguf(ARCH, [info("token_embd.weight", (40, 1), 8, 0)], DATA), "whole blocks"),
}


@pytest.mark.parametrize("name", list(STRUCTURAL))
def test_structural_damage_is_one_typed_line_and_nothing_written(tmp_path: Path, name: str) -> None:
    content, message = STRUCTURAL[name]
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=message) as caught:
        GGUFFile(path)
    assert "\n" not in str(caught.value)
    with pytest.raises(CheckpointError):  # a file without the magic is not taken for a GGUF at all
        export_bundle(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    from test_gguf import make_model

    root = tmp_path_factory.mktemp("valid-gguf")
    model, tok = make_model("llama", num_hidden_layers=1, rope_scaling=None)
    write_gguf(model, tok, root / "m.gguf", "llama", "F32")
    return root / "m.gguf"


def rewrite(source: Path, dest: Path, *, drop: str = "", metadata: dict | None = None) -> Path:
    """A copy of a valid file with a tensor left out or metadata values replaced (gguf's writer)."""
    f = GGUFFile(source)
    changes = metadata or {}
    w = gguf.GGUFWriter(str(dest), str(changes.get("general.architecture", f.metadata["general.architecture"])))
    for key, value in f.metadata.items():
        if key in ("general.architecture", "GGUF.version"):
            continue
        value = changes.get(key, value)
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_array(key, np.asarray(value).tolist())
    for name, t in f.tensors.items():
        if name != drop:
            w.add_tensor(name, np.array(f.raw(name)), raw_dtype=gguf.GGMLQuantizationType(t.type_id))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dest


SEMANTIC = {
    "missing tensor": (dict(drop="blk.0.attn_k.weight"), "missing: blk.0.attn_k.weight"),
    "shape against the metadata": (dict(metadata={"llama.feed_forward_length": 64}), "wrong shape"),
    "unsupported architecture": (dict(metadata={"general.architecture": "mamba"}), "architecture 'mamba'"),
    "unknown pre-tokenizer": (dict(metadata={"tokenizer.ggml.pre": "klingon"}), "pre-tokenizer 'klingon'"),
    "unknown tokenizer model": (dict(metadata={"tokenizer.ggml.model": "rwkv"}), "tokenizer model 'rwkv'"),
    "heads that do not divide": (dict(metadata={"llama.attention.head_count_kv": 4}), "cannot build"),
}


@pytest.mark.parametrize("name", list(SEMANTIC))
def test_a_file_that_does_not_describe_a_model_is_refused(valid: Path, tmp_path: Path, name: str) -> None:
    change, message = SEMANTIC[name]
    path = rewrite(valid, tmp_path / "bad.gguf", **change)
    with pytest.raises(GGUFError, match=message) as caught:
        export_bundle(path, tmp_path / "out", progress=False)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_the_command_line_says_one_line_and_exits_2(tmp_path: Path, capsys) -> None:
    from gptedge.cli import main

    path = tmp_path / "bad.gguf"
    path.write_bytes(STRUCTURAL["absurd tensor count"][0])
    assert main(["export", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("gptedge export:")]
    assert len(errors) == 1 and "more than the file holds" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()
