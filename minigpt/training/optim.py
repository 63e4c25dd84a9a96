"""The optimizer and the learning-rate schedule of appendix D.

The one idea: AdamW moves each weight by its own, normalised step, and the learning rate
says how large those steps are: small at first (a random model's gradients point
anywhere), largest after a short warm-up, then shrinking along a cosine so that the
model settles into a minimum instead of jumping around it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on weight matrices, none on the rest.

    Decay pulls weights towards zero. That regularises the matrices of linear layers;
    shrinking a bias, a LayerNorm scale or an embedding row (which only moves when its
    token appears) has no such benefit, so those are left alone. A tied output head is
    the embedding matrix and counts as an embedding. Frozen parameters are left out.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay = []
    no_decay = []
    for param in model.parameters():  # each shared parameter once
        if param.requires_grad:
            is_matrix = param.dim() >= 2 and id(param) not in embeddings
            (decay if is_matrix else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def create_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, with the fused kernel where PyTorch has one
    (one pass over all parameters instead of a dozen small ops per tensor)."""
    device_type = next(model.parameters()).device.type
    fused = device_type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused)


def lr_at_step(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay.

    Warm-up: ``max_lr * (step + 1) / warmup_steps``, so the first, wildest updates of a
    random model are small. Then the rate follows half a cosine from ``max_lr`` at
    ``warmup_steps`` down to ``min_lr`` at ``max_steps``, and stays at ``min_lr`` after.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
