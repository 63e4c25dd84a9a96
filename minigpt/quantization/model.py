"""A whole model quantized: every linear layer outside the skipped names replaced by its quantized layer,
one at a time (never a second float copy), and back to full precision when LoRA is merged.

The one idea: what stays in full precision depends on what the quantization is for.

* QLoRA's schemes (``nf4``, ``nf4-dq``, ``fp4``) make a large model fit for *training*: the block
  linears hold almost all the weights, so they go to 4 bits; the embeddings and the output head
  are a small part of a large model and the most sensitive, so they stay in full precision.
* The weight-only schemes (``int8``, ``int4``) make *decoding* fast: each new token reads every
  weight once, and the output head is read whole for every token (GPT-2 small's tied head is 154 MB
  of its 495 MB in float32), so it is quantized too; int8 keeps its logits close (one scale per
  vocabulary row). The embeddings stay: a token looks up one row of them, however large they are.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from minigpt.quantization.layers import QUANTIZED_LAYERS, Linear4bit, Linear8bit, LinearInt4
from minigpt.quantization.schemes import (
    check_block_size,
    check_scheme,
)
from minigpt.runtime.linear import Linear

QLORA_SKIP: tuple[str, ...] = ("tok_emb", "pos_emb", "out_head")
WEIGHT_ONLY_SKIP: tuple[str, ...] = ("tok_emb", "pos_emb")
WEIGHT_ONLY_SCHEMES: tuple[str, ...] = ("int8", "int4")


def default_skip(scheme: str) -> tuple[str, ...]:
    """The modules ``scheme`` leaves in full precision unless told otherwise: the embeddings, and for
    QLoRA's schemes the output head too (see the module's docstring)."""
    return WEIGHT_ONLY_SKIP if scheme in WEIGHT_ONLY_SCHEMES else QLORA_SKIP


def quantize_linear(linear: nn.Linear, scheme: str, *, block_size: int = 64, scale_block_size: int = 256,
                    compute_dtype: torch.dtype = torch.float32) -> Linear4bit | Linear8bit | LinearInt4:
    """The quantized replacement of one ``nn.Linear`` (layer-by-layer loading builds on this)."""
    if check_scheme(scheme) == "int8":
        return Linear8bit.from_linear(linear, compute_dtype)
    if scheme == "int4":
        return LinearInt4.from_linear(linear, block_size, compute_dtype)
    return Linear4bit.from_linear(linear, scheme, block_size, compute_dtype, scale_block_size)


def _skipped(name: str, skip: Sequence[str]) -> bool:
    """Whether a dotted module name is, or lies inside, or ends with one of the ``skip`` patterns."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p)
               or name.startswith(p + ".") for p in skip)


def quantize_model(model: nn.Module, scheme: str, *, skip: Sequence[str] | None = None, block_size: int = 64,
                   scale_block_size: int = 256, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` not named in ``skip`` by its quantized layer, in place.

    ``skip`` holds module-name patterns (``fnmatch``; a pattern also matches a name's dotted
    endings and everything inside it); None is :func:`default_skip`: the embeddings, and for
    QLoRA's schemes the output head. A tied output head quantized gets its own quantized copy;
    the embedding keeps the float matrix. Each layer is quantized on its own device and its
    float weight freed right after. Returns ``model``.
    """
    check_scheme(scheme)
    skip = default_skip(scheme) if skip is None else skip
    check_block_size(block_size)
    check_block_size(scale_block_size, "scale block size")
    if isinstance(skip, str):
        raise TypeError(f"skip must be a list of module names, e.g. [{skip!r}], not a string")
    if is_quantized(model):
        raise ValueError(f"model is already quantized ({quantization_of(model)['scheme']}); "
                         "quantize a full-precision model instead")
    # Names first, then replacement: swapping modules while named_modules() walks them is unsafe.
    names = linears_to_quantize(model, skip)
    if not names:
        raise ValueError(f"model has no nn.Linear layer outside skip={list(skip)} to quantize")
    ties = tied_weights(model)
    for name in names:
        quantized = quantize_linear(model.get_submodule(name), scheme, block_size=block_size,
                                    scale_block_size=scale_block_size, compute_dtype=compute_dtype)
        quantized.tied_to = ties.get(name)
        _set_submodule(model, name, quantized)
    return model


def linears_to_quantize(model: nn.Module, skip: Sequence[str]) -> list[str]:
    """The names of ``model``'s ``nn.Linear`` layers outside the ``skip`` patterns (see :func:`quantize_model`)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not _skipped(name, skip)]


def tied_weights(model: nn.Module) -> dict[str, str]:
    """``{linear's name: name of the module that holds the same weight first}`` for every linear
    layer whose weight is shared (a tied output head -> ``"tok_emb"``)."""
    owners: dict[int, str] = {}
    ties = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            continue
        owner = owners.setdefault(id(weight), name)
        if owner != name and isinstance(module, nn.Linear):
            ties[name] = owner
    return ties


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Put a plain ``nn.Linear`` back in place of every quantized layer, in place, holding the
    dequantized weight (in ``dtype``, by default each layer's compute dtype) and its bias.

    The rounding of quantization stays: the result computes what the quantized model
    computes, in full precision (e.g. to merge LoRA adapters into it). An output head quantized
    from a tied weight stays untied from the embedding (:func:`untie_in_config`). Returns ``model``.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]
    if not layers:
        raise ValueError("model has no quantized layers to dequantize")
    if any(layer.tied_to is not None for _, layer in layers):
        # A tied head was quantized on its own: its dequantized copy differs from the embedding's
        # float matrix by the rounding, so the two stay apart, and the model saves both.
        untie_in_config(model)
    for name, layer in layers:
        weight = layer.dequantized_weight().to(dtype or layer.compute_dtype)
        linear = Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                        device="meta", dtype=weight.dtype)
        # The layer was built on meta (no memory), so assigning the weight allocates nothing twice.
        linear.weight = nn.Parameter(weight)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.to(weight.dtype))
        _set_submodule(model, name, linear)
    return model


def untie_in_config(model: nn.Module) -> None:
    """Record that ``model``'s output head no longer shares the token embedding's weight:
    ``model.cfg.tie_weights`` becomes False (on a copy of the config, which other models may
    share), so saving writes the head's own matrix."""
    cfg = getattr(model, "cfg", None)
    if dataclasses.is_dataclass(cfg) and getattr(cfg, "tie_weights", False):
        model.cfg = dataclasses.replace(cfg, tie_weights=False)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is a quantized linear layer."""
    return any(isinstance(m, QUANTIZED_LAYERS) for m in model.modules())


def quantization_of(model: nn.Module) -> dict[str, Any] | None:
    """The quantization settings of ``model`` (what a saved quantized model records), or None.

    ``{"scheme", "block_size", "scale_block_size", "compute_dtype", "modules"}``; the block sizes
    are None for int8. Raises ValueError for a model whose layers use different settings.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)}
    if not layers:
        return None
    settings = {(m.scheme, getattr(m, "block_size", None), getattr(m, "scale_block_size", None),
                 str(m.compute_dtype).removeprefix("torch.")) for m in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"the quantized layers of this model use different settings {sorted(settings)}")
    scheme, block_size, scale_block_size, compute_dtype = settings.pop()
    return {"scheme": scheme, "block_size": block_size, "scale_block_size": scale_block_size,
            "compute_dtype": compute_dtype, "modules": list(layers)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weight matrices of ``model``'s linear layers, as stored: float ``nn.Linear``
    weights and quantized layers' packed values and scales (biases left out; a shared weight once)."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        if isinstance(m, QUANTIZED_LAYERS):
            total += m.quantized_bytes()
        elif isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.nbytes
    return total
