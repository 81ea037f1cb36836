"""Cached, checksummed, atomic downloads of checkpoints (``file://`` and ``http(s)://``).

Cache layout (``cache_dir`` argument, else ``$SIDLIB_CACHE``, else ``~/.cache/sidlib``)::

    <cache>/<first 16 hex of sha256(url)>/<file name>          the downloaded file
    <cache>/<first 16 hex of sha256(url)>/<file name>.sha256   "<hex digest>  <file name>"

The file is streamed into a temporary file in the same folder, hashed on the fly, checked against
the expected digest if one was given, and only then renamed into place; the ``.sha256`` record is
written after it (``sha256sum -c`` can check it). A file without a record therefore counts as an
incomplete download.

Reuse: a cached file is re-hashed when it is reused (once per process while its size, mtime and
inode stay the same).

* recorded digest matches the file, and (if given) the expected digest -> reused;
* recorded digest no longer matches the file (edited or damaged on disk) -> the entry is discarded
  with a warning and downloaded again (the URL is the source of truth; the expected digest, when
  given, still guards the fresh copy);
* the file is intact but differs from the expected digest (upstream changed, or a different pin)
  -> downloaded again; if the fresh copy also differs, :class:`ChecksumError` is raised and no
  cache entry is left behind.

Concurrent downloads of the same URL (e.g. several ranks) are safe but redundant: each writes its
own temporary file and the last rename wins with identical content.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from .atomic import atomic_open, atomic_write_text

__all__ = ["download", "default_cache_dir", "cache_path_for", "file_sha256", "DownloadError",
           "ChecksumError", "CACHE_ENV_VAR"]

CACHE_ENV_VAR = "SIDLIB_CACHE"
_CHUNK = 1 << 20
_TIMEOUT_S = 60
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(OSError):
    """A URL could not be fetched completely."""


class ChecksumError(DownloadError):
    """Downloaded content does not have the expected sha256; nothing was cached."""


def default_cache_dir() -> Path:
    """``$SIDLIB_CACHE`` if set and non-empty, else ``~/.cache/sidlib``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sidlib"


def _file_name(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    name = urllib.parse.unquote(Path(parsed.path).name)
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".")
    return name or "download"


def cache_path_for(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`download` keeps ``url`` (the file may not exist yet)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / hashlib.sha256(url.encode("utf-8")).hexdigest()[:16] / _file_name(url)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# Digests this process already computed, keyed by path and (size, mtime_ns, inode): re-hashing a
# multi-GB teacher on every load in one process buys nothing unless the file changed.
_VERIFIED: dict[Path, tuple[tuple, str]] = {}


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _verified_sha256(path: Path) -> str:
    key = _stat_key(path)
    hit = _VERIFIED.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    digest = file_sha256(path)
    _VERIFIED[path] = (key, digest)
    return digest


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_record(path: Path) -> str | None:
    try:
        text = _record_path(path).read_text(encoding="utf-8").split()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return text[0].lower() if text and _HEX64.match(text[0].lower()) else None


def _discard(path: Path) -> None:
    _VERIFIED.pop(path, None)
    for p in (path, _record_path(path)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _normalise_expected(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not _HEX64.match(value):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return value


def download(url: str, *, sha256: str | None = None, cache_dir: str | os.PathLike | None = None,
             progress: bool = True) -> Path:
    """Return a local path holding the content of ``url``, downloading it once.

    Args:
        url: ``file://``, ``http://`` or ``https://`` URL.
        sha256: expected hex digest; a mismatch raises :class:`ChecksumError` and caches nothing.
        cache_dir: cache root; default ``$SIDLIB_CACHE`` or ``~/.cache/sidlib``.
        progress: show a tqdm progress bar (bytes) on stderr.

    Raises:
        ValueError: unsupported URL scheme or malformed ``sha256``.
        DownloadError: the transfer failed or was incomplete (nothing is cached).
        ChecksumError: the content does not match ``sha256`` (nothing is cached).
    """
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme not in ("file", "http", "https"):
        raise ValueError(f"unsupported URL scheme {scheme!r} in {url!r} (use file://, http:// or https://)")
    expected = _normalise_expected(sha256)
    path = cache_path_for(url, cache_dir)

    if path.exists():
        recorded = _read_record(path)
        actual = _verified_sha256(path)
        if recorded is None:
            pass  # no record: an interrupted earlier run; fetch again below
        elif recorded != actual:
            warnings.warn(f"cached {path} no longer matches its recorded sha256 "
                          f"({actual} != {recorded}); downloading it again", RuntimeWarning,
                          stacklevel=2)
        elif expected is None or actual == expected:
            return path
        _discard(path)

    path.parent.mkdir(parents=True, exist_ok=True)
    actual = _fetch(url, path, expected, progress)
    atomic_write_text(_record_path(path), f"{actual}  {path.name}\n")
    _VERIFIED[path] = (_stat_key(path), actual)
    return path


def _fetch(url: str, path: Path, expected: str | None, progress: bool) -> str:
    """Stream ``url`` into ``path`` atomically; returns the sha256 of what was written.

    The temporary file lives beside ``path`` and is renamed onto it only after the transfer is
    complete and the digest matches ``expected`` (if given); on any failure it is removed and
    ``path`` is not created.
    """
    h = hashlib.sha256()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "sidlib"})
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            received = 0
            with atomic_open(path, "wb") as out, tqdm(
                    total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name,
                    disable=not progress, leave=False) as bar:
                while True:
                    chunk = response.read(_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    h.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                if total is not None and received != total:
                    raise DownloadError(f"incomplete download of {url}: got {received} of {total} bytes")
                if expected is not None and h.hexdigest() != expected:
                    raise ChecksumError(f"sha256 mismatch for {url}: expected {expected}, got "
                                        f"{h.hexdigest()}; the file was refused and not cached")
    except DownloadError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise DownloadError(f"could not download {url}: {e}") from e
    return h.hexdigest()
