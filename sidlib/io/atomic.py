"""Atomic file writes: readers see either the old file or the complete new one, never a partial file.

Every writer goes through a temporary file in the destination's own directory (so the final
``os.replace`` is a same-filesystem rename, which POSIX and Windows perform atomically) and
removes that temporary file if anything fails before the rename.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_path", "atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_copy", "TEMP_SUFFIX"]

#: Suffix of in-flight temporary files (so they are easy to recognise and clean up).
TEMP_SUFFIX = ".partial"


def _current_umask() -> int:
    # mkstemp creates 0600 files; finished files should get the usual permissions instead.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()


def _fsync_dir(directory: Path) -> None:
    # Persist the rename itself; not all platforms allow opening a directory, which is fine.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit rename it onto ``path``.

    For writers that insist on a file name (e.g. ``safetensors.torch.save_file``). The caller
    writes the complete content to the yielded path. If the block raises, the temporary file is
    deleted and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, _FILE_MODE)
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """Open a temporary file for writing; it replaces ``path`` only if the block completes.

    ``mode`` must be a write mode (``'wb'`` or ``'w'``); extra kwargs go to :func:`open`
    (e.g. ``encoding``).
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_open needs a write mode ('w' or 'wb'), got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
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
    """Place a copy of file ``src`` at ``dst`` atomically; returns ``Path(dst)``.

    A hard link is used when both paths are on one filesystem (downloaded teachers are hundreds of MB, and the
    download cache already holds one copy); otherwise the bytes are copied. Either way ``dst`` appears only complete.
    """
    import shutil

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
        os.replace(tmp, dst)
        # rename() of two links to one file (dst already linked to src) succeeds without removing tmp.
        tmp.unlink(missing_ok=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dst.parent)
    return dst
