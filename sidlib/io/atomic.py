"""Atomic file writes: readers see the old file or the complete new one. Writers go through a temporary
``.<name>.<random>.partial`` beside the destination (removed on failure), renamed with ``os.replace``; finished files
get the mode ``0666 & ~umask``, not the 0600 of temporary files."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_path", "atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_copy", "file_mode",
           "TEMP_SUFFIX"]

#: Suffix of in-flight temporary files (so they are easy to recognise and clean up).
TEMP_SUFFIX = ".partial"


def file_mode() -> int:
    """``0o666 & ~umask``, the mode ``open()`` would give a new file, read now (Linux: without changing the umask)."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status", encoding="ascii") as f:
        return 0o666 & ~int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore, the only portable way to read it
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # persist the rename; not all platforms can open a directory, which is fine
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that insists on a file name (e.g. safetensors'
    ``save_file``); on normal exit it is renamed onto ``path``, if the block raises it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # after writing: a writer may have replaced the file we created
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """Open a temporary file for writing (``'wb'`` or ``'w'``, kwargs to :func:`open`); it replaces ``path`` only
    if the block completes."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_open needs a write mode ('w' or 'wb'), got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``Path(path)``."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``Path(path)``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Place a copy of file ``src`` at ``dst`` atomically; returns ``Path(dst)``. A hard link when both are on one
    filesystem (teachers are hundreds of MB and the cache already holds one copy), else a byte copy."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"cannot copy {src}: not a file")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}{TEMP_SUFFIX}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            os.chmod(tmp, file_mode())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)  # also on success: rename() of two links to one file leaves tmp in place
    _fsync_dir(dst.parent)
    return dst
