"""GPT-2 by name from the Hugging Face hub: one cache shared with transformers, offline
use, resumed transfers and SHA-256 checks, against a hub-like server on 127.0.0.1.

The stand-in hub answers what ``huggingface_hub`` asks: ``HEAD``/``GET
/{repo}/resolve/{revision}/{file}`` with ``X-Repo-Commit`` and ``ETag``; for a large (LFS)
file a 302 to a second server (the content host) with ``X-Linked-Etag`` (its SHA-256) and
``X-Linked-Size``. The content host honours ``Range`` requests. It publishes a tiny random
GPT-2 saved by transformers under OpenAI's ``gpt2-small`` repository.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from conftest import QuietHandler
from test_hf_gpt2 import SHAPES, TOL, max_logit_diff, random_ids, rewrite_checkpoint, saved_hf_model

from minigpt.cli import main as cli_main
from minigpt.io import hub
from minigpt.io.files import ChecksumError, sha256_of
from minigpt.io.hub import default_weights_dir, download_gpt2
from minigpt.models.gpt2.model import GPTModel

transformers = pytest.importorskip("transformers")
from huggingface_hub import constants  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402

REPO_ID = "openai-community/gpt2"
COMMIT = "4f1c1d4f6b0e8d1e2a3b4c5d6e7f8091a2b3c4d5"
LFS = {"model.safetensors"}


class FakeHub:
    """Two loopback servers: the hub (``api``) and the content host (``cdn``)."""

    def __init__(self, http_server, directory: Path) -> None:
        self.files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
        self.etags = {name: hashlib.sha256(data).hexdigest() for name, data in self.files.items()}
        self.corrupt: set[str] = set()  # served with one byte changed
        self.drop_once: set[str] = set()  # the connection drops halfway, once
        self.ranges: list[str] = []  # Range headers the content host received
        self.api = http_server(HubHandler)
        self.cdn = http_server(ContentHandler)
        self.api.hub = self.cdn.hub = self

    def requests(self) -> list[tuple[str, str]]:
        return self.api.requests + self.cdn.requests

    def clear(self) -> None:
        self.api.requests.clear()
        self.cdn.requests.clear()
        self.ranges.clear()

    def weight_downloads(self) -> int:
        return sum(method == "GET" and path.startswith("/blobs/") for method, path in self.cdn.requests)


class HubHandler(QuietHandler):
    def do_HEAD(self) -> None:
        self.resolve(body=False)

    def do_GET(self) -> None:
        self.resolve(body=True)

    def resolve(self, body: bool) -> None:
        hub: FakeHub = self.server.hub
        match = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>[^?]+)", self.path)
        if match is None or match["repo"] != REPO_ID or match["file"] not in hub.files:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound" if match and match["repo"] == REPO_ID else "RepoNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        name = match["file"]
        data, etag = hub.files[name], hub.etags[name]
        if name in LFS:  # the hub redirects large files to its content host
            self.send_response(302)
            self.send_header("Location", hub.cdn.url(f"/blobs/{name}"))
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("ETag", '"0123456789abcdef0123456789abcdef01234567"')  # the Git pointer's
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("ETag", f'"{etag[:40]}"')  # a small file's ETag is its Git hash
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


class ContentHandler(QuietHandler):
    def do_HEAD(self) -> None:
        self.serve(body=False)

    def do_GET(self) -> None:
        self.serve(body=True)

    def serve(self, body: bool) -> None:
        hub: FakeHub = self.server.hub
        name = self.path.removeprefix("/blobs/")
        data = hub.files[name]
        if name in hub.corrupt:
            data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match[1]) if match else 0
        if match:
            hub.ranges.append(self.headers["Range"])
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if body:
            sent = data[start:]
            if name in hub.drop_once:
                hub.drop_once.discard(name)
                sent = sent[: len(sent) // 2]
            self.wfile.write(sent)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[GPT2LMHeadModel, Path]:
    directory = tmp_path_factory.mktemp("tiny")
    return saved_hf_model("tiny", directory), directory


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache of this test's own, used by minigpt and transformers alike;
    online, no weights folder, and no pinned hash (each test pins what it needs)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MINIGPT_WEIGHTS_DIR",
                "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "KNOWN_SHA256", {})
    return cache


def use_endpoint(monkeypatch, url: str) -> None:
    """Point ``huggingface_hub`` at ``url``: the variable, and the constants it read at import."""
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    # transformers keeps one hub client, made with the endpoint of its first use: make it afresh.
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None, raising=False)


@pytest.fixture
def fake_hub(http_server, tiny, hf_cache, monkeypatch) -> FakeHub:
    fake = FakeHub(http_server, tiny[1])
    use_endpoint(monkeypatch, fake.api.base_url)
    return fake


@pytest.fixture
def no_network(hf_cache, monkeypatch) -> None:
    use_endpoint(monkeypatch, "http://127.0.0.1:9")  # nothing listens there


def pin(sha256: str, name: str = "model.safetensors") -> None:
    """Pin ``gpt2-small``'s file to ``sha256``, as minigpt pins OpenAI's."""
    hub.KNOWN_SHA256[("gpt2-small", name)] = sha256


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


# ------------------------------------------------------------------- download, cache, offline

def test_download_lands_in_the_hf_cache_and_loads_with_transformers_logits(fake_hub, tiny, hf_cache, capsys):
    pin(fake_hub.etags["model.safetensors"])
    assert default_weights_dir() == hf_cache
    assert cli_main(["download", "gpt2-small"]) == 0
    snapshot = hf_cache / "models--openai-community--gpt2" / "snapshots" / COMMIT
    assert str(snapshot) in capsys.readouterr().out
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors"]
    assert fake_hub.weight_downloads() == 1

    fake_hub.clear()
    model = GPTModel.from_pretrained("gpt2-small", progress=False)
    assert fake_hub.requests() == []  # the cached copy is used as it is
    diff = max_logit_diff(model, tiny[0], random_ids(model.cfg, 2, SHAPES["tiny"]["n_positions"]))
    assert diff < TOL


def test_a_warm_cache_needs_no_request_online_or_offline(fake_hub, monkeypatch):
    first = download_gpt2("gpt2-small", progress=False)
    fake_hub.clear()
    assert download_gpt2("gpt2-small", progress=False) == first
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert download_gpt2("gpt2-small", progress=False) == first
    assert GPTModel.from_pretrained("gpt2-small").cfg.emb_dim == SHAPES["tiny"]["n_embd"]
    assert fake_hub.requests() == []


def test_a_gpt2_that_transformers_downloaded_loads_without_a_download(fake_hub, tiny):
    reference = GPT2LMHeadModel.from_pretrained(REPO_ID).eval()
    assert fake_hub.weight_downloads() == 1
    fake_hub.clear()
    model = GPTModel.from_pretrained("gpt2-small", progress=False)
    assert fake_hub.requests() == []
    assert max_logit_diff(model, reference, random_ids(model.cfg, 2, 16)) < TOL


def test_transformers_loads_what_minigpt_downloaded_without_a_download(fake_hub):
    model = GPTModel.from_pretrained("gpt2-small", progress=False)
    fake_hub.clear()
    reference = GPT2LMHeadModel.from_pretrained(REPO_ID).eval()
    assert fake_hub.weight_downloads() == 0
    assert max_logit_diff(model, reference, random_ids(model.cfg, 2, 16)) < TOL


def hf_cache_layout(cache: Path, checkpoint: Path) -> Path:
    """Lay ``checkpoint``'s files out as the Hugging Face cache does: blobs named by their
    SHA-256, a snapshot of links to them, and ``refs/main`` naming the snapshot's commit."""
    repo = cache / "models--openai-community--gpt2"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name in ("config.json", "model.safetensors"):
        blob = repo / "blobs" / sha256_of(checkpoint / name)
        blob.write_bytes((checkpoint / name).read_bytes())
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_a_checkpoint_in_the_cache_layout_loads_without_any_request(hf_cache, no_network, tmp_path, monkeypatch):
    hf = saved_hf_model("heads6", tmp_path / "saved")
    snapshot = hf_cache_layout(hf_cache, tmp_path / "saved")
    pin(sha256_of(tmp_path / "saved" / "model.safetensors"))
    assert download_gpt2("gpt2-small") == snapshot
    model = GPTModel.from_pretrained("gpt2-small")
    assert max_logit_diff(model, hf, random_ids(model.cfg, 2, 16)) < TOL

    pin("0" * 64)  # another file than the pinned one is refused, by the blob's name
    with pytest.raises(ChecksumError, match="not gpt2-small's published weights"):
        GPTModel.from_pretrained("gpt2-small")


# ------------------------------------------------------------------------- verification

@pytest.mark.parametrize("how", ["corrupted_transfer", "wrong_pinned_sha", "wrong_published_sha"])
def test_a_file_with_the_wrong_sha256_is_refused_and_deleted(fake_hub, hf_cache, how):
    if how == "corrupted_transfer":
        fake_hub.corrupt.add("model.safetensors")  # the hub still publishes the right SHA-256
    elif how == "wrong_pinned_sha":
        pin("0" * 64)
    else:
        fake_hub.etags["model.safetensors"] = "f" * 64
    with pytest.raises(ChecksumError, match="gpt2/resolve/main/model.safetensors has SHA-256"):
        GPTModel.from_pretrained("gpt2-small", progress=False)
    assert [p for p in files_under(hf_cache) if p.parent.name in ("blobs", COMMIT)] == []
    assert not (hf_cache / "models--openai-community--gpt2").exists()


def test_a_dropped_transfer_resumes_with_a_range_request(fake_hub, monkeypatch):
    pin(fake_hub.etags["model.safetensors"])
    # Received bytes are kept chunk by chunk (10 MB by default): small chunks for a small file.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    fake_hub.drop_once.add("model.safetensors")
    path = download_gpt2("gpt2-small", progress=False)
    size = len(fake_hub.files["model.safetensors"])
    [resumed] = fake_hub.ranges
    assert 0 < int(re.fullmatch(r"bytes=(\d+)-", resumed)[1]) < size
    assert sha256_of(path / "model.safetensors") == fake_hub.etags["model.safetensors"]


def test_the_published_sha256_verifies_an_unpinned_file(fake_hub):
    path = download_gpt2("gpt2-small", progress=False)
    assert ("HEAD", "/openai-community/gpt2/resolve/main/model.safetensors") in fake_hub.api.requests
    assert sha256_of(path / "model.safetensors") == fake_hub.etags["model.safetensors"]


def test_an_unverifiable_download_warns(fake_hub, monkeypatch):
    monkeypatch.setitem(fake_hub.etags, "model.safetensors", "not-a-sha256")
    with pytest.warns(UserWarning, match="cannot verify"):
        GPTModel.from_pretrained("gpt2-small", progress=False)


# ------------------------------------------------------------------- a weights folder

def test_a_weights_folder_gets_plain_files_and_is_reused(fake_hub, tmp_path, monkeypatch):
    pin(fake_hub.etags["model.safetensors"])
    target = tmp_path / "weights"
    assert download_gpt2("gpt2-small", target, progress=False) == target / "gpt2-small"
    assert (target / "gpt2-small" / "model.safetensors").is_file()
    assert not (target / "gpt2-small" / "model.safetensors").is_symlink()

    fake_hub.clear()
    monkeypatch.setenv("MINIGPT_WEIGHTS_DIR", str(target))
    assert default_weights_dir() == target
    assert GPTModel.from_pretrained("gpt2-small").cfg.n_layers == SHAPES["tiny"]["n_layer"]
    assert fake_hub.requests() == []


def test_a_local_copy_in_the_data_dir_needs_no_network(tiny, no_network, tmp_path, monkeypatch):
    rewrite_checkpoint(tiny[1], tmp_path / "gpt2-medium")
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(tmp_path))
    assert GPTModel.from_pretrained("gpt2-medium").cfg.emb_dim == SHAPES["tiny"]["n_embd"]


# ------------------------------------------------------------------------------ offline

@pytest.mark.parametrize("name", ["gpt2-small", "gpt2-xl"])
@pytest.mark.parametrize("where", ["hf_cache", "weights_dir"])
def test_offline_download_says_what_to_put_where_and_leaves_no_folder(no_network, hf_cache, tmp_path, name, where):
    weights_dir = tmp_path / "weights" if where == "weights_dir" else None
    with pytest.raises(ConnectionError, match="could not download") as err:
        GPTModel.from_pretrained(name, weights_dir=weights_dir, progress=False)
    assert f"put its config.json and model.safetensors in {weights_dir / name if weights_dir else ''}" in str(err.value)
    assert not (tmp_path / "weights").exists() and not hf_cache.exists()


def test_hf_hub_offline_with_nothing_cached_makes_no_request(fake_hub, hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match=r"HF_HUB_OFFLINE is set.*\$MINIGPT_DATA_DIR/gpt2-small/"):
        download_gpt2("gpt2-small", progress=False)
    assert fake_hub.requests() == [] and not hf_cache.exists()


def test_the_default_folder_is_the_hf_cache_unless_a_weights_folder_is_set(hf_cache, tmp_path, monkeypatch):
    assert default_weights_dir() == hf_cache
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert default_weights_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("MINIGPT_WEIGHTS_DIR", str(tmp_path / "w"))
    assert default_weights_dir() == tmp_path / "w"
    assert not (tmp_path / "w").exists() and not (tmp_path / "home").exists()  # asking creates nothing
