"""Where minigpt's files live, and writing them so that a crash never leaves half a file.

The one idea: every file minigpt writes is written to a temporary file beside its
destination and moved into place with one rename (:func:`atomic_write`), so a reader
sees the old file or the new one, never a truncated one. ``write_bytes``, ``write_text``
and ``write_json`` are the three ways to use it; every writer in minigpt goes through them.

Three folders hold the files minigpt reads:

* the data folder, ``MINIGPT_DATA_DIR`` (optional): local copies of pinned files, searched
  first, so a machine without internet works from it alone;
* the files shipped inside the package (``minigpt/package_data``: GPT-2's BPE and the two
  small public-domain corpora), which need neither network nor setting;
* the cache, ``MINIGPT_CACHE_DIR`` (default ``~/.cache/minigpt``): where downloads land.

A relative ``MINIGPT_DATA_DIR`` or ``MINIGPT_CACHE_DIR`` is resolved against the working
directory of the process when minigpt was first imported (normally where the process
started), never against a directory the program changes to later. A Jupyter kernel starts
in the notebook's own folder (``notebooks/``), so a relative value set in a shell at the
repository's root names another folder inside a notebook: give an absolute path to share
one setting between the shell and the notebooks.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "MINIGPT_DATA_DIR"
CACHE_DIR_ENV = "MINIGPT_CACHE_DIR"
# The directory relative settings are resolved against: recorded once, at first import.
START_DIR = Path(os.getcwd())
# Files shipped inside the package, laid out like the data folder (``gpt2/vocab.bpe``, ...).
PACKAGE_DATA_DIR = Path(__file__).resolve().parent.parent / "package_data"
_CHUNK = 1 << 20


class ChecksumError(RuntimeError):
    """A downloaded or local file does not have the SHA-256 it should have."""


def _resolve(value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else START_DIR / path


def data_dir() -> Path | None:
    """The folder named by ``MINIGPT_DATA_DIR``, or None when the variable is unset or empty.

    A relative value is resolved against the directory where the process started (see the
    module docstring). A value naming a folder that does not exist is an error, not silently
    ignored: it is almost always a typo or a folder that was moved.
    """
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        return None
    path = _resolve(value)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{DATA_DIR_ENV}={value} names {path}, which is not an existing folder. "
            f"Create it and put the data files there, fix the path, or unset {DATA_DIR_ENV}."
        )
    return path


def cache_dir() -> Path:
    """Where downloads are kept: ``MINIGPT_CACHE_DIR`` or ``~/.cache/minigpt`` (created on first write)."""
    value = os.environ.get(CACHE_DIR_ENV)
    return _resolve(value) if value else Path.home() / ".cache" / "minigpt"


def package_data_dir() -> Path:
    """The folder of files shipped inside the package (``minigpt/package_data``)."""
    return PACKAGE_DATA_DIR


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one rename; returns ``path``.

    The temporary file sits in the same folder (a rename across file systems would copy),
    and is deleted if ``write`` fails. A crash mid-write leaves the old file (or none),
    never a truncated one. Missing parent folders are created.
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
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, as UTF-8 (line endings unchanged)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically: UTF-8, non-ASCII kept readable, final newline."""
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks so that large weight files need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
