"""The blocks that turn GPT-2 into Llama: RMSNorm, SwiGLU and grouped-query attention.

- :class:`RMSNorm` drops LayerNorm's mean subtraction and shift: it only divides each
  vector by its root mean square, then rescales. Cheaper, and works as well.
- :class:`SwiGLU` replaces GELU's ``Linear -> GELU -> Linear`` with a *gated* layer:
  ``down(silu(gate(x)) * up(x))``; one projection decides how much of the other passes.
- :class:`GroupedQueryAttention` shares each key/value head among a group of query
  heads (``n_kv_heads`` divides ``n_heads``; one kv head is multi-query attention), so
  the KV cache shrinks by ``n_heads / n_kv_heads``. Positions enter as rotations of
  queries and keys (:mod:`minigpt.models.llama.rope`), not as added vectors. Qwen3 also normalises
  each query and key head with its own RMSNorm (``qk_norm``).
"""

from __future__ import annotations

import torch
from torch import nn

from minigpt.models.attention import CachedAttention
from minigpt.models.kv_cache import KVCache
from minigpt.models.llama.rope import RoPE
from minigpt.runtime.linear import Linear


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension: ``(..., dim) -> (..., dim)``.

    As in the reference implementation, the statistics are computed in float32 (a
    bfloat16 mean of squares loses too many digits), the result is cast back to the
    input's dtype, and only then multiplied by ``weight``.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        # Upcast: in bfloat16 (8 significant bits) the mean of squares over hundreds of features
        # loses enough digits to shift every vector's scale.
        x = x.float()
        # Divide by the root mean square: no mean subtraction and no shift, unlike LayerNorm; eps
        # keeps an all-zero vector finite.
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast back *before* the weight multiply, as the reference does, so the rounding matches.
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    """Gated feed-forward: ``(batch, tokens, emb_dim) -> (batch, tokens, emb_dim)`` via ``hidden_dim``.

    ``fc1`` (the gate) goes through SiLU (``x * sigmoid(x)``) and multiplies ``fc2``'s
    output element-wise; ``fc3`` projects back. Three matrices instead of GELU's two, so
    Llama uses a ``hidden_dim`` of about ``8/3 * emb_dim`` instead of ``4 * emb_dim``.
    """

    def __init__(self, emb_dim: int, hidden_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.fc1 = Linear(emb_dim, hidden_dim, bias=bias)
        self.fc2 = Linear(emb_dim, hidden_dim, bias=bias)
        self.fc3 = Linear(hidden_dim, emb_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The gate: silu(fc1(x)) decides, per hidden unit, how much of fc2(x) passes;
        # (b, T, hidden) * (b, T, hidden), then fc3 projects back to (b, T, emb_dim).
        return self.fc3(nn.functional.silu(self.fc1(x)) * self.fc2(x))


def repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``(batch, n_kv_heads, tokens, head_dim) -> (batch, n_kv_heads * groups, tokens, head_dim)``:
    each key/value head repeated for the ``groups`` query heads that share it."""
    # repeat_interleave, not repeat: kv head j must serve query heads j*groups .. (j+1)*groups - 1,
    # the grouping the checkpoints were trained with (and SDPA's enable_gqa assumes).
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


class GroupedQueryAttention(CachedAttention):
    """Causal attention with ``n_heads`` query heads and ``n_kv_heads`` key/value heads.

    ``forward(x (batch, tokens, d_in), positions, use_cache, attn_mask) -> (batch, tokens, d_in)``.
    Query head ``h`` reads key/value head ``h // (n_heads / n_kv_heads)``; with
    ``n_kv_heads == n_heads`` it is ordinary multi-head attention.

    ``positions`` ``(tokens,)`` or ``(batch, tokens)`` are the RoPE angles' positions;
    ``attn_mask`` ``(batch, 1, tokens, past + tokens)`` (bool, True where a query may see a key,
    causality included; see :func:`minigpt.models.kv_cache.padded_causal_mask`) hides left padding;
    ``None`` is plain causal attention.
    As in :class:`minigpt.models.attention.MultiHeadAttention`, ``use_sdpa`` picks PyTorch's fused
    kernel or the explicit ``softmax(Q K^T / sqrt(head_dim) + mask) V``, and ``use_cache``
    keeps keys (already rotated) and values of earlier calls. The cache grows in chunks, so
    a 128k context does not reserve gigabytes for a short chat.
    """

    def __init__(self, d_in: int, n_heads: int, n_kv_heads: int, head_dim: int, rope: RoPE,
                 qkv_bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-6,
                 use_sdpa: bool = True) -> None:
        super().__init__()
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}: "
                             "each key/value head serves a whole group of query heads")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.groups = n_heads // n_kv_heads
        self.context_length = rope.context_length
        self.use_sdpa = use_sdpa
        self.W_query = Linear(d_in, n_heads * head_dim, bias=qkv_bias)
        # Keys and values get n_kv_heads heads only: their projections and the KV cache are
        # n_heads / n_kv_heads times smaller than the queries'.
        self.W_key = Linear(d_in, n_kv_heads * head_dim, bias=qkv_bias)
        self.W_value = Linear(d_in, n_kv_heads * head_dim, bias=qkv_bias)
        # n_heads * head_dim need not equal d_in (Qwen3-0.6B: 16 * 128 = 2048 from 1024).
        self.out_proj = Linear(n_heads * head_dim, d_in, bias=qkv_bias)
        # Qwen3's QK-norm: one RMSNorm over head_dim, shared by every head, keeps the attention
        # logits from growing large.
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.rope = [rope]  # shared by every block; a list keeps it out of this module's children
        self.last_attn_weights: torch.Tensor | None = None
        # Starts at 256 tokens and doubles up to the context (131,072 for Llama 3.2): a short
        # chat never reserves the whole context.
        self.kv_cache = KVCache(self.context_length, min_capacity=256)

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        b, tokens, _ = t.shape  # (b, tokens, n * head_dim) -> (b, n, tokens, head_dim)
        return t.view(b, tokens, n, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, use_cache: bool = False,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, tokens, _ = x.shape
        # queries (b, n_heads, T, hd); keys and values (b, n_kv_heads, T, hd).
        queries = self._heads(self.W_query(x), self.n_heads)
        keys = self._heads(self.W_key(x), self.n_kv_heads)
        values = self._heads(self.W_value(x), self.n_kv_heads)
        if self.q_norm is not None:  # Qwen3: each head's query and key normalised before rotating
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        rope = self.rope[0]
        # Rotate before caching: a cached key keeps the rotation of its own absolute position.
        # `positions` already continue at cache_pos (Decoder._positions_and_mask).
        queries, keys = rope(queries, positions), rope(keys, positions)
        past = self.cache_len if use_cache else 0
        if use_cache:
            keys, values = self.kv_cache.append(keys, values)
        # allowed: True where a query may see a key (SDPA's meaning of a bool mask); None: no mask.
        allowed = attn_mask
        if allowed is None and past > 0 and tokens > 1:  # new tokens after cached ones: causal from `past` on
            allowed = ~_causal(tokens, past, x.device)
        if self.use_sdpa:
            self.last_attn_weights = None
            # Plain bools for SDPA: under torch.compile these ints may be symbolic, an `if` fixes them.
            is_causal = enable_gqa = False
            if allowed is None and past == 0 and tokens > 1:
                is_causal = True
            if self.groups > 1:
                enable_gqa = True
            # enable_gqa lets SDPA share each key/value head across its query group without
            # repeat_kv's copies.
            context = nn.functional.scaled_dot_product_attention(
                queries, keys, values, attn_mask=allowed, is_causal=is_causal, enable_gqa=enable_gqa)
        else:
            # The explicit path copies each kv head for its group: (b, n_heads, past + T, hd).
            keys, values = repeat_kv(keys, self.groups), repeat_kv(values, self.groups)
            scores = queries @ keys.transpose(2, 3) / self.head_dim ** 0.5  # (b, heads, tokens, past + tokens)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            elif past == 0 and tokens > 1:
                scores = scores.masked_fill(_causal(tokens, 0, x.device), float("-inf"))
            # Softmax in float32, as the reference does, then back to the compute dtype.
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(queries.dtype)
            self.last_attn_weights = weights.detach()
            context = weights @ values  # (b, heads, tokens, head_dim)
        # Merge the heads back: (b, n_heads, T, hd) -> (b, T, n_heads * hd), then project to d_in.
        return self.out_proj(context.transpose(1, 2).reshape(b, tokens, self.n_heads * self.head_dim))


def _causal(tokens: int, past: int, device: torch.device) -> torch.Tensor:
    """``(tokens, past + tokens)`` bool, True above the diagonal: query ``i`` (at ``past + i``)
    must not see keys after it."""
    # triu(past + 1): key j is hidden from query i when j > past + i, i.e. in its future; the
    # diagonal is shifted by the cache offset since the queries are the last `tokens` keys.
    return torch.ones(tokens, past + tokens, dtype=torch.bool, device=device).triu(past + 1)
