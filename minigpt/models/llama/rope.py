"""Rotary position embeddings (RoPE): positions as rotations of query and key pairs.

GPT-2 adds a learned vector per position to each token embedding. RoPE instead
rotates every query and key: the head's ``head_dim`` numbers are read as
``head_dim / 2`` pairs ``(x[i], x[i + head_dim/2])``, and at position ``m`` pair ``i``
turns by the angle ``m * inv_freq[i]``, with ``inv_freq[i] = theta ** (-2i / head_dim)``::

    x'[i]            = x[i] cos(m w_i) - x[i + d/2] sin(m w_i)
    x'[i + d/2]      = x[i] sin(m w_i) + x[i + d/2] cos(m w_i)

A dot product of two rotated vectors depends only on the *difference* of their
angles, so attention scores see relative positions, and no parameter is learned.
The first pairs turn fast (fine position), the last ones slowly (coarse position).
This is the "rotate half" layout of Hugging Face's Llama (pairs are half a head
apart), which the checkpoints' query and key weights assume.

Llama 3 stretches the slow frequencies for long contexts (``rope_type: "llama3"``):
wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are
divided by ``factor``, shorter than ``.../ high_freq_factor`` kept, and the ones in
between interpolated smoothly (:func:`llama3_inv_freq`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def inverse_frequencies(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """``(head_dim // 2,)`` float32 angles per position, ``theta ** (-2i / head_dim)``."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"RoPE rotates pairs of numbers, so head_dim must be even, got {head_dim}")
    # 2i / head_dim for i = 0 .. head_dim/2 - 1, computed as the reference does (int64 arange,
    # then float) so the frequencies match it bit for bit.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    # theta^(-2i/d): pair 0 turns one radian per position, the last about 1/theta radians.
    return 1.0 / (theta ** exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    """Llama 3's long-context frequencies: slow pairs divided by ``factor``, fast ones kept,
    the middle band blended linearly in ``original_max_position_embeddings / wavelength``."""
    missing = [key for key in LLAMA3_KEYS if key not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type 'llama3' needs {', '.join(missing)}; got {dict(scaling)}")
    factor = scaling["factor"]
    low = scaling["low_freq_factor"]
    high = scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    # A pair's wavelength: the number of positions one full turn takes.
    wavelength = 2 * math.pi / inv_freq
    # Pairs slower than old_context / low never completed a turn in pretraining: divide their
    # frequency by `factor`, so factor times longer contexts stay within angles the model has seen.
    scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    # smooth rises from 0 at wavelength old/low to 1 at old/high.
    smooth = (old_context / wavelength - low) / (high - low)
    # Between the cut-offs `scaled` is inv_freq, so this blends divided and kept frequencies.
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    # The band old/high <= wavelength <= old/low, bounds included, as in transformers.
    middle = ~(wavelength < old_context / high) & ~(wavelength > old_context / low)
    return torch.where(middle, blended, scaled)


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> torch.Tensor:
    """The frequencies of a Hugging Face ``rope_scaling`` setting: none/``default`` or ``llama3``."""
    inv_freq = inverse_frequencies(head_dim, theta)
    # Newer config.json files say rope_type, older ones type.
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "llama3":
        return llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope_scaling type {kind!r} is not implemented; minigpt knows 'default' and 'llama3'")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn each pair ``(x[i], x[i + d/2])`` of ``x`` ``(..., tokens, head_dim)`` by the angle
    whose ``cos``/``sin`` ``(..., tokens, head_dim / 2)`` are given (broadcast over heads)."""
    # Rotate-half: pair i is (x[i], x[i + d/2]), the two halves of the head, not neighbours
    # (x[2i], x[2i + 1]) as in the RoPE paper; HF's conversion permuted q/k weights to this.
    x1, x2 = x.chunk(2, dim=-1)
    # The tables are float32; rounding them to x's dtype first matches the reference in bfloat16.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    # The 2-D rotation [[cos, -sin], [sin, cos]] applied to every (x1, x2) pair.
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RoPE(nn.Module):
    """Precomputed ``cos``/``sin`` tables ``(context_length, head_dim / 2)`` and ``forward(x, positions)``
    that rotates ``x`` ``(batch, heads, tokens, head_dim)``.

    The tables are plain float32 tensors, not buffers: they are not saved, they follow ``x`` to
    its device when first used there, and ``model.to(torch.bfloat16)`` leaves them in float32
    (each call rounds them to ``x``'s dtype, as the reference does, and a later ``.float()``
    still finds them exact).

    ``positions`` is ``(tokens,)`` (the same for every row) or ``(batch, tokens)`` (rows
    that start at different places, e.g. after left padding).
    """

    def __init__(self, head_dim: int, context_length: int, theta: float = 10000.0,
                 scaling: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.context_length = context_length
        self.theta = theta
        self.scaling = dict(scaling) if scaling else None
        self.build_tables(torch.empty(0).device)

    def build_tables(self, device: torch.device | str) -> None:
        """(Re)compute the tables on ``device``: angle ``m * inv_freq[i]`` at row ``m``, in float32."""
        with torch.device(device):
            inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)
            positions = torch.arange(self.context_length, dtype=torch.int64).float()
            angles = positions[:, None] * inv_freq[None, :]  # (context_length, head_dim / 2)
            # Half-width tables: rotate() applies each angle to both halves, where HF repeats the columns.
            self.cos = angles.cos()
            self.sin = angles.sin()

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Moved lazily: the tables are not buffers, so model.to(device) does not move them.
        if self.cos.device != x.device:
            self.cos, self.sin = self.cos.to(x.device), self.sin.to(x.device)
        cos = self.cos[positions]  # (tokens | batch x tokens, head_dim / 2)
        sin = self.sin[positions]
        if positions.dim() == 2:  # one row of angles per sequence: broadcast over the heads
            cos, sin = cos[:, None], sin[:, None]
        # cos/sin are (T, hd/2), broadcast over batch and heads, or (b, 1, T, hd/2), over heads.
        return rotate(x, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, context_length={self.context_length}, theta={self.theta}"
