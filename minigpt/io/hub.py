"""OpenAI's GPT-2 checkpoints (and the Llama family's) from the Hugging Face hub, in the cache
``transformers`` uses.

The one idea: a name such as ``gpt2-small`` is a repository on the hub
(:data:`GPT2_REPOS`), fetched with ``huggingface_hub.hf_hub_download``, so minigpt and
``transformers`` share one copy: a GPT-2 that either of them downloaded loads in the other
without a second download. ``hf_hub_download`` honours ``HF_ENDPOINT`` (a mirror),
``HF_HUB_CACHE``/``HF_HOME`` (where the cache is) and ``HF_HUB_OFFLINE``, streams into a
temporary file, resumes a dropped transfer with an HTTP ``Range`` request and checks the
size; minigpt then checks the SHA-256 of every file that has just arrived.

Where a name is looked for, in order (:func:`download_gpt2`):

1. ``$MINIGPT_DATA_DIR/<name>/`` holding ``config.json`` and ``model.safetensors``: a local
   copy, used as it is (no network);
2. ``<weights dir>/<name>/`` when a weights folder is chosen (the ``weights_dir`` argument, else
   ``$MINIGPT_WEIGHTS_DIR``): downloads land there as plain files;
3. otherwise the Hugging Face cache (``~/.cache/huggingface/hub`` unless ``HF_HUB_CACHE`` or
   ``HF_HOME`` says otherwise), in its own layout
   (``models--openai-community--gpt2/snapshots/<commit>/``).

Files found locally are used without a request to the network (a file was verified when it
arrived); in the Hugging Face cache a large file is stored under its SHA-256, so the pinned
hash of ``gpt2-small``'s weights is checked against that name at no cost.

The Llama-family names (:data:`minigpt.io.hub_llama.LLAMA_REPOS`: SmolLM2, Qwen3, Llama 3.2) are fetched by
:func:`minigpt.io.hub_llama.download_llama` with ``huggingface_hub.snapshot_download`` at a pinned commit: the
weights (one file or shards), the config and the tokenizer files, each large file checked
against the hub's SHA-256 by ``huggingface_hub``. Llama is gated: without a token the error
says how to get access.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

from tqdm import tqdm

from minigpt.io.files import START_DIR, ChecksumError, data_dir, sha256_of
from minigpt.io.weight_files import CONFIG_FILE, WEIGHTS_FILE

logger = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "MINIGPT_WEIGHTS_DIR"
FILES = (WEIGHTS_FILE, CONFIG_FILE)  # the big one first: a failure leaves no half checkpoint

# OpenAI's released GPT-2 checkpoints, as published in the Hugging Face format.
GPT2_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}

# SHA-256 of the published files (revision 607a30d7 of openai-community/gpt2, the one in
# its Git LFS pointer; 548,105,171 bytes). The other sizes' hashes could not be looked up
# offline, so their model.safetensors is checked against the SHA-256 that the hub sends
# in its X-Linked-Etag header, which proves the transfer intact but trusts the server;
# their config.json is not verified at all (a small Git file whose ETag is a Git hash),
# but a config that disagrees with the weights fails the shape check when loading.
KNOWN_SHA256 = {
    ("gpt2-small", WEIGHTS_FILE): "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",
    ("gpt2-small", CONFIG_FILE): "0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4",
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read when called: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``,
    else ``huggingface_hub``'s default (``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def weights_dir_setting(weights_dir: str | os.PathLike | None) -> Path | None:
    """The chosen weights folder (argument, else ``MINIGPT_WEIGHTS_DIR``), or None for the HF cache."""
    if weights_dir is not None:
        return Path(weights_dir).expanduser()
    value = os.environ.get(WEIGHTS_DIR_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else START_DIR / path  # like MINIGPT_DATA_DIR


def default_weights_dir() -> Path:
    """Where :func:`download_gpt2` puts a name when no ``weights_dir`` is given:
    ``$MINIGPT_WEIGHTS_DIR`` (each name in ``<dir>/<name>/``) if set, else the Hugging Face
    cache (:func:`hf_cache_dir`; each name in ``models--openai-community--<repo>/snapshots/``)."""
    return weights_dir_setting(None) or hf_cache_dir()


def _repo_of(name: str) -> str:
    if name not in GPT2_REPOS:
        raise ValueError(f"{name!r} is not a GPT-2 name; known: {', '.join(GPT2_REPOS)}")
    return GPT2_REPOS[name]


def _complete(directory: Path) -> bool:
    return all((directory / f).is_file() for f in FILES)


def download_gpt2(name: str, weights_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """A local directory with OpenAI's GPT-2 ``name`` in the Hugging Face format
    (``config.json`` + ``model.safetensors``), downloaded only if no copy is found.

    Looks in ``$MINIGPT_DATA_DIR/<name>/``, then in ``<weights_dir>/<name>/`` (default
    ``$MINIGPT_WEIGHTS_DIR``) or, with neither set, in the Hugging Face cache; downloads
    there otherwise. A file that has just arrived is checked by SHA-256 (a mismatch deletes
    it and raises :class:`ChecksumError`). Without network, or with ``HF_HUB_OFFLINE=1``, a
    name that is not there raises ``ConnectionError`` saying where to put which files, and
    leaves no folder behind.
    """
    _repo_of(name)
    local = data_dir()
    if local is not None and _complete(local / name):
        return local / name
    folder = weights_dir_setting(weights_dir)
    found = _find_downloaded(name, folder)
    if found is not None:
        _check_cached_blob(name, found)
        return found
    if env_true("HF_HUB_OFFLINE") or env_true("TRANSFORMERS_OFFLINE") or hub_offline_constant():
        raise ConnectionError(_missing_message(name, folder, "HF_HUB_OFFLINE is set and no copy was found"))
    return _download(name, folder, progress=progress)


def hub_offline_constant() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _find_downloaded(name: str, folder: Path | None) -> Path | None:
    """The directory of a complete earlier download, found without any network request."""
    if folder is not None:
        return folder / name if _complete(folder / name) else None
    from huggingface_hub import try_to_load_from_cache

    paths = [try_to_load_from_cache(GPT2_REPOS[name], f, cache_dir=str(hf_cache_dir())) for f in FILES]
    if all(isinstance(p, str) for p in paths) and len({Path(p).parent for p in paths}) == 1:
        return Path(paths[0]).parent
    return None


def _check_cached_blob(name: str, directory: Path) -> None:
    # The Hugging Face cache names a large file's blob after its SHA-256: comparing the name
    # with the pinned hash costs nothing and catches another revision or another file.
    expected = KNOWN_SHA256.get((name, WEIGHTS_FILE))
    blob = (directory / WEIGHTS_FILE).resolve().name
    if expected is not None and _SHA256.fullmatch(blob) and blob != expected:
        raise ChecksumError(
            f"{directory / WEIGHTS_FILE} is the file with SHA-256 {blob}, not {name}'s published "
            f"weights ({expected}). Delete {directory.parent.parent} to download it again."
        )


def _download(name: str, folder: Path | None, *, progress: bool) -> Path:
    target = folder / name if folder is not None else None
    new_dirs = _missing_dirs(name, target)
    try:
        paths = [_fetch_file(name, filename, target, progress) for filename in FILES]
    except BaseException as err:
        _remove_without_downloads(new_dirs)  # leave no empty folder behind
        if isinstance(err, network_errors()):
            raise ConnectionError(_missing_message(name, folder, f"{type(err).__name__}: {err}")) from err
        raise
    return paths[0].parent


def _fetch_file(name: str, filename: str, target: Path | None, progress: bool) -> Path:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download

    url = _url(name, filename)
    # One request without retries first: offline, it fails at once (hf_hub_download would
    # retry for half a minute), and it gives the SHA-256 the hub publishes for a large file.
    published = get_hf_file_metadata(url).etag
    before = _signature(_existing(name, filename, target))
    kwargs = {}
    if not progress and "tqdm_class" in inspect.signature(hf_hub_download).parameters:
        kwargs["tqdm_class"] = QuietBar
    path = Path(hf_hub_download(
        GPT2_REPOS[name], filename, cache_dir=str(hf_cache_dir()), local_dir=target,
        endpoint=hub_endpoint(), library_name="minigpt", **kwargs,
    ))
    if _signature(path) != before:  # it has just arrived: check it now, once
        _verify(name, filename, path, url, published)
    return path


class QuietBar(tqdm):
    """A progress bar that never shows (``progress=False``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.pop("name", None)
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def hub_endpoint() -> str | None:
    # Read when called, so that HF_ENDPOINT set after import (a notebook, a test) counts.
    value = os.environ.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None


def _url(name: str, filename: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(GPT2_REPOS[name], filename, endpoint=hub_endpoint())


def _existing(name: str, filename: str, target: Path | None) -> Path | None:
    if target is not None:
        return target / filename if (target / filename).is_file() else None
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(GPT2_REPOS[name], filename, cache_dir=str(hf_cache_dir()))
    return Path(path) if isinstance(path, str) else None


def _signature(path: Path | None) -> tuple | None:
    if path is None or not path.exists():
        return None
    real = path.resolve()
    stat = real.stat()
    return real, stat.st_ino, stat.st_mtime_ns, stat.st_size


def _verify(name: str, filename: str, path: Path, url: str, published: str | None) -> None:
    expected = KNOWN_SHA256.get((name, filename))
    if expected is None and filename == WEIGHTS_FILE and _SHA256.fullmatch(published or ""):
        expected = published  # the hub's X-Linked-Etag: proves the transfer, trusts the server
    if expected is None:
        if filename == WEIGHTS_FILE:
            warnings.warn(f"cannot verify {url}: no known SHA-256 and the server published none", stacklevel=5)
        return
    actual = sha256_of(path)
    if actual != expected:
        real = path.resolve()
        path.unlink(missing_ok=True)
        real.unlink(missing_ok=True)  # the cache's blob behind the snapshot's link
        raise ChecksumError(f"{url} has SHA-256 {actual}, expected {expected}; the download was deleted. "
                            "Call again to retry; if it happens again, the server sends another file.")


def network_errors() -> tuple[type[BaseException], ...]:
    """What a failed transfer raises: OSError (no connection, truncated file, offline mode),
    the hub's HTTP errors, and the HTTP client's own errors (whichever client is installed)."""
    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [OSError, HfHubHTTPError]
    for client in ("httpx2", "httpx", "requests"):
        module = sys.modules.get(client)
        if module is not None and isinstance(getattr(module, "HTTPError", None), type):
            errors.append(module.HTTPError)
    return tuple(errors)


def _missing_dirs(name: str, target: Path | None) -> list[Path]:
    """The top folders that a download of ``name`` would create (they do not exist yet)."""
    if target is not None:
        candidates = [target]
    else:
        repo_folder = "models--" + GPT2_REPOS[name].replace("/", "--")
        candidates = [hf_cache_dir() / repo_folder, hf_cache_dir() / ".locks" / repo_folder]
    tops = []
    for path in candidates:
        path = path.absolute()
        top = None
        while not path.exists():
            top, path = path, path.parent
        if top is not None and top not in tops:
            tops.append(top)
    return tops


def _remove_without_downloads(folders: list[Path]) -> None:
    for folder in folders:
        if folder.is_dir() and not any(p.name in FILES and p.exists() for p in folder.rglob("*")):
            shutil.rmtree(folder, ignore_errors=True)


def _missing_message(name: str, folder: Path | None, reason: str) -> str:
    where = (f"{folder / name}" if folder is not None
             else f"$MINIGPT_DATA_DIR/{name}/ or $MINIGPT_WEIGHTS_DIR/{name}/")
    return (f"could not download {name} ({GPT2_REPOS[name]} on the Hugging Face hub): {reason.rstrip('.')}. "
            f"Without internet, put its {CONFIG_FILE} and {WEIGHTS_FILE} in {where}, "
            f"or run `minigpt download {name}` once on a machine that is online and copy them over.")


# ---------------------------------------------------------------------------- the Llama family


