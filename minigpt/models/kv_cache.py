"""The key/value cache both families share, and the padded causal mask.

The one idea: at generation step t only the new token's query is new; every earlier token's key
and value are what they were, so they are kept (grown by doubling, not copied at every step)
and each step attends the new query to all of them.
"""

from __future__ import annotations

import torch
from torch import nn


def padded_causal_mask(real: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``(batch, keys)`` bool mask of real tokens -> ``(batch, 1, num_tokens, keys)`` allowed pairs.

    The queries are the last ``num_tokens`` keys. A query sees earlier keys that are real;
    a padding query sees itself only, so its softmax never runs over nothing (NaN), and
    its output is never read by a real token.
    """
    keys = real.shape[1]
    key_pos = torch.arange(keys, device=real.device)
    # With a KV cache the new queries are the last num_tokens keys: query i sits at absolute
    # position keys - num_tokens + i, so causality is "key position <= query position".
    query_pos = key_pos[keys - num_tokens:, None]  # (num_tokens, 1)
    # Causal AND the key is a real token of that row: (num_tokens, keys) & (batch, 1, keys)
    # broadcasts to (batch, num_tokens, keys).
    allowed = (key_pos <= query_pos) & real[:, None, :]
    # Every query may see itself, even a padding query: a row with no allowed key would be
    # softmax over nothing, 0/0 = NaN, and NaN spreads through the batch's gradients.
    # [:, None] adds the head axis, (batch, 1, num_tokens, keys), broadcast over all heads.
    return (allowed | (key_pos == query_pos))[:, None]


class KVCache(nn.Module):
    """The keys and values of every token fed so far, for one attention module.

    ``append(keys, values)``, each ``(batch, heads, new, head_dim)``, returns the keys and values
    so far, ``(batch, heads, length, head_dim)``. The memory grows to the next power of two (at
    least ``min_capacity``, at most ``context_length``): a copy now and then instead of a
    ``torch.cat`` at every token, and a batch of short answers does not hold the whole context.
    (A module without parameters: under ``torch.compile`` its ``length`` may stay symbolic, see
    :mod:`minigpt.generation.decoding`.)
    """

    def __init__(self, context_length: int, min_capacity: int = 64) -> None:
        super().__init__()
        self.context_length = context_length
        self.min_capacity = min_capacity
        self.reset()

    def reset(self) -> None:
        self.k: torch.Tensor | None = None  # (batch, heads, capacity, head_dim)
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, n, d = keys.shape
        start = self.length
        end = self.length + n
        if end > self.context_length:
            raise ValueError(
                f"KV cache holds {start} tokens and {n} more do not fit in context_length="
                f"{self.context_length}; call reset_cache() and feed at most the last "
                f"{self.context_length} tokens"
            )
        # A first call, a new batch size or a new dtype (a model cast to bfloat16) starts an empty
        # buffer of the right kind; reserve() below allocates it.
        if self.k is None or self.k.shape[0] != b or self.k.dtype != keys.dtype:
            self.k = keys.new_empty(b, h, 0, d)
            self.v = values.new_empty(b, h, 0, d)
        self.reserve(n)
        # The new tokens go at their absolute positions start .. end - 1 (dim 2 is the sequence).
        self.k[:, :, start:end] = keys
        self.v[:, :, start:end] = values
        self.length = end
        # Views of the filled part, (b, h, end, d): attention never reads the unused capacity.
        return self.k[:, :, :end], self.v[:, :, :end]

    def reserve(self, new_tokens: int) -> None:
        """Grow the buffers, if they exist, to hold ``new_tokens`` more than they hold now.

        :meth:`append` calls it; a model compiled for decoding calls it before each compiled step
        (:mod:`minigpt.generation.decoding`), so that no step's graph contains the growth.
        """
        end = self.length + new_tokens
        if self.k is None or end <= self.k.shape[2]:
            return
        # Doubling, not bit_length(): under torch.compile the comparisons stay symbolic, so one
        # graph serves every prompt length up to the same capacity.
        capacity = max(self.min_capacity, self.k.shape[2])
        while capacity < end:
            capacity *= 2
        capacity = min(self.context_length, capacity)
        b, h, _, d = self.k.shape
        grown_k = self.k.new_empty(b, h, capacity, d)
        grown_v = self.v.new_empty(b, h, capacity, d)
        # Copy only the filled prefix: the rest of the new buffer is written as tokens arrive.
        grown_k[:, :, :self.length] = self.k[:, :, :self.length]
        grown_v[:, :, :self.length] = self.v[:, :, :self.length]
        self.k = grown_k
        self.v = grown_v
