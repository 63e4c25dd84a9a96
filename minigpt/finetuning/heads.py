"""A new output head on a language model, read at the last real token: the surgery behind a classifier
and a reward model, and how such a model is saved and loaded back.

The one idea: a causal LM's last position has read the whole text, so its hidden state is a summary of
it; swapping the vocabulary-sized head for one with a row per class (or one row, a reward) turns the
language model into a scorer of texts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from minigpt.io.state_dict import tensor_mismatches
from minigpt.io.weight_files import CONFIG_FILE, read_config_json, stored_once, write_checkpoint
from minigpt.models.base import CausalLM
from minigpt.models.registry import family_of, family_of_config
from minigpt.runtime.linear import Linear
from minigpt.training.checkpoint import load_state


def replace_head(model: CausalLM, out_features: int) -> CausalLM:
    """Give ``model`` (in place) a fresh output head ``Linear(emb_dim, out_features)``, on the
    embedding's device and dtype; a tied head is simply replaced (``cfg.tie_weights`` becomes
    False in a copy of the config). A classifier has a row per class, a reward model one."""
    # A fresh head: the vocabulary rows of the old one say nothing about the classes.
    head = Linear(model.cfg.emb_dim, out_features)
    # A new module unties a tied head: tok_emb keeps its matrix, the head gets its own weights.
    model.out_head = head.to(device=model.tok_emb.weight.device, dtype=model.tok_emb.weight.dtype)
    if model.cfg.tie_weights:
        model.cfg = dataclasses.replace(model.cfg, tie_weights=False)  # a copy: others may share the config
    return model


def set_trainable(model: nn.Module, trainable: Sequence[str] | Literal["all"]) -> None:
    """Freeze every parameter of ``model``, then unfreeze the named submodules (or ``"all"``)."""
    if trainable == "all":
        model.requires_grad_(True)
        return
    if isinstance(trainable, str):
        raise TypeError(f"trainable must be a list of module names or 'all', not the string {trainable!r}")
    modules = [submodule(model, name) for name in trainable]
    # Freeze everything first, then unfreeze the chosen parts (the new head among them).
    model.requires_grad_(False)
    for module in modules:
        module.requires_grad_(True)


def submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``, where a negative number indexes from the end."""
    module = model
    for part in name.split("."):
        # Indexing the container (not get_submodule) is what lets "-1" mean the last block.
        if part.lstrip("-").isdigit() and isinstance(module, (nn.Sequential, nn.ModuleList)):
            if not -len(module) <= int(part) < len(module):
                raise ValueError(f"{name!r}: index {part} is out of range for {len(module)} modules")
            module = module[int(part)]
        elif part in module._modules:
            module = module._modules[part]
        else:
            children = [child for child, _ in model.named_children()]
            raise ValueError(f"the model has no submodule {name!r}; its top-level modules are {children}")
    return module


def last_token_logits(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``(batch, tokens, classes)`` logits and ``(batch,)`` real lengths -> ``(batch, classes)``:
    the scores at position ``length - 1`` of each sequence, its last real token."""
    if lengths.min() < 1 or lengths.max() > logits.shape[1]:
        raise ValueError(f"lengths must be in [1, {logits.shape[1]}], got {lengths.tolist()}")
    # The last-real-token read: row i at position lengths[i] - 1, the one position whose causal
    # attention saw the whole text. Advanced indexing with two (batch,) index tensors -> (batch, classes).
    return logits[torch.arange(logits.shape[0], device=logits.device), lengths.to(logits.device) - 1]


def save_with_head(model: CausalLM, directory: str | os.PathLike) -> None:
    """Write a model whose head was replaced: its family's config and every tensor under our names
    (a Hugging Face layout has no place for a head of another shape), each file atomically."""
    write_checkpoint(directory, stored_once(model.state_dict()), family_of(model).checkpoint_config(model))


def load_with_head(directory: str | os.PathLike, out_features: int, what: str) -> CausalLM:
    """A model of any family saved by :func:`save_with_head` with a head of ``out_features`` rows,
    in its saved precision. The tensors are read by the checked loader; a mismatch names each
    tensor and says the directory does not hold ``what``."""
    directory = Path(directory)
    family = family_of_config(read_config_json(directory), str(directory / CONFIG_FILE))
    cfg = family.read_config(directory)
    state = load_state(directory)
    # Built with random weights and the saved head's shape, then overwritten by the file's tensors.
    model = replace_head(family.model_class(cfg), out_features)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    # Names and shapes are checked first, so an error names each tensor instead of failing inside
    # load_state_dict.
    problems = tensor_mismatches(expected, state)
    if problems:
        raise ValueError(f"{directory} does not hold {what} and its config ({cfg}): " + ", ".join(problems))
    # (load_state_dict copies into the existing tensors and would cast to their dtype otherwise.)
    model.to(next(iter(state.values())).dtype)  # keep the saved precision
    model.load_state_dict(state)
    return model
