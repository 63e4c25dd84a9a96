"""Files, downloads and pinned files: download() and fetch() against a loopback HTTP server.

The server serves files from a temporary folder, answers ``Range`` requests, and can be
told to drop a response part-way, so checksum failures and resumed downloads are
exercised over real sockets rather than mocks. No test here reaches the internet.
"""

import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import QuietHandler

from minigpt.data import corpora
from minigpt.io import files, sources
from minigpt.io.download import PinnedFile, download, fetch
from minigpt.io.files import ChecksumError, cache_dir, data_dir, sha256_of, write_bytes, write_json, write_text

# Files this module reads from the data folder (without it, from the copies minigpt ships).
DATA_FILES = ["SHA256SUMS", "sms_spam/SMSSpamCollection.tsv"]

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("only_localhost")]
TIMEOUT = 5.0  # seconds; every request below is to 127.0.0.1 and answers at once
CONTENT = random.Random(0).randbytes(300_000)
CONTENT_SHA256 = hashlib.sha256(CONTENT).hexdigest()
SHIPPED = list(sources.PINNED_FILES.values())  # every pinned file ships: only model weights need a network


class RangeHandler(QuietHandler):
    """GET with single ``bytes=N-`` ranges, the kind ``download`` sends to resume.

    Serves ``server.root``; records each request's path and ``Range`` header in
    ``server.gets``; ``server.drop_after`` / ``server.stall_after`` (once) cut a body short
    by hanging up or by going silent; ``server.honor_range = False`` ignores ``Range``.
    """

    def do_GET(self):
        server = self.server
        range_header = self.headers.get("Range")
        server.gets.append((self.path, range_header))
        path = server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if range_header and server.honor_range:
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
        if server.drop_after is not None:
            # Promise the whole body, send part of it, hang up: a dropped connection.
            body, server.drop_after = body[: server.drop_after], None
        if server.stall_after is not None:
            # Send part of the body, then nothing: the client's read must time out.
            self.wfile.write(body[: server.stall_after])
            self.wfile.flush()
            server.stall_after = None
            server.release.wait(timeout=10)
            return
        self.wfile.write(body)


@pytest.fixture
def server(http_server, tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    (root / "blob.bin").write_bytes(CONTENT)
    httpd = http_server(RangeHandler)
    httpd.root = root
    httpd.gets = []
    httpd.drop_after = None  # send only this many body bytes, once
    httpd.stall_after = None  # send this many body bytes, then go silent, once
    httpd.honor_range = True
    return httpd


def sha256_sums(data_path: Path) -> dict[str, str]:
    """The data folder's ``SHA256SUMS`` as ``{relpath: sha256}``."""
    lines = (data_path / "SHA256SUMS").read_text().splitlines()
    return {path.removeprefix("./"): digest for digest, path in (line.split() for line in lines)}


# -- download(): checksums, resuming, broken transfers ---------------------------------------


def test_download_verifies_and_writes_the_file(server, tmp_path):
    dest = tmp_path / "out" / "nested" / "blob.bin"
    path = download(server.url("blob.bin"), dest, CONTENT_SHA256, progress=False, timeout=TIMEOUT)
    assert path == dest
    assert dest.read_bytes() == CONTENT
    assert sha256_of(dest) == CONTENT_SHA256
    assert not dest.with_name("blob.bin.part").exists()
    assert server.gets == [("/blob.bin", None)]


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
    assert server.gets == [("/blob.bin", None), ("/blob.bin", "bytes=100000-")]


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
    assert server.gets == [("/blob.bin", f"bytes={len(CONTENT)}-")]


def test_existing_file_with_right_checksum_is_not_downloaded_again(server, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(CONTENT)
    download(server.url("blob.bin"), dest, CONTENT_SHA256, progress=False, timeout=TIMEOUT)
    assert server.gets == []


def test_existing_file_with_wrong_checksum_is_replaced(server, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"an older version")
    download(server.url("blob.bin"), dest, CONTENT_SHA256, progress=False, timeout=TIMEOUT)
    assert dest.read_bytes() == CONTENT
    assert len(server.gets) == 1


def test_http_error_and_unreachable_server_raise_connection_error(server, tmp_path):
    with pytest.raises(ConnectionError, match="404"):
        download(server.url("missing.bin"), tmp_path / "missing.bin", progress=False, timeout=TIMEOUT)
    with socket.socket() as sock:  # a port that was free a moment ago: nobody listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionError, match="MINIGPT_DATA_DIR"):
        download(f"http://127.0.0.1:{port}/blob.bin", tmp_path / "blob.bin", progress=False, timeout=TIMEOUT)
    assert not (tmp_path / "missing.bin").exists() and not (tmp_path / "blob.bin").exists()


# -- fetch(): the data folder, the package, the cache, the network ---------------------------


def served(server, relpath="sub/blob.bin", sha256=CONTENT_SHA256, name="blob.bin", member=None) -> PinnedFile:
    return PinnedFile(relpath, server.url(name), sha256, member)


def test_fetch_prefers_the_data_dir(server, tmp_path, monkeypatch):
    local = tmp_path / "data"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "blob.bin").write_bytes(CONTENT)
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(local))
    assert fetch(served(server), progress=False) == local / "sub" / "blob.bin"
    assert server.gets == []
    # A wrong local copy is an error, not silently replaced by a download.
    with pytest.raises(ChecksumError, match="sub/blob.bin"):
        fetch(served(server, sha256="0" * 64), progress=False)
    assert server.gets == []


def test_fetch_without_data_dir_downloads_into_the_cache_once(server):
    path = fetch(served(server), progress=False)
    assert path == cache_dir() / "sub" / "blob.bin"
    assert path.read_bytes() == CONTENT
    assert fetch(served(server), progress=False) == path
    assert len(server.gets) == 1


@pytest.mark.parametrize("pinned", SHIPPED, ids=lambda pinned: pinned.relpath)
def test_shipped_files_need_no_network_and_no_data_dir(pinned, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a shipped file was downloaded")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    path = fetch(pinned, progress=False)
    assert path == files.PACKAGE_DATA_DIR / pinned.relpath
    assert sha256_of(path) == pinned.sha256
    assert not cache_dir().exists()


@pytest.mark.parametrize(("folder", "licence", "attribution"), [
    ("instruct", "Apache License\n                           Version 2.0, January 2004", "generated with Llama 3.1"),
    ("sms_spam", "Creative Commons Attribution 4.0", "Almeida"),
    ("wikitext2", "Creative Commons Attribution-ShareAlike 3.0", "Merity"),
])
def test_each_shipped_data_set_has_its_licence_and_attribution_beside_it(folder, licence, attribution):
    text = (files.PACKAGE_DATA_DIR / folder / "LICENSE").read_text(encoding="utf-8")
    assert licence in text and attribution in text
    assert folder in (files.PACKAGE_DATA_DIR / "README.md").read_text(encoding="utf-8")


def test_the_fine_tuning_lab_reads_its_default_data_with_no_network_and_no_data_folder(monkeypatch):
    from minigpt.evaluation.comparison import golden_from_instructions
    from minigpt.finetuning.instruction import load_instruction_data
    from minigpt.finetuning.labelled_data import load_labelled_texts
    from minigpt.finetuning.preference import load_preference_data
    from minigpt.jobs.evaluate import text_token_ids

    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: pytest.fail("went to the network"))
    assert len(load_instruction_data()) == 1100  # finetune instruct
    assert len(load_preference_data()) > 1000  # finetune dpo and the preference notebook
    assert len(load_labelled_texts("spam")) > 5000  # finetune classify
    assert len(golden_from_instructions()) == 110  # compare's golden set
    assert len(text_token_ids("wikitext2", max_tokens=1000)) == 1000  # compare's forgetting check
    assert not any((cache_dir() / relpath).exists() for relpath in sources.PINNED_FILES)  # only token ids cached


def test_without_the_data_folder_tests_read_the_shipped_copies_and_skip_only_for_unshipped_files(tmp_path,
                                                                                                  monkeypatch):
    from conftest import _need_data

    monkeypatch.setenv("MINIGPT_TEST_DATA", str(tmp_path / "absent"))
    assert _need_data("tinyshakespeare.txt", "sms_spam/SMSSpamCollection.tsv") == files.PACKAGE_DATA_DIR
    with pytest.raises(pytest.skip.Exception, match=r"needs SHA256SUMS from the data folder .*absent "
                                                    r"\(minigpt does not ship it\)"):
        _need_data("tinyshakespeare.txt", "SHA256SUMS")  # the message names only the file that is not shipped


def test_gpt2_files_ship_with_their_licence():
    licence = (files.PACKAGE_DATA_DIR / "gpt2" / "LICENSE").read_text(encoding="utf-8")
    assert licence.startswith("Modified MIT License\n\nSoftware Copyright (c) 2019 OpenAI")
    assert "We don’t claim ownership of the content you create with GPT-2" in licence


def test_a_tampered_shipped_file_is_refused(server, tmp_path, monkeypatch):
    shipped = tmp_path / "package_data"
    shipped.mkdir()
    text = (files.PACKAGE_DATA_DIR / "the-verdict.txt").read_text(encoding="utf-8")
    (shipped / "the-verdict.txt").write_text(text.replace("Gisburn", "Gisborn"), encoding="utf-8")
    monkeypatch.setattr(files, "PACKAGE_DATA_DIR", shipped)
    with pytest.raises(ChecksumError, match=r"the-verdict\.txt in minigpt's package .* reinstall minigpt"):
        fetch(sources.THE_VERDICT, progress=False)


def test_the_data_dir_is_searched_before_the_shipped_files(tmp_path, monkeypatch):
    local = tmp_path / "data"
    local.mkdir()
    shutil.copy(files.PACKAGE_DATA_DIR / "the-verdict.txt", local / "the-verdict.txt")
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(local))
    assert fetch(sources.THE_VERDICT, progress=False) == local / "the-verdict.txt"
    (local / "the-verdict.txt").write_text("Another story.", encoding="utf-8")
    with pytest.raises(ChecksumError, match=r"the data folder \(MINIGPT_DATA_DIR\)"):
        fetch(sources.THE_VERDICT, progress=False)


def test_corpus_is_downloaded_when_neither_the_data_dir_nor_the_package_has_it(server, tmp_path, monkeypatch):
    verdict = (files.PACKAGE_DATA_DIR / "the-verdict.txt").read_bytes()
    (server.root / "the-verdict.txt").write_bytes(verdict)
    empty = tmp_path / "empty-data"
    empty.mkdir()
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(empty))
    source = PinnedFile("elsewhere/the-verdict.txt", server.url("the-verdict.txt"), sources.THE_VERDICT.sha256)
    monkeypatch.setitem(corpora.CORPORA, "served", corpora.Corpus("served", "a corpus that is not shipped", source))

    text = corpora.load_corpus("served")
    assert len(text) == 20479
    assert (cache_dir() / "elsewhere" / "the-verdict.txt").is_file()
    assert corpora.load_corpus("served") == text  # the second time from the cache
    assert server.gets == [("/the-verdict.txt", None)]


# -- a file inside a zip archive -------------------------------------------------------------

SPAM = b"ham\tOk lar... Joking wif u oni...\nspam\tWINNER!! Claim your prize\n"


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def test_zip_member_is_extracted_verified_and_kept_alone(server):
    (server.root / "sms+spam+collection.zip").write_bytes(zip_of({"readme": b"about", "SMSSpamCollection": SPAM}))
    pinned = served(server, "zipped/SMSSpamCollection.tsv", hashlib.sha256(SPAM).hexdigest(),
                    "sms+spam+collection.zip", member="SMSSpamCollection")
    path = fetch(pinned, progress=False)
    assert path == cache_dir() / "zipped" / "SMSSpamCollection.tsv"
    assert path.read_bytes() == SPAM
    assert os.listdir(path.parent) == [path.name]  # the archive is gone, no temporary file is left
    assert fetch(pinned, progress=False) == path  # the second time from the cache
    assert server.gets == [("/sms+spam+collection.zip", None)]


def test_zip_member_with_the_wrong_checksum_is_not_kept(server):
    (server.root / "spam.zip").write_bytes(zip_of({"SMSSpamCollection": SPAM}))
    pinned = served(server, "zipped/SMSSpamCollection.tsv", "0" * 64, "spam.zip", member="SMSSpamCollection")
    with pytest.raises(ChecksumError, match=f"SMSSpamCollection in .* has SHA-256 {hashlib.sha256(SPAM).hexdigest()}"):
        fetch(pinned, progress=False)
    assert os.listdir(cache_dir() / "zipped") == []  # neither the member nor the archive


def test_zip_without_the_member_is_an_error_naming_it(server):
    (server.root / "spam.zip").write_bytes(zip_of({"readme": b"about"}))
    pinned = served(server, "zipped/SMSSpamCollection.tsv", hashlib.sha256(SPAM).hexdigest(), "spam.zip",
                    member="SMSSpamCollection")
    with pytest.raises(ChecksumError, match="not a zip archive holding SMSSpamCollection"):
        fetch(pinned, progress=False)
    assert os.listdir(cache_dir() / "zipped") == []


def test_sms_spam_is_extracted_from_uci_s_archive(server, data_path, tmp_path, monkeypatch):
    # The registry's real entry (member name, checksum), served from a zip made of the real file.
    real = (data_path / sources.SMS_SPAM.relpath).read_bytes()
    monkeypatch.setattr(files, "PACKAGE_DATA_DIR", tmp_path / "no-package-data")  # a package built without it
    (server.root / "sms+spam+collection.zip").write_bytes(zip_of({"readme": b"", "SMSSpamCollection": real}))
    pinned = dataclasses.replace(sources.SMS_SPAM, url=server.url("sms+spam+collection.zip"))
    assert fetch(pinned, progress=False).read_bytes() == real


def test_sms_spam_comes_from_the_data_dir(data_dir, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: pytest.fail("went to the network"))
    assert fetch(sources.SMS_SPAM, progress=False) == data_dir / "sms_spam" / "SMSSpamCollection.tsv"


def test_offline_fetch_says_which_file_to_place_where(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(files, "PACKAGE_DATA_DIR", tmp_path / "no-package-data")  # a package built without them
    with pytest.raises(ConnectionError) as err:
        fetch(sources.SMS_SPAM, progress=False)
    message = str(err.value)
    assert "the file SMSSpamCollection from the zip archive https://archive.ics.uci.edu/" in message
    assert "FOLDER/sms_spam/SMSSpamCollection.tsv and set MINIGPT_DATA_DIR=FOLDER" in message

    local = tmp_path / "data"
    local.mkdir()
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(local))
    with pytest.raises(ConnectionError) as err:
        fetch(sources.INSTRUCTION_DATA, progress=False)
    expected = local / "instruct" / "instruction-data.json"
    assert f"MINIGPT_DATA_DIR/instruct/instruction-data.json (that is {expected})" in str(err.value)
    assert not cache_dir().exists()  # an offline attempt leaves no empty folder behind


# -- the registry ----------------------------------------------------------------------------


def test_every_pinned_file_has_the_checksum_of_the_data_folder(data_path):
    sums = sha256_sums(data_path)
    for relpath, pinned in sources.PINNED_FILES.items():
        assert pinned.relpath == relpath
        assert pinned.url.startswith("https://"), relpath
        assert pinned.sha256 == sums[relpath], relpath
    # Every data file is registered, except tiktoken's copy of GPT-2's BPE and the spam set's readme.
    assert set(sums) - set(sources.PINNED_FILES) == {"gpt2/r50k_base.tiktoken", "sms_spam/readme.txt"}


def test_shipped_files_are_the_registered_ones_and_equal_the_data_folder(data_path):
    shipped = sorted(
        path.relative_to(files.PACKAGE_DATA_DIR).as_posix() for path in files.PACKAGE_DATA_DIR.rglob("*")
        if path.is_file() and path.name not in ("LICENSE", "README.md", "readme.txt")
    )
    assert shipped == sorted(pinned.relpath for pinned in SHIPPED)
    sums = sha256_sums(data_path)
    assert {relpath: sha256_of(files.PACKAGE_DATA_DIR / relpath) for relpath in shipped} == \
        {relpath: sums[relpath] for relpath in shipped}


# -- the data folder and the atomic writers --------------------------------------------------


def test_unset_empty_and_absolute_data_dir(tmp_path, monkeypatch):
    assert data_dir() is None
    monkeypatch.setenv("MINIGPT_DATA_DIR", "")
    assert data_dir() is None
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path


def test_relative_data_dir_is_resolved_against_the_starting_directory(tmp_path):
    # As a notebook that changes directory: the folder stays the one named at the start.
    start = tmp_path.resolve() / "repo"
    (start / "data").mkdir(parents=True)
    (start / "notebooks").mkdir()
    code = "import os, minigpt.io.files as f; os.chdir('notebooks'); print(f.data_dir())"
    env = {**os.environ, "MINIGPT_DATA_DIR": "data", "PYTHONPATH": str(Path(files.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", code], cwd=start, env=env, capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == str(start / "data")


def test_relative_data_dir_ignores_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "start" / "data").mkdir(parents=True)
    monkeypatch.setattr(files, "START_DIR", tmp_path / "start")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINIGPT_DATA_DIR", "data")
    assert data_dir() == tmp_path / "start" / "data"


def test_a_data_dir_that_does_not_exist_is_an_error_naming_it(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-folder"
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(missing))
    with pytest.raises(FileNotFoundError) as err:
        data_dir()
    assert "MINIGPT_DATA_DIR" in str(err.value) and str(missing) in str(err.value)
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        fetch(sources.THE_VERDICT, progress=False)  # even for a shipped file: the setting is wrong


def test_writers_give_the_file_in_one_piece_with_the_usual_mode(tmp_path):
    path = tmp_path / "sub" / "settings.json"
    assert write_json(path, {"city": "Zürich", "steps": 3}) == path
    assert path.read_text(encoding="utf-8") == '{\n  "city": "Zürich",\n  "steps": 3\n}\n'
    write_text(path, "one line\r\n")
    assert path.read_bytes() == b"one line\r\n"
    write_bytes(path, b"\x00\xff")
    assert path.read_bytes() == b"\x00\xff"
    assert os.listdir(path.parent) == ["settings.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.json"
    write_json(path, {"version": 1})

    def half_then_fail(tmp):
        Path(tmp).write_text('{"vers', encoding="utf-8")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(path, half_then_fail)
    assert json.loads(path.read_text(encoding="utf-8")) == {"version": 1}
    assert os.listdir(tmp_path) == ["model.json"]


def test_pip_install_ships_every_file_of_the_package_data():
    # The globs of pyproject.toml's [tool.setuptools.package-data], as setuptools expands them.
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = Path(files.__file__).resolve().parents[2]  # minigpt/io/files.py -> the project
    globs = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"]["minigpt"]
    package = project / "minigpt"
    installed = {Path(path) for pattern in globs for path in package.glob(pattern) if path.is_file()}
    # the data files, and the server's page (plain HTML, CSS and JavaScript)
    folders = (files.PACKAGE_DATA_DIR, package / "serving" / "static")
    shipped = {path for folder in folders for path in folder.rglob("*") if path.is_file()}
    assert shipped == installed
