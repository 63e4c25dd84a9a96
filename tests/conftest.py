"""Shared test setup: the offline data folder, per-test caches, a loopback HTTP server and
a character tokenizer that every test module can use."""

import base64
import json
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import tiktoken
import torch
from tiktoken_ext.openai_public import r50k_pat_str

from minigpt.io.files import PACKAGE_DATA_DIR

# Every test computes its products with one kernel instead of timing both in its own fresh cache;
# `MINIGPT_LINEAR_KERNEL=onednn python -m pytest ...` runs them all on the other (minigpt.runtime.kernels).
os.environ.setdefault("MINIGPT_LINEAR_KERNEL", "f_linear")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


def _data_root() -> Path:
    return Path(os.environ.get("MINIGPT_TEST_DATA", DEFAULT_DATA))


def _need_data(*relpaths: str) -> Path:
    """The data folder; without it, the package's own copies when it ships every file asked for;
    else a skip that names the files minigpt does not ship."""
    root = _data_root()
    if root.is_dir() and all((root / relpath).is_file() for relpath in relpaths):
        return root
    unshipped = [relpath for relpath in relpaths if not (PACKAGE_DATA_DIR / relpath).is_file()]
    if not unshipped:
        return PACKAGE_DATA_DIR
    pytest.skip(f"needs {', '.join(unshipped)} from the data folder {root} (minigpt does not ship "
                f"{'it' if len(unshipped) == 1 else 'them'})")


@pytest.fixture
def data_path(request) -> Path:
    """The folder of real data (``../shared/data``, or ``$MINIGPT_TEST_DATA``), an independent copy
    of what minigpt ships plus reference files it does not. A test module lists the files it reads
    from it in ``DATA_FILES``; without the folder, the shipped copies stand in, and a test that needs
    a file minigpt does not ship is skipped with its name."""
    return _need_data(*getattr(request.module, "DATA_FILES", ()))


@pytest.fixture
def data_dir(data_path, monkeypatch) -> Path:
    """``MINIGPT_DATA_DIR`` pointed at the data folder for this test."""
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(data_path))
    return data_path


@pytest.fixture(scope="session")
def gpt2() -> tiktoken.Encoding:
    """Reference GPT-2 BPE, built straight from tiktoken's own file in the data folder
    (independent of minigpt's tokenizer code)."""
    path = _need_data("gpt2/r50k_base.tiktoken") / "gpt2" / "r50k_base.tiktoken"
    lines = path.read_bytes().splitlines()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257,
    )


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test downloads into its own cache, so no test sees another's files; and no test
    sees a data folder unless it asks for one (``data_dir``)."""
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MINIGPT_DATA_DIR", raising=False)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU two threads
    waiting for each other make each step several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- a loopback HTTP server -----------------------------------------------------------------


class LoopbackServer(ThreadingHTTPServer):
    """A threaded HTTP server on 127.0.0.1 with a free port; ``url(path)`` gives its address."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.requests: list[tuple[str, str]] = []  # (method, path), filled by QuietHandler
        self.release = threading.Event()  # set at teardown: lets a deliberately stalled handler end

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def url(self, path: str = "") -> str:
        return f"{self.base_url}/{path.lstrip('/')}"


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that records each request on the server and logs nothing."""

    server: LoopbackServer

    def log_request(self, code="-", size="-") -> None:
        self.server.requests.append((self.command, self.path))

    def log_message(self, *args) -> None:
        pass

    def send_json(self, obj) -> None:
        """Answer 200 with ``obj`` as a JSON body."""
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def http_server() -> Iterator[Callable[[type[BaseHTTPRequestHandler]], LoopbackServer]]:
    """Start ``LoopbackServer(handler)`` in a thread: ``server = http_server(Handler)``.
    Every server started in a test is shut down after it. Handlers may subclass
    :class:`QuietHandler` (importable from ``conftest``)."""
    started: list[tuple[LoopbackServer, threading.Thread]] = []

    def start(handler: type[BaseHTTPRequestHandler]) -> LoopbackServer:
        server = LoopbackServer(handler)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def only_localhost(monkeypatch):
    """Fail any urllib request that is not to 127.0.0.1, and keep proxies out of the way."""
    import urllib.parse
    import urllib.request

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


# --- a character tokenizer ------------------------------------------------------------------


class CharTokenizer:
    """One id per character (its code point), with tiktoken's interface: token ids a reader
    can compute by hand. ``<|endoftext|>`` is id 50256 when allowed, as in GPT-2."""

    name = "chars"
    eot_token = 50256
    n_vocab = 50257

    def encode(self, text: str, allowed_special=frozenset()) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(text.split("<|endoftext|>")):
            if i:
                ids += [self.eot_token] if allowed_special else [ord(c) for c in "<|endoftext|>"]
            ids += [ord(c) for c in piece]
        return ids

    def decode(self, ids) -> str:
        return "".join("<|endoftext|>" if i == self.eot_token else chr(i) for i in ids)


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()
