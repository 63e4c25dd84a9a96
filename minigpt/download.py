"""Finding and downloading the files minigpt needs, verified by SHA-256.

Two places are searched before anything is downloaded:

1. ``MINIGPT_DATA_DIR``: a folder of local copies (tests and CI point it at
   ``../shared/data``). A machine without internet works from here alone.
2. The cache (``MINIGPT_CACHE_DIR``, default ``~/.cache/minigpt``): where downloads land.

A download streams into ``<name>.part`` next to its destination and is renamed into
place only once its SHA-256 matches, so an interrupted or corrupt transfer never
leaves a file that looks complete. An interrupted transfer keeps its ``.part`` file
and the next call resumes it with an HTTP ``Range`` request. Every file minigpt writes
goes through :func:`atomic_write` for the same reason.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from tqdm import tqdm

DATA_DIR_ENV = "MINIGPT_DATA_DIR"
CACHE_DIR_ENV = "MINIGPT_CACHE_DIR"
_CHUNK = 1 << 20


class ChecksumError(RuntimeError):
    """A downloaded or local file does not have the SHA-256 it should have."""


def data_dir() -> Path | None:
    """The folder named by ``MINIGPT_DATA_DIR``, or None when it is unset or missing."""
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_dir() else None


def cache_dir() -> Path:
    """Where downloads are kept: ``MINIGPT_CACHE_DIR`` or ``~/.cache/minigpt``."""
    return Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "minigpt")).expanduser()


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one rename.

    A crash mid-write leaves the old file (or none), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); use the usual mode
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks so large weight files need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    so a retry starts clean.
    """
    dest = Path(dest)
    if dest.exists():
        if sha256 is None or sha256_of(dest) == sha256:
            return dest
        dest.unlink()  # stale or corrupt copy: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0

    request = urllib.request.Request(url, headers={"User-Agent": "minigpt"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the .part file is already complete
            response = None
        else:
            raise ConnectionError(f"could not download {url}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        raise ConnectionError(
            f"could not download {url}: {err}. Without internet, point {DATA_DIR_ENV} "
            "at a folder holding a local copy."
        ) from err

    if response is not None:
        with response:
            if offset and response.status != 206:  # server ignored Range: start over
                offset = 0
            total = response.headers.get("Content-Length")
            total = int(total) + offset if total is not None else None
            mode = "ab" if offset else "wb"
            with open(part, mode) as f, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True,
                desc=dest.name, disable=not progress, leave=False,
            ) as bar:
                try:
                    while chunk := response.read(_CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
                except (TimeoutError, http.client.HTTPException) as err:
                    # A stalled or broken transfer: the .part keeps what arrived.
                    raise ConnectionError(
                        f"download of {url} was interrupted ({err!r}); call again to resume it"
                    ) from err
            if total is not None and part.stat().st_size < total:
                raise ConnectionError(
                    f"download of {url} stopped after {part.stat().st_size} of {total} bytes; "
                    "call again to resume it"
                )

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


def fetch(relpath: str, url: str, sha256: str | None = None, *, progress: bool = True) -> Path:
    """Return a local path for the file known as ``relpath`` (e.g. ``"gpt2/vocab.bpe"``).

    Looks in ``MINIGPT_DATA_DIR`` first, then the cache, and downloads into the cache
    only when neither has it. A local copy with the wrong checksum is an error rather
    than silently replaced, because it usually means the wrong file was put there.
    """
    local_root = data_dir()
    if local_root is not None and (local_root / relpath).is_file():
        local = local_root / relpath
        if sha256 is not None and sha256_of(local) != sha256:
            raise ChecksumError(f"{local} does not have the expected SHA-256 {sha256}")
        return local
    return download(url, cache_dir() / relpath, sha256, progress=progress)
