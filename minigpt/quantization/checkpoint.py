"""Quantized checkpoints: what ``config.json`` says about a quantized model, and its layers rebuilt.

The one idea: a quantized layer's packed bytes and scales are plain tensors, so they save
in ``model.safetensors`` like any others; what the file cannot say is how to read them.
That goes into ``config.json`` as a ``quantization`` entry::

    "quantization": {"scheme": "nf4-dq", "block_size": 64, "scale_block_size": 256,
                     "compute_dtype": "float32",
                     "layers": {"trf_blocks.0.att.W_query": [768, 768], ...}}   # (out, in)

Loading builds the model on the ``meta`` device (shapes, no memory), puts a quantized layer
of the recorded shape in place of each listed linear, checks every tensor of the file
against that skeleton (name, shape, dtype), and then assigns the file's tensors.
:mod:`minigpt.models.gpt2.weights` does the reading and writing; this module knows the entry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from minigpt.io.state_dict import tensor_mismatches
from minigpt.quantization.layers import QUANTIZED_LAYERS, Linear4bit, Linear8bit, LinearInt4
from minigpt.quantization.model import quantization_of, quantize_model, tied_weights
from minigpt.quantization.schemes import check_scheme

logger = logging.getLogger(__name__)

QUANTIZATION_KEY = "quantization"  # config.json's entry describing a quantized model's layers


def quantization_entry(model: nn.Module) -> dict[str, Any] | None:
    """The ``quantization`` entry of ``model``'s ``config.json``, or None for a model
    that is not quantized: the settings (scheme, block sizes, compute dtype) and the
    ``[out_features, in_features]`` of every quantized layer, by name."""
    settings = quantization_of(model)
    if settings is None:
        return None
    layers = {name: [m.out_features, m.in_features] for name, m in model.named_modules()
              if isinstance(m, QUANTIZED_LAYERS)}
    return {**{k: v for k, v in settings.items() if k != "modules"}, "layers": layers}


def quantize_loaded(model: nn.Module, scheme: str, source: str) -> None:
    """Quantize a freshly loaded ``model`` in place with ``scheme``, unless the checkpoint
    was saved quantized with that very scheme (another one is refused)."""
    saved = quantization_of(model)
    if saved is None:
        quantize_model(model, scheme)  # one linear at a time: never a second float copy
        quantized = sum(m.quantized_bytes() for m in model.modules() if isinstance(m, QUANTIZED_LAYERS))
        logger.info("%s: linear layers quantized to %s while loading (%.1f MB)", source, scheme, quantized / 2**20)
    elif saved["scheme"] != scheme:
        raise ValueError(f"{source} holds a model quantized with {saved['scheme']}, not {scheme}: load it with "
                         f"quantize={saved['scheme']!r} or without quantize, or quantize the full-precision "
                         "checkpoint it came from")


def quantize_skeleton(model: nn.Module, entry: Mapping[str, Any], source: str) -> None:
    """Replace each linear the ``entry`` lists by an empty quantized layer of the recorded
    shape and settings, in place; on a model built on ``meta`` (under ``torch.device("meta")``)
    the new buffers take no memory either, until the file's tensors are assigned."""
    try:
        scheme = check_scheme(entry["scheme"])
        layers = dict(entry["layers"])
        dtype = getattr(torch, entry["compute_dtype"])
        if scheme == "int8":
            blocks = {}
        elif scheme == "int4":
            blocks = {"block_size": int(entry["block_size"])}
        else:
            blocks = {"block_size": int(entry["block_size"]), "scale_block_size": int(entry["scale_block_size"]),
                      "double_quant": scheme == "nf4-dq"}
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise ValueError(f"{source}: its {QUANTIZATION_KEY} entry is damaged ({err!r}); save the model again") from err
    layer_type = {"int8": Linear8bit, "int4": LinearInt4}.get(scheme, Linear4bit)
    ties = tied_weights(model)
    for name, shape in layers.items():
        linear = _linear(model, name, source)
        if [linear.out_features, linear.in_features] != list(shape):
            raise ValueError(f"{source}: layer {name} is ({linear.out_features}, {linear.in_features}) by its "
                             f"config but {tuple(shape)} by its {QUANTIZATION_KEY} entry")
        quantized = layer_type(linear.in_features, linear.out_features, linear.bias is not None,
                               compute_dtype=dtype, **blocks)
        quantized.tied_to = ties.get(name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized)


def _linear(model: nn.Module, name: str, source: str) -> nn.Linear:
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        linear = None
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"{source}: its {QUANTIZATION_KEY} entry lists {name!r}, which is no linear layer "
                         "of the model its config describes")
    return linear


def tensor_problems(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> list[str]:
    """What is wrong with ``found`` against the (meta) tensors of a quantized model: missing,
    unexpected or misshapen tensors, and any whose dtype differs (packed codes are integers,
    scales float32: one dtype for all cannot be asked here)."""
    problems = tensor_mismatches({k: tuple(v.shape) for k, v in expected.items()}, found)
    return problems + [f"{k} is {found[k].dtype}, not {t.dtype}" for k, t in expected.items()
                       if k in found and found[k].dtype != t.dtype]
