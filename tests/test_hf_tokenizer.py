"""Hugging Face tokenizer.json files read by our BPE give exactly the ids of the `tokenizers` library."""

import base64
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minigpt.data.windows import tokenize
from minigpt.generation.text import IncrementalDecoder
from minigpt.io.files import PACKAGE_DATA_DIR
from minigpt.tokenizers.bpe import ENDOFTEXT, bytes_to_unicode
from minigpt.tokenizers.pretokenizers import normalizer_of, pre_tokenize, pre_tokenizer_steps
from minigpt.tokenizers.tokenizer_json import load_hf_tokenizer

tokenizers = pytest.importorskip("tokenizers", reason="the reference tokenizers come from the tokenizers library")
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, trainers  # noqa: E402
from tokenizers import pre_tokenizers as pt  # noqa: E402

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# The split regexes of the real files: Llama 3 (digits in threes) and Qwen2 (one digit a piece)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

# How the real files pre-tokenize (and normalize): each style is trained on the same text
STYLES = {
    "llama3": (None, lambda: pt.Sequence([pt.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                          pt.ByteLevel(add_prefix_space=False, use_regex=False)]), True),
    "qwen2": (normalizers.NFC, lambda: pt.Sequence([pt.Split(Regex(QWEN2_PATTERN), "isolated"),
                                                    pt.ByteLevel(add_prefix_space=False, use_regex=False)]), False),
    "smollm2": (None, lambda: pt.Sequence([pt.Digits(individual_digits=True),
                                           pt.ByteLevel(add_prefix_space=False, use_regex=True)]), False),
    "gpt2": (None, lambda: pt.ByteLevel(add_prefix_space=False), False),
    "gpt2-prefix-space": (None, lambda: pt.ByteLevel(add_prefix_space=True), False),
}

HELD_OUT = [
    "Hello world! It's 2024, and we'll see what they've done.\n\n",
    "Ünïcödé: naïve café, Straße, ÉCOLE; Привет, мир! 你好，世界。こんにちは 안녕하세요 مرحبا שלום हिन्दी ไทย",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif x >= 10_000: print(f\"{x:>8}\")\r\n",
    "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷 and the flags 🏳️‍🌈, math ∑ x² ≤ ½ ⅓ Ⅻ ٣٤ ５６",
    "numbers 1234567 3.14159 1,000,000 and   many    spaces  \n  \n\n\n tail   ",
    "<|begin_of_text|>system<|eot_id|>user says <think>hmm</think> ok<|eot_id|><|end_of_text|>",
    "a <mask> b<mask>c \n <mask>\t<think>x <think> <|eot_id|>  <|eot_id|>",
    "special tokens glued:<|eot_id|><|eot_id|>word<|begin_of_text|>end  <|eot_id|> ",
    "'S 'LL 'Ve DON'T ſ K \u00a0nbsp\u3000ideographic\u2028line\x0bvt\x1cfs\x85nel",
    "caf\u00e9 vs cafe\u0301, \ufb01 ligature, Ａ fullwidth, \ufeffbom \x00nul \x7f",
    "single words: _c alone, ab_c glued, _c. (_c) _cd é_c 1_c _c",
]

ASSIGNED = st.characters(exclude_categories=("Cn", "Cs"))
FRAGMENTS = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "'s", "'LL", "123", "12345", "3.14", "the", " the",
             "Hello", "café", "cafe\u0301", "😀", "中文", "<|eot_id|>", "<mask>", "<think>", "<|begin_of_text|>",
             "\u00a0", "\u3000", "\x85", "_", "ab_c"]
TEXT = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(ASSIGNED, max_size=4)), max_size=25).map("".join)


def train(style: str, vocab_size: int = 800) -> Tokenizer:
    """A byte-level BPE that the tokenizers library trains on the shipped texts, with added tokens."""
    normalizer, pre_tokenizer, ignore_merges = STYLES[style]
    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if normalizer:
        tokenizer.normalizer = normalizer()
    tokenizer.pre_tokenizer = pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pt.ByteLevel.alphabet(),
                                  special_tokens=["<|begin_of_text|>", "<|end_of_text|>"], show_progress=False)
    texts = [(PACKAGE_DATA_DIR / name).read_text(encoding="utf-8")[:60_000]
             for name in ("the-verdict.txt", "tinyshakespeare.txt")]
    tokenizer.train_from_iterator(texts, trainer)
    # As the real files have them: control tokens are special and never normalized; <mask>
    # swallows the spaces before it (RoBERTa-style); <think> is ordinary vocabulary (Qwen3)
    tokenizer.add_special_tokens([
        AddedToken("<|eot_id|>", special=True, normalized=False),
        AddedToken("<mask>", special=True, lstrip=True, normalized=False),
        AddedToken("<|im_start|>", special=True, rstrip=True, normalized=False),
    ])
    tokenizer.add_tokens([AddedToken("<think>", special=False, normalized=True),
                          AddedToken("</think>", special=False, normalized=False),
                          AddedToken("_c", special=False, single_word=True, normalized=False)])
    return tokenizer


def save(tokenizer: Tokenizer, directory, config: dict | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


@pytest.fixture(scope="module", params=list(STYLES))
def pair(request, tmp_path_factory):
    """(the style, the reference tokenizer, ours loaded from the file it saved) for each style of file."""
    reference = train(request.param)
    directory = save(reference, tmp_path_factory.mktemp(request.param))
    return request.param, reference, load_hf_tokenizer(directory)


def reference_ids(reference: Tokenizer, text: str, specials: bool = True) -> list[int]:
    reference.encode_special_tokens = not specials
    return reference.encode(text, add_special_tokens=False).ids


def test_held_out_text_gives_the_reference_ids(pair):
    _, reference, ours = pair
    for text in HELD_OUT:
        assert ours.encode(text, allowed_special="all") == reference_ids(reference, text), text
        # Special tokens read as plain text, as with the library's encode_special_tokens
        assert ours.encode(text, disallowed_special=()) == reference_ids(reference, text, specials=False), text


@PROPERTY
@given(text=TEXT)
def test_any_text_gives_the_reference_ids(pair, text):
    _, reference, ours = pair
    assert ours.encode(text, allowed_special="all") == reference_ids(reference, text)


def test_decoding_matches_the_reference_and_round_trips(pair):
    style, reference, ours = pair
    for text in HELD_OUT:
        ids = ours.encode(text, allowed_special="all")
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=False)
        if style in ("llama3", "smollm2", "gpt2") and not any(t in text for t in ("<mask>", "<|im_start|>", "_c")):
            assert ours.decode(ids) == text  # (a normalizer, a prefix space or lstrip/rstrip change the text)
    # One character over several tokens: the bytes join up, though each token alone is invalid UTF-8
    ids = ours.encode("😀")
    assert b"".join(ours.decode_bytes([i]) for i in ids) == reference.decode(ids).encode()
    assert len(ids) > 1 and "\ufffd" in ours.decode(ids[-1:])


def test_a_long_text_gives_the_reference_ids(pair):
    _, reference, ours = pair
    text = (PACKAGE_DATA_DIR / "tinyshakespeare.txt").read_text(encoding="utf-8")[-200_000:]
    assert ours.encode(text) == reference_ids(reference, text)


# -- each step of the file against the library ----------------------------------------------


def file_entry(pre_tokenizer) -> dict:
    """The pre-tokenizer as the library writes it into tokenizer.json."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    return json.loads(tokenizer.to_str())["pre_tokenizer"]


@pytest.mark.parametrize("pre_tokenizer", [
    *[pt.Split(Regex(r"\s+|-"), behavior, invert=invert)
      for behavior in ("removed", "isolated", "merged_with_previous", "merged_with_next", "contiguous")
      for invert in (False, True)],
    pt.Split("--", "merged_with_next"), pt.Digits(individual_digits=True), pt.Digits(individual_digits=False),
    pt.ByteLevel(add_prefix_space=True, use_regex=True), pt.ByteLevel(add_prefix_space=False, use_regex=False),
    pt.Sequence([pt.Split(Regex(r"\s+"), "isolated"), pt.ByteLevel(add_prefix_space=True, use_regex=False)]),
], ids=repr)
def test_each_pre_tokenizer_cuts_like_the_library(pre_tokenizer):
    visible = bytes_to_unicode()
    steps = pre_tokenizer_steps(file_entry(pre_tokenizer))
    for text in ["a  b--c -d ", "--x- y--", "ab12٣4５x 7 and 2024", " lead  and trail ", "x", ""]:
        pieces = pre_tokenize(text, steps)
        expected = [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]
        # ByteLevel shows bytes as visible characters (the space as Ġ); our BPE does that later
        assert ["".join(visible[b] for b in piece.encode()) for piece in pieces] == \
            ["".join(visible[b] for b in piece.encode()) if "ByteLevel" not in repr(pre_tokenizer) else piece
             for piece in expected]


def test_gpt2_s_own_files_give_tiktoken_s_ids(gpt2, tmp_path):
    """GPT-2's vocabulary and merges, written as a tokenizer.json by the library."""
    reference = Tokenizer(models.BPE.from_file(str(PACKAGE_DATA_DIR / "gpt2" / "encoder.json"),
                                               str(PACKAGE_DATA_DIR / "gpt2" / "vocab.bpe")))
    reference.pre_tokenizer = pt.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    reference.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    ours = load_hf_tokenizer(save(reference, tmp_path, {"eos_token": ENDOFTEXT}))
    text = (PACKAGE_DATA_DIR / "the-verdict.txt").read_text(encoding="utf-8") + ENDOFTEXT + "".join(HELD_OUT)
    ids = ours.encode(text, allowed_special={ENDOFTEXT})
    assert ids == gpt2.encode(text, allowed_special={ENDOFTEXT}) == reference_ids(reference, text)
    assert (ours.n_vocab, ours.eot_token) == (gpt2.n_vocab, gpt2.eot_token)
    assert ours.decode(ids) == gpt2.decode(ids) == text


@pytest.mark.slow
def test_a_file_converted_from_tiktoken_like_llama_3_s_gives_tiktoken_s_ids(gpt2, tmp_path):
    """Llama 3's tokenizer.json is converted from tiktoken: a Split regex then ByteLevel, ignore_merges,
    and every way of building a token from two others listed as a merge. GPT-2's ranks, converted
    the same way by transformers, give tiktoken's ids."""
    convert_slow_tokenizer = pytest.importorskip("transformers.convert_slow_tokenizer",
                                                 reason="transformers converts tiktoken files")
    ranks_file = tmp_path / "gpt2.tiktoken"
    ranks_file.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n"
                                  for token, rank in gpt2._mergeable_ranks.items()), encoding="utf-8")
    reference = convert_slow_tokenizer.TikTokenConverter(
        vocab_file=str(ranks_file), pattern=gpt2._pat_str, extra_special_tokens=[ENDOFTEXT]).converted()
    ours = load_hf_tokenizer(save(reference, tmp_path / "converted"))
    text = (PACKAGE_DATA_DIR / "tinyshakespeare.txt").read_text(encoding="utf-8")[:300_000] + "".join(HELD_OUT)
    assert ours.encode(text) == gpt2.encode(text) == reference_ids(reference, text)


def test_merges_in_either_form_and_in_any_id_order(tmp_path):
    """Older files write merges "Ġ t"; and a merge's rank is its place in the list, not its token's id."""
    data = json.loads(train("llama3").to_str())
    model = data["model"]
    model["merges"] = [" ".join(pair) for pair in model["merges"]]
    added = {token["id"] for token in data["added_tokens"]}
    merged = [token for token, i in model["vocab"].items() if len(token) > 1 and i not in added]
    shuffled = sorted(model["vocab"][token] for token in merged)
    random.Random(0).shuffle(shuffled)
    model["vocab"].update(zip(merged, shuffled, strict=True))
    for ignore_merges in (True, False):
        model["ignore_merges"] = ignore_merges
        (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
        reference, ours = Tokenizer.from_file(str(tmp_path / "tokenizer.json")), load_hf_tokenizer(tmp_path)
        for text in HELD_OUT:
            assert ours.encode(text, allowed_special="all") == reference_ids(reference, text), text


# -- the interface minigpt uses ----------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_like(tmp_path_factory):
    reference = train("llama3")
    config = {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", "__type": "AddedToken"},
              "pad_token": None}
    return reference, load_hf_tokenizer(save(reference, tmp_path_factory.mktemp("llama"), config))


def test_tokenizer_config_names_the_special_tokens(llama_like):
    reference, ours = llama_like
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == \
        (reference.token_to_id("<|begin_of_text|>"), reference.token_to_id("<|eot_id|>"), None)
    assert ours.eot_token == ours.eos_token_id
    assert ours.special_token_names == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    assert ours.n_vocab == reference.get_vocab_size(with_added_tokens=True)
    for token in ["Ġthe", "e", "<think>", "<|eot_id|>", "Ġ", "no such token"]:
        assert ours.token_to_id(token) == reference.token_to_id(token)
    assert ours.special_tokens_set == {"<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<mask>", "<|im_start|>"}


def test_special_tokens_follow_tiktoken_s_rules(llama_like):
    reference, ours = llama_like
    text = "Hi<|eot_id|> <mask>"
    with pytest.raises(ValueError, match=r"special token '<\|eot_id\|>'.*allowed_special"):
        ours.encode(text)
    only_eot = ours.encode(text, allowed_special={"<|eot_id|>"}, disallowed_special=())
    assert only_eot == ours.encode("Hi") + [reference.token_to_id("<|eot_id|>")] + ours.encode(" <mask>",
                                                                                             disallowed_special=())
    assert ours.encode_ordinary(text) == reference_ids(reference, text, specials=False)
    # Added tokens that are not special are ordinary vocabulary, always read
    assert ours.encode("<think>") == [reference.token_to_id("<think>")]


def test_minigpt_reads_and_streams_with_it(llama_like):
    _, ours = llama_like
    text = "Streaming 😀 naïve text<|endoftext|> ends"
    ids = tokenize(text, ours)  # <|endoftext|> is no token here: plain text
    assert ids == ours.encode(text, disallowed_special=()) and ours.decode(ids) == text
    decoder = IncrementalDecoder(ours)
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)


def test_names_differ_between_files(tmp_path):
    first = load_hf_tokenizer(save(train("gpt2", 600), tmp_path / "same"))
    second = load_hf_tokenizer(save(train("gpt2", 700), tmp_path / "same-other"))
    assert first.name.startswith("same-") and first.name != second.name


def test_files_that_are_not_byte_level_bpe_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        load_hf_tokenizer(tmp_path)
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="not a byte-level BPE tokenizer.*WordPiece"):
        load_hf_tokenizer(save(wordpiece, tmp_path / "bert"))
    sentencepiece = Tokenizer(models.BPE({"▁a": 0, "<unk>": 1}, [], unk_token="<unk>", byte_fallback=True))
    sentencepiece.pre_tokenizer = pt.Metaspace()
    with pytest.raises(ValueError, match="no ByteLevel step"):
        load_hf_tokenizer(save(sentencepiece, tmp_path / "llama2") / "tokenizer.json")


@pytest.mark.parametrize("text", ["ΟΔΟΣ ΚΑΛΟΣ", "ΣΑΣ Σ ΑΣ.", "İstanbul ǅ ẞ ΌΣΟΣ", "Hello WORLD"])
def test_lowercase_is_per_character_like_the_library(text):
    # str.lower() writes a word-final capital sigma as ς; the library lowercases each character alone (σ)
    ours = normalizer_of({"type": "Lowercase"})
    assert ours(text) == normalizers.Lowercase().normalize_str(text)
