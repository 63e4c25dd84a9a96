"""Named text corpora for pretraining, their train/validation split, and cached token ids.

The one idea: a pretraining corpus is nothing but one long text. Everything else here is
bookkeeping that makes it reproducible: every corpus is a pinned file (see
``minigpt.io.sources``) or built deterministically, and its token ids are computed once and
cached on disk.

Known corpora, all available offline:

* ``tiny-shakespeare``: Karpathy's 1.1 MB Shakespeare collection (ships with minigpt).
* ``the-verdict``: Edith Wharton's short story used throughout the book (20,479 characters,
  ships with minigpt).
* ``python-docs``: the language reference documentation that ships inside every CPython
  (``pydoc_data.topics``, the text behind ``help("if")``); its text follows the running
  Python's version.

Any path to a UTF-8 text file is accepted wherever a corpus name is.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from minigpt.data.windows import tokenize
from minigpt.io import sources
from minigpt.io.download import PinnedFile, fetch
from minigpt.io.files import atomic_write, cache_dir
from minigpt.tokenizers.gpt2 import ENDOFTEXT, get_gpt2_tokenizer


@dataclass(frozen=True)
class Corpus:
    """A named text: either a pinned file (``source``, fetched and verified by SHA-256)
    or a ``build`` function that makes the text locally."""

    name: str
    description: str
    source: PinnedFile | None = None
    build: Callable[[], str] | None = None

    def load(self) -> str:
        """The corpus's text."""
        if self.build is not None:
            return self.build()
        if self.source is None:
            raise ValueError(f"corpus {self.name!r} has neither a source file nor a build function")
        return read_text_file(fetch(self.source))


def read_text_file(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file (any line endings read as ``\\n``); another encoding is an error
    that names the file and the first byte that is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{path} is not UTF-8 text: byte {err.start} (line {line}) is {err.object[err.start:err.end]!r}. "
            "Convert the file to UTF-8 (for example `iconv -f latin1 -t utf-8`) and try again."
        ) from None


def _python_docs_text() -> str:
    """CPython's reference topics, sorted by name, with ``<|endoftext|>`` between them.

    The marker (one token, id 50256 in GPT-2) tells the model where an unrelated
    document begins, so it does not learn to continue one topic into the next.
    Sorting makes the text independent of the dict's order.
    """
    from pydoc_data.topics import topics

    return ENDOFTEXT.join(topics[name] for name in sorted(topics))


CORPORA: dict[str, Corpus] = {
    corpus.name: corpus
    for corpus in [
        Corpus(
            name="the-verdict",
            description='Edith Wharton, "The Verdict" (1908): 20,479 characters, the book\'s corpus',
            source=sources.THE_VERDICT,
        ),
        Corpus(
            name="tiny-shakespeare",
            description="Shakespeare plays concatenated (Karpathy's char-rnn): 1,115,394 characters",
            source=sources.TINY_SHAKESPEARE,
        ),
        Corpus(
            name="python-docs",
            description="the Python language reference shipped with CPython (pydoc_data), offline",
            build=_python_docs_text,
        ),
    ]
}


def list_corpora() -> list[str]:
    """Names of the known corpora, sorted."""
    return sorted(CORPORA)


def load_corpus(name_or_path: str | os.PathLike) -> str:
    """The text of a known corpus (see ``list_corpora()``) or of a UTF-8 text file.

    Known corpora need no network (see the module docstring). A name is looked up among
    the known corpora before it is tried as a path.
    """
    if isinstance(name_or_path, str) and name_or_path in CORPORA:
        return CORPORA[name_or_path].load()
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return read_text_file(path)
    raise ValueError(
        f"unknown corpus {str(name_or_path)!r}: known corpora are {', '.join(list_corpora())}; "
        "a path to an existing text file is accepted too"
    )


Splittable = TypeVar("Splittable", str, list, torch.Tensor, np.ndarray)


def split_text(data: Splittable, train_ratio: float = 0.9) -> tuple[Splittable, Splittable]:
    """Split a text or its token ids into (train, validation): the first ``train_ratio``
    of it, then the rest. The split is contiguous, not shuffled, so no validation
    token is ever inside a training window.

    The book splits the text by characters; splitting the token ids is preferable:
    the ratio is then measured in what the model actually sees, and no word is cut in
    half at the boundary. Both work: ``split_text(load_token_ids("the-verdict"))``.
    """
    if not 0 < train_ratio < 1:
        raise ValueError(f"train_ratio must be between 0 and 1 (exclusive), got {train_ratio}")
    # A tiny tolerance so that float error (0.29 * 100 == 28.999...) does not move the cut.
    cut = int(train_ratio * len(data) + 1e-9)
    return data[:cut], data[cut:]


def load_token_ids(name_or_path: str | os.PathLike, tokenizer: Any = None) -> torch.Tensor:
    """Token ids of a corpus, shape ``(tokens,)``, ``torch.long``; tokenized once, then cached.

    ``tokenizer`` defaults to GPT-2's BPE. The cache file is
    ``cache_dir()/tokens/<tokenizer name>-<SHA-256 of the text>.npy``: keyed by the text
    itself, so an edited file or a newer Python's ``python-docs`` is tokenized afresh.
    """
    text = load_corpus(name_or_path)
    if tokenizer is None:
        tokenizer = get_gpt2_tokenizer()
    tokenizer_name = re.sub(r"[^A-Za-z0-9_.-]", "_", getattr(tokenizer, "name", type(tokenizer).__name__))
    text_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    path = cache_dir() / "tokens" / f"{tokenizer_name}-{text_sha256}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path).astype(np.int64))

    ids = np.asarray(tokenize(text, tokenizer), dtype=np.int64)
    # GPT-2's 50,257 ids fit in 16 bits: a quarter of the disk space of int64.
    stored = ids.astype(np.uint16) if ids.size == 0 or ids.max() < 2**16 else ids.astype(np.uint32)
    atomic_write(path, lambda tmp: _save_npy(tmp, stored))
    return torch.from_numpy(ids)


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a bare name
        np.save(f, array)
