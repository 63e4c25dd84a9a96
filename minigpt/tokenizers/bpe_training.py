"""Learning BPE merges: the training half of :class:`~minigpt.tokenizers.bpe.BPETokenizer`.

The one idea: count every pair of neighbouring ids over the *distinct* pre-tokens (each weighted by
how often it occurs), merge the most frequent pair into a new id, and recount only the pre-tokens
that contained it — far cheaper than scanning the whole text at every step. A heap finds the most
frequent pair without looking at all of them.
"""

from __future__ import annotations

import heapq
import warnings
from collections import Counter, defaultdict
from itertools import pairwise

Pair = tuple[int, int]


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids``, left to right, by ``new_id``."""
    first, second = pair
    merged = []
    i = 0
    n = len(ids)
    while i < n:
        if ids[i] == first and i + 1 < n and ids[i + 1] == second:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def _count_pairs(words: list[list[int]], freqs: list[int]) -> tuple[Counter[Pair], defaultdict[Pair, set[int]]]:
    """How often each pair of neighbouring ids occurs (word ``w`` counts ``freqs[w]`` times), and in which words."""
    pair_counts: Counter[Pair] = Counter()
    words_with: defaultdict[Pair, set[int]] = defaultdict(set)
    for w, ids in enumerate(words):
        for pair in pairwise(ids):
            pair_counts[pair] += freqs[w]
            words_with[pair].add(w)
    return pair_counts, words_with


def _merge_and_recount(
    pair: Pair, new_id: int, words: list[list[int]], freqs: list[int],
    pair_counts: Counter[Pair], words_with: defaultdict[Pair, set[int]],
) -> set[Pair]:
    """Merge ``pair`` into ``new_id`` in every word containing it, updating the counts in place.

    Only those words change: their old pairs are taken back and their new pairs counted.
    Returns the pairs whose count changed.
    """
    changed = set()
    for w in words_with.pop(pair):
        ids = words[w]
        n = freqs[w]
        for old in pairwise(ids):
            pair_counts[old] -= n
            changed.add(old)
        words[w] = ids = merge_pair(ids, pair, new_id)
        for new in pairwise(ids):
            pair_counts[new] += n
            words_with[new].add(w)
            changed.add(new)
    return changed


def learn_merges(words: list[list[int]], freqs: list[int], num_merges: int) -> tuple[dict[int, bytes], list[Pair]]:
    """Up to ``num_merges`` merges learned from ``words`` (each a list of byte ids, occurring
    ``freqs[w]`` times), changed in place; returns the vocabulary ``{id: bytes}`` (the 256 bytes,
    then one id per merge) and the merges in the order learned. Ties go to the pair of smaller
    ids; stops early, with a warning, when no pair is left to merge."""
    pair_counts, words_with = _count_pairs(words, freqs)
    # A heap finds the most frequent pair without scanning all of them; an entry whose
    # count has changed since it was pushed is stale and skipped when it comes up
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)

    vocab = {b: bytes([b]) for b in range(256)}
    merges = []
    for new_id in range(256, 256 + num_merges):
        while heap and pair_counts.get(heap[0][1]) != -heap[0][0]:
            heapq.heappop(heap)
        if not heap:
            warnings.warn(f"the text has no more pairs to merge: stopped after {new_id - 256} of {num_merges} "
                          "merges", stacklevel=3)
            break
        _, pair = heapq.heappop(heap)
        merges.append(pair)
        vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
        changed = _merge_and_recount(pair, new_id, words, freqs, pair_counts, words_with)
        for changed_pair in changed:
            if pair_counts[changed_pair] > 0:
                heapq.heappush(heap, (-pair_counts[changed_pair], changed_pair))
            else:
                del pair_counts[changed_pair]  # it no longer occurs anywhere

    return vocab, merges
