"""ROUGE-L: how much of a reference answer an answer repeats, in order.

The one idea: the longest common subsequence (LCS) of two word sequences is the
longest run of words that appear in both in the same order, gaps allowed. For an
answer of ``m`` words, a reference of ``n`` words and an LCS of ``l`` words,

    precision = l / m,   recall = l / n,   ROUGE-L F1 = 2 * precision * recall / (precision + recall)

(Lin, 2004, with beta = 1: the F-measure the ``rouge-score`` package reports). Words
are lower-cased runs of letters and digits, so punctuation and case do not count.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

WORD = re.compile(r"[^\W_]+")  # letters and digits of any script


class RougeL(NamedTuple):
    """Precision, recall and F1 of one answer against one reference, each in [0, 1]."""

    precision: float
    recall: float
    f1: float


def words(text: str) -> list[str]:
    """The lower-cased words of ``text``: ``"Hello, World!" -> ["hello", "world"]``."""
    return WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` by dynamic programming:
    ``row[j]`` is the LCS of the prefix of ``a`` read so far and ``b[:j]``; one row is kept."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # the previous row's value at j - 1
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(answer: str, reference: str) -> RougeL:
    """ROUGE-L of ``answer`` against ``reference`` (see the module docstring); all zeros
    when either has no words."""
    a = words(answer)
    r = words(reference)
    common = lcs_length(a, r)
    if common == 0:
        return RougeL(0.0, 0.0, 0.0)
    precision = common / len(a)
    recall = common / len(r)
    return RougeL(precision, recall, 2 * precision * recall / (precision + recall))
