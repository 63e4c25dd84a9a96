"""Attention, built up one idea at a time (book ch. 3).

1. ``SelfAttentionV1``: each token's output is a weighted average of all value
   vectors; the weights come from query-key dot products, scaled by sqrt(d) and
   softmax-normalised. Weights are bare ``nn.Parameter`` matrices.
2. ``SelfAttentionV2``: the same with ``nn.Linear`` layers (better init, optional bias).
3. ``CausalAttention``: a mask hides future tokens, so a token can only look back;
   dropout on the attention weights regularises training.
4. ``MultiHeadAttentionWrapper``: several causal heads side by side, concatenated.
5. ``MultiHeadAttention``: the same result computed for all heads at once by
   splitting one wide projection into heads with a reshape; it is what the GPT
   model uses, with a KV cache for fast generation and an optional mask of allowed
   query-key pairs, which keeps padded prompts of a batch from seeing their padding.
"""

from __future__ import annotations

import torch
from torch import nn

from minigpt.runtime.linear import Linear


def _check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def padded_causal_mask(real: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``(batch, keys)`` bool mask of real tokens -> ``(batch, 1, num_tokens, keys)`` allowed pairs.

    The queries are the last ``num_tokens`` keys. A query sees earlier keys that are real;
    a padding query sees itself only, so its softmax never runs over nothing (NaN), and
    its output is never read by a real token.
    """
    keys = real.shape[1]
    key_pos = torch.arange(keys, device=real.device)
    query_pos = key_pos[keys - num_tokens:, None]  # (num_tokens, 1)
    allowed = (key_pos <= query_pos) & real[:, None, :]
    return (allowed | (key_pos == query_pos))[:, None]


class SelfAttentionV1(nn.Module):
    """Scaled dot-product self-attention with raw weight matrices.

    ``(tokens, d_in) -> (tokens, d_out)`` or ``(batch, tokens, d_in) -> (batch, tokens, d_out)``.
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        queries, keys, values = x @ self.W_query, x @ self.W_key, x @ self.W_value
        scores = queries @ keys.transpose(-2, -1)  # (..., tokens, tokens)
        # Dividing by sqrt(d_out) keeps dot products from growing with the dimension,
        # which would push softmax into regions with vanishing gradients.
        weights = torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1)
        return weights @ values


class SelfAttentionV2(nn.Module):
    """``SelfAttentionV1`` with ``nn.Linear`` projections.

    ``nn.Linear`` stores the transposed matrix, so ``V2.W_query.weight == V1.W_query.T``
    gives identical outputs.
    """

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False) -> None:
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)
        scores = queries @ keys.transpose(-2, -1)
        weights = torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1)
        return weights @ values


class CausalAttention(nn.Module):
    """Single-head attention in which token t only sees tokens 0..t.

    ``(batch, tokens, d_in) -> (batch, tokens, d_out)``. Future positions get a
    score of -inf before the softmax, so their weight is exactly 0 and each row
    of weights still sums to 1.
    """

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False
    ) -> None:
        super().__init__()
        _check_dropout(dropout)
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        # A buffer moves with the module to the GPU but is not trained.
        self.register_buffer(
            "mask", torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), 1),
            persistent=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[-2]
        queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)
        scores = queries @ keys.transpose(-2, -1)
        scores = scores.masked_fill(self.mask[:num_tokens, :num_tokens], float("-inf"))
        weights = torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1)
        return self.dropout(weights) @ values


class MultiHeadAttentionWrapper(nn.Module):
    """``num_heads`` independent ``CausalAttention`` heads, outputs concatenated.

    ``(batch, tokens, d_in) -> (batch, tokens, num_heads * d_out)``. Simple to read,
    but runs the heads one after another.
    """

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(x) for head in self.heads], dim=-1)


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
        start, end = self.length, self.length + n
        if end > self.context_length:
            raise ValueError(
                f"KV cache holds {start} tokens and {n} more do not fit in context_length="
                f"{self.context_length}; call reset_cache() and feed at most the last "
                f"{self.context_length} tokens"
            )
        if self.k is None or self.k.shape[0] != b or self.k.dtype != keys.dtype:
            self.k, self.v = keys.new_empty(b, h, 0, d), values.new_empty(b, h, 0, d)
        if end > self.k.shape[2]:
            # Doubling, not bit_length(): under torch.compile the comparisons stay symbolic, so one
            # graph serves every prompt length up to the same capacity.
            capacity = max(self.min_capacity, self.k.shape[2])
            while capacity < end:
                capacity *= 2
            capacity = min(self.context_length, capacity)
            grown_k, grown_v = keys.new_empty(b, h, capacity, d), values.new_empty(b, h, capacity, d)
            grown_k[:, :, :start], grown_v[:, :, :start] = self.k[:, :, :start], self.v[:, :, :start]
            self.k, self.v = grown_k, grown_v
        self.k[:, :, start:end] = keys
        self.v[:, :, start:end] = values
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class CachedAttention(nn.Module):
    """What every attention module with a KV cache (``self.kv_cache``, a :class:`KVCache`) shares."""

    kv_cache: KVCache

    def reset_cache(self) -> None:
        """Forget cached keys/values; the next ``use_cache=True`` call starts at position 0."""
        self.kv_cache.reset()

    @property
    def cache_k(self) -> torch.Tensor | None:
        return self.kv_cache.k  # (batch, heads, capacity, head_dim)

    @property
    def cache_v(self) -> torch.Tensor | None:
        return self.kv_cache.v

    @property
    def cache_len(self) -> int:
        return self.kv_cache.length


class MultiHeadAttention(CachedAttention):
    """Causal multi-head attention with all heads in one set of matrix products.

    ``(batch, tokens, d_in) -> (batch, tokens, d_out)``; each of the ``num_heads``
    heads works on ``head_dim = d_out // num_heads`` dimensions, and ``out_proj``
    mixes the concatenated heads.

    Two code paths compute the same thing (within 1e-5 in float32):

    - the explicit path spells out ``softmax(Q K^T / sqrt(head_dim) + mask) V`` and
      can return the attention weights; select it with ``use_sdpa=False`` (constructor
      argument or attribute);
    - the fast path (default) calls ``torch.nn.functional.scaled_dot_product_attention``,
      which fuses those steps and never stores the ``tokens x tokens`` weights.

    KV cache: with ``use_cache=True`` the keys and values of earlier calls are kept,
    so generation feeds only the newest token instead of the whole sequence. Call
    ``reset_cache()`` before a new sequence.

    Padding: ``attn_mask`` replaces the causal mask with one per row (see
    :func:`padded_causal_mask`), so no query attends a padded key.
    """

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
        qkv_bias: bool = False, use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        if num_heads < 1 or d_out % num_heads != 0:
            raise ValueError(
                f"d_out={d_out} must be divisible by num_heads={num_heads}: each head gets "
                f"d_out // num_heads dimensions"
            )
        _check_dropout(dropout)
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length
        self.dropout_p = dropout
        self.use_sdpa = use_sdpa

        self.W_query = Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer(
            "mask", torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), 1),
            persistent=False,
        )
        self.last_attn_weights: torch.Tensor | None = None
        self.kv_cache = KVCache(context_length)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        # (b, tokens, d_out) -> (b, heads, tokens, head_dim)
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, use_cache: bool = False, attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``attn_mask``: ``(batch, 1, tokens, past + tokens)`` bool, True where a query may
        see a key, causality included (padding makes it differ per row); ``None`` is plain
        causal attention."""
        b, num_tokens, _ = x.shape
        queries = self._split_heads(self.W_query(x))
        keys = self._split_heads(self.W_key(x))
        values = self._split_heads(self.W_value(x))

        past = self.cache_len if use_cache else 0
        if use_cache:
            keys, values = self.kv_cache.append(keys, values)
        if attn_mask is None:
            # Query i sits at absolute position past + i and may see keys 0..past + i.
            hidden = self.mask[past:past + num_tokens, :past + num_tokens]
        else:
            hidden = ~attn_mask

        if self.use_sdpa:
            self.last_attn_weights = None
            # A single new token may see every cached key, so it needs no mask at all.
            needs_mask = attn_mask is not None or (past > 0 and num_tokens > 1)
            is_causal = False  # a plain bool: under torch.compile `past` may be symbolic, an `if` fixes it
            if attn_mask is None and past == 0 and num_tokens > 1:
                is_causal = True
            context = nn.functional.scaled_dot_product_attention(
                queries, keys, values,
                attn_mask=~hidden if needs_mask else None,  # SDPA's bool mask marks *allowed* pairs
                dropout_p=self.dropout_p if self.training else 0.0,
                is_causal=is_causal,
            )
        else:
            scores = queries @ keys.transpose(2, 3)  # (b, heads, tokens, past + tokens)
            scores = scores.masked_fill(hidden, float("-inf"))
            weights = torch.softmax(scores / self.head_dim ** 0.5, dim=-1)
            self.last_attn_weights = weights.detach()
            context = self.dropout(weights) @ values  # (b, heads, tokens, head_dim)

        # Undo the head split: (b, heads, tokens, head_dim) -> (b, tokens, d_out)
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context)
