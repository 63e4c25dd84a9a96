"""LoRA, low-rank adaptation (book appendix E): fine-tune a few million numbers, not all of them.

The one idea: keep a pretrained weight ``W`` (out x in) frozen and learn its change
as the product of two thin matrices, ``delta_W = scaling * (A @ B).T`` with
``A: (in, r)`` and ``B: (r, out)``, ``r`` much smaller than ``in`` and ``out``::

    y = x @ W.T + scaling * (x @ A @ B)        scaling = alpha / r

A Linear(768, 768) has 589,824 weights; its rank-16 update has 16 * (768 + 768) = 24,576.
``B`` starts at zero, so a freshly adapted model computes exactly what the base model
computes, and training moves it away from there only as far as the data asks.

Workflow::

    report = apply_lora(model, rank=16, alpha=16)   # wrap linears, freeze the rest
    print(report)                                    # trainable vs total parameters
    ...train as usual (only the LoRA tensors get gradients)...
    with lora_disabled(model): ...                   # the base model again, no copy (DPO's reference)
    save_lora(model, "adapter.safetensors")          # a few MB: only A and B
    load_lora(fresh_base_model, "adapter.safetensors")
    merge_lora(model)                                # fold into W: plain nn.Linear again

QLoRA (Dettmers et al. 2023) is the same on a base quantized by ``quantize_model``: its
``Linear4bit`` / ``Linear8bit`` layers stay frozen, the adapters train in the compute dtype.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minigpt.lora.layers import LinearWithLoRA, check_lora_settings
from minigpt.lora.targets import DEFAULT_TARGETS, match_targets
from minigpt.quantization.layers import QUANTIZED_LAYERS
from minigpt.quantization.model import dequantize_model, is_quantized, untie_in_config

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class LoRAReport:
    """What :func:`apply_lora` did: which layers it wrapped and how many parameters now train."""

    rank: int
    alpha: float
    dropout: float
    modules: tuple[str, ...]  # dotted names of the wrapped nn.Linear layers
    trainable: int            # the LoRA A and B tensors
    total: int                # every parameter of the model, LoRA included, shared ones once

    fraction = property(lambda self: self.trainable / self.total)  # the share that trains

    def __str__(self) -> str:
        return (f"LoRA rank={self.rank} alpha={self.alpha:g} on {len(self.modules)} linear layers: "
                f"{self.trainable:,} trainable of {self.total:,} parameters ({100 * self.fraction:.2f}%)")


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    target_modules: Sequence[str] | None = None,
    dropout: float = 0.0,
) -> LoRAReport:
    """Wrap the chosen ``nn.Linear`` layers of ``model`` (quantized ones too: QLoRA) in
    :class:`LinearWithLoRA`, in place, and freeze every other parameter.

    ``target_modules`` are patterns on the dotted module names printed by
    ``model.named_modules()`` (e.g. ``trf_blocks.3.att.W_query``, ``"att.*"``; see
    :mod:`minigpt.lora.targets`). The default, :data:`DEFAULT_TARGETS`, is every linear of
    the transformer blocks plus ``out_head``. Each pattern must match one linear at least.

    A head tied to the token embedding keeps sharing it (frozen); the update is added
    to the head only. Returns a :class:`LoRAReport` (also logged at INFO level).
    """
    check_lora_settings(rank, alpha, dropout)
    if isinstance(target_modules, str):
        raise TypeError(f"target_modules must be a list of patterns, e.g. [{target_modules!r}], not a string")
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; call merge_lora(model) first, or build a fresh model")
    patterns = DEFAULT_TARGETS if target_modules is None else tuple(target_modules)
    return wrap_layers(model, match_targets(model, patterns), rank, alpha, dropout)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight, ``W += scaling * (A @ B).T``, and put
    the plain ``nn.Linear`` back in place of each :class:`LinearWithLoRA`.

    The merged model computes the same outputs (up to float rounding) with no extra
    cost per token, and saves with ``save_pretrained`` like any base model. A quantized
    model (QLoRA) is dequantized first, every quantized linear to an ``nn.Linear`` in its
    compute dtype: adding a float update to 4-bit codes would round most of it away.

    A head whose weight is shared with the token embedding is *untied*: it gets its own
    merged copy, since adding the update to the shared matrix would change the
    embedding too. ``model.cfg.tie_weights`` is then set to False so the head is saved.
    Parameters keep the ``requires_grad`` that :func:`apply_lora` gave them (frozen).
    Returns ``model``.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to merge; was apply_lora or load_lora called on it?")
    if is_quantized(model):  # the wrappers stay; their base layers become nn.Linear, frozen as they were
        quantized = [name for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]
        dequantize_model(model)
        for name in quantized:
            model.get_submodule(name).requires_grad_(False)
    shared = _shared_parameter_ids(model)
    untied = []
    for name, wrapper in layers.items():
        linear = wrapper.linear
        with torch.no_grad():
            delta = wrapper.lora.delta_weight().to(linear.weight.dtype)
            if id(linear.weight) in shared:
                # A new tensor: add_ on a shared weight would change the token embedding as well.
                linear.weight = nn.Parameter(linear.weight + delta, requires_grad=linear.weight.requires_grad)
                untied.append(name)
            else:
                # In place: W += scaling * (A @ B).T, and the wrapper disappears below.
                linear.weight.add_(delta)
        _set_submodule(model, name, linear)
    if untied:
        logger.info("merge_lora: untied %s from the weights it shared, to merge its update", untied)
        untie_in_config(model)
    return model


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the ``with`` body with every LoRA update switched off: the model computes exactly
    what its frozen base computes, with no second copy in memory (DPO's reference model).
    The previous state comes back afterwards, also when the body raises; nesting is fine."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("model has no LoRA layers to switch off; call apply_lora or load_lora first, "
                         "or use a separate, frozen copy of the model")
    before = [layer.enabled for layer in layers]
    for layer in layers:
        # Flags, not removal: the adapters stay in memory and come back unchanged.
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, before, strict=True):
            layer.enabled = enabled


# --- helpers -------------------------------------------------------------------------------


def lora_layers(model: nn.Module) -> dict[str, LinearWithLoRA]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)}


def base_layer(module: nn.Module | None) -> nn.Module | None:
    """The frozen layer itself: a wrapped layer's base tensors live under its ``.linear``."""
    return module.linear if isinstance(module, LinearWithLoRA) else module


def wrap_layers(model: nn.Module, names: Sequence[str], rank: int, alpha: float, dropout: float) -> LoRAReport:
    """Freeze ``model``, replace each named linear by a LinearWithLoRA, and report."""
    # Freeze everything first; the LoRA layers created below are trainable (new parameters are).
    model.requires_grad_(False)
    for name in names:
        _set_submodule(model, name, LinearWithLoRA(model.get_submodule(name), rank, alpha, dropout))
    report = lora_report(model, lora_layers(model))
    logger.info("%s", report)
    return report


def lora_report(model: nn.Module, layers: dict[str, LinearWithLoRA]) -> LoRAReport:
    some = next(iter(layers.values()))
    return LoRAReport(
        rank=some.lora.rank, alpha=some.lora.alpha, dropout=some.dropout.p, modules=tuple(layers),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total=sum(p.numel() for p in model.parameters()),  # parameters() lists a shared one once
    )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters registered under more than one name (tied weights)."""
    counts = Counter(id(param) for _, param in model.named_parameters(remove_duplicate=False))
    return {key for key, count in counts.items() if count > 1}


def check_same_lora(existing: dict[str, LinearWithLoRA], names: Sequence[str], rank: int, alpha: float,
                     path: Path) -> None:
    some = next(iter(existing.values()))
    if sorted(existing) != sorted(names) or some.lora.rank != rank or some.lora.alpha != alpha:
        raise ValueError(f"{path} holds a rank-{rank} alpha-{alpha} adapter for {len(names)} layers, but the model "
                         f"already has rank-{some.lora.rank} alpha-{some.lora.alpha} LoRA on {len(existing)} "
                         "layers; load it onto a base model without LoRA")
