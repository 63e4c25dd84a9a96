"""Fetching the pinned files minigpt needs, verified by SHA-256, with or without internet.

The one idea: a pinned file (:class:`PinnedFile`) is a local name, a public URL and the
SHA-256 of its content. :func:`fetch` looks for it, in order, in

1. ``MINIGPT_DATA_DIR``: an optional folder of local copies, searched first;
2. the files shipped inside the package (all of ``minigpt.io.sources``: the BPE, the corpora,
   the fine-tuning data, WikiText-2's test split);
3. the cache (``MINIGPT_CACHE_DIR``, default ``~/.cache/minigpt``);

and downloads it into the cache only when none has it. Every copy, wherever it was
found, must have the pinned SHA-256. A file that lives inside a zip archive
(``member``) is extracted from the downloaded archive and verified itself.

A download streams into ``<name>.part`` next to its destination and is renamed into
place only once its SHA-256 matches, so an interrupted or corrupt transfer never
leaves a file that looks complete. An interrupted transfer keeps its ``.part`` file
and the next call resumes it with an HTTP ``Range`` request.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from minigpt.io.files import (
    DATA_DIR_ENV,
    ChecksumError,
    atomic_write,
    cache_dir,
    data_dir,
    package_data_dir,
    sha256_of,
)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class PinnedFile:
    """A file minigpt can fetch: its local name, where to download it, and its SHA-256.

    ``relpath`` is the file's place inside the data folder, the package data and the cache
    (e.g. ``"gpt2/vocab.bpe"``). ``member``, when given, names a file inside the zip
    archive at ``url``; ``sha256`` is then the member's checksum (an archive may be
    repackaged upstream, its content should not change).
    """

    relpath: str
    url: str
    sha256: str
    member: str | None = None


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    *,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` atomically, resuming a previous partial download.

    If ``dest`` already exists (and matches ``sha256`` when given) nothing is fetched.
    On a checksum mismatch the partial data is deleted and ``ChecksumError`` raised,
    so a retry starts clean. A failed connection raises ``ConnectionError``.
    """
    dest = Path(dest)
    if dest.exists():
        if sha256 is None or sha256_of(dest) == sha256:
            return dest
        dest.unlink()  # stale or corrupt copy: fetch it again
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    response = _open(url, offset, timeout)
    if response is not None:
        dest.parent.mkdir(parents=True, exist_ok=True)  # only now: an offline call leaves no empty folder
        _receive(response, url, part, offset, desc=dest.name, progress=progress)

    if sha256 is not None:
        actual = sha256_of(part)
        if actual != sha256:
            part.unlink()
            raise ChecksumError(
                f"{url} has SHA-256 {actual}, expected {sha256}; the download was deleted. "
                "The file may have changed upstream or the transfer was corrupted."
            )
    os.replace(part, dest)
    return dest


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse | None:
    """The server's response, asking for the bytes from ``offset`` on; None when they are all here."""
    request = urllib.request.Request(url, headers={"User-Agent": "minigpt"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the .part file is already complete
            return None
        raise ConnectionError(f"could not download {url}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        raise ConnectionError(
            f"could not download {url}: {err}. Without internet, point {DATA_DIR_ENV} "
            "at a folder holding a local copy."
        ) from err


def _receive(response: http.client.HTTPResponse, url: str, part: Path, offset: int, *, desc: str,
             progress: bool) -> None:
    """Append the response's body to ``part`` (or rewrite it when the server ignored ``Range``)."""
    with response:
        if offset and response.status != 206:  # server ignored Range: start over
            offset = 0
        total = response.headers.get("Content-Length")
        total = int(total) + offset if total is not None else None
        mode = "ab" if offset else "wb"
        with open(part, mode) as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False,
        ) as bar:
            try:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (TimeoutError, http.client.HTTPException) as err:
                # A stalled or broken transfer: the .part keeps what arrived.
                raise ConnectionError(f"download of {url} was interrupted ({err!r}); call again to resume it") from err
        if total is not None and part.stat().st_size < total:
            raise ConnectionError(
                f"download of {url} stopped after {part.stat().st_size} of {total} bytes; call again to resume it"
            )


def fetch(pinned: PinnedFile, *, progress: bool = True) -> Path:
    """A local, verified path of ``pinned``: from the data folder, the package, the cache or the network.

    A local copy with the wrong checksum is an error rather than silently replaced,
    because it usually means that the wrong file was put there; only the cache, which
    minigpt alone writes, is repaired by downloading again. Without network, the error
    says which file to place where.
    """
    local = (
        (data_dir(), f"the data folder ({DATA_DIR_ENV})", "replace it with the right file or delete it"),
        (package_data_dir(), "minigpt's package", "reinstall minigpt"),
    )
    for root, where, fix in local:
        if root is not None and (root / pinned.relpath).is_file():
            return _verified(root / pinned.relpath, pinned, where, fix)
    dest = cache_dir() / pinned.relpath
    try:
        if pinned.member is None:
            return download(pinned.url, dest, pinned.sha256, progress=progress)
        return _extract_member(pinned, dest, progress=progress)
    except ConnectionError as err:
        raise ConnectionError(_offline_message(pinned, err)) from err


def _verified(path: Path, pinned: PinnedFile, where: str, fix: str) -> Path:
    actual = sha256_of(path)
    if actual != pinned.sha256:
        raise ChecksumError(
            f"{path} in {where} has SHA-256 {actual}, but {pinned.relpath} should have {pinned.sha256}: "
            f"it is another version of the file or a damaged copy; {fix}."
        )
    return path


def _extract_member(pinned: PinnedFile, dest: Path, *, progress: bool) -> Path:
    """Download the zip archive into the cache, extract ``pinned.member`` to ``dest`` and verify it.

    The member is checked before it is renamed into place, so ``dest`` is either right or
    absent. The archive is deleted afterwards: the member is what is kept.
    """
    if dest.is_file() and sha256_of(dest) == pinned.sha256:
        return dest
    name = urllib.parse.unquote(Path(urllib.parse.urlsplit(pinned.url).path).name) or "archive.zip"
    archive = download(pinned.url, dest.with_name(name), progress=progress)
    try:
        with zipfile.ZipFile(archive) as zf:
            atomic_write(dest, lambda tmp: _copy_verified(zf, pinned, tmp))
    except (zipfile.BadZipFile, KeyError) as err:
        raise ChecksumError(
            f"{pinned.url} is not a zip archive holding {pinned.member} ({err}); the download was deleted"
        ) from err
    finally:
        archive.unlink(missing_ok=True)
    return dest


def _copy_verified(zf: zipfile.ZipFile, pinned: PinnedFile, tmp: str) -> None:
    digest = hashlib.sha256()
    with zf.open(pinned.member) as src, open(tmp, "wb") as out:
        for chunk in iter(lambda: src.read(_CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != pinned.sha256:
        raise ChecksumError(
            f"{pinned.member} in {pinned.url} has SHA-256 {digest.hexdigest()}, expected {pinned.sha256}; "
            "nothing was kept. The archive may have changed upstream."
        )


def _offline_message(pinned: PinnedFile, err: ConnectionError) -> str:
    what = f"the file {pinned.member} from the zip archive {pinned.url}" if pinned.member else f"a copy of {pinned.url}"
    root = data_dir()
    where = (
        f"{DATA_DIR_ENV}/{pinned.relpath} (that is {root / pinned.relpath})" if root is not None
        else f"FOLDER/{pinned.relpath} and set {DATA_DIR_ENV}=FOLDER"
    )
    return f"{pinned.relpath} is neither local nor downloadable ({err}). To work offline, place {what} at {where}."
