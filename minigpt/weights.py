"""Saving and loading model weights.

minigpt's own format is a directory with ``config.json`` (the :class:`GPTConfig`)
and ``model.safetensors`` (the state dict). safetensors files hold only tensors,
so loading one can never run code, and they can be memory-mapped: the model is
built on the ``meta`` device (no memory) and each tensor is assigned straight
from the file, so loading never holds two copies of the weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minigpt.attention import CausalAttention, MultiHeadAttention
from minigpt.config import GPTConfig
from minigpt.model import GPTModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one rename.

    A crash mid-write leaves the old file (or none), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pretrained(model: GPTModel, directory: str | os.PathLike) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``directory``."""
    directory = Path(directory)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_weights:
        # The head is the embedding matrix itself; safetensors stores each tensor once.
        state.pop("out_head.weight", None)
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    config_text = json.dumps(model.cfg.to_dict(), indent=2)
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(config_text))


def load_pretrained(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> GPTModel:
    """Load a minigpt weights directory (``config.json`` + ``model.safetensors``)."""
    directory = Path(name_or_path)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; is it a minigpt weights directory?")
    try:
        cfg = GPTConfig.from_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{config_path} is not a valid minigpt config: {err}") from err
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_FILE}")
    try:
        with safe_open(weights_path, framework="pt", device=str(device)) as f:
            state = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{weights_path} is corrupt or truncated: {err}") from err
    return build_model(cfg, state, source=str(weights_path), device=device)


def build_model(
    cfg: GPTConfig, state: Mapping[str, torch.Tensor], source: str, device: str | torch.device = "cpu"
) -> GPTModel:
    """A :class:`GPTModel` whose parameters *are* the given tensors (no copy).

    Every expected tensor must be present with the right shape; the error names
    the file and each offending tensor.
    """
    with torch.device("meta"):
        model = GPTModel(cfg)
    expected = model.state_dict()
    if cfg.tie_weights:
        expected.pop("out_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k}: file has {tuple(state[k].shape)}, model expects {tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if wrong_shape:
        problems.append("tensors of the wrong shape: " + "; ".join(wrong_shape))
    if problems:
        raise ValueError(
            f"{source} does not match its config ({cfg}): " + ", ".join(problems)
        )
    model.load_state_dict(dict(state), strict=not cfg.tie_weights, assign=True)
    if cfg.tie_weights:
        model.out_head.weight = model.tok_emb.weight  # assign replaced the shared Parameter
    _materialize_masks(model, device)
    return model


def _materialize_masks(model: GPTModel, device: str | torch.device) -> None:
    # Causal masks are buffers that are not saved: recreate the ones left on meta.
    for module in model.modules():
        if isinstance(module, (MultiHeadAttention, CausalAttention)):
            n = module.mask.shape[0]
            module.mask = torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), 1)
