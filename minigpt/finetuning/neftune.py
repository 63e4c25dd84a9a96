"""NEFTune: noisy token embeddings while fine-tuning (Jain et al. 2023).

The one idea: during training only, each token embedding gets uniform noise in
``[-m, m]`` added, with ::

    m = alpha / sqrt(L * d)

where ``d`` is the embedding width and ``L`` is the example's own length without
padding, so every example's noise has the same total size ``alpha`` however long it
is. The model, which can no longer rely on the exact vectors, learns answers that
generalise better; evaluation and generation see the clean embeddings.

Shapes: the token embeddings are ``(batch, tokens, emb_dim)``; the lengths are
``(batch,)``. Padding positions (``>= L``) get no noise, and ``L`` is each example's
length, never the padded width of the batch (with the width, short examples in a
batch of long ones would get too little noise).

Usage::

    enable_neftune(model, alpha=5.0)              # a hook on model.tok_emb
    with neftune_lengths(model, lengths):         # the batch's real lengths, (batch,)
        logits = model(inputs)                    # noisy while model.training

For instruction batches, :func:`minigpt.finetuning.instruction.instruction_loss` does the
second part: pass it to the training loop as its loss.

The noise is drawn from torch's global random generator, in the embeddings' dtype
and on their device, so a resumed run (whose checkpoint restores the generator's
state) repeats exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass
class _NEFTune:
    """What the hook on the embedding needs: alpha, the current batch's lengths, its handle."""

    alpha: float
    handle: RemovableHandle
    lengths: torch.Tensor | None = None


def neftune_noise(embeddings: torch.Tensor, lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """The noise to add to ``embeddings`` ``(batch, tokens, emb_dim)``: uniform in ``[-m_i, m_i]``
    on the first ``lengths[i]`` positions of row ``i``, with ``m_i = alpha / sqrt(lengths[i] * emb_dim)``,
    and exactly 0 on the positions after them (padding). Same shape, dtype and device.

    ``lengths`` is ``(batch,)``; a length beyond the width counts as the width.
    """
    batch, tokens, dim = embeddings.shape
    if lengths.shape != (batch,):
        raise ValueError(f"NEFTune needs one length per example, shape ({batch},), got {tuple(lengths.shape)}")
    # A length past the width (a batch cut by allowed_max_length) counts as the width.
    lengths = lengths.to(embeddings.device).clamp(max=tokens)
    # Padding sits after each row's length (right padding), so position < length means real.
    real = torch.arange(tokens, device=embeddings.device) < lengths[:, None]  # (batch, tokens)
    # clamp(min=1): an empty row has no real position, and its scale must not be infinite.
    # NEFTune's alpha / sqrt(L * d): the noise vector has L * d entries, each of variance m^2 / 3,
    # so its norm is about alpha / sqrt(3) whatever the length and width.
    scale = alpha / torch.sqrt(lengths.clamp(min=1).float() * dim)  # (batch,)
    scale = (scale[:, None] * real).to(embeddings.dtype)  # (batch, tokens)
    # Uniform in [-1, 1], scaled per row and zeroed on padding; drawn in the embeddings' dtype
    # from the global generator, so a resumed run draws the same noise.
    return torch.empty_like(embeddings).uniform_(-1, 1) * scale[:, :, None]


def _add_noise(embedding: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
    """The forward hook: the embedding's output plus noise, in training mode only."""
    state: _NEFTune = embedding._neftune
    if not embedding.training:
        return None  # the output unchanged
    if state.lengths is None:
        raise RuntimeError(
            "NEFTune is on and the model is training, but the examples' lengths are unknown: wrap the forward in "
            "`with neftune_lengths(model, lengths):` (lengths without padding, shape (batch,)), or train "
            "instruction data with minigpt.finetuning.instruction.instruction_loss as the loss")
    # Returning a tensor from a forward hook replaces the module's output.
    return output + neftune_noise(output, state.lengths, state.alpha)


def enable_neftune(model: nn.Module, alpha: float | None) -> nn.Module:
    """Add NEFTune noise to ``model.tok_emb``'s output in training mode; returns ``model``.

    ``alpha`` sets the noise (the paper uses 5 to 15); ``None`` turns NEFTune off (as
    :func:`disable_neftune`), so a setting that may be unset can be passed as it is.
    Calling it again changes ``alpha``. In eval mode the model is unchanged bit for bit.
    Training forwards must run inside :func:`neftune_lengths`.
    """
    if alpha is None:
        return disable_neftune(model)
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"NEFTune's alpha must be a positive number (the paper uses 5 to 15), or None for off; "
                         f"got {alpha!r}")
    embedding = getattr(model, "tok_emb", None)
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"NEFTune adds noise to the token embedding model.tok_emb (an nn.Embedding); "
                        f"this {type(model).__name__} has none")
    state = getattr(embedding, "_neftune", None)
    # A second call only changes alpha: the hook is registered once.
    if state is None:
        # The state lives on the embedding itself, so wrappers (DDP, torch.compile) that keep the same
        # module find it through model.modules().
        embedding._neftune = _NEFTune(float(alpha), embedding.register_forward_hook(_add_noise))
    else:
        state.alpha = float(alpha)
    return model


def disable_neftune(model: nn.Module) -> nn.Module:
    """Remove NEFTune's hook from ``model.tok_emb`` (nothing happens when it has none); returns ``model``."""
    embedding = getattr(model, "tok_emb", None)
    state = getattr(embedding, "_neftune", None)
    if state is not None:
        # Without the hook the embedding's output is the plain lookup again, bit for bit.
        state.handle.remove()
        del embedding._neftune
    return model


def neftune_enabled(model: nn.Module) -> bool:
    """Whether NEFTune is on for ``model`` (a wrapper around it, e.g. a compiled model, included)."""
    return any(hasattr(module, "_neftune") for module in model.modules())


@contextmanager
def neftune_lengths(model: nn.Module, lengths: torch.Tensor) -> Iterator[None]:
    """Forwards in the ``with`` body take ``lengths`` ``(batch,)`` as the examples' lengths
    without padding. No effect when NEFTune is off; the previous lengths come back after.

    ``model`` may be a wrapper around the model (distributed, compiled): the NEFTune
    embedding is found among its modules.
    """
    states = [module._neftune for module in model.modules() if hasattr(module, "_neftune")]
    # Restored afterwards: a training forward outside any block then fails loudly (no lengths)
    # instead of silently reusing this batch's.
    previous = [state.lengths for state in states]
    for state in states:
        state.lengths = lengths
    try:
        yield
    finally:
        for state, old in zip(states, previous, strict=True):
            state.lengths = old
