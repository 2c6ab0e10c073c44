"""gptedge.atomic: whole outputs or nothing, readable by everyone the umask allows."""

from __future__ import annotations

import os
import stat

import pytest

from gptedge.atomic import atomic_output_dir, check_output_dir
from gptedge.errors import OutputBusyError, OutputExistsError, QuantizeError, UsageError


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


@pytest.mark.parametrize("out", ["src", "src/inside", "."], ids=["same", "inside", "containing"])
def test_an_output_overlapping_its_input_is_refused_with_the_command_s_error(tmp_path, out):
    source = tmp_path / "src"
    source.mkdir()
    with pytest.raises(UsageError, match="overlaps the input .* would replace the source"):
        check_output_dir(source, tmp_path / out, force=True)
    with pytest.raises(QuantizeError, match="overlaps"):
        check_output_dir(source, tmp_path / out, force=True, error=QuantizeError)


def test_an_existing_output_needs_force_and_must_be_a_folder(tmp_path):
    source, out = tmp_path / "src", tmp_path / "out"
    source.mkdir()
    check_output_dir(source, out)
    out.mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        check_output_dir(source, out)
    check_output_dir(source, out, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a folder"):
        check_output_dir(source, tmp_path / "file", force=True)
    check_output_dir(source, tmp_path / "src-2")  # a sibling whose name starts like the input's does not overlap


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


def test_a_second_writer_of_the_same_folder_is_refused_and_harms_nothing(tmp_path):
    dest = tmp_path / "bundle"
    with atomic_output_dir(dest) as first:
        (first / "a.txt").write_text("first")
        with pytest.raises(OutputBusyError, match="another gptedge process is writing"):
            with atomic_output_dir(dest, force=True):
                pass
        assert (first / "a.txt").read_text() == "first"  # the first writer's temporary folder survived
        with atomic_output_dir(tmp_path / "bundle-2") as other:  # a neighbour is not locked out
            (other / "b.txt").write_text("b")
    assert (dest / "a.txt").read_text() == "first" and (tmp_path / "bundle-2" / "b.txt").read_text() == "b"
    with atomic_output_dir(dest, force=True) as again:  # the lock was released
        (again / "a.txt").write_text("again")
    assert (dest / "a.txt").read_text() == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "bundle-2"]  # no lock or temp files left


def test_stale_cleanup_never_touches_a_neighbours_temporary_folder(tmp_path):
    with atomic_output_dir(tmp_path / "run-2") as neighbour:
        with atomic_output_dir(tmp_path / "run") as out:
            (out / "x").write_text("x")
        assert neighbour.is_dir()  # writing "run" cleaned only "run"'s stale folders
        (neighbour / "y").write_text("y")
    assert (tmp_path / "run-2" / "y").read_text() == "y"


def test_permissions_are_read_without_touching_the_process_umask(tmp_path, monkeypatch):
    """os.umask can only be read by setting it; meanwhile another thread would create files with mode 0666."""
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("atomic_output_dir changed the process umask"))
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
            os.chmod(tmp / "f", 0o600)
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out" / "f").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
