"""LoRA adapter files: only the ``A`` and ``B`` tensors (a few MB), with the settings that made
them, so an adapter loads onto a fresh copy of its base model (``minigpt serve --adapter``,
``minigpt.models.load(spec, adapter=...)``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from minigpt.io.files import atomic_write
from minigpt.io.state_dict import tensor_mismatches
from minigpt.lora.adapters import LoRAReport, base_layer, check_same_lora, lora_layers, lora_report, wrap_layers
from minigpt.lora.targets import LINEAR_LAYERS

logger = logging.getLogger(__name__)

_METADATA_KEY = "minigpt_lora"


def save_lora(model: nn.Module, path: str | os.PathLike, include: Sequence[str] = ()) -> None:
    """Write only the adapter: each LoRA layer's ``A`` and ``B`` and the settings used
    (rank, alpha, dropout, wrapped module names) as one safetensors file, atomically.

    The base weights are not stored, so the adapter must be loaded onto the same base
    model. A part that is *not* in the base checkpoint, such as a freshly initialised
    classification head, must be saved too: name it in ``include`` (e.g.
    ``include=["out_head"]``) and its full weights are stored and restored with the adapter.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to save; call apply_lora(model, ...) first")
    some = next(iter(layers.values()))
    modules = dict(model.named_modules())
    unknown = [name for name in include if name not in modules]
    if unknown:
        raise ValueError(f"include names {unknown} are not modules of the model")
    containing = [name for name in include for layer in layers if layer.startswith(name + ".")]
    if containing:
        raise ValueError(f"include names {sorted(set(containing))} contain LoRA layers; include is for parts "
                         "outside them, such as a new head (a LoRA layer itself may be named)")
    state = {f"{name}.lora.{key}": t for name, w in layers.items() for key, t in w.lora.state_dict().items()}
    state |= {f"{name}.{key}": t for name in include for key, t in base_layer(modules[name]).state_dict().items()}
    # safetensors refuses tensors that share memory (a tied head); copies never do.
    state = {key: tensor.detach().to("cpu", copy=True).contiguous() for key, tensor in state.items()}
    settings = {"rank": some.lora.rank, "alpha": some.lora.alpha, "dropout": some.dropout.p,
                "target_modules": list(layers), "include": list(include)}
    metadata = {"format": "pt", _METADATA_KEY: json.dumps(settings)}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def load_lora(model: nn.Module, path: str | os.PathLike) -> LoRAReport:
    """Load an adapter written by :func:`save_lora` into ``model``.

    On a base model (no LoRA yet) the saved rank, alpha, dropout and target modules are
    applied first, as :func:`apply_lora` would; on a model that already has LoRA layers
    they must be the same. Every tensor's name and shape is checked before the model is
    touched, and a mismatch names each offending tensor. Returns the :class:`LoRAReport`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA adapter file at {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if _METADATA_KEY not in metadata:
        raise ValueError(f"{path} has no LoRA settings in its metadata; was it written by save_lora?")
    settings = json.loads(metadata[_METADATA_KEY])
    rank = settings["rank"]
    alpha = settings["alpha"]
    dropout = settings["dropout"]
    names = settings["target_modules"]
    include = settings["include"]
    existing = lora_layers(model)
    if existing:
        check_same_lora(existing, names, rank, alpha, path)
    _check_adapter_tensors(model, state, names, include, rank, path)
    report = lora_report(model, existing) if existing else wrap_layers(model, names, rank, alpha, dropout)
    targets = {**dict(model.named_buffers()), **dict(model.named_parameters(remove_duplicate=False))}
    with torch.no_grad():
        for key, tensor in state.items():
            # copy_ moves the tensor to the parameter's device and dtype.
            targets[_stored_to_model_key(key, names, include)].copy_(tensor)
    return report


def _stored_to_model_key(key: str, names: Sequence[str], include: Sequence[str]) -> str:
    """The model's state-dict name of a stored tensor: an included wrapped layer's base
    tensors are stored as ``out_head.weight`` but live at ``out_head.linear.weight``."""
    for name in include:
        if name in names and key.startswith(name + ".") and not key.startswith(name + ".lora."):
            return f"{name}.linear.{key[len(name) + 1:]}"
    return key


def _check_adapter_tensors(model: nn.Module, state: dict[str, torch.Tensor], names: Sequence[str],
                           include: Sequence[str], rank: int, path: Path) -> None:
    """Compare the file's tensors with what ``model`` (with or without LoRA) would expect."""
    modules = dict(model.named_modules())
    expected: dict[str, tuple[int, ...]] = {}
    problems = []
    for name in names:
        base = base_layer(modules.get(name))
        if not isinstance(base, LINEAR_LAYERS):
            problems.append(f"the model has no linear layer named {name!r}")
            continue
        expected[f"{name}.lora.A"] = (base.in_features, rank)
        expected[f"{name}.lora.B"] = (rank, base.out_features)
    for name in include:
        base = base_layer(modules.get(name))
        if base is None:
            problems.append(f"the model has no module named {name!r}")
            continue
        for key, tensor in base.state_dict().items():
            expected[f"{name}.{key}"] = tuple(tensor.shape)
    problems += tensor_mismatches(expected, state)
    if problems:
        raise ValueError(f"adapter {path} does not fit this model: " + ", ".join(problems))
