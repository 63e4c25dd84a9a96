"""The normalizers and pre-tokenizers of Hugging Face ``tokenizer.json`` files.

The one idea: before BPE merges anything, a tokenizer cuts text into words, numbers,
punctuation runs and whitespace (the *pre-tokens*), so that merges never cross them. A
``tokenizer.json`` writes this as a list of steps (a regex ``Split``, ``Digits``, GPT-2's
``ByteLevel`` regex); each becomes a function from a piece of text to smaller pieces.
A *normalizer* (Unicode NFC for Qwen, none for Llama 3) may rewrite the text first.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable, Mapping
from itertools import groupby
from typing import Any

import regex

from minigpt.tokenizers.bpe import GPT2_SPLIT_PATTERN

Step = Callable[[str], list[str]]  # one pre-tokenizer: a piece of text -> smaller pieces


def _spans(pattern: regex.Pattern[str], text: str) -> list[tuple[str, bool]]:
    """``text`` cut into the pattern's matches (True) and the gaps between them (False)."""
    spans = []
    end = 0
    for match in pattern.finditer(text):
        if match.start() > end:
            spans.append((text[end:match.start()], False))
        if match.end() > match.start():
            spans.append((match.group(), True))
        end = match.end()
    if end < len(text):
        spans.append((text[end:], False))
    return spans


def _merge_into_neighbour(spans: list[tuple[str, bool]], backwards: bool) -> list[str]:
    """Each match joins the piece before it (or after it, ``backwards``), unless that is a match too."""
    pieces: list[str] = []
    previous_match = False
    for text, is_match in reversed(spans) if backwards else spans:
        if is_match and not previous_match and pieces:
            pieces[-1] = text + pieces[-1] if backwards else pieces[-1] + text
        else:
            pieces.append(text)
        previous_match = is_match
    return pieces[::-1] if backwards else pieces


def _splitter(pattern: str, behavior: str = "Isolated", invert: bool = False) -> Step:
    """The ``Split`` pre-tokenizer: cut at the matches of ``pattern`` and keep them as ``behavior`` says."""
    compiled = regex.compile(pattern)

    def split(text: str) -> list[str]:
        spans = [(piece, is_match != invert) for piece, is_match in _spans(compiled, text)]
        if behavior == "Isolated":
            return [piece for piece, _ in spans]
        if behavior == "Removed":
            return [piece for piece, is_match in spans if not is_match]
        if behavior == "Contiguous":
            return ["".join(piece for piece, _ in run) for _, run in groupby(spans, key=lambda span: span[1])]
        return _merge_into_neighbour(spans, backwards=behavior == "MergedWithNext")

    if behavior not in ("Isolated", "Removed", "Contiguous", "MergedWithPrevious", "MergedWithNext"):
        raise ValueError(f"tokenizer.json: unknown Split behavior {behavior!r}")
    return split


def _byte_level(spec: Mapping[str, Any]) -> Step:
    """``ByteLevel``: GPT-2's regex (``use_regex``) after an optional space in front of each piece.

    The mapping of bytes to visible characters itself happens inside ``BPETokenizer``.
    """
    gpt2_split = _splitter(GPT2_SPLIT_PATTERN) if spec.get("use_regex", True) else None
    add_prefix_space = spec.get("add_prefix_space", True)

    def step(text: str) -> list[str]:
        if add_prefix_space and text and not text.startswith(" "):
            text = " " + text
        return gpt2_split(text) if gpt2_split else [text]

    return step


def pre_tokenizer_steps(spec: Mapping[str, Any] | None) -> list[Step]:
    """The steps of a ``pre_tokenizer`` entry, flattened out of its ``Sequence``."""
    kind = spec and spec.get("type")
    if kind == "Sequence":
        return [step for inner in spec["pretokenizers"] for step in pre_tokenizer_steps(inner)]
    if kind == "ByteLevel":
        return [_byte_level(spec)]
    if kind == "Split":
        pattern = spec["pattern"]
        text = pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"])
        return [_splitter(text, spec.get("behavior", "Isolated"), spec.get("invert", False))]
    if kind == "Digits":  # numbers (Unicode category N) apart from the rest
        return [_splitter(r"\p{N}" if spec.get("individual_digits") else r"\p{N}+")]
    raise ValueError(f"tokenizer.json: the pre-tokenizer {kind!r} is not supported; byte-level BPE "
                     "files use ByteLevel, Split and Digits")


def pre_tokenize(text: str, steps: Iterable[Step]) -> list[str]:
    """The pre-tokens of ``text``: each step cuts every piece the previous one left."""
    pieces = [text]
    for step in steps:
        pieces = [smaller for piece in pieces for smaller in step(piece) if smaller]
    return pieces


def _lowercase(text: str) -> str:
    """Each character lowercased on its own, as ``tokenizers`` does: ``str.lower`` would
    write a word-final capital sigma as the final form ς, ``tokenizers`` always writes σ."""
    return "".join(character.lower() for character in text)


def normalizer_of(spec: Mapping[str, Any] | None) -> Callable[[str], str] | None:
    """The ``normalizer`` entry as a function (None when the file normalizes nothing)."""
    kind = spec and spec.get("type")
    if not kind:
        return None
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda text: unicodedata.normalize(kind, text)
    if kind == "Lowercase":
        return _lowercase
    if kind == "Sequence":
        steps = [step for step in map(normalizer_of, spec["normalizers"]) if step]

        def normalize(text: str) -> str:
            for step in steps:
                text = step(text)
            return text

        return normalize
    raise ValueError(f"tokenizer.json: the normalizer {kind!r} is not supported (only NFC, NFD, NFKC, "
                     "NFKD, Lowercase and Sequence)")


def pre_tokenizer_kinds(spec: Mapping[str, Any] | None) -> set[str]:
    """The types of a pre-tokenizer entry and of every step inside its ``Sequence``."""
    if not spec:
        return set()
    return {spec.get("type", "")}.union(*(pre_tokenizer_kinds(inner) for inner in spec.get("pretokenizers", ())))
