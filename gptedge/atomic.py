"""Write a whole output folder or none of it.

Outputs are built in a hidden temporary folder next to the destination (same
filesystem, so the final `os.replace` is atomic) and renamed into place only
when complete. A process killed half-way leaves at most a `.tmp-*` folder, which
the next run removes; an existing folder at the destination stays intact until
the new one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from gptedge.errors import GptEdgeError, OutputExistsError

_TMP_PREFIX = ".tmp-gptedge-"
_OLD_PREFIX = ".old-gptedge-"


def _clean_stale(parent: Path, name: str) -> None:
    """Remove temporary folders that a killed earlier run left for this destination."""
    for prefix in (_TMP_PREFIX, _OLD_PREFIX):
        for stale in parent.glob(f"{prefix}{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(dest: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on clean exit it replaces `dest`, on error it is removed.

    Raises OutputExistsError when `dest` exists and `force` is False, and a
    GptEdgeError naming the folder when it cannot be written (permissions, full disk).
    """
    dest = Path(dest).resolve()
    if dest.exists() and not force:
        raise OutputExistsError(f"{dest} already exists; pass --force (force=True) to replace it, or choose another folder")
    if dest.exists() and not dest.is_dir():
        raise OutputExistsError(f"{dest} exists and is not a folder; remove it or choose another output path")
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(parent, dest.name)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{dest.name}-", dir=parent))
    except OSError as exc:
        raise GptEdgeError(f"cannot write to {parent}: {exc.strerror or exc}; choose a writable output folder") from exc
    try:
        yield tmp
        _replace_dir(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise GptEdgeError(f"disk full while writing {dest}; free space and run again (nothing was written)") from exc
        raise GptEdgeError(f"cannot write {dest}: {exc.strerror or exc} (nothing was written)") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_permissions(folder: Path) -> None:
    """Give the finished output the permissions a plain `mkdir`/`open` would have.

    mkdtemp creates 0700 and some writers (onnx's external data) create 0600; a bundle installed
    for every user of a laptop must be readable by all of them, as the umask allows.
    """
    mask = _umask()
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
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:
        os.replace(old, dest)  # put the earlier output back
        raise
    shutil.rmtree(old, ignore_errors=True)


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
