"""Tokenizers: turning text into the integer ids a GPT reads (book chapter 2).

The one idea: a tokenizer is a fixed lookup between pieces of text and integers.
A word-level tokenizer (``SimpleTokenizerV1``/``V2``) looks up whole words and must give
up on words it has never seen; byte-level BPE (``minigpt.tokenizers.bpe``) starts from the 256
possible bytes, so it can encode *any* text.

``get_gpt2_tokenizer`` returns tiktoken's fast GPT-2 encoding, which the rest of minigpt
uses. It is built from GPT-2's BPE files that ship inside the package, so it needs no
network and no setting; ``minigpt.tokenizers.bpe.BPETokenizer.from_gpt2_files`` is our own
from-scratch encoder for the same files and produces exactly the same ids.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from minigpt.tokenizers.bpe import ENDOFTEXT, bytes_to_unicode, gpt2_bpe_files

ENDOFTEXT_ID = 50256  # the id of <|endoftext|> in GPT-2's vocabulary
# GPT-2 has no padding token: batches of unequal texts are padded with <|endoftext|>.
# The one padding id of minigpt (classification and instruction tuning use it).
PAD_TOKEN_ID = ENDOFTEXT_ID
UNK = "<|unk|>"


# ---------------------------------------------------------------------------------------
# Word-level tokenizers (book section 2.3 and 2.4)
# ---------------------------------------------------------------------------------------

# Split on punctuation, double dashes and whitespace, keeping them (the capturing group)
# so that punctuation becomes tokens of its own.
_SEPARATORS = r'[,.:;?_!"()\']|--|\s'
_WORD_SPLIT = f"({_SEPARATORS})"
# Decoding joins tokens with spaces, then removes the space written before punctuation.
_SPACE_BEFORE_PUNCT = re.compile(r'\s+([,.:;?!"()\'])')


class UnknownTokenError(KeyError):
    """A word-level tokenizer was asked to encode a word that is not in its vocabulary."""

    def __init__(self, word: str, message: str) -> None:
        super().__init__(message)
        self.word = word

    def __str__(self) -> str:
        # KeyError would show the message in quotes, as if it were the missing key
        return self.args[0]


def _split_words(text: str, split_pattern: str = _WORD_SPLIT) -> list[str]:
    return [piece for piece in re.split(split_pattern, text) if piece.strip()]


def build_vocab(text: str, special_tokens: Sequence[str] = ()) -> dict[str, int]:
    """``{token: id}`` for every distinct word and punctuation mark of ``text``.

    Ids follow alphabetical order; ``special_tokens`` (e.g. ``(ENDOFTEXT, UNK)`` for
    ``SimpleTokenizerV2``) get the last ids, in the order given.
    """
    tokens = sorted(set(_split_words(text)))
    tokens += [token for token in special_tokens if token not in tokens]
    return {token: i for i, token in enumerate(tokens)}


class SimpleTokenizerV1:
    """Word-level tokenizer: each word or punctuation mark is looked up in ``vocab``."""

    def __init__(self, vocab: Mapping[str, int]) -> None:
        self.str_to_int = dict(vocab)
        self.int_to_str = {i: token for token, i in self.str_to_int.items()}

    def encode(self, text: str) -> list[int]:
        """Ids of the words and punctuation marks of ``text`` (whitespace is dropped)."""
        return [self._lookup(token) for token in self._split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """The tokens joined by single spaces, without a space before punctuation."""
        tokens = []
        for i in ids:
            if i not in self.int_to_str:
                raise ValueError(
                    f"token id {i} is not in the vocabulary of {len(self.int_to_str)} tokens"
                )
            tokens.append(self.int_to_str[i])
        return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(tokens))

    def _split(self, text: str) -> list[str]:
        return _split_words(text)

    def _lookup(self, token: str) -> int:
        if token not in self.str_to_int:
            raise UnknownTokenError(
                token,
                f"{token!r} is not in the vocabulary ({len(self.str_to_int)} tokens). "
                f"SimpleTokenizerV1 cannot encode words it has not seen: use SimpleTokenizerV2, "
                f"which maps them to {UNK}, or rebuild the vocabulary from a text containing it.",
            )
        return self.str_to_int[token]


class SimpleTokenizerV2(SimpleTokenizerV1):
    """``SimpleTokenizerV1`` that encodes unknown words as ``<|unk|>`` instead of failing.

    ``<|endoftext|>`` (placed between documents) is split off as a token of its own even
    without spaces around it, so it reaches its id when the vocabulary has it.
    """

    def __init__(self, vocab: Mapping[str, int]) -> None:
        super().__init__(vocab)
        if UNK not in self.str_to_int:
            raise ValueError(
                f"the vocabulary has no {UNK} token; build it with "
                f"build_vocab(text, special_tokens=({ENDOFTEXT!r}, {UNK!r}))"
            )
        specials = "|".join(re.escape(token) for token in (ENDOFTEXT, UNK))
        self._split_pattern = f"({specials}|{_SEPARATORS})"

    def _split(self, text: str) -> list[str]:
        return _split_words(text, self._split_pattern)

    def _lookup(self, token: str) -> int:
        return self.str_to_int.get(token, self.str_to_int[UNK])


# ---------------------------------------------------------------------------------------
# tiktoken's GPT-2 encoding, from the files shipped with minigpt
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def get_gpt2_tokenizer() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding (50,257 ids), built offline from GPT-2's BPE files.

    The files ship with minigpt and are checked by SHA-256 when loaded; a copy in
    ``MINIGPT_DATA_DIR`` is used instead when there is one. tiktoken needs the *rank* of
    every token, and for GPT-2 a token's rank is its id in ``encoder.json``: ``vocab.bpe``
    lists the merges that build exactly these tokens in this order (pinned by checksum).
    The ranks are read here rather than by tiktoken's loader, which would also write a
    copy of the files into its own cache folder.
    """
    encoder_json, _ = gpt2_bpe_files()
    encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
    byte_of = {char: b for b, char in bytes_to_unicode().items()}  # OpenAI's visible alphabet
    ranks = {bytes(byte_of[char] for char in token): i for token, i in encoder.items() if token != ENDOFTEXT}
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,  # tiktoken's faster equivalent of minigpt.tokenizers.bpe.GPT2_SPLIT_PATTERN
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: encoder[ENDOFTEXT]},
        explicit_n_vocab=50257,
    )
