"""Hugging Face ``tokenizer.json`` files (Llama 3, Qwen, SmolLM2, GPT-2) read by our own BPE.

The one idea: a ``tokenizer.json`` is a pipeline of small, well-defined steps, and each one
maps onto something minigpt already has. Text is first cut at *added tokens* (``<|eot_id|>``,
``<|im_start|>``: whole strings with ids of their own), the rest is *normalized* (often not
at all), *pre-tokenized* by a regex into words, numbers and punctuation runs, and each such
piece is merged by the byte-level BPE of ``minigpt.tokenizers.bpe``, from the file's vocabulary and
merges. ``load_hf_tokenizer`` gives the same ids as the ``tokenizers`` library, behind the
interface of tiktoken's ``Encoding`` that the rest of minigpt uses.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import regex

from minigpt.tokenizers.bpe import BPETokenizer, bytes_to_unicode, special_token_pattern
from minigpt.tokenizers.pretokenizers import Step, normalizer_of, pre_tokenize, pre_tokenizer_kinds, pre_tokenizer_steps

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# The names tokenizer_config.json gives its special tokens, as transformers reads them
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# What the ``tokenizers`` library counts as whitespace (Unicode's White_Space property) when
# an added token with lstrip/rstrip swallows the spaces next to it
_WHITE_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                         + "".join(map(chr, range(0x2000, 0x200B))))
_WORD_CHAR = regex.compile(r"\w")


# -- added tokens -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AddedToken:
    """A whole string with an id of its own, found in the text before any BPE.

    ``special`` tokens (``<|eot_id|>``) are control tokens, read from text only when allowed;
    other added tokens (``<think>``) are ordinary vocabulary and always read. ``lstrip`` /
    ``rstrip`` swallow the whitespace before / after the token, ``single_word`` matches only
    between non-word characters, and ``normalized`` matches in the normalized text.
    """

    id: int
    content: str
    special: bool = False
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False


def _is_alone(text: str, start: int, end: int) -> bool:
    """No word character touches ``text[start:end]`` on either side (``single_word``)."""
    return not ((start > 0 and _WORD_CHAR.match(text[start - 1]))
                or (end < len(text) and _WORD_CHAR.match(text[end])))


def find_added_tokens(text: str, tokens: Mapping[str, AddedToken]) -> list[str | AddedToken]:
    """``text`` cut at the added tokens in it: plain pieces and the tokens, in order.

    The leftmost token wins, the longest one where several start at the same place; the
    whitespace an ``lstrip``/``rstrip`` token swallows belongs to no piece.
    """
    if not tokens:
        return [text] if text else []
    parts: list[str | AddedToken] = []
    done = 0
    for match in special_token_pattern(frozenset(tokens)).finditer(text):
        token = tokens[match.group()]
        start = match.start()
        end = match.end()
        if token.single_word and not _is_alone(text, start, end):
            continue
        while token.lstrip and start > done and text[start - 1] in _WHITE_SPACE:
            start -= 1
        while token.rstrip and end < len(text) and text[end] in _WHITE_SPACE:
            end += 1
        if start > done:
            parts.append(text[done:start])
        parts.append(token)
        done = end
    if done < len(text):
        parts.append(text[done:])
    return parts


# -- the tokenizer ----------------------------------------------------------------------------


class HFTokenizer:
    """A Hugging Face byte-level BPE tokenizer, with tiktoken's ``Encoding`` interface.

    ``encode`` gives the ids of ``tokenizers``' ``encode(text, add_special_tokens=False)``
    (no BOS is added: prepend ``bos_token_id`` yourself where the model wants one). The
    tokens the file marks special (``special_tokens_set``) follow tiktoken's rules: read from
    text only when in ``allowed_special``, an error when ``disallowed_special`` (by default
    every other special token) occurs in the text. ``tokenizer_config.json`` names some of
    them: ``bos_token_id``, ``eos_token_id``, ``pad_token_id``, and ``special_token_names``
    for chat templates.
    """

    def __init__(
        self,
        bpe: BPETokenizer,
        added_tokens: Iterable[AddedToken] = (),
        pre_tokenizer: Iterable[Step] = (),
        normalizer: Callable[[str], str] | None = None,
        name: str = "hf-bpe",
        special_token_names: Mapping[str, str] | None = None,
    ) -> None:
        self.bpe = bpe
        self.name = name
        self.added_tokens = {token.content: token for token in added_tokens}
        self.special_tokens_set: Set[str] = frozenset(t for t, token in self.added_tokens.items() if token.special)
        self._steps = list(pre_tokenizer)
        self._normalize = normalizer
        self._visible = bytes_to_unicode()
        self._id_of_visible = {self._show(data): i for i, data in bpe.vocab.items()}
        ids = [*bpe.vocab, *(token.id for token in self.added_tokens.values())]
        self.max_token_value = max(ids)
        # tokenizer_config.json's names ({"bos_token": "<|begin_of_text|>", ...}; chat templates print
        # them) and their ids
        self.special_token_names = dict(special_token_names or {})
        self.special_token_ids = {name: self.token_to_id(token) for name, token in self.special_token_names.items()}

    @property
    def n_vocab(self) -> int:
        """Number of ids (the largest plus one, as in tiktoken)."""
        return self.max_token_value + 1

    @property
    def bos_token_id(self) -> int | None:
        return self.special_token_ids.get("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self.special_token_ids.get("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self.special_token_ids.get("pad_token")

    @property
    def eot_token(self) -> int:
        """The id that ends a text: ``eos_token`` of tokenizer_config.json, else ``<|endoftext|>``."""
        eot = self.eos_token_id if self.eos_token_id is not None else self.token_to_id("<|endoftext|>")
        if eot is None:
            raise ValueError(f"tokenizer {self.name} has no end-of-text token: put an eos_token in "
                             f"{TOKENIZER_CONFIG_FILE} next to {TOKENIZER_FILE}")
        return eot

    def _show(self, data: bytes) -> str:
        return "".join(self._visible[b] for b in data)

    def token_to_id(self, token: str) -> int | None:
        """Id of an added token's text or of a vocabulary entry as the file writes it (``Ġthe``)."""
        added = self.added_tokens.get(token)
        return added.id if added is not None else self._id_of_visible.get(token)

    def encode(
        self,
        text: str,
        *,
        allowed_special: Set[str] | Literal["all"] = frozenset(),
        disallowed_special: Set[str] | Literal["all"] = "all",
    ) -> list[int]:
        """Token ids of ``text``; special tokens as tiktoken treats them (see the class)."""
        if allowed_special == "all":
            allowed_special = self.special_tokens_set
        if disallowed_special == "all":
            disallowed_special = self.special_tokens_set - set(allowed_special)
        if disallowed_special and (found := special_token_pattern(frozenset(disallowed_special)).search(text)):
            raise ValueError(
                f"the text contains the special token {found.group()!r}. Pass allowed_special={{{found.group()!r}}} "
                "(or 'all') to encode it as its id, or disallowed_special=() to encode it as plain text")
        active = {content: token for content, token in self.added_tokens.items()
                  if not token.special or content in allowed_special}
        return self._encode(text, active)

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text`` with every special token read as plain text."""
        return self.encode(text, disallowed_special=())

    def _encode(self, text: str, active: Mapping[str, AddedToken]) -> list[int]:
        # Tokens matched in the raw text first; those marked `normalized` in the normalized rest
        raw = {content: token for content, token in active.items() if not token.normalized}
        normalize = self._normalize or (lambda piece: piece)
        normalized = {normalize(content): token for content, token in active.items() if token.normalized}
        ids: list[int] = []
        for part in find_added_tokens(text, raw):
            if isinstance(part, AddedToken):
                ids.append(part.id)
                continue
            for inner in find_added_tokens(normalize(part), normalized):
                if isinstance(inner, AddedToken):
                    ids.append(inner.id)
                else:
                    for piece in pre_tokenize(inner, self._steps):
                        ids += self.bpe.encode_piece(piece)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids`` joined; added tokens give their text."""
        return self.bpe.decode_bytes(ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (special tokens included); invalid UTF-8 becomes U+FFFD."""
        return self.bpe.decode(ids)


# -- reading the files ------------------------------------------------------------------------


def _check_byte_level_bpe(data: Mapping[str, Any]) -> None:
    model = data.get("model") or {}
    problem = None
    if model.get("type", "BPE") != "BPE" or "merges" not in model:
        problem = f"its model is {model.get('type')!r}, not BPE"
    elif "ByteLevel" not in pre_tokenizer_kinds(data.get("pre_tokenizer")):
        problem = "its pre-tokenizer has no ByteLevel step (a SentencePiece-style file, such as Llama 2's?)"
    elif model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        problem = "it uses byte_fallback or subword prefixes/suffixes"
    elif model.get("dropout"):
        problem = "it uses BPE dropout, which makes encoding random"
    if problem:
        raise ValueError(f"{TOKENIZER_FILE} is not a byte-level BPE tokenizer ({problem}); minigpt reads "
                         "those of GPT-2, Llama 3, Qwen and SmolLM2")


def _byte_vocab(vocab: Mapping[str, int], added: Mapping[int, AddedToken]) -> dict[int, bytes]:
    """``{id: bytes}`` of the BPE vocabulary, in which an added token stays only as its own bytes."""
    byte_of = {char: b for b, char in bytes_to_unicode().items()}
    result = {}
    for token, i in vocab.items():
        try:
            data = bytes(byte_of[char] for char in token)
        except KeyError:
            if i in added:
                continue
            raise ValueError(f"{TOKENIZER_FILE}: the vocabulary entry {token!r} is not written in GPT-2's "
                             "byte alphabet, as byte-level BPE needs") from None
        if i not in added or data == added[i].content.encode("utf-8"):
            result[i] = data
    return result


def _merges(entries: Iterable[str | list[str]], vocab: Mapping[str, int]) -> list[tuple[int, int]]:
    """Merges written ``"Ġ t"`` (older files) or ``["Ġ", "t"]`` (newer ones), as pairs of ids."""
    pairs = [entry.split(" ") if isinstance(entry, str) else entry for entry in entries]
    try:
        return [(vocab[first], vocab[second]) for first, second in pairs]
    except KeyError as err:
        raise ValueError(f"{TOKENIZER_FILE}: a merge uses {err.args[0]!r}, which is not in the vocabulary") from None


def _special_token_names(config_file: Path) -> dict[str, str]:
    """``{"bos_token": "<|begin_of_text|>", ...}`` from tokenizer_config.json, when there is one."""
    if not config_file.is_file():
        return {}
    config = json.loads(config_file.read_text(encoding="utf-8"))
    names = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value  # older files write a whole AddedToken
        if value is not None:
            names[name] = value
    return names


def load_hf_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """The tokenizer of a Hugging Face ``tokenizer.json`` (or of the model directory holding one).

    ``tokenizer_config.json`` beside it, when present, names the BOS, EOS and padding tokens.
    """
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {TOKENIZER_FILE}: give a model directory holding one, or the file")
    raw = file.read_bytes()
    data = json.loads(raw)
    _check_byte_level_bpe(data)
    added = {}
    for entry in data.get("added_tokens") or ():
        special = entry.get("special", False)
        added[entry["id"]] = AddedToken(
            entry["id"], entry["content"], special, entry.get("lstrip", False), entry.get("rstrip", False),
            entry.get("single_word", False), entry.get("normalized", not special))
    model = data["model"]
    vocab = _byte_vocab(model["vocab"], added)
    bpe = BPETokenizer(vocab, _merges(model["merges"], model["vocab"]),
                       {token.content: i for i, token in added.items() if i not in vocab},
                       ignore_merges=model.get("ignore_merges", False))
    # The directory's name plus the file's checksum: caches of encoded text are kept per tokenizer
    name = f"{file.resolve().parent.name or 'tokenizer'}-{hashlib.sha256(raw).hexdigest()[:12]}"
    return HFTokenizer(bpe, added.values(), pre_tokenizer_steps(data.get("pre_tokenizer")),
                       normalizer_of(data.get("normalizer")), name,
                       _special_token_names(file.with_name(TOKENIZER_CONFIG_FILE)))
