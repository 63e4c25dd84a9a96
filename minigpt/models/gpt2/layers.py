"""The pieces of a transformer block besides attention (book ch. 4).

LayerNorm keeps activations at a steady scale, GELU is the smooth non-linearity,
the feed-forward network widens each token's vector 4x and back, and the
transformer block wires them with attention through shortcut connections.
"""

from __future__ import annotations

import torch
from torch import nn

from minigpt.models.attention import MultiHeadAttention
from minigpt.models.gpt2.config import GPTConfig
from minigpt.runtime.linear import Linear


class LayerNorm(nn.Module):
    """Normalise each token's vector to mean 0 and variance 1, then rescale.

    ``(..., emb_dim) -> (..., emb_dim)``. ``scale`` and ``shift`` let training
    undo the normalisation where that helps. Uses the biased variance (divide by
    n), as GPT-2 and ``torch.nn.LayerNorm`` do.
    """

    def __init__(self, emb_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        # scale 1 and shift 0: a fresh LayerNorm is the plain normalisation. Hugging Face calls
        # them ln_*.weight and ln_*.bias.
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fused kernel computes exactly mean/var/normalise/affine, in one pass.
        return nn.functional.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)

    def extra_repr(self) -> str:
        return f"{self.scale.shape[0]}, eps={self.eps}"


class GELU(nn.Module):
    """GELU with GPT-2's tanh approximation: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.

    Unlike ReLU it is smooth and lets small negative values through, which
    gives better-behaved gradients.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PyTorch's fused kernel evaluates exactly this formula in one pass instead of
        # five element-wise ops; tests check it against the formula written out.
        return nn.functional.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """Position-wise MLP: ``(batch, tokens, emb_dim) -> (batch, tokens, emb_dim)`` via ``4 * emb_dim``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        # The indices are part of the checkpoint names: layers.0 is HF's c_fc, layers.2 its c_proj,
        # the residual write whose initialisation GPT-2 scales down.
        self.layers = nn.Sequential(
            Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            GELU(),
            Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(norm1(x))`` then ``x + ff(norm2(x))``.

    ``(batch, tokens, emb_dim) -> (batch, tokens, emb_dim)``. The shortcuts give
    gradients a direct path through deep stacks of blocks.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        # d_in == d_out == emb_dim: the branch's output is added back onto its input.
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            context_length=cfg.context_length,
            dropout=cfg.drop_rate,
            num_heads=cfg.n_heads,
            qkv_bias=cfg.qkv_bias,
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(
        self, x: torch.Tensor, use_cache: bool = False, attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``attn_mask``: see :meth:`MultiHeadAttention.forward` (``None``: plain causal)."""
        # Pre-norm (GPT-2's order; the original Transformer normalised after the sum): the norm sits
        # inside the branch, so the shortcut carries x, and its gradient, through unchanged.
        x = x + self.drop_shortcut(self.att(self.norm1(x), use_cache=use_cache, attn_mask=attn_mask))
        # Attention moved information between tokens; the feed-forward now works on each token alone.
        return x + self.drop_shortcut(self.ff(self.norm2(x)))
