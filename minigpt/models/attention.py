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

from minigpt.models.kv_cache import KVCache
from minigpt.runtime.linear import Linear


def _check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


class SelfAttentionV1(nn.Module):
    """Scaled dot-product self-attention with raw weight matrices.

    ``(tokens, d_in) -> (tokens, d_out)`` or ``(batch, tokens, d_in) -> (batch, tokens, d_out)``.
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        # torch.rand, as in the book: uniform [0, 1) weights, enough to show the computation;
        # SelfAttentionV2's nn.Linear initialisation is the one to train with.
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One projection per role, (..., tokens, d_in) @ (d_in, d_out) -> (..., tokens, d_out):
        # the query asks, the key is what a token offers to be matched on, the value what it passes on.
        queries = x @ self.W_query
        keys = x @ self.W_key
        values = x @ self.W_value
        # scores[i, j]: how well token i's query matches token j's key.
        scores = queries @ keys.transpose(-2, -1)  # (..., tokens, tokens)
        # Dividing by sqrt(d_out) keeps dot products from growing with the dimension,
        # which would push softmax into regions with vanishing gradients.
        weights = torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1)
        # Each output row is a weighted average of the value rows (each row of weights sums to 1).
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
        # Same maths as V1; nn.Linear computes x @ W.T (+ b), hence the transposed storage.
        queries = self.W_query(x)
        keys = self.W_key(x)
        values = self.W_value(x)
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
        # triu(..., 1) is True strictly above the diagonal: entry (i, j) with j > i is a key in the
        # *future* of query i, exactly the pairs to hide. Built once at the full context length and
        # sliced to each call's length in forward.
        # A buffer moves with the module to the GPU but is not trained.
        self.register_buffer(
            "mask", torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), 1),
            persistent=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[-2]
        queries = self.W_query(x)
        keys = self.W_key(x)
        values = self.W_value(x)
        scores = queries @ keys.transpose(-2, -1)
        # -inf, not a large negative number: exp(-inf) is exactly 0, so future tokens get no weight.
        scores = scores.masked_fill(self.mask[:num_tokens, :num_tokens], float("-inf"))
        weights = torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1)
        # Dropout on the weights drops random query-key links while training; the kept weights are
        # scaled by 1 / (1 - p), so a row sums to 1 only on average.
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
        # (batch, tokens, d_out) per head, concatenated along the features: num_heads * d_out.
        return torch.cat([head(x) for head in self.heads], dim=-1)


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

        # One wide projection per role instead of one per head: the heads are the d_out features
        # cut into num_heads slices of head_dim (see _split_heads), computed in one matmul.
        self.W_query = Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = Linear(d_in, d_out, bias=qkv_bias)
        # out_proj mixes the heads' outputs; it writes into the residual stream, which is why
        # GPT-2 initialises it with a smaller std (GPTModel._init_parameters).
        self.out_proj = Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # True above the diagonal = future keys to hide. persistent=False keeps it out of the state
        # dict: checkpoints do not store it (the book's files do; loading drops that copy).
        self.register_buffer(
            "mask", torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), 1),
            persistent=False,
        )
        # Set by the explicit path only, for plotting what each head attends to.
        self.last_attn_weights: torch.Tensor | None = None
        self.kv_cache = KVCache(context_length)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        # (b, tokens, d_out) -> (b, heads, tokens, head_dim)
        b, n, _ = t.shape
        # view splits the last dimension into (heads, head_dim) without copying; transpose puts the
        # heads next to the batch, so each head is an independent (tokens, head_dim) problem.
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, use_cache: bool = False, attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``attn_mask``: ``(batch, 1, tokens, past + tokens)`` bool, True where a query may
        see a key, causality included (padding makes it differ per row); ``None`` is plain
        causal attention."""
        b, num_tokens, _ = x.shape
        # queries, keys, values: (b, heads, tokens, head_dim) each.
        queries = self._split_heads(self.W_query(x))
        keys = self._split_heads(self.W_key(x))
        values = self._split_heads(self.W_value(x))

        # Tokens already cached: the new queries sit at absolute positions past .. past + tokens - 1.
        past = self.cache_len if use_cache else 0
        if use_cache:
            # From here keys and values cover the whole sequence so far: (b, heads, past + tokens, head_dim).
            keys, values = self.kv_cache.append(keys, values)
        if attn_mask is None:
            # Query i sits at absolute position past + i and may see keys 0..past + i.
            hidden = self.mask[past:past + num_tokens, :past + num_tokens]
        else:
            # A per-row mask (left padding) already includes causality; both paths below want the
            # pairs to hide, so flip it once here.
            hidden = ~attn_mask

        if self.use_sdpa:
            self.last_attn_weights = None
            # A single new token may see every cached key, so it needs no mask at all.
            needs_mask = attn_mask is not None or (past > 0 and num_tokens > 1)
            is_causal = False  # a plain bool: under torch.compile `past` may be symbolic, an `if` fixes it
            if attn_mask is None and past == 0 and num_tokens > 1:
                is_causal = True
            # SDPA picks a kernel (FlashAttention, memory-efficient, or the math fallback) and divides by
            # sqrt(head_dim) itself; the fused kernels never materialise the (tokens, past + tokens) weights.
            context = nn.functional.scaled_dot_product_attention(
                queries, keys, values,
                attn_mask=~hidden if needs_mask else None,  # SDPA's bool mask marks *allowed* pairs
                dropout_p=self.dropout_p if self.training else 0.0,
                is_causal=is_causal,
            )
        else:
            scores = queries @ keys.transpose(2, 3)  # (b, heads, tokens, past + tokens)
            scores = scores.masked_fill(hidden, float("-inf"))
            # Masked scores are -inf and stay -inf after the scaling, so they weigh exactly 0.
            weights = torch.softmax(scores / self.head_dim ** 0.5, dim=-1)
            self.last_attn_weights = weights.detach()
            context = self.dropout(weights) @ values  # (b, heads, tokens, head_dim)

        # Undo the head split: (b, heads, tokens, head_dim) -> (b, tokens, d_out)
        # (transpose leaves the tensor non-contiguous, so reshape copies where view would fail.)
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        # Without out_proj each head would only ever feed its own head_dim slice of the output.
        return self.out_proj(context)
