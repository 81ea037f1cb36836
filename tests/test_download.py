"""Download cache: file:// and a local http server; checksums, reuse, atomicity, cache location."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest

from sidlib.io import download as dl
from sidlib.io import atomic
from sidlib.io.atomic import TEMP_SUFFIX, atomic_copy, atomic_open, atomic_write_bytes


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


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
    assert [p for p in cache.rglob("*") if p.is_file()] == []
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
    assert [p for p in cache.rglob("*") if p.is_file()] == []


# ---------------------------------------------------------------------------------- http server


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        if self.path == "/short.bin":
            # Announces more bytes than it sends, then closes: a truncated transfer.
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            self.close_connection = True
            return
        self.server.hits[self.path] = self.server.hits.get(self.path, 0) + 1
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    httpd.hits = {}
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
    assert [p for p in cache.rglob("*") if p.is_file()] == []


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
    # Finished files get ordinary permissions, not the 0600 of temporary files.
    assert target.stat().st_mode & 0o777 == atomic._FILE_MODE


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
