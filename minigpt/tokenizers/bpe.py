"""Byte-level byte-pair encoding (BPE), GPT-2's tokenizer, written from scratch (book chapter 2).

The one idea: start from the 256 possible bytes, so that *any* text can be encoded, and
learn merges of frequent neighbouring pieces, so that common words still become a single
id. ``BPETokenizer.train`` learns merges from a text; ``BPETokenizer.from_gpt2_files``
loads OpenAI's and produces exactly the ids of tiktoken's GPT-2 encoding
(``minigpt.tokenizers.gpt2.get_gpt2_tokenizer``, which the rest of minigpt uses because it is
faster). ``minigpt.tokenizers.tokenizer_json`` feeds it the vocabulary and merges of Hugging Face
``tokenizer.json`` files (Llama 3, Qwen, SmolLM2).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence, Set
from itertools import pairwise
from operator import index
from pathlib import Path
from typing import Literal

import regex  # like `re`, but knows Unicode classes such as \p{L} (any letter)

from minigpt.io.download import fetch
from minigpt.io.files import write_json
from minigpt.io.sources import GPT2_ENCODER_JSON, GPT2_VOCAB_BPE
from minigpt.tokenizers.bpe_training import learn_merges

ENDOFTEXT = "<|endoftext|>"  # GPT-2's one special token: it separates documents

# GPT-2's pre-tokenizer: text is first cut into words, numbers, punctuation runs and
# whitespace, each keeping its leading space, and BPE then merges only *inside* a piece,
# so " the" is learned once rather than once per neighbouring word. `\s+(?!\S)` leaves
# the last space of a run to start the next word.
# \p{L} (letters) and \p{N} (digits and numerals) follow the Unicode tables of the
# `regex` package, which may be newer than those of tiktoken's engine: a character added
# to Unicode very recently can split differently from tiktoken (the tests check every
# character that Python's `unicodedata` knows).
GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
_PRE_TOKENIZER = regex.compile(GPT2_SPLIT_PATTERN)

# The pre-token cache is emptied when it grows past this many entries, so that encoding
# an endless stream of distinct strings cannot use unbounded memory.
_CACHE_LIMIT = 200_000


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible mapping from each of the 256 bytes to a visible character.

    OpenAI's files store tokens as text, but a token is a byte string that may be invalid
    UTF-8 or contain spaces and control bytes. So printable bytes stand for themselves and
    the other 68 get the characters from U+0100 upwards: the space byte becomes ``Ġ``,
    which is why GPT-2's vocabulary is full of tokens such as ``Ġthe``.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in mapping):
        mapping[b] = chr(256 + n)
    return dict(sorted(mapping.items()))


def gpt2_bpe_files() -> tuple[Path, Path]:
    """Local, checksum-verified paths of OpenAI's ``encoder.json`` and ``vocab.bpe``.

    They ship with minigpt; a copy in ``MINIGPT_DATA_DIR`` is preferred when there is one.
    """
    return fetch(GPT2_ENCODER_JSON), fetch(GPT2_VOCAB_BPE)


@functools.cache
def special_token_pattern(tokens: frozenset[str]) -> re.Pattern[str]:
    """A regex finding any of ``tokens`` (one capturing group): leftmost, and longest there."""
    # Longest first, so that a special token containing another one wins
    alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    return re.compile(f"({alternatives})")


class BPETokenizer:
    """Byte-level byte-pair encoding, as in GPT-2.

    A token is a byte string. ``vocab`` maps ids to those bytes and must contain all 256
    single bytes, so every text can be encoded. ``merges`` lists pairs of ids in the order
    they were learned: merging a pair creates the token made of both byte strings, and its
    place in that list is the merge's *rank*: encoding a piece repeatedly applies the
    lowest-ranked (earliest learned) merge available. ``special_tokens`` (e.g.
    ``<|endoftext|>``) are whole strings with ids of their own that BPE never produces from
    ordinary text. With ``ignore_merges`` (tiktoken's rule) a piece that is already a token
    is that token; without it the merges alone decide, as in Hugging Face's default BPE.

    With no arguments the tokenizer knows only the 256 bytes (byte ``b`` has id ``b``);
    call ``train`` to learn merges, or load GPT-2's with ``from_gpt2_files``.
    """

    def __init__(
        self,
        vocab: Mapping[int, bytes] | None = None,
        merges: Sequence[tuple[int, int]] = (),
        special_tokens: Mapping[str, int] | None = None,
        ignore_merges: bool = True,
    ) -> None:
        vocab = dict(vocab) if vocab is not None else {b: bytes([b]) for b in range(256)}
        special_tokens = dict(special_tokens or {})
        id_of = {token: i for i, token in vocab.items()}
        if len(id_of) != len(vocab):
            raise ValueError("two ids in vocab have the same bytes")
        missing = [b for b in range(256) if bytes([b]) not in id_of]
        if missing:
            raise ValueError(f"vocab lacks the single bytes {missing[:8]}... "
                             "byte-level BPE needs all 256 of them to encode any text")
        clashes = set(special_tokens.values()) & set(vocab)
        if clashes:
            raise ValueError(f"special token ids {sorted(clashes)} are also ids in vocab")

        self.vocab: dict[int, bytes] = vocab
        self.special_tokens: dict[str, int] = special_tokens
        self.merges: dict[tuple[int, int], int] = {}  # pair -> id of the token it creates
        self._ranks: dict[tuple[int, int], int] = {}  # pair -> rank (a repeated pair keeps its last)
        for rank, (first, second) in enumerate(merges):
            new_id = id_of.get(vocab[first] + vocab[second])
            if new_id is None:
                raise ValueError(f"merge {(first, second)} creates a token that is not in vocab")
            self.merges[(first, second)], self._ranks[(first, second)] = new_id, rank
        self.ignore_merges = ignore_merges
        self._id_of = id_of
        self._byte_ids = [id_of[bytes([b])] for b in range(256)]
        self._decoder = vocab | {i: token.encode("utf-8") for token, i in special_tokens.items()}
        self._no_merge = len(merges)  # above every rank
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        """Number of ids: byte tokens, merged tokens and special tokens."""
        return len(self._decoder)

    # -- training ------------------------------------------------------------------------

    def train(
        self, text: str, vocab_size: int, allowed_special: Set[str] = frozenset({ENDOFTEXT})
    ) -> BPETokenizer:
        """Learn ``vocab_size - 256 - len(allowed_special)`` merges from ``text``; returns self.

        Replaces whatever this tokenizer knew. Each step merges the most frequent pair of
        neighbouring tokens (ties go to the pair of smaller ids), so frequent words end up as
        single tokens. Pairs are counted over the *distinct* pre-tokens, each weighted by how
        often it occurs, and after a merge only the pre-tokens containing the merged pair are
        recounted: far cheaper than scanning the whole text every step.
        ``allowed_special`` strings get the last ids; in ``text`` they separate documents
        and are never merged with their neighbours. Stops early, with a warning, when no
        pair is left to merge.
        """
        specials = sorted(allowed_special)
        if vocab_size < 256 + len(specials):
            raise ValueError(
                f"vocab_size={vocab_size} is too small: it must cover the 256 byte tokens "
                f"plus {len(specials)} special token(s), i.e. be at least {256 + len(specials)}"
            )
        chunks = special_token_pattern(frozenset(specials)).split(text) if specials else [text]
        counts = Counter(
            piece for chunk in chunks if chunk not in allowed_special
            for piece in _PRE_TOKENIZER.findall(chunk)
        )
        words = [list(piece.encode("utf-8")) for piece in counts]
        freqs = list(counts.values())

        vocab, merges = learn_merges(words, freqs, vocab_size - len(specials) - 256)
        special_tokens = {token: len(vocab) + i for i, token in enumerate(specials)}
        self.__init__(vocab, merges, special_tokens)  # validates and indexes the new tables
        return self

    # -- encoding and decoding -----------------------------------------------------------

    def encode(self, text: str, allowed_special: Set[str] | Literal["all"] = frozenset()) -> list[int]:
        """Token ids of ``text``.

        A special token string becomes its single id only when named in ``allowed_special``
        (or ``allowed_special="all"``); otherwise it is encoded as ordinary text, so text
        from users cannot inject document boundaries. (tiktoken raises an error there by
        default instead; ``disallowed_special=()`` gives our behaviour.)
        """
        if allowed_special == "all":
            allowed_special = self.special_tokens.keys()
        unknown = set(allowed_special) - self.special_tokens.keys()
        if unknown:
            raise ValueError(f"{sorted(unknown)} are not special tokens of this tokenizer; "
                             f"it has {sorted(self.special_tokens)}")
        if not allowed_special:
            return self._encode_ordinary(text)
        ids = []
        for chunk in special_token_pattern(frozenset(allowed_special)).split(text):
            if chunk in allowed_special:
                ids.append(self.special_tokens[chunk])
            else:
                ids.extend(self._encode_ordinary(chunk))
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _PRE_TOKENIZER.findall(text):
            ids += self.encode_piece(piece)
        return ids

    def encode_piece(self, piece: str) -> list[int]:
        """Token ids of one pre-token (a piece the pre-tokenizer cut out), merges applied."""
        piece_ids = self._cache.get(piece)
        if piece_ids is None:  # words repeat a lot, so each distinct one is merged once
            if len(self._cache) > _CACHE_LIMIT:
                self._cache.clear()
            data = piece.encode("utf-8")
            # A piece that is already a token is its own encoding (tiktoken's shortcut): for
            # GPT-2 the merges would build it anyway, as they built it in training.
            token_id = self._id_of.get(data) if self.ignore_merges else None
            piece_ids = self._cache[piece] = [token_id] if token_id is not None else self._bpe(data)
        return piece_ids

    def _bpe(self, piece: bytes) -> list[int]:
        """Merge the bytes of one pre-token, lowest-ranked (earliest learned) merge first."""
        rank_of = self._ranks
        no_merge = self._no_merge
        ids = [self._byte_ids[b] for b in piece]
        while len(ids) > 1:
            # The rank of every neighbouring pair; pairs never merged in training rank last
            ranks = [rank_of.get(pair, no_merge) for pair in pairwise(ids)]
            rank = min(ranks)
            if rank == no_merge:
                break
            i = ranks.index(rank)  # the leftmost place, if the pair occurs more than once
            ids[i : i + 2] = [self.merges[ids[i], ids[i + 1]]]
        return ids

    def clear_cache(self) -> None:
        """Forget the already-encoded pre-tokens (for timing cold encoding)."""
        self._cache.clear()

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; bytes that do not form valid UTF-8 become U+FFFD (``errors="replace"``).

        A single token can hold part of a multi-byte character, so decoding a slice of ids
        may show replacement characters that disappear once the neighbouring ids are added.
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids`` joined: a special token gives its text's UTF-8 bytes."""
        decoder = self._decoder
        try:
            return b"".join([decoder[index(i)] for i in ids])
        except KeyError as err:
            raise ValueError(f"token id {err.args[0]} is outside the vocabulary: this tokenizer "
                             f"has {self.vocab_size} ids, 0 to {self.vocab_size - 1}") from None

    # -- files ---------------------------------------------------------------------------

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> BPETokenizer:
        """GPT-2's tokenizer from OpenAI's ``encoder.json`` (token -> id) and ``vocab.bpe`` (merges)."""
        encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        special_tokens = {ENDOFTEXT: encoder.pop(ENDOFTEXT)}
        lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")
        # The first line is a version comment and the last one is empty
        merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
        return cls._from_visible_strings(encoder, merges, special_tokens)

    @classmethod
    def _from_visible_strings(
        cls, encoder: Mapping[str, int], merges: Iterable[Sequence[str]], special_tokens: Mapping[str, int]
    ) -> BPETokenizer:
        """Build from tokens written in GPT-2's byte-to-unicode alphabet (see ``bytes_to_unicode``)."""
        byte_of = {char: b for b, char in bytes_to_unicode().items()}
        vocab = {i: bytes(byte_of[char] for char in token) for token, i in encoder.items()}
        return cls(vocab, [(encoder[first], encoder[second]) for first, second in merges], special_tokens)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON: tokens in GPT-2's visible byte alphabet, one per line.

        Like OpenAI's files, ``vocab`` maps each token (space shown as ``Ġ``) to its id and
        ``merges`` lists the learned pairs in order as ``"first second"``.
        """
        visible = bytes_to_unicode()

        def show(token_id: int) -> str:
            return "".join(visible[b] for b in self.vocab[token_id])

        data = {
            "format": "minigpt-bpe",
            "version": 1,
            "pattern": GPT2_SPLIT_PATTERN,
            "vocab": {show(i): i for i in sorted(self.vocab)},
            "merges": [f"{show(first)} {show(second)}" for first, second in self.merges],
            "special_tokens": self.special_tokens,
        }
        write_json(path, data, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read a tokenizer written by ``save``."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != "minigpt-bpe" or data.get("version") != 1:
            raise ValueError(f"{path} is not a minigpt BPE tokenizer file (format minigpt-bpe, version 1)")
        if data["pattern"] != GPT2_SPLIT_PATTERN:
            raise ValueError(f"{path} uses the pre-tokenization pattern {data['pattern']!r}, "
                             "but BPETokenizer implements only GPT-2's")
        merges = [merge.split(" ") for merge in data["merges"]]
        return cls._from_visible_strings(data["vocab"], merges, data["special_tokens"])

