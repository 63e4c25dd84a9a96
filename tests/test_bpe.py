"""Our from-scratch byte-level BPE: GPT-2's files give exactly tiktoken's ids; training and files."""

import json
import unicodedata
from collections import Counter
from itertools import pairwise

import pytest
import regex
import tiktoken
import tiktoken.load
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiktoken_ext.openai_public import r50k_pat_str

from minigpt.io.files import PACKAGE_DATA_DIR, cache_dir
from minigpt.tokenizers.bpe import ENDOFTEXT, GPT2_SPLIT_PATTERN, BPETokenizer, bytes_to_unicode, gpt2_bpe_files
from minigpt.tokenizers.bpe_training import merge_pair

# The autouse fixtures of conftest.py only set environment variables, which need no reset
# between the examples of one test.
PROPERTY = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

EXPECTED_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250,
                8812, 2114, 286, 617, 34680, 27271, 13]
EXPECTED_TEXT = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
# The files that ship with minigpt (read directly: module fixtures run outside any test's settings).
ENCODER_JSON = PACKAGE_DATA_DIR / "gpt2" / "encoder.json"
VOCAB_BPE = PACKAGE_DATA_DIR / "gpt2" / "vocab.bpe"

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
def verdict():
    return (PACKAGE_DATA_DIR / "the-verdict.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def ours():
    return BPETokenizer.from_gpt2_files(ENCODER_JSON, VOCAB_BPE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """tiktoken's GPT-2 encoding, with OpenAI's files read by tiktoken's own loader (none of our code)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-cache")))
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(VOCAB_BPE), encoder_json_file=str(ENCODER_JSON))
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)


@pytest.fixture(scope="module")
def trained(verdict):
    return BPETokenizer().train(verdict, vocab_size=500)


# -- GPT-2's BPE: our encoder against tiktoken ----------------------------------------------


def test_gpt2_bpe_files_ship_with_minigpt_and_are_verified():
    assert gpt2_bpe_files() == (ENCODER_JSON, VOCAB_BPE)
    assert not cache_dir().exists()  # nothing was downloaded


def test_bytes_to_unicode_is_a_visible_one_to_one_alphabet():
    mapping = bytes_to_unicode()
    assert list(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert all(char.isprintable() and not char.isspace() for char in mapping.values())
    assert (mapping[ord(" ")], mapping[ord("\n")], mapping[ord("A")]) == ("\u0120", "\u010a", "A")  # Ġ, Ċ


def test_from_gpt2_files_gives_gpt2_ids(ours):
    assert ours.encode(EXPECTED_TEXT, allowed_special={ENDOFTEXT}) == EXPECTED_IDS
    assert ours.vocab_size == 50257


def test_the_verdict_encodes_exactly_like_tiktoken(ours, reference, verdict):
    ids = ours.encode(verdict)
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
    pattern = regex.compile(unicode_class)
    disagree = [
        hex(cp) for cp in range(0x110000)
        if unicodedata.category(char := chr(cp)) not in ("Cn", "Cs")
        and (probe.encode_ordinary("ZZ" + char)[0] == 256) != bool(pattern.fullmatch(char))
    ]
    assert disagree == []


@PROPERTY
@given(text=st.text(ASSIGNED))
def test_any_text_encodes_exactly_like_tiktoken(ours, reference, text):
    assert ours.encode(text) == reference.encode(text, disallowed_special=())


@PROPERTY
@given(text=TRICKY_TEXT)
def test_tricky_text_encodes_exactly_like_tiktoken(ours, reference, text):
    assert ours.encode(text) == reference.encode(text, disallowed_special=())
    assert ours.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")


@PROPERTY
@given(text=TRICKY_TEXT | st.text(ASSIGNED))
def test_decode_inverts_encode(ours, text):
    assert ours.decode(ours.encode(text)) == text
    assert ours.decode(ours.encode(text, allowed_special="all")) == text


@PROPERTY
@given(ids=st.lists(st.integers(0, 50256), max_size=40))
def test_decode_of_any_ids_matches_tiktoken(ours, reference, ids):
    assert ours.decode(ids) == reference.decode(ids)


def test_decode_replaces_a_partial_character(ours):
    ids = ours.encode("😀")  # four UTF-8 bytes in two tokens
    assert len(ids) == 2
    assert ours.decode(ids[:1]) == "\ufffd"
    assert ours.decode(ids) == "😀"


@pytest.mark.parametrize("bad_id", [50257, -1])
def test_decode_of_an_id_outside_the_vocabulary_names_it(ours, bad_id):
    with pytest.raises(ValueError, match=f"token id {bad_id} .* 50257 ids"):
        ours.decode([464, bad_id])


def test_endoftext_is_special_only_when_allowed(ours, reference):
    assert ours.encode(ENDOFTEXT, allowed_special={ENDOFTEXT}) == [50256]
    assert ours.encode(ENDOFTEXT, allowed_special="all") == [50256]
    # Not allowed: plain text, as tiktoken's disallowed_special=() (tiktoken itself would raise)
    plain = ours.encode(ENDOFTEXT)
    assert plain == reference.encode(ENDOFTEXT, disallowed_special=()) == [27, 91, 437, 1659, 5239, 91, 29]
    with pytest.raises(ValueError):
        reference.encode(ENDOFTEXT)


def test_allowing_an_unknown_special_token_is_an_error(ours):
    with pytest.raises(ValueError, match="<\\|fim_prefix\\|>"):
        ours.encode("x", allowed_special={"<|fim_prefix|>"})


def test_gpt2_tokenizer_survives_save_and_load(ours, verdict, tmp_path):
    path = tmp_path / "gpt2.json"
    ours.save(path)
    loaded = BPETokenizer.load(path)
    assert (loaded.vocab, loaded.merges, loaded.special_tokens) == \
        (ours.vocab, ours.merges, ours.special_tokens)
    assert loaded.encode(verdict) == ours.encode(verdict)
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["vocab"]["\u0120the"] == 262  # readable: " the" is written "Ġthe"
    assert saved["merges"][0] == "\u0120 t"


def test_a_merge_s_rank_is_its_place_in_the_list_not_its_token_s_id():
    a, b, c = b"abc"
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"ab", 257: b"bc", 258: b"abc"}
    merges = [(b, c), (a, b), (256, c)]  # "bc" (id 257) is learned before "ab" (id 256)
    assert BPETokenizer(vocab, merges).encode("abcab") == [a, 257, 256]
    # "abc" is a token that its own merges never build: tiktoken's rule keeps it whole
    assert BPETokenizer(vocab, merges).encode("abc") == [258]
    assert BPETokenizer(vocab, merges, ignore_merges=False).encode("abc") == [a, 257]


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
        counts = Counter(pair for ids in words for pair in pairwise(ids))
        best = max(counts.values())
        pair = min(pair for pair, n in counts.items() if n == best)
        merges.append(pair)
        words = [merge_pair(ids, pair, new_id) for ids in words]
    return merges


def test_training_learns_the_same_merges_as_recounting_everything(verdict):
    tokenizer = BPETokenizer().train(verdict, vocab_size=256 + 200, allowed_special=set())
    assert list(tokenizer.merges) == naive_merges(verdict, 200)


def test_every_token_is_built_by_its_merges(ours, trained):
    # Encoding takes a shortcut (a piece that is a token is that token); merging alone
    # must reach the same answer, or the shortcut would change the ids.
    for tokenizer in (ours, trained):
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


def test_load_rejects_files_in_another_format():
    with pytest.raises(ValueError, match="not a minigpt BPE tokenizer"):
        BPETokenizer.load(ENCODER_JSON)
