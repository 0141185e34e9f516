"""Replace a file or a folder so that a reader sees the old content or the new, never half of either.

The temporary sits beside the target (``os.replace`` is atomic only within one
file system), hidden, and ends in ``.tmp``: folder scanners skip it, and what a
crash leaves behind can be recognised and swept (RejectArchive does on start).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_path(path: Path) -> Path:
    """A temporary name for ``path``: unique per process and thread, so concurrent writers never share one."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it replaces ``path``, on an error it is removed.

    For writers that want a path, not bytes (a model converter's ``save``). ``fsync``: the content and
    the rename reach the disk before returning, for files whose loss on power cut leaves nothing usable
    (a bundle's manifest); not for the hot path.
    """
    tmp = temp_path(path)
    try:
        yield tmp
        if fsync:
            _fsync_path(tmp)
        os.replace(tmp, path)
        if fsync:
            _fsync_path(path.parent, directory=True)
    finally:
        tmp.unlink(missing_ok=True)  # nothing there after a successful replace


def write_bytes_atomic(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """``path.write_bytes(data)``, atomically (see ``atomic_path``)."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str, *, encoding: str = "utf-8", fsync: bool = False) -> None:
    """``path.write_text(text)``, atomically (see ``atomic_path``)."""
    write_bytes_atomic(path, text.encode(encoding), fsync=fsync)


def swap_in_dir(staging: Path, final: Path) -> None:
    """Put the fully written folder ``staging`` in place of ``final`` (which may exist), then drop the old one.

    A folder cannot be replaced over a non-empty one in one rename: the old one is moved aside first,
    so a reader sees the old folder, briefly none, then the new one, never a mix of files.
    """
    if not final.exists():
        os.replace(staging, final)
        return
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
