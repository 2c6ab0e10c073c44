"""The pieces of loading a model that a bundle and an Optimum folder share: tokenizer, verified spec, engine."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from gptedge.atomic import atomic_write_bytes
from gptedge.errors import BundleError
from gptedge.runtime.bundle import TOKENIZER_NAME, BundleSpec, read_spec
from gptedge.runtime.engine import Engine
from gptedge.runtime.providers import ProviderChoice, cache_root

log = logging.getLogger("gptedge.runtime")


def load_tokenizer(path: Path, vocab_size: int) -> Tokenizer:
    if not path.is_file():
        raise BundleError(f"{path} is missing; a bundle keeps its tokenizer as {TOKENIZER_NAME}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception on parse errors
        raise BundleError(f"{path} is not a valid tokenizer.json ({exc}); re-export the bundle") from exc
    if tok.get_vocab_size() > vocab_size:
        log.info("tokenizer has %d entries, the model %d: ids above the model's vocabulary are refused",
                 tok.get_vocab_size(), vocab_size)
    return tok


def read_verified_spec(folder: Path, verify: bool) -> BundleSpec:
    """read_spec, skipping the sha256 pass when these exact files (same stat) were verified before.

    Hashing is most of a warm load (0.5 GB of weights: ~1 s). A file rewritten in any way changes its
    mtime or ctime (ctime cannot be set back by the user), so a match means the bytes hashed earlier.
    """
    if not verify:
        return read_spec(folder, verify_checksums=False)
    spec = read_spec(folder, verify_checksums=False)  # format version, sizes, files present and inside
    record = {"files": spec.files, "stats": _stats(folder, spec)}
    stamp = cache_root() / "verified" / (hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32] + ".json")
    try:
        if json.loads(stamp.read_text(encoding="utf-8")) == record:
            return spec
    except (OSError, ValueError):
        pass
    spec = read_spec(folder, verify_checksums=True)
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(stamp, json.dumps(record).encode())
    except OSError as exc:
        log.info("gptedge: cannot record the verified checksums in %s (%s); the next load hashes again", stamp, exc)
    return spec


def _stats(folder: Path, spec: BundleSpec) -> dict[str, list[int]]:
    out = {}
    for relative in sorted(spec.files):
        st = (folder / relative).stat()
        out[relative] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    out["gptedge.json"] = [(folder / "gptedge.json").stat().st_mtime_ns]
    return out


def make_engine(session: ort.InferenceSession, spec: BundleSpec, choice: ProviderChoice) -> Engine:
    """The Engine for a session: KV on the provider's device (IO binding),
    runs serialized where the provider needs it."""
    device = choice.device
    if device != "cpu":
        try:  # device OrtValues need an onnxruntime build that exposes the device (some DirectML builds do not)
            ort.OrtValue.ortvalue_from_shape_and_type([1], np.float32, device, 0)
        except Exception as exc:  # noqa: BLE001 - keep the KV on the host instead
            log.warning("gptedge: cannot place the KV cache on the %s device (%s); keeping it in host memory",
                        device, exc)
            device = "cpu"
    return Engine(session, spec, device=device, serialize_runs=choice.serialize_runs)
