"""Write a whole output folder or none of it.

Outputs are built in a hidden temporary folder next to the destination (same
filesystem, so the final `os.replace` is atomic) and renamed into place only
when complete. A process killed half-way leaves at most a `.tmp-*` folder, which
the next run removes; an existing folder at the destination stays intact until
the new one is complete.

Two processes writing the same destination at once: the first holds a lock (an OS file lock on a
hidden `.lock-gptedge-NAME` file, released by the OS if the process dies), the second fails at once
with OutputBusyError, so neither removes the other's temporary folder. Stale temporary folders are
only cleaned while the lock is held, when they cannot belong to a live writer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from gptedge.errors import GptEdgeError, OutputBusyError, OutputExistsError, UsageError

_TMP_PREFIX = ".tmp-gptedge-"
_OLD_PREFIX = ".old-gptedge-"
_LOCK_PREFIX = ".lock-gptedge-"
BUSY_ATTEMPTS, BUSY_WAIT_S = 10, 0.2  # a destination held open gets 2 s to be let go before the write gives up


def _clean_stale(parent: Path, name: str) -> None:
    """Remove temporary folders that a killed earlier run left for this destination (called with its lock held).

    Only `<prefix><name>-<8 random characters>` (what mkdtemp makes here) counts, so destination "run" never
    touches the temporary folder of a live writer of "run-2".
    """
    for prefix in (_TMP_PREFIX, _OLD_PREFIX):
        for stale in parent.glob(f"{prefix}{name}-*"):
            suffix = stale.name[len(prefix) + len(name) + 1:]
            if len(suffix) == 8 and "-" not in suffix:
                shutil.rmtree(stale, ignore_errors=True)


def check_output_dir(source: str | os.PathLike[str], out: str | os.PathLike[str], force: bool = False, *,
                     error: type[GptEdgeError] = UsageError) -> None:
    """Refuse, before any work, an output folder that cannot be written for input `source`.

    The output overlaps the input when it is the same folder, lies inside it or contains it: writing it would
    replace (or change) the source, so it raises `error` (the command's error for a bad option). An existing
    output without `force`, or one that is not a folder, raises OutputExistsError, as `atomic_output_dir` does.
    Paths resolve as the loaders and the writer resolve them (the source with `~` expanded).
    """
    src, dst = Path(source).expanduser().resolve(), Path(out).resolve()
    if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise error(f"the output folder {out} overlaps the input {source} (it is the same folder, lies inside it or "
                    "contains it): writing it would replace the source; choose another output folder")
    _check_destination(dst, force)


def _check_destination(dest: Path, force: bool) -> None:
    """OutputExistsError when the resolved `dest` exists and `force` is False, or exists and is not a folder."""
    if dest.exists() and not force:
        raise OutputExistsError(f"{dest} already exists; pass --force (force=True) to replace it, "
                                "or choose another folder")
    if dest.exists() and not dest.is_dir():
        raise OutputExistsError(f"{dest} exists and is not a folder; remove it or choose another output path")


@contextlib.contextmanager
def atomic_output_dir(dest: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on clean exit it replaces `dest`, on error it is removed.

    Raises OutputExistsError when `dest` exists and `force` is False, and a
    GptEdgeError naming the folder when it cannot be written (permissions, full disk).
    A command that reads an input checks `check_output_dir` first, before its work starts.
    """
    dest = Path(dest).resolve()
    _check_destination(dest, force)
    parent = dest.parent
    with contextlib.ExitStack() as stack:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_destination_lock(parent, dest.name))
            _clean_stale(parent, dest.name)
            tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{dest.name}-", dir=parent))
        except OSError as exc:
            raise GptEdgeError(f"cannot write to {parent}: {exc.strerror or exc}; "
                               "choose a writable output folder") from exc
        yield from _fill_and_publish(tmp, dest)


def _fill_and_publish(tmp: Path, dest: Path) -> Iterator[Path]:
    try:
        yield tmp
        _replace_dir(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise GptEdgeError(f"disk full while writing {dest}; "
                               "free space and run again (nothing was written)") from exc
        raise GptEdgeError(f"cannot write {dest}: {exc.strerror or exc} (nothing was written)") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _destination_lock(parent: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock for writing `parent/name`, or raise OutputBusyError if another process holds it."""
    path = parent / f"{_LOCK_PREFIX}{name}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            raise OutputBusyError(f"another gptedge process is writing {parent / name} right now; "
                                  "wait for it to finish, or choose another output folder")
        try:
            yield
        finally:
            with contextlib.suppress(OSError):  # Windows keeps an open file; the next writer reuses it
                os.unlink(path)
    finally:
        os.close(fd)  # releases the lock


def _try_lock(fd: int) -> bool:
    if os.name == "nt":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _umask(folder: Path) -> int:
    """The process umask, read from a file created in `folder`: os.umask can only be read by setting it, and for
    that moment another thread of the app would create world-writable files."""
    probe = folder / ".umask-probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o777)
    try:
        return ~os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        os.unlink(probe)


def _publish_permissions(folder: Path) -> None:
    """Give the finished output the permissions a plain `mkdir`/`open` would have.

    mkdtemp creates 0700 and some writers (onnx's external data) create 0600; a bundle installed
    for every user of a laptop must be readable by all of them, as the umask allows.
    """
    mask = _umask(folder)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move `tmp` to `dest`; an existing `dest` is swapped out first and removed only afterwards."""
    _publish_permissions(tmp)
    if not dest.exists():
        os.replace(tmp, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{_OLD_PREFIX}{dest.name}-", dir=dest.parent))
    os.rmdir(old)
    _swap_out(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:
        os.replace(old, dest)  # put the earlier output back
        raise
    # Windows cannot delete a file that is open: what a running app still holds stays in the .old folder, which
    # the next write of this destination removes.
    shutil.rmtree(old, ignore_errors=True)


def _swap_out(dest: Path, old: Path, attempts: int = BUSY_ATTEMPTS) -> None:
    """Rename the existing output aside. Windows refuses while a file in it is open (a loaded model, an editor, a
    virus scanner that lets go in a moment): retry briefly, then say what holds it. Nothing has changed then."""
    for attempt in range(attempts):
        try:
            os.replace(dest, old)
            return
        except PermissionError as exc:
            if attempt + 1 == attempts:
                raise OutputBusyError(
                    f"{dest} is in use and cannot be replaced ({exc.strerror or exc}): a program has a file in it "
                    "open, as a program with this bundle loaded does on Windows; close that program and run again, or "
                    "write to another folder. Nothing was changed") from exc
            time.sleep(BUSY_WAIT_S)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write one file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
