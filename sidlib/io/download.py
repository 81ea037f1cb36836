"""Cached, checksummed, atomic downloads of checkpoints (``file://`` and ``http(s)://``).

Cache (``cache_dir``, else ``$SIDLIB_CACHE``, else ``~/.cache/sidlib``): ``<cache>/<16 hex of sha256(url)>/<name>``,
beside it ``<name>.sha256`` (``"<digest>  <name>"``, for ``sha256sum -c``; written last, a file without one is
incomplete) and ``<name>.lock`` (an ``flock``: concurrent calls for one URL take turns). The URL is streamed into a
``.partial`` file and renamed into place once complete (the announced length, a properly ended chunked transfer, or
the pinned digest) and matching the expected digest. Without length or chunks a truncation cannot be seen: the file
is returned with a warning and not recorded. A reused entry is re-hashed (once per process while size, mtime and
inode stay); a damaged or mismatching one is fetched again (:class:`ChecksumError` if the fresh copy differs too)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from .atomic import TEMP_SUFFIX, atomic_open, atomic_write_text

try:
    import fcntl
except ImportError:  # Windows: no lock; concurrent downloads of one URL are then only atomic, not serialised
    fcntl = None

__all__ = ["download", "default_cache_dir", "cache_path_for", "cache_lock", "file_sha256", "DownloadError",
           "ChecksumError", "CACHE_ENV_VAR"]

CACHE_ENV_VAR = "SIDLIB_CACHE"
_CHUNK = 1 << 20
_TIMEOUT_S = 60
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(OSError):
    """A URL could not be fetched completely, or the cache cannot be used (names the URL or path)."""


class ChecksumError(DownloadError):
    """Downloaded content does not have the expected sha256; nothing was cached."""


def default_cache_dir() -> Path:
    """``$SIDLIB_CACHE`` if set and non-empty, else ``~/.cache/sidlib``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sidlib"


def cache_path_for(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`download` keeps ``url`` (the file may not exist yet)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = urllib.parse.unquote(Path(urllib.parse.urlparse(url).path).name)
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".") or "download"
    return root / hashlib.sha256(url.encode("utf-8")).hexdigest()[:16] / name


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def cache_lock(path: Path):
    """Hold the lock of cache entry ``path``; removes the leftover ``.partial`` files in its folder (only holders of
    the lock write there)."""
    lock = path.with_name(path.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise DownloadError(f"cache directory {lock.parent} is not usable: {e.strerror or e}") from None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        for leftover in lock.parent.glob("*" + TEMP_SUFFIX):
            leftover.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the lock


# Digests this process computed, by path and (size, mtime_ns, inode): re-hashing a multi-GB teacher buys nothing.
_VERIFIED: dict[Path, tuple[tuple, str]] = {}


def _verified_sha256(path: Path, digest: str | None = None) -> str:
    """The sha256 of ``path``: ``digest`` if given (just computed), else hashed unless this process already did."""
    st = path.stat()
    key = (st.st_size, st.st_mtime_ns, st.st_ino)
    if digest is not None or _VERIFIED.get(path, (None,))[0] != key:
        _VERIFIED[path] = (key, digest or file_sha256(path))
    return _VERIFIED[path][1]


def _read_record(path: Path) -> str | None:
    try:
        text = path.with_name(path.name + ".sha256").read_text(encoding="utf-8").split()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return text[0].lower() if text and _HEX64.match(text[0].lower()) else None


def download(url: str, *, sha256: str | None = None, cache_dir: str | os.PathLike | None = None,
             progress: bool = True) -> Path:
    """A local path holding the content of ``url`` (``file://``, ``http://``, ``https://``), downloaded once;
    ``sha256``: expected hex digest; ``progress``: a tqdm bar on stderr. Raises ValueError (scheme, malformed
    ``sha256``), :class:`DownloadError` or :class:`ChecksumError`; nothing is cached then."""
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme not in ("file", "http", "https"):
        raise ValueError(f"unsupported URL scheme {scheme!r} in {url!r} (use file://, http:// or https://)")
    expected = None if sha256 is None else sha256.strip().lower()
    if expected is not None and not _HEX64.match(expected):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    path = cache_path_for(url, cache_dir)
    with cache_lock(path):
        try:
            if path.exists():
                recorded, actual = _read_record(path), _verified_sha256(path)
                if recorded is not None and recorded != actual:
                    warnings.warn(f"cached {path} no longer matches its recorded sha256 ({actual} != {recorded}); "
                                  "downloading it again", RuntimeWarning, stacklevel=2)
                elif recorded is not None and expected in (None, actual):
                    return path
                _VERIFIED.pop(path, None)  # no record: an interrupted or unverifiable earlier download
                for p in (path, path.with_name(path.name + ".sha256")):
                    p.unlink(missing_ok=True)
            actual, complete = _fetch(url, path, expected, progress)
            _verified_sha256(path, actual)
            if complete:
                atomic_write_text(path.with_name(path.name + ".sha256"), f"{actual}  {path.name}\n")
            else:
                warnings.warn(f"{url} was served without a length, so a truncated transfer cannot be told from a "
                              f"complete one; {path} is used once and not recorded as complete (pass sha256= to pin "
                              "and cache it)", RuntimeWarning, stacklevel=2)
        except DownloadError:
            raise
        except OSError as e:
            raise DownloadError(f"cache entry {path} is not usable: {e}") from e
    return path


def _fetch(url: str, path: Path, expected: str | None, progress: bool) -> tuple[str, bool]:
    """Stream ``url`` into ``path`` atomically (not created on any failure); ``(sha256, verified complete)``."""
    h = hashlib.sha256()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "sidlib"})
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            chunked = getattr(response, "chunked", False)  # http.client raises IncompleteRead on a cut-off chunk
            with atomic_open(path, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                                      desc=path.name, disable=not progress, leave=False) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
                if total is not None and out.tell() != total:
                    raise DownloadError(f"incomplete download of {url}: got {out.tell()} of {total} bytes")
                if expected is not None and h.hexdigest() != expected:
                    raise ChecksumError(f"sha256 mismatch for {url}: expected {expected}, got {h.hexdigest()}; "
                                        "the file was refused and not cached")
    except DownloadError:
        raise
    except (http.client.HTTPException, OSError, ValueError) as e:  # urllib's URLError is an OSError
        raise DownloadError(f"could not download {url} into {path}: {e}") from e
    return h.hexdigest(), expected is not None or total is not None or bool(chunked)
