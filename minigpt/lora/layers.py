"""The LoRA layers (book appendix E): a frozen linear layer plus a trainable low-rank update.

    y = x @ W.T + scaling * (x @ A @ B)        scaling = alpha / r,  A: (in, r),  B: (r, out)

``B`` starts at zero, so a freshly wrapped layer computes exactly what the base layer computes.
:mod:`minigpt.lora.adapters` wraps a model's layers in them; :mod:`minigpt.lora.files` saves
and loads only ``A`` and ``B``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minigpt.quantization.layers import QUANTIZED_LAYERS


def check_lora_settings(rank: int, alpha: float, dropout: float = 0.0) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


class LoRALayer(nn.Module):
    """The low-rank update alone: ``(..., in_dim) -> (..., out_dim)`` as ``scaling * (x @ A @ B)``.

    ``A: (in_dim, rank)`` is initialised like ``nn.Linear(in_dim, rank)`` (Kaiming-uniform,
    a=sqrt(5)); ``B: (rank, out_dim)`` is zero, so the layer outputs zeros until trained.
    ``scaling = alpha / rank`` keeps the update's size roughly independent of the rank,
    so a good learning rate for one rank works for another.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_lora_settings(rank, alpha)
        # alpha / r: a higher rank sums more rank-1 terms, and the smaller scaling keeps the update's
        # size roughly the same, so alpha and the learning rate need not be retuned with r.
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.A = nn.Parameter(torch.empty(in_dim, rank, device=device, dtype=dtype))
        # B = 0: x @ A @ B is 0 at first, so training starts at the base model exactly; A random so
        # B's gradient (A^T x^T dy) is not zero too.
        self.B = nn.Parameter(torch.zeros(rank, out_dim, device=device, dtype=dtype))
        # Initialise the transposed view, shape (rank, in_dim) like nn.Linear(in_dim, rank).weight,
        # so the fan-in is in_dim (bound 1/sqrt(in_dim)). The book calls this on A itself,
        # which takes fan-in = rank and draws much larger values.
        nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) @ (in, r) is cheap; the (in, out) product A @ B is never formed.
        return self.scaling * (x @ self.A @ self.B)

    def delta_weight(self) -> torch.Tensor:
        """The update in ``nn.Linear.weight`` layout: ``(out_dim, in_dim)``."""
        return self.scaling * (self.A @ self.B).T

    def extra_repr(self) -> str:
        return f"in_dim={self.A.shape[0]}, out_dim={self.B.shape[1]}, rank={self.rank}, alpha={self.alpha}"


class LinearWithLoRA(nn.Module):
    """A frozen-able ``nn.Linear`` (or quantized linear) plus a trainable low-rank update:
    ``linear(x) + lora(dropout(x))``, the update in the layer's (compute) dtype.

    ``(..., in_features) -> (..., out_features)``. The wrapped layer stays available as
    ``.linear`` (its weight may be shared, e.g. a head tied to the token embedding);
    LoRA dropout zeroes inputs of the update only, never of the frozen path. With
    ``enabled`` False (see :func:`lora_disabled`) the layer is its frozen base alone.
    """

    def __init__(self, linear: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        check_lora_settings(rank, alpha, dropout)
        self.linear = linear
        quantized = isinstance(linear, QUANTIZED_LAYERS)  # its tensors are buffers, its dtype the compute one
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha,
                              device=linear.device if quantized else linear.weight.device,
                              dtype=linear.compute_dtype if quantized else linear.weight.dtype)
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        # Base path on x itself, update on dropout(x): LoRA dropout never touches the frozen path.
        return out + self.lora(self.dropout(x).to(self.lora.A.dtype)).to(out.dtype) if self.enabled else out

    # Read like an nn.Linear's, so code that asks a layer for its sizes works on either.
    in_features = property(lambda self: self.linear.in_features)
    out_features = property(lambda self: self.linear.out_features)
