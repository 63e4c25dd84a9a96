"""download() and fetch() against a real HTTP server on 127.0.0.1 that the tests control.

The server serves files from a temporary folder, answers ``Range`` requests, and can be
told to drop a response part-way, so checksum failures and resumed downloads are
exercised over real sockets rather than mocks.
"""

import dataclasses
import hashlib
import random
import socket
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from minigpt import datasets
from minigpt.download import ChecksumError, cache_dir, download, fetch, sha256_of

pytestmark = pytest.mark.timeout(60)
TIMEOUT = 5.0  # seconds; every request below is to 127.0.0.1 and answers at once
CONTENT = random.Random(0).randbytes(300_000)
CONTENT_SHA256 = hashlib.sha256(CONTENT).hexdigest()


class FileServer(ThreadingHTTPServer):
    """Serves files from ``root``; records every request's path and ``Range`` header."""

    def __init__(self, root):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.root = root
        self.requests: list[tuple[str, str | None]] = []
        self.drop_after: int | None = None  # send only this many body bytes, once
        self.stall_after: int | None = None  # send this many body bytes, then go silent, once
        self.release = threading.Event()  # ends a stall (set at teardown at the latest)
        self.honor_range = True

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class RangeHandler(BaseHTTPRequestHandler):
    """GET with single ``bytes=N-`` ranges, the kind ``download`` sends to resume."""

    server: FileServer

    def do_GET(self):
        range_header = self.headers.get("Range")
        self.server.requests.append((self.path, range_header))
        path = self.server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if range_header and self.server.honor_range:
            start = int(range_header.removeprefix("bytes=").removesuffix("-"))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.drop_after is not None:
            # Promise the whole body, send part of it, hang up: a dropped connection.
            body, self.server.drop_after = body[: self.server.drop_after], None
        if self.server.stall_after is not None:
            # Send part of the body, then nothing: the client's read must time out.
            self.wfile.write(body[: self.server.stall_after])
            self.wfile.flush()
            self.server.stall_after = None
            self.server.release.wait(timeout=10)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass  # keep test output clean


@pytest.fixture(autouse=True)
def only_localhost(monkeypatch):
    """Fail any request that is not to 127.0.0.1, and keep proxies out of the way."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    real_urlopen = urllib.request.urlopen

    def guarded_urlopen(request, *args, **kwargs):
        url = request.full_url if isinstance(request, urllib.request.Request) else request
        host = urllib.parse.urlsplit(url).hostname
        assert host == "127.0.0.1", f"a test tried to reach {host}"
        return real_urlopen(request, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", guarded_urlopen)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    (root / "blob.bin").write_bytes(CONTENT)
    httpd = FileServer(root)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def test_download_verifies_and_writes_the_file(server, tmp_path):
    dest = tmp_path / "out" / "nested" / "blob.bin"
    path = download(server.url("blob.bin"), dest, CONTENT_SHA256, progress=False, timeout=TIMEOUT)
    assert path == dest
    assert dest.read_bytes() == CONTENT
    assert sha256_of(dest) == CONTENT_SHA256
    assert not dest.with_name("blob.bin.part").exists()
    assert server.requests == [("/blob.bin", None)]


def test_wrong_checksum_leaves_nothing_behind(server, tmp_path):
    dest = tmp_path / "blob.bin"
    with pytest.raises(ChecksumError, match=CONTENT_SHA256):
        download(server.url("blob.bin"), dest, "0" * 64, progress=False, timeout=TIMEOUT)
    assert not dest.exists()
    assert not dest.with_name("blob.bin.part").exists()


def test_dropped_connection_is_resumed_with_range(server, tmp_path):
    dest = tmp_path / "blob.bin"
    part = dest.with_name("blob.bin.part")
    server.drop_after = 100_000
    with pytest.raises(ConnectionError, match="resume"):
        download(server.url("blob.bin"), dest, CONTENT_SHA256, progress=False, timeout=TIMEOUT)
    assert not dest.exists()
    assert part.read_bytes() == CONTENT[:100_000]

    download(server.url("blob.bin"), dest, CONTENT_SHA256, progress=False, timeout=TIMEOUT)
    assert dest.read_bytes() == CONTENT
    assert not part.exists()
    assert server.requests == [("/blob.bin", None), ("/blob.bin", "bytes=100000-")]


def test_stalled_transfer_times_out_and_can_be_resumed(server, tmp_path):
    dest = tmp_path / "blob.bin"
    server.stall_after = 100_000
    with pytest.raises(ConnectionError, match="resume"):
        download(server.url("blob.bin"), dest, CONTENT_SHA256, progress=False, timeout=0.3)
    assert not dest.exists()
    server.release.set()
    download(server.url("blob.bin"), dest, CONTENT_SHA256, progress=False, timeout=TIMEOUT)
    assert dest.read_bytes() == CONTENT


def test_resume_starts_over_when_the_server_ignores_range(server, tmp_path):
    dest = tmp_path / "blob.bin"
    server.drop_after = 100_000
    with pytest.raises(ConnectionError):
        download(server.url("blob.bin"), dest, CONTENT_SHA256, progress=False, timeout=TIMEOUT)
    server.honor_range = False  # answers 200 with the whole file: the .part must not be appended to
    download(server.url("blob.bin"), dest, CONTENT_SHA256, progress=False, timeout=TIMEOUT)
    assert dest.read_bytes() == CONTENT


def test_complete_part_file_is_finished_without_refetching(server, tmp_path):
    # As after a crash between the last byte and the rename: the server answers 416.
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(CONTENT)
    download(server.url("blob.bin"), dest, CONTENT_SHA256, progress=False, timeout=TIMEOUT)
    assert dest.read_bytes() == CONTENT
    assert server.requests == [("/blob.bin", f"bytes={len(CONTENT)}-")]


def test_existing_file_with_right_checksum_is_not_downloaded_again(server, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(CONTENT)
    download(server.url("blob.bin"), dest, CONTENT_SHA256, progress=False, timeout=TIMEOUT)
    assert server.requests == []


def test_existing_file_with_wrong_checksum_is_replaced(server, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"an older version")
    download(server.url("blob.bin"), dest, CONTENT_SHA256, progress=False, timeout=TIMEOUT)
    assert dest.read_bytes() == CONTENT
    assert len(server.requests) == 1


def test_http_error_and_unreachable_server_raise_connection_error(server, tmp_path):
    with pytest.raises(ConnectionError, match="404"):
        download(server.url("missing.bin"), tmp_path / "missing.bin", progress=False, timeout=TIMEOUT)
    with socket.socket() as sock:  # a port that was free a moment ago: nobody listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionError, match="MINIGPT_DATA_DIR"):
        download(f"http://127.0.0.1:{port}/blob.bin", tmp_path / "blob.bin", progress=False, timeout=TIMEOUT)
    assert not (tmp_path / "missing.bin").exists() and not (tmp_path / "blob.bin").exists()


def test_fetch_prefers_the_data_dir(server, tmp_path, monkeypatch):
    local = tmp_path / "data"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "blob.bin").write_bytes(CONTENT)
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(local))
    assert fetch("sub/blob.bin", server.url("blob.bin"), CONTENT_SHA256, progress=False) == local / "sub" / "blob.bin"
    assert server.requests == []
    # A wrong local copy is an error, not silently replaced by a download.
    with pytest.raises(ChecksumError):
        fetch("sub/blob.bin", server.url("blob.bin"), "0" * 64, progress=False)
    assert server.requests == []


def test_fetch_without_data_dir_downloads_into_the_cache_once(server, monkeypatch):
    monkeypatch.delenv("MINIGPT_DATA_DIR")
    path = fetch("sub/blob.bin", server.url("blob.bin"), CONTENT_SHA256, progress=False)
    assert path == cache_dir() / "sub" / "blob.bin"
    assert path.read_bytes() == CONTENT
    assert fetch("sub/blob.bin", server.url("blob.bin"), CONTENT_SHA256, progress=False) == path
    assert len(server.requests) == 1


def test_corpus_is_downloaded_when_the_data_dir_lacks_it(server, tmp_path, monkeypatch, data_path):
    (server.root / "the-verdict.txt").write_bytes((data_path / "the-verdict.txt").read_bytes())
    empty = tmp_path / "empty-data"
    empty.mkdir()
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(empty))
    local_verdict = dataclasses.replace(datasets.CORPORA["the-verdict"], url=server.url("the-verdict.txt"))
    monkeypatch.setitem(datasets.CORPORA, "the-verdict", local_verdict)

    text = datasets.load_corpus("the-verdict")
    assert len(text) == 20479
    assert (cache_dir() / "the-verdict.txt").is_file()
    assert datasets.load_corpus("the-verdict") == text  # the second time from the cache
    assert server.requests == [("/the-verdict.txt", None)]
