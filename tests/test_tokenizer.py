"""Word-level tokenizers (the book's examples) and GPT-2's tiktoken encoding, offline."""

import shutil
import socket
import urllib.error
import urllib.request

import pytest
import tiktoken
import tiktoken.load

from minigpt.io import files
from minigpt.io.files import PACKAGE_DATA_DIR, ChecksumError, cache_dir
from minigpt.tokenizers.gpt2 import (
    ENDOFTEXT,
    ENDOFTEXT_ID,
    PAD_TOKEN_ID,
    UNK,
    SimpleTokenizerV1,
    SimpleTokenizerV2,
    UnknownTokenError,
    build_vocab,
    get_gpt2_tokenizer,
)

BOOK_TEXT = '"It\'s the last he painted, you know," \n           Mrs. Gisburn said with pardonable pride.'
EXPECTED_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250,
                8812, 2114, 286, 617, 34680, 27271, 13]
EXPECTED_TEXT = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."


@pytest.fixture(scope="module")
def verdict():
    return (PACKAGE_DATA_DIR / "the-verdict.txt").read_text(encoding="utf-8")


@pytest.fixture
def shipped_copy(tmp_path, monkeypatch):
    """A copy of the package's data folder that the test may damage."""
    copy = tmp_path / "package_data"
    shutil.copytree(PACKAGE_DATA_DIR / "gpt2", copy / "gpt2")
    monkeypatch.setattr(files, "PACKAGE_DATA_DIR", copy)
    return copy


@pytest.fixture
def no_network(monkeypatch):
    """Every way out is closed: sockets, urllib and tiktoken's own download."""
    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (blocked by the test)")

    def refuse_url(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (blocked by the test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse_url)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: pytest.fail("went to tiktoken's download"))
    monkeypatch.setattr(tiktoken.load, "read_file", lambda path: pytest.fail(f"tiktoken read {path}"))



# -- word-level tokenizers: the book's numbers ----------------------------------------------


def test_vocabularies_of_the_verdict_have_the_books_sizes(verdict):
    assert len(build_vocab(verdict)) == 1130
    vocab = build_vocab(verdict, special_tokens=(ENDOFTEXT, UNK))
    assert len(vocab) == 1132
    assert (vocab[ENDOFTEXT], vocab[UNK]) == (1130, 1131)


def test_v1_encodes_and_decodes_the_books_example(verdict):
    tokenizer = SimpleTokenizerV1(build_vocab(verdict))
    ids = tokenizer.encode(BOOK_TEXT)
    assert ids == [1, 56, 2, 850, 988, 602, 533, 746, 5, 1126, 596, 5, 1, 67, 7, 38, 851,
                   1108, 754, 793, 7]
    assert tokenizer.decode(ids) == \
        '" It\' s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'


def test_v1_decoded_text_encodes_to_the_same_ids(verdict):
    tokenizer = SimpleTokenizerV1(build_vocab(verdict))
    ids = tokenizer.encode(verdict)
    assert tokenizer.encode(tokenizer.decode(ids)) == ids


def test_v1_unknown_word_raises_a_helpful_key_error(verdict):
    tokenizer = SimpleTokenizerV1(build_vocab(verdict))
    with pytest.raises(KeyError) as info:
        tokenizer.encode("Hello, do you like tea?")
    assert isinstance(info.value, UnknownTokenError)
    assert info.value.word == "Hello"
    assert "'Hello'" in str(info.value) and "SimpleTokenizerV2" in str(info.value)


def test_v2_encodes_unknown_words_as_unk_like_the_book(verdict):
    tokenizer = SimpleTokenizerV2(build_vocab(verdict, special_tokens=(ENDOFTEXT, UNK)))
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of the palace."
    ids = tokenizer.encode(text)
    assert ids == [1131, 5, 355, 1126, 628, 975, 10, 1130, 55, 988, 956, 984, 722, 988, 1131, 7]
    assert tokenizer.decode(ids) == \
        "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."


def test_v2_finds_endoftext_without_surrounding_spaces(verdict):
    tokenizer = SimpleTokenizerV2(build_vocab(verdict, special_tokens=(ENDOFTEXT, UNK)))
    assert tokenizer.encode("tea?<|endoftext|>In") == [975, 10, 1130, 55]


def test_v2_needs_unk_in_its_vocabulary(verdict):
    with pytest.raises(ValueError, match="<\\|unk\\|>"):
        SimpleTokenizerV2(build_vocab(verdict))


@pytest.mark.parametrize("cls", [SimpleTokenizerV1, SimpleTokenizerV2])
def test_word_level_decode_of_an_unknown_id_names_it(verdict, cls):
    tokenizer = cls(build_vocab(verdict, special_tokens=(ENDOFTEXT, UNK)))
    with pytest.raises(ValueError, match="token id 5000 .* 1132 tokens"):
        tokenizer.decode([1, 5000])


# -- GPT-2's encoding: shipped, offline, verified -------------------------------------------


def test_endoftext_is_the_padding_id():
    assert ENDOFTEXT == "<|endoftext|>"
    assert PAD_TOKEN_ID == ENDOFTEXT_ID == 50256 == get_gpt2_tokenizer().eot_token


def test_get_gpt2_tokenizer_gives_gpt2_ids():
    reference = get_gpt2_tokenizer()
    assert reference.encode(EXPECTED_TEXT, allowed_special={ENDOFTEXT}) == EXPECTED_IDS
    assert reference.n_vocab == 50257


def test_get_gpt2_tokenizer_works_offline_with_no_data_dir(no_network, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    encoding = get_gpt2_tokenizer.__wrapped__()  # bypass the cached result
    assert encoding.encode(EXPECTED_TEXT, allowed_special={ENDOFTEXT}) == EXPECTED_IDS
    assert not (tmp_path / "tiktoken-cache").exists()  # tiktoken kept no copy of the files
    assert not cache_dir().exists()  # and nothing was downloaded


def test_get_gpt2_tokenizer_equals_tiktoken_s_own_file(gpt2, verdict):
    # The reference comes from tiktoken's r50k_base file in the data folder: another file format.
    ours = get_gpt2_tokenizer()
    assert [ours.decode_single_token_bytes(i) for i in range(50257)] == \
        [gpt2.decode_single_token_bytes(i) for i in range(50257)]
    sample = verdict + ENDOFTEXT + EXPECTED_TEXT + " Zürich, 東京 😀 \u2028  \t\n"
    assert ours.encode(sample, allowed_special="all") == gpt2.encode(sample, allowed_special="all")


def test_get_gpt2_tokenizer_has_the_ranks_of_tiktoken_s_loader(tmp_path, monkeypatch):
    # tiktoken's own reading of encoder.json + vocab.bpe (which also checks the merges).
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(PACKAGE_DATA_DIR / "gpt2" / "vocab.bpe"),
        encoder_json_file=str(PACKAGE_DATA_DIR / "gpt2" / "encoder.json"),
    )
    ours = get_gpt2_tokenizer()
    assert {ours.decode_single_token_bytes(i): i for i in range(50256)} == ranks


def test_a_tampered_shipped_file_is_refused(shipped_copy):
    encoder = shipped_copy / "gpt2" / "encoder.json"
    encoder.write_text(encoder.read_text(encoding="utf-8").replace('"Hello": 15496', '"Hello": 15497'),
                       encoding="utf-8")
    with pytest.raises(ChecksumError, match=r"gpt2/encoder\.json.*reinstall minigpt"):
        get_gpt2_tokenizer.__wrapped__()


def test_the_data_dir_is_searched_first(tmp_path, monkeypatch):
    # A wrong copy there is refused, which shows that it was looked at before the shipped one.
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "encoder.json").write_text("{}", encoding="utf-8")
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(tmp_path))
    with pytest.raises(ChecksumError, match=r"encoder\.json in the data folder"):
        get_gpt2_tokenizer.__wrapped__()


def test_without_shipped_files_or_network_the_error_says_how_to_fix_it(shipped_copy, no_network):
    shutil.rmtree(shipped_copy / "gpt2")  # a damaged installation
    with pytest.raises(ConnectionError, match="place a copy of .*encoder.json at FOLDER/gpt2/encoder.json "
                                              "and set MINIGPT_DATA_DIR=FOLDER"):
        get_gpt2_tokenizer.__wrapped__()
