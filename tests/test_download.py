"""Download cache: file:// and a local http server; checksums, reuse, atomicity, cache location."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from sidlib.io import download as dl
from sidlib.io import atomic
from sidlib.io.atomic import TEMP_SUFFIX, atomic_copy, atomic_open, atomic_write_bytes


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


def _files(root: Path) -> list[Path]:
    """Files of the cache other than the entries' lock files."""
    return [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


@pytest.fixture
def payload(tmp_path):
    data = os.urandom(300_000)  # several read chunks would be < 1 MiB; size is irrelevant to logic
    src = tmp_path / "src" / "weights file.pkl"
    src.parent.mkdir()
    src.write_bytes(data)
    return src, data


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv(dl.CACHE_ENV_VAR, raising=False)
    return tmp_path / "cache"


def test_file_url_first_download_records_hash(payload, cache):
    src, data = payload
    path = dl.download(src.as_uri(), cache_dir=cache, progress=False)
    assert path.read_bytes() == data
    assert path.is_relative_to(cache)
    record = path.with_name(path.name + ".sha256").read_text().split()
    assert record == [_sha(data), path.name]
    assert not _leftovers(cache)


def test_reuse_does_not_refetch(payload, cache, monkeypatch):
    src, data = payload
    first = dl.download(src.as_uri(), cache_dir=cache, progress=False)

    def no_network(*a, **k):
        raise AssertionError("a valid cache entry must be reused")

    monkeypatch.setattr(dl, "_fetch", no_network)
    assert dl.download(src.as_uri(), cache_dir=cache, progress=False) == first
    assert dl.download(src.as_uri(), sha256=_sha(data).upper(), cache_dir=cache, progress=False) == first


def test_expected_checksum_match_and_mismatch(payload, cache):
    src, data = payload
    with pytest.raises(dl.ChecksumError, match="sha256 mismatch"):
        dl.download(src.as_uri(), sha256=_sha(b"something else"), cache_dir=cache, progress=False)
    # Refused content leaves neither a file, a record nor a temporary file behind.
    assert _files(cache) == []
    path = dl.download(src.as_uri(), sha256=_sha(data), cache_dir=cache, progress=False)
    assert path.read_bytes() == data


def test_tampered_cache_entry_is_downloaded_again(payload, cache):
    src, data = payload
    path = dl.download(src.as_uri(), cache_dir=cache, progress=False)
    path.write_bytes(b"damaged")
    with pytest.warns(RuntimeWarning, match="no longer matches its recorded sha256"):
        again = dl.download(src.as_uri(), cache_dir=cache, progress=False)
    assert again == path and again.read_bytes() == data
    assert dl._read_record(path) == _sha(data)


def test_cached_entry_with_other_digest_than_pinned(payload, cache):
    src, data = payload
    path = dl.download(src.as_uri(), cache_dir=cache, progress=False)
    # Upstream changed: the pin now names the new content, the cache holds the old one.
    new = b"new upstream content"
    src.write_bytes(new)
    assert dl.download(src.as_uri(), sha256=_sha(new), cache_dir=cache, progress=False).read_bytes() == new
    # A pin that matches neither the cache nor the source: error, and no entry survives.
    with pytest.raises(dl.ChecksumError):
        dl.download(src.as_uri(), sha256=_sha(data), cache_dir=cache, progress=False)
    assert not path.exists() and not path.with_name(path.name + ".sha256").exists()
    assert not _leftovers(cache)


def test_file_without_record_counts_as_incomplete(payload, cache):
    src, data = payload
    path = dl.cache_path_for(src.as_uri(), cache)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"half a file")
    assert dl.download(src.as_uri(), cache_dir=cache, progress=False).read_bytes() == data


def test_env_var_and_default_cache_dir(payload, tmp_path, monkeypatch):
    src, data = payload
    env_cache = tmp_path / "env-cache"
    monkeypatch.setenv(dl.CACHE_ENV_VAR, str(env_cache))
    path = dl.download(src.as_uri(), progress=False)
    assert path.is_relative_to(env_cache) and path.read_bytes() == data
    # An explicit cache_dir wins over the variable.
    explicit = tmp_path / "explicit"
    assert dl.download(src.as_uri(), cache_dir=explicit, progress=False).is_relative_to(explicit)
    monkeypatch.delenv(dl.CACHE_ENV_VAR)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dl.default_cache_dir() == tmp_path / "home" / ".cache" / "sidlib"


def test_same_file_name_different_urls_do_not_collide(tmp_path):
    a = dl.cache_path_for("https://example.org/alpha1/network.pkl", tmp_path)
    b = dl.cache_path_for("https://example.org/alpha1.2/network.pkl", tmp_path)
    assert a != b and a.name == b.name == "network.pkl"


def test_bad_arguments(payload, cache):
    src, _ = payload
    with pytest.raises(ValueError, match="scheme"):
        dl.download("ftp://example.org/x.pkl", cache_dir=cache)
    with pytest.raises(ValueError, match="64 hex"):
        dl.download(src.as_uri(), sha256="abc", cache_dir=cache)
    with pytest.raises(dl.DownloadError):
        dl.download((src.parent / "missing.pkl").as_uri(), cache_dir=cache, progress=False)
    assert not _leftovers(cache)


def test_interrupted_stream_leaves_nothing(payload, cache, monkeypatch):
    src, data = payload
    real_open = dl.urllib.request.urlopen

    class Broken:
        def __init__(self, resp):
            self._resp, self.headers, self._n = resp, resp.headers, 0

        def read(self, n):
            self._n += 1
            if self._n > 1:
                raise ConnectionResetError("connection dropped")
            return self._resp.read(1000)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._resp.close()

    monkeypatch.setattr(dl.urllib.request, "urlopen", lambda *a, **k: Broken(real_open(*a, **k)))
    with pytest.raises(dl.DownloadError, match="connection dropped"):
        dl.download(src.as_uri(), cache_dir=cache, progress=False)
    assert _files(cache) == []


# ---------------------------------------------------------------------------------- http server


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        self.server.hits[self.path] = self.server.hits.get(self.path, 0) + 1
        if self.path in ("/http10-cut.bin", "/http10-full.bin", "/slow.bin"):
            data = (self.server.root / "data.bin").read_bytes()
            self.send_response(200)
            if self.path == "/slow.bin":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()  # HTTP/1.0 without a length: the end of the data is the closing connection
            cut = len(data) // 2 if self.path == "/http10-cut.bin" else len(data)
            step = 1 << 16
            for i in range(0, cut, step):
                self.wfile.write(data[i:min(i + step, cut)])
                self.wfile.flush()
                if self.path == "/slow.bin":
                    time.sleep(0.04)
            self.close_connection = True
            return
        if self.path == "/short.bin":
            # Announces more bytes than it sends, then closes: a truncated transfer.
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    httpd.hits, httpd.root = {}, root
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_http_download_reuse_and_mismatch(server, cache):
    root, base, httpd = server
    data = os.urandom(2_500_000)  # more than two read chunks
    (root / "net.pkl").write_bytes(data)
    url = f"{base}/net.pkl"
    path = dl.download(url, cache_dir=cache, progress=True)
    assert path.read_bytes() == data and httpd.hits["/net.pkl"] == 1
    assert dl.download(url, sha256=_sha(data), cache_dir=cache, progress=False) == path
    assert httpd.hits["/net.pkl"] == 1  # served from the cache

    other = f"{base}/net.pkl?v=2"
    with pytest.raises(dl.ChecksumError):
        dl.download(other, sha256="0" * 64, cache_dir=cache, progress=False)
    assert not dl.cache_path_for(other, cache).exists()
    assert not _leftovers(cache)


def test_http_errors_leave_no_entry(server, cache):
    _, base, _ = server
    with pytest.raises(dl.DownloadError, match="404"):
        dl.download(f"{base}/absent.pkl", cache_dir=cache, progress=False)
    with pytest.raises(dl.DownloadError):
        dl.download(f"{base}/short.bin", cache_dir=cache, progress=False)
    assert _files(cache) == []


# ---------------------------------------------------------------------------------- atomic writes


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "wb") as f:
            f.write(b"new but incomplete")
            raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"old"
    assert not _leftovers(tmp_path)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"


def test_atomic_copy_places_a_complete_copy_and_replaces_the_old_one(tmp_path):
    src = tmp_path / "cache" / "ref.npz"
    src.parent.mkdir()
    src.write_bytes(b"reference statistics")
    dst = tmp_path / "out" / "deeper" / "fid.npz"
    dst.parent.mkdir(parents=True)
    dst.write_bytes(b"an older, unrelated file")
    assert atomic_copy(src, dst) == dst and dst.read_bytes() == b"reference statistics"
    # Copying again onto the existing copy (e.g. fetching a reference twice) leaves no temporary file behind.
    atomic_copy(src, dst)
    assert dst.read_bytes() == b"reference statistics" and src.read_bytes() == b"reference statistics"
    assert not _leftovers(tmp_path)
    with pytest.raises(FileNotFoundError):
        atomic_copy(tmp_path / "missing.npz", tmp_path / "out" / "x.npz")
    assert not (tmp_path / "out" / "x.npz").exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_finished_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert atomic.file_mode() == mode and os.umask(umask) == umask  # reading the umask leaves it as it was
        atomic_write_bytes(tmp_path / "a.bin", b"a")
        with atomic.atomic_path(tmp_path / "b.bin") as tmp:  # a writer that replaces the file it was given
            (tmp_path / "other").write_bytes(b"b")
            os.chmod(tmp_path / "other", 0o600)
            os.replace(tmp_path / "other", tmp)
    finally:
        os.umask(old)
    for name in ("a.bin", "b.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


# ---------------------------------------------------------------------------------- truncation, leftovers, locks


def test_truncated_transfer_without_length_is_never_recorded(server, cache):
    root, base, httpd = server
    data = os.urandom(300_000)
    (root / "data.bin").write_bytes(data)
    url = f"{base}/http10-cut.bin"
    # HTTP/1.0 without Content-Length that closes after half the data: indistinguishable from a complete transfer.
    with pytest.warns(RuntimeWarning, match="without a length"):
        path = dl.download(url, cache_dir=cache, progress=False)
    assert path.read_bytes() == data[:150_000]
    assert dl._read_record(path) is None  # not recorded as complete ...
    with pytest.warns(RuntimeWarning):
        dl.download(url, cache_dir=cache, progress=False)
    assert httpd.hits["/http10-cut.bin"] == 2  # ... so it is fetched again rather than reused
    # With a pin the truncation is detected: nothing is cached.
    with pytest.raises(dl.ChecksumError):
        dl.download(url, sha256=_sha(data), cache_dir=cache, progress=False)
    assert not path.exists() and _files(cache) == [] and not _leftovers(cache)
    # A complete length-less transfer with a pin is verified, recorded and reused.
    full = f"{base}/http10-full.bin"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = dl.download(full, sha256=_sha(data), cache_dir=cache, progress=False)
        assert dl.download(full, cache_dir=cache, progress=False) == path
    assert path.read_bytes() == data and dl._read_record(path) == _sha(data)
    assert httpd.hits["/http10-full.bin"] == 1


def test_leftover_partial_files_are_removed(payload, cache):
    src, data = payload
    path = dl.cache_path_for(src.as_uri(), cache)
    path.parent.mkdir(parents=True)
    stale = [path.parent / f".{path.name}.x1{TEMP_SUFFIX}", path.parent / f".{path.name}.sha256.x2{TEMP_SUFFIX}"]
    for p in stale:
        p.write_bytes(b"left by a killed download")
    assert dl.download(src.as_uri(), cache_dir=cache, progress=False).read_bytes() == data
    assert not _leftovers(cache)


def _download_in_subprocess(url: str, cache: Path) -> subprocess.Popen:
    code = ("import sys; from sidlib.io import download as dl; "
            "print(dl.download(sys.argv[1], cache_dir=sys.argv[2], progress=False))")
    return subprocess.Popen([sys.executable, "-c", code, url, str(cache)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_killed_download_leaves_nothing_for_the_next_one(server, cache):
    root, base, httpd = server
    data = os.urandom(2_000_000)  # sent in 64 KiB pieces, 40 ms apart
    (root / "data.bin").write_bytes(data)
    url = f"{base}/slow.bin"
    proc = _download_in_subprocess(url, cache)
    deadline = time.monotonic() + 60
    while not _leftovers(cache) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert _leftovers(cache), "the download never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _leftovers(cache)  # what a killed attempt leaves behind ...
    path = dl.download(url, cache_dir=cache, progress=False)
    assert path.read_bytes() == data and dl._read_record(path) == _sha(data)
    assert not _leftovers(cache)  # ... is gone after the next download


def test_concurrent_downloads_of_one_url(server, cache):
    root, base, httpd = server
    data = os.urandom(1_500_000)
    (root / "data.bin").write_bytes(data)
    url = f"{base}/slow.bin"
    procs = [_download_in_subprocess(url, cache) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1 and Path(paths.pop()).read_bytes() == data
    assert httpd.hits["/slow.bin"] == 1  # the second waited for the first and reused its entry
    assert len(_files(cache)) == 2 and not _leftovers(cache)  # the file and its record


def test_cache_directory_problems_name_the_path(payload, tmp_path):
    src, _ = payload
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    with pytest.raises(dl.DownloadError, match=str(blocker)):
        dl.download(src.as_uri(), cache_dir=blocker, progress=False)
    cache = tmp_path / "cache"
    path = dl.cache_path_for(src.as_uri(), cache)
    path.mkdir(parents=True)  # a folder where the entry's file should be
    with pytest.raises(dl.DownloadError, match=str(path)):
        dl.download(src.as_uri(), cache_dir=cache, progress=False)
