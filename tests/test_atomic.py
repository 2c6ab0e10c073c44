"""gptedge.atomic: whole outputs or nothing, readable by everyone the umask allows."""

from __future__ import annotations

import os

import pytest

from gptedge.atomic import atomic_output_dir
from gptedge.errors import OutputExistsError


def test_output_gets_umask_permissions_not_private_temp_ones(tmp_path):
    old = os.umask(0o022)
    try:
        dest = tmp_path / "bundle"
        with atomic_output_dir(dest) as tmp:
            (tmp / "model.onnx.data").write_bytes(b"w")
            os.chmod(tmp / "model.onnx.data", 0o600)  # as onnx writes external data
        assert dest.stat().st_mode & 0o777 == 0o755
        assert (dest / "model.onnx.data").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_error_inside_leaves_nothing_and_keeps_the_earlier_output(tmp_path):
    dest = tmp_path / "bundle"
    with atomic_output_dir(dest) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(dest, force=True) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("killed half-way")
    assert (dest / "v").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_output_dir(dest):
            pass
