"""Tokenizers: the book's word-level examples, and our BPE checked against tiktoken."""

import json
import unicodedata
from collections import Counter

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minigpt.tokenizer import (
    ENDOFTEXT,
    GPT2_SPLIT_PATTERN,
    UNK,
    BPETokenizer,
    SimpleTokenizerV1,
    SimpleTokenizerV2,
    UnknownTokenError,
    _merge,
    build_vocab,
    get_gpt2_tokenizer,
)

# The autouse fixtures of conftest.py only set environment variables, which need no reset
# between the examples of one test.
PROPERTY = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

BOOK_TEXT = """"It's the last he painted, you know," 
           Mrs. Gisburn said with pardonable pride."""
EXPECTED_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250,
                8812, 2114, 286, 617, 34680, 27271, 13]
EXPECTED_TEXT = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."

# Every character the running Python's Unicode database knows (no unassigned code points,
# no surrogates, which are not valid text).
ASSIGNED = st.characters(exclude_categories=("Cn", "Cs"))
# Pieces where GPT-2's pre-tokenizer has special cases or tends to go wrong.
FRAGMENTS = [
    " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n ", "\u00a0", "\u3000", "\u2028", "\x0b",
    "\x1c", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "\u2019s", "'",
    "0", "7", "123", "3.14", "1,000", "\u0663", "\u00bd", "\u00b2", "\u216b",
    "a", "the", " the", "Hello", "HELLO", "don", "caf\u00e9", "cafe\u0301", "na\u00efve",
    "\U0001f600", "\U0001f44d\U0001f3fd", "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\U0001f1eb\U0001f1f7", "中文", "日本語", "한국어", "Привет", "مرحبا", "שלום", "हिन्दी",
    "ไทย", ".", ",", "!?", "...", "--", "\u2014", "<|", "|>", ENDOFTEXT, "\\", "$", "@", "_",
    "\x00", "\x7f", "\ufffd", "\ufeff",
]
TRICKY_TEXT = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(ASSIGNED, max_size=4)), max_size=30
).map("".join)


@pytest.fixture(scope="module")
def verdict(data_path):
    return (data_path / "the-verdict.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def gpt2(data_path):
    return BPETokenizer.from_gpt2_files(data_path / "gpt2" / "encoder.json",
                                        data_path / "gpt2" / "vocab.bpe")


@pytest.fixture(scope="module")
def reference():
    return get_gpt2_tokenizer()


@pytest.fixture(scope="module")
def trained(verdict):
    return BPETokenizer().train(verdict, vocab_size=500)


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


# -- GPT-2's BPE: our encoder against tiktoken ----------------------------------------------


def test_get_gpt2_tokenizer_gives_gpt2_ids(reference):
    assert reference.encode(EXPECTED_TEXT, allowed_special={ENDOFTEXT}) == EXPECTED_IDS
    assert reference.n_vocab == 50257


def test_get_gpt2_tokenizer_works_from_the_download_cache(data_path, tmp_path, monkeypatch):
    # Without a data folder the files come from minigpt's cache, not from tiktoken's download
    monkeypatch.delenv("MINIGPT_DATA_DIR")
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path))
    (tmp_path / "gpt2").mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        (tmp_path / "gpt2" / name).write_bytes((data_path / "gpt2" / name).read_bytes())
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: pytest.fail("went to tiktoken"))
    encoding = get_gpt2_tokenizer.__wrapped__()  # bypass the cached result
    assert encoding.encode(EXPECTED_TEXT, allowed_special={ENDOFTEXT}) == EXPECTED_IDS


def test_from_gpt2_files_gives_gpt2_ids(gpt2):
    assert gpt2.encode(EXPECTED_TEXT, allowed_special={ENDOFTEXT}) == EXPECTED_IDS
    assert gpt2.vocab_size == 50257


def test_the_verdict_encodes_exactly_like_tiktoken(gpt2, reference, verdict):
    ids = gpt2.encode(verdict)
    assert len(ids) == 5145
    assert ids == reference.encode_ordinary(verdict)


@pytest.mark.parametrize("unicode_class", [r"\p{L}", r"\p{N}", r"\s"])
def test_pre_tokenizer_classes_agree_with_tiktoken_on_every_assigned_character(unicode_class):
    """Letters, digits and spaces decide where pre-tokens end, so all three must agree.

    A probe encoding knows one merge, "ZZ", and its pattern keeps "ZZ" together only when
    the next character is in the class: tiktoken's answer for a character is whether
    "ZZ" followed by it starts with the merged id.
    """
    probe = tiktoken.Encoding(
        name="probe", pat_str=rf"ZZ(?={unicode_class})|[\s\S]",
        mergeable_ranks={**{bytes([b]): b for b in range(256)}, b"ZZ": 256}, special_tokens={},
    )
    ours = regex.compile(unicode_class)
    disagree = [
        hex(cp) for cp in range(0x110000)
        if unicodedata.category(char := chr(cp)) not in ("Cn", "Cs")
        and (probe.encode_ordinary("ZZ" + char)[0] == 256) != bool(ours.fullmatch(char))
    ]
    assert disagree == []


@PROPERTY
@given(text=st.text(ASSIGNED))
def test_any_text_encodes_exactly_like_tiktoken(gpt2, reference, text):
    assert gpt2.encode(text) == reference.encode(text, disallowed_special=())


@PROPERTY
@given(text=TRICKY_TEXT)
def test_tricky_text_encodes_exactly_like_tiktoken(gpt2, reference, text):
    assert gpt2.encode(text) == reference.encode(text, disallowed_special=())
    assert gpt2.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")


@PROPERTY
@given(text=TRICKY_TEXT | st.text(ASSIGNED))
def test_decode_inverts_encode(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text
    assert gpt2.decode(gpt2.encode(text, allowed_special="all")) == text


@PROPERTY
@given(ids=st.lists(st.integers(0, 50256), max_size=40))
def test_decode_of_any_ids_matches_tiktoken(gpt2, reference, ids):
    assert gpt2.decode(ids) == reference.decode(ids)


def test_decode_replaces_a_partial_character(gpt2):
    ids = gpt2.encode("😀")  # four UTF-8 bytes in two tokens
    assert len(ids) == 2
    assert gpt2.decode(ids[:1]) == "\ufffd"
    assert gpt2.decode(ids) == "😀"


@pytest.mark.parametrize("bad_id", [50257, -1])
def test_decode_of_an_id_outside_the_vocabulary_names_it(gpt2, bad_id):
    with pytest.raises(ValueError, match=f"token id {bad_id} .* 50257 ids"):
        gpt2.decode([464, bad_id])


def test_endoftext_is_special_only_when_allowed(gpt2, reference):
    assert gpt2.encode(ENDOFTEXT, allowed_special={ENDOFTEXT}) == [50256]
    assert gpt2.encode(ENDOFTEXT, allowed_special="all") == [50256]
    # Not allowed: plain text, as tiktoken's disallowed_special=() (tiktoken itself would raise)
    plain = gpt2.encode(ENDOFTEXT)
    assert plain == reference.encode(ENDOFTEXT, disallowed_special=()) == [27, 91, 437, 1659, 5239, 91, 29]
    with pytest.raises(ValueError):
        reference.encode(ENDOFTEXT)


def test_allowing_an_unknown_special_token_is_an_error(gpt2):
    with pytest.raises(ValueError, match="<\\|fim_prefix\\|>"):
        gpt2.encode("x", allowed_special={"<|fim_prefix|>"})


def test_gpt2_tokenizer_survives_save_and_load(gpt2, verdict, tmp_path):
    path = tmp_path / "gpt2.json"
    gpt2.save(path)
    loaded = BPETokenizer.load(path)
    assert (loaded.vocab, loaded.merges, loaded.special_tokens) == \
        (gpt2.vocab, gpt2.merges, gpt2.special_tokens)
    assert loaded.encode(verdict) == gpt2.encode(verdict)
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["vocab"]["\u0120the"] == 262  # readable: " the" is written "Ġthe"
    assert saved["merges"][0] == "\u0120 t"


# -- training our own BPE -------------------------------------------------------------------


def test_training_merges_the_most_frequent_pair_first():
    # Wikipedia's example: "aa" occurs 4 times and becomes Z; then "Za" and "ab" tie at 2
    # and the pair of smaller ids, "ab", becomes Y; then "ZY" occurs twice.
    tokenizer = BPETokenizer().train("aaabdaaabac", vocab_size=259, allowed_special=set())
    a, b = ord("a"), ord("b")
    assert list(tokenizer.merges.items()) == [((a, a), 256), ((a, b), 257), ((256, 257), 258)]
    assert tokenizer.vocab[258] == b"aaab"
    assert tokenizer.encode("aaabdaaabac") == [258, ord("d"), 258, a, ord("c")]


def naive_merges(text, n_merges):
    """Training the slow, obvious way: recount every pair of every pre-token at each step."""
    words = [list(piece.encode("utf-8")) for piece in regex.findall(GPT2_SPLIT_PATTERN, text)]
    merges = []
    for new_id in range(256, 256 + n_merges):
        counts = Counter(pair for ids in words for pair in zip(ids, ids[1:]))
        best = max(counts.values())
        pair = min(pair for pair, n in counts.items() if n == best)
        merges.append(pair)
        words = [_merge(ids, pair, new_id) for ids in words]
    return merges


def test_training_learns_the_same_merges_as_recounting_everything(verdict):
    tokenizer = BPETokenizer().train(verdict, vocab_size=256 + 200, allowed_special=set())
    assert list(tokenizer.merges) == naive_merges(verdict, 200)


def test_every_token_is_built_by_its_merges(gpt2, trained):
    # Encoding takes a shortcut (a piece that is a token is that token); merging alone
    # must reach the same answer, or the shortcut would change the ids.
    for tokenizer in (gpt2, trained):
        assert [i for i, token in tokenizer.vocab.items() if tokenizer._bpe(token) != [i]] == []


def test_training_never_merges_across_pre_tokens():
    # 267 = 256 bytes + all 10 possible merges + <|endoftext|>
    tokenizer = BPETokenizer().train("hello, world. " * 50, vocab_size=267)
    learned = [token for token in tokenizer.vocab.values() if len(token) > 1]
    assert b" world" in learned and b"hello" in learned
    assert not [token for token in learned if b"," in token or b"." in token or token.endswith(b" ")]


def test_trained_tokenizer_has_the_requested_size_and_round_trips(trained, verdict):
    assert trained.vocab_size == 500
    assert trained.special_tokens == {ENDOFTEXT: 499}
    ids = trained.encode(verdict)
    assert trained.decode(ids) == verdict
    assert len(ids) < len(verdict.encode("utf-8")) / 2  # the merges compress the text it saw


@settings(PROPERTY, max_examples=100)
@given(text=TRICKY_TEXT | st.text(ASSIGNED))
def test_trained_tokenizer_round_trips_any_text(trained, text):
    assert trained.decode(trained.encode(text, allowed_special="all")) == text


def test_special_tokens_in_the_training_text_stay_whole():
    documents = [f"story number {i} ends here." for i in range(100)]
    text = ENDOFTEXT.join(documents)
    tokenizer = BPETokenizer().train(text, vocab_size=320)
    assert not [token for token in tokenizer.vocab.values() if b"endoftext" in token]
    ids = tokenizer.encode(text, allowed_special={ENDOFTEXT})
    assert ids.count(tokenizer.special_tokens[ENDOFTEXT]) == 99
    assert tokenizer.decode(ids) == text


def test_vocab_size_must_leave_room_for_bytes_and_specials():
    with pytest.raises(ValueError, match="at least 257"):
        BPETokenizer().train("some text", vocab_size=256)
    assert BPETokenizer().train("some text", vocab_size=256, allowed_special=set()).merges == {}


def test_training_warns_when_the_text_runs_out_of_pairs():
    with pytest.warns(UserWarning, match="no more pairs"):
        tokenizer = BPETokenizer().train("ab", vocab_size=300)
    assert tokenizer.vocab_size == 258  # 256 bytes, "ab", <|endoftext|>


def test_trained_tokenizer_survives_save_and_load(trained, verdict, tmp_path):
    path = tmp_path / "tokenizer.json"
    trained.save(path)
    loaded = BPETokenizer.load(path)
    assert (loaded.vocab, loaded.merges, loaded.special_tokens) == \
        (trained.vocab, trained.merges, trained.special_tokens)
    text = verdict + ENDOFTEXT + "Unseen words: Zürich, 東京 😀"
    assert loaded.encode(text, allowed_special="all") == trained.encode(text, allowed_special="all")


def test_load_rejects_files_in_another_format(data_path):
    with pytest.raises(ValueError, match="not a minigpt BPE tokenizer"):
        BPETokenizer.load(data_path / "gpt2" / "encoder.json")


def test_without_local_files_or_network_the_error_says_how_to_fix_it(monkeypatch):
    import minigpt.tokenizer as tok

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tok, "gpt2_bpe_files", offline)
    monkeypatch.setattr(tok.tiktoken, "get_encoding", offline)
    tok.get_gpt2_tokenizer.cache_clear()
    try:
        with pytest.raises(ConnectionError, match="set MINIGPT_DATA_DIR"):
            tok.get_gpt2_tokenizer()
    finally:
        tok.get_gpt2_tokenizer.cache_clear()  # later tests get the real encoding again
