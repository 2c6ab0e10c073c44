"""Files from strangers: escaping paths, hostile external data, tampered weights, pickles, impossible shapes.

Every hostile file is refused with a typed error before onnxruntime (or torch) is asked to read it,
before any large allocation, and without running any code it carries. "onnxruntime was never asked"
is enforced by replacing onnxruntime.InferenceSession with a function that fails the test;
"no large allocation" by tracemalloc's peak (numpy, torch's Python side and Python objects are all
traced) and the process's peak RSS; "no code ran" by a marker file the payload would create.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import resource
import shutil
import tracemalloc
from pathlib import Path
from typing import Callable, Iterator

import onnx
import pytest
import torch
from onnx import TensorProto

from gptedge.errors import BundleError, CheckpointError, DataError
from gptedge.runtime import Model
from gptedge.runtime.bundle import SPEC_NAME, checksum_files

SMALL_BYTES = 32 << 20  # what refusing a hostile file may cost at most (traced Python/numpy memory)
POSITION_TABLE = "transformer.wpe.weight"  # an external initializer of the exported graph: [context, n_embd] fp32


# -- helpers -----------------------------------------------------------------------------------------------
@pytest.fixture
def no_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything asks onnxruntime to load a model."""
    import onnxruntime

    def refuse(*args, **kwargs):
        pytest.fail(f"onnxruntime.InferenceSession was called with {args[:1]}: the hostile file reached onnxruntime")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


@contextlib.contextmanager
def stays_small(limit: int = SMALL_BYTES) -> Iterator[None]:
    """Assert that the block's traced allocations peak below `limit` and the process's peak RSS does not jump."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    try:
        yield
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert peak < limit, f"refusing the file allocated {peak / 2**20:.0f} MiB"
    assert rss_growth < 4 * limit, f"peak RSS grew by {rss_growth / 2**20:.0f} MiB"


def copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def rewrite_spec(folder: Path, edit: Callable[[dict], None] | None = None, rechecksum: bool = True) -> None:
    """Edit gptedge.json; re-record checksums so that only the hostile content itself can be refused."""
    spec = json.loads((folder / SPEC_NAME).read_text())
    if rechecksum:
        spec["files"] = checksum_files(folder)
    if edit is not None:
        edit(spec)
    (folder / SPEC_NAME).write_text(json.dumps(spec))


def edit_initializer(folder: Path, edit: Callable[[TensorProto], None]) -> None:
    """Rewrite model.onnx with `edit` applied to the position table (weights stay external, untouched)."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == POSITION_TABLE)
    edit(tensor)
    onnx.save(model, str(folder / "model.onnx"))


def external(location: str, length: int | None = None, offset: int = 0) -> Callable[[TensorProto], None]:
    def edit(t: TensorProto) -> None:
        size = length if length is not None else next(int(e.value) for e in t.external_data if e.key == "length")
        del t.external_data[:]
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(size))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        t.data_location = TensorProto.EXTERNAL
    return edit


# -- paths that escape the bundle --------------------------------------------------------------------------------
@pytest.mark.parametrize("listed", ["../outside.txt", "{abs}"], ids=["dot-dot", "absolute"])
def test_spec_listing_a_file_outside_the_bundle_is_refused(runtime_bundle: Path, tmp_path: Path, no_onnxruntime,
                                                           listed) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("a file the bundle must not make us read")
    folder = copy_bundle(runtime_bundle, tmp_path / "bundle")
    from gptedge.runtime.bundle import sha256_file

    name = listed.format(abs=outside)
    rewrite_spec(folder, lambda s: s["files"].update({name: sha256_file(outside)}), rechecksum=False)
    with pytest.raises(BundleError, match="points outside the bundle folder"):
        Model.load(folder, provider="cpu")


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(os.urandom(128 * 64 * 4))  # exactly the size the position table declares
    return secret


@pytest.mark.parametrize("how", ["dot-dot", "absolute", "symlink"])
@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_external_data_outside_the_bundle_is_refused(runtime_bundle: Path, tmp_path: Path, no_onnxruntime, how,
                                                     verify) -> None:
    secret = _secret(tmp_path)
    folder = copy_bundle(runtime_bundle, tmp_path / "bundle")
    location = {"dot-dot": "../secret.bin", "absolute": str(secret), "symlink": "weights.bin"}[how]
    if how == "symlink":
        (folder / "weights.bin").symlink_to(secret)
    edit_initializer(folder, external(location))
    rewrite_spec(folder)
    with stays_small(), pytest.raises(BundleError, match="outside the bundle folder"):
        Model.load(folder, provider="cpu", verify=verify)


def test_hostile_optimum_folder_is_scanned_too(runtime_bundle: Path, tmp_path: Path, no_onnxruntime) -> None:
    """A folder without gptedge.json (loaded as a Hugging Face Optimum export) has no checksums,
    but the scan still runs."""
    _secret(tmp_path)
    folder = tmp_path / "optimum"
    folder.mkdir()
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json"):
        shutil.copyfile(runtime_bundle / name, folder / name)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64,
                                                     "n_positions": 128, "vocab_size": 320}))
    edit_initializer(folder, external("../secret.bin"))
    with pytest.raises(BundleError, match="outside the bundle folder"):
        Model.load(folder, provider="cpu")


def test_hf_shard_index_pointing_outside_is_refused(tmp_path: Path, runtime_checkpoint: Path) -> None:
    folder = _hf_folder(tmp_path / "hf", runtime_checkpoint)
    shutil.copyfile(runtime_checkpoint / "model.safetensors", tmp_path / "stolen.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"transformer.wte.weight": "../stolen.safetensors"}}))
    from gptedge.export.exporter import export_bundle

    with pytest.raises(CheckpointError, match="names shards that are missing"):
        export_bundle(folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# -- tampering -----------------------------------------------------------------------------------------------------
def test_flipped_weight_byte_is_refused_before_onnxruntime(runtime_bundle: Path, tmp_path: Path,
                                                           no_onnxruntime) -> None:
    folder = copy_bundle(runtime_bundle, tmp_path / "bundle")
    data = bytearray((folder / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    (folder / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx.data does not match its sha256"):
        Model.load(folder, provider="cpu")
    from gptedge.quantize import quantize_bundle

    with pytest.raises(BundleError, match="model.onnx.data does not match its sha256"):  # the quantizer checks too
        quantize_bundle(folder, tmp_path / "q", eval_text="x = 1\n" * 100, progress=False, log=lambda line: None)
    assert not (tmp_path / "q").exists()


# -- pickles ---------------------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this creates `marker`: the proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _hf_folder(folder: Path, runtime_checkpoint: Path) -> Path:
    """A transformers-style GPT-2 folder (config + tokenizer) without weights, sized like the runtime checkpoint."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                     "vocab_size": 320, "n_positions": 128, "n_embd": 64,
                                                     "n_layer": 2, "n_head": 4}))
    shutil.copyfile(runtime_checkpoint / "tokenizer.json", folder / "tokenizer.json")
    return folder


def _zip_pickle(path: Path, marker: Path) -> None:
    torch.save({"transformer.wte.weight": torch.zeros(2), "payload": Payload(marker)}, path)


def _legacy_pickle(path: Path, marker: Path) -> None:
    torch.save({"payload": Payload(marker)}, path, _use_new_zipfile_serialization=False)


def _bare_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"payload": Payload(marker)}))


@pytest.mark.parametrize("writer", [_zip_pickle, _legacy_pickle, _bare_pickle],
                         ids=["torch-zip", "torch-legacy", "bare-pickle"])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_pickle_in_hf_weights_never_runs(tmp_path: Path, runtime_checkpoint: Path, writer, layout) -> None:
    from gptedge.export.exporter import export_bundle

    marker = tmp_path / "pwned"
    folder = _hf_folder(tmp_path / "hf", runtime_checkpoint)
    if layout == "single":
        writer(folder / "pytorch_model.bin", marker)
    else:
        writer(folder / "pytorch_model-00001-of-00001.bin", marker)
        (folder / "pytorch_model.bin.index.json").write_text(
            json.dumps({"weight_map": {"transformer.wte.weight": "pytorch_model-00001-of-00001.bin"}}))
    with pytest.raises(CheckpointError, match="could not be read as weights"):
        export_bundle(folder, tmp_path / "out", progress=False)
    assert not marker.exists(), "the pickle's code ran"
    assert not (tmp_path / "out").exists()


def test_poisoned_token_cache_is_not_unpickled(tmp_path: Path) -> None:
    """The token cache is a user-writable folder: a planted object array is never loaded, the cache is rebuilt."""
    import numpy as np

    from gptedge.train import data as D
    from gptedge.train.tokenizer import train_tokenizer

    marker = tmp_path / "pwned"
    text = "def add(a, b):\n    return a + b\n" * 50
    tok = train_tokenizer([text], 300)
    sources = lambda: D.Sources(texts=[text], n_files=1, n_bytes=len(text))  # noqa: E731
    first = D.load_or_build_tokens(tmp_path / "cache", "key", sources, tok)
    expected = np.asarray(first.tokens).copy()
    np.save(tmp_path / "cache" / "tokens" / "key" / "tokens.npy", np.array([Payload(marker)], dtype=object),
            allow_pickle=True)
    try:
        again = D.load_or_build_tokens(tmp_path / "cache", "key", sources, tok)
    except DataError as exc:  # refusing (and saying which folder to delete) is as good as rebuilding
        assert "cache" in str(exc)
    else:
        np.testing.assert_array_equal(np.asarray(again.tokens), expected)
    assert not marker.exists(), "the planted pickle's code ran"


# -- shapes that would need terabytes ----------------------------------------------------------------------------
def _inline(t: TensorProto) -> None:
    del t.external_data[:]
    t.data_location = TensorProto.DEFAULT


def _external_4tib(t: TensorProto) -> None:
    """4 TiB declared, backed by the 32 KiB the real table had in model.onnx.data."""
    t.dims[:] = [1 << 20, 1 << 20]
    external("model.onnx.data", length=32768)(t)


def _external_length_lies(t: TensorProto) -> None:
    """256 GiB declared and claimed by the external range: it runs past the end of the 0.5 MB file."""
    t.dims[:] = [1 << 18, 1 << 18]
    external("model.onnx.data", length=1 << 38)(t)


def _inline_raw_4tib(t: TensorProto) -> None:
    """16 bytes of inline raw_data for 4 TiB declared."""
    _inline(t)
    t.dims[:] = [1 << 20, 1 << 20]
    t.raw_data = b"\0" * 16


def _inline_typed_256gib(t: TensorProto) -> None:
    """One inline float (the typed float_data field, not raw_data) for 256 GiB declared."""
    _inline(t)
    t.dims[:] = [1 << 18, 1 << 18]
    t.float_data.append(1.0)


def _negative_dim(t: TensorProto) -> None:
    t.dims[:] = [-1, 64]


TERABYTE_TENSORS = {f.__name__.lstrip("_"): f for f in
                    (_external_4tib, _external_length_lies, _inline_raw_4tib, _inline_typed_256gib, _negative_dim)}


@pytest.mark.parametrize("name", list(TERABYTE_TENSORS))
def test_impossible_tensor_shape_is_refused_before_any_allocation(runtime_bundle: Path, tmp_path: Path, no_onnxruntime,
                                                                  name) -> None:
    folder = copy_bundle(runtime_bundle, tmp_path / "bundle")
    edit_initializer(folder, TERABYTE_TENSORS[name])
    rewrite_spec(folder)
    with stays_small(), pytest.raises(BundleError, match=POSITION_TABLE.replace(".", r"\.")):
        Model.load(folder, provider="cpu")


@pytest.mark.parametrize("arch", [
    dict(n_layer=1 << 22),  # each size within the plausible bound, but not this graph
    # would mean a 1 GiB KV buffer per layer and token block
    dict(n_head=2048, n_kv_head=2048, head_dim=2048, n_embd=1 << 22),
    dict(vocab_size=1 << 22),
    dict(context_length=1 << 22),  # the graph's position table has 128 rows
], ids=["layers", "heads", "vocab", "context"])
def test_spec_dimensions_must_match_the_graph(runtime_bundle: Path, tmp_path: Path, arch, no_onnxruntime) -> None:
    """gptedge.json is not covered by its own checksums: absurd sizes there are refused before onnxruntime or the engine
    sees them (the scanner reads the graph's declared inputs, outputs and position tables)."""
    folder = copy_bundle(runtime_bundle, tmp_path / "bundle")
    rewrite_spec(folder, lambda s: s["architecture"].update(arch), rechecksum=False)
    with stays_small(), pytest.raises(BundleError, match="does not match model.onnx"):
        Model.load(folder, provider="cpu", threads=1)


@contextlib.contextmanager
def address_space_cap(extra: int) -> Iterator[None]:
    """Lower this process's address-space limit to its current size + `extra` for the block, so a bug that
    tries to allocate terabytes fails fast instead of swapping the machine."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (current + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc to cap the address space safely")
def test_checkpoint_config_with_absurd_sizes_is_refused_before_allocating(runtime_checkpoint: Path,
                                                                          tmp_path: Path) -> None:
    """config.json says a model of 64 layers x 65536 wide (~3 TB of fp32); the weights file is the small real one."""
    from gptedge.export.exporter import export_bundle

    source = tmp_path / "ckpt"
    shutil.copytree(runtime_checkpoint, source)
    config = json.loads((source / "config.json").read_text())
    config["model"].update(n_layer=64, n_head=64, n_embd=1 << 16)
    (source / "config.json").write_text(json.dumps(config))
    with address_space_cap(1 << 30), stays_small(), pytest.raises(
            CheckpointError, match="does not match its config.json"):
        export_bundle(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_hf_config_with_absurd_sizes_is_refused_before_allocating(runtime_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from gptedge.export.exporter import export_bundle

    folder = _hf_folder(tmp_path / "hf", runtime_checkpoint)
    config = json.loads((folder / "config.json").read_text())
    config.update(n_layer=64, n_head=64, n_embd=1 << 16)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"transformer.wte.weight": torch.zeros(320, 64)}, str(folder / "model.safetensors"))
    with address_space_cap(1 << 30), stays_small(), pytest.raises(CheckpointError, match="do not match config.json"):
        export_bundle(folder, tmp_path / "out", progress=False)
