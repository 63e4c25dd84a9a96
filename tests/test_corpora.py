"""Corpus registry, train/validation split and the token-id cache."""

import hashlib
import pydoc_data.topics
import urllib.request

import numpy as np
import pytest
import torch

from minigpt.data.corpora import CORPORA, Corpus, list_corpora, load_corpus, load_token_ids, split_text
from minigpt.io import sources
from minigpt.io.download import PinnedFile
from minigpt.io.files import cache_dir
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer

# Files this module reads from the data folder (without it, from the copies minigpt ships).
DATA_FILES = ["tinyshakespeare.txt"]


class OneShotTokenizer:
    """Delegates to a real tokenizer once; a second encode means the cache was missed."""

    def __init__(self, tokenizer, name="gpt2"):
        self.tokenizer = tokenizer
        self.name = name
        self.calls = 0

    def encode(self, text, **kwargs):
        self.calls += 1
        if self.calls > 1:
            raise AssertionError("tokenized twice: the token cache was not used")
        return self.tokenizer.encode(text, **kwargs)


@pytest.fixture(scope="module")
def gpt2():
    """GPT-2's encoding as shipped (test_tokenizer.py checks it against tiktoken's own files);
    the ids below are the book's."""
    return get_gpt2_tokenizer()


@pytest.fixture
def no_network(monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: pytest.fail("went to the network"))


def test_registry_pins_the_shared_source_files():
    assert list_corpora() == ["python-docs", "the-verdict", "tiny-shakespeare"]
    assert CORPORA["the-verdict"].source is sources.THE_VERDICT
    assert CORPORA["tiny-shakespeare"].source is sources.TINY_SHAKESPEARE
    assert CORPORA["python-docs"].source is None and CORPORA["python-docs"].build is not None


def test_the_verdict_ships_with_minigpt(no_network):
    text = load_corpus("the-verdict")
    assert len(text) == 20479
    assert text.startswith("I HAD always thought Jack Gisburn rather a cheap genius")


def test_tiny_shakespeare_ships_with_minigpt(no_network):
    text = load_corpus("tiny-shakespeare")
    assert len(text) == 1115394
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")


def test_a_corpus_in_the_data_dir_is_preferred(data_dir):
    # The same bytes, read from the data folder (fetch checks which copy it returns).
    assert load_corpus("tiny-shakespeare") == (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8")


def test_python_docs_needs_no_download_and_is_one_document_per_topic(monkeypatch, gpt2):
    def no_download(*args, **kwargs):
        raise AssertionError("python-docs must not need a download")

    monkeypatch.setattr("minigpt.data.corpora.fetch", no_download)
    text = load_corpus("python-docs")
    topics = pydoc_data.topics.topics
    assert len(text) > 300_000
    assert text.startswith(topics["assert"])  # "assert" sorts first among the topics
    assert 'The "if" statement' in text
    ids = gpt2.encode(text, allowed_special={"<|endoftext|>"})
    assert ids.count(50256) == len(topics) - 1  # one end-of-text token between documents


def test_python_docs_is_deterministic(monkeypatch):
    text = load_corpus("python-docs")
    assert load_corpus("python-docs") == text
    reordered = dict(reversed(pydoc_data.topics.topics.items()))
    monkeypatch.setattr(pydoc_data.topics, "topics", reordered)
    assert load_corpus("python-docs") == text


def test_any_text_file_is_a_corpus(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text("Ein Gedicht über Bäume.\n", encoding="utf-8")
    assert load_corpus(path) == load_corpus(str(path)) == "Ein Gedicht über Bäume.\n"


def test_a_file_that_is_not_utf8_is_an_error_naming_it(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Zeile eins\nEin Gedicht über Bäume.\n".encode("latin-1"))
    with pytest.raises(ValueError) as err:
        load_corpus(path)
    message = str(err.value)
    assert str(path) in message and "not UTF-8" in message and "line 2" in message and "b'\\xfc'" in message


def test_a_registered_corpus_that_is_not_utf8_names_its_file(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "odd.txt").write_bytes(b"caf\xe9")
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(data))
    source = PinnedFile("odd.txt", "https://example.invalid/odd.txt", hashlib.sha256(b"caf\xe9").hexdigest())
    monkeypatch.setitem(CORPORA, "odd", Corpus("odd", "a Latin-1 file", source))
    with pytest.raises(ValueError, match=f"{data / 'odd.txt'} is not UTF-8"):
        load_corpus("odd")


def test_unknown_corpus_lists_the_known_ones_and_mentions_paths(tmp_path):
    with pytest.raises(ValueError) as err:
        load_corpus("the-verdikt")
    message = str(err.value)
    assert "'the-verdikt'" in message
    assert all(name in message for name in list_corpora())
    assert "path" in message
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus(tmp_path / "missing.txt")


def test_split_by_characters_gives_the_books_sizes():
    text = load_corpus("the-verdict")
    train, val = split_text(text, train_ratio=0.90)
    assert (len(train), len(val)) == (18431, 2048)
    assert train + val == text


def test_split_token_ids_keeps_their_type_and_order(gpt2):
    ids = load_token_ids("the-verdict", gpt2)
    train, val = split_text(ids)
    assert isinstance(train, torch.Tensor) and isinstance(val, torch.Tensor)
    assert (len(train), len(val)) == (4630, 515)  # int(0.9 * 5145) = 4630
    assert torch.equal(torch.cat([train, val]), ids)
    # A float product just under an integer (0.29 * 100 = 28.999...) must not shift the cut.
    assert [len(part) for part in split_text(list(range(100)), 0.29)] == [29, 71]
    assert [len(part) for part in split_text(np.arange(10), 0.7)] == [7, 3]


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.1])
def test_split_ratio_must_leave_both_parts(ratio):
    with pytest.raises(ValueError, match="train_ratio"):
        split_text("abcdef", ratio)


def test_token_ids_are_gpt2s_and_cached(gpt2):
    tokenizer = OneShotTokenizer(gpt2)
    ids = load_token_ids("the-verdict", tokenizer)
    assert ids.dtype == torch.long
    assert len(ids) == 5145
    assert ids[:4].tolist() == [40, 367, 2885, 1464]
    cached = list((cache_dir() / "tokens").iterdir())
    assert [path.suffix for path in cached] == [".npy"]  # no temporary file left behind

    again = load_token_ids("the-verdict", tokenizer)  # would raise if it tokenized again
    assert again.dtype == torch.long
    assert torch.equal(again, ids)


def test_token_cache_is_keyed_by_text_and_tokenizer(tmp_path, gpt2):
    path = tmp_path / "corpus.txt"
    path.write_text("The cat sat on the mat.", encoding="utf-8")
    load_token_ids(path, OneShotTokenizer(gpt2))
    # Same text, another tokenizer: tokenized afresh (OneShotTokenizer would raise otherwise).
    other = load_token_ids(path, OneShotTokenizer(gpt2, name="other-bpe"))
    assert other.tolist() == gpt2.encode("The cat sat on the mat.")
    # An edited file is tokenized afresh too.
    path.write_text("The dog sat on the mat.", encoding="utf-8")
    edited = load_token_ids(path, OneShotTokenizer(gpt2))
    assert edited.tolist() == gpt2.encode("The dog sat on the mat.")
    assert len(list((cache_dir() / "tokens").iterdir())) == 3


def test_default_tokenizer_is_gpt2():
    assert len(load_token_ids("the-verdict")) == 5145
