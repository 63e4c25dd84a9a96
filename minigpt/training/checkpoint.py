"""Checkpoints: everything needed to continue a training run as if it never stopped.

The one idea: a resumed run repeats the uninterrupted one exactly only if *every*
source of change is saved: the weights, the optimizer's moment estimates, the step
(which fixes the learning rate), the data loader's place in its shuffled order, and
the random number generators (dropout draws from them).

A run directory holds::

    config.json, model.safetensors   the model (as the model's family writes it): minigpt.models.load(run_dir)
                                     reads a finished run; a classifier's or LoRA's tensors are saved as they are
    training_state.pt                optimizer, loss scaler, step, data position, RNG states
    history.json                     the losses recorded so far
    settings.json                    the run's settings, so that resuming needs no arguments

A checkpoint is saved as a whole or not at all: its files are written into a staging
folder, which one rename commits, and then moved into place. A crash before the
commit leaves the previous checkpoint untouched; a crash after it is completed by the
next :func:`load_checkpoint`. (This protects against the process dying, not against
the machine losing power before the disk cache is flushed.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigpt.io.files import write_json
from minigpt.io.state_dict import tensor_mismatches
from minigpt.io.weight_files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    dtype_problems,
    read_config_json,
    read_safetensors,
    stored_once,
    write_checkpoint,
)
from minigpt.models.registry import family_of
from minigpt.quantization.checkpoint import QUANTIZATION_KEY
from minigpt.runtime.runtime import rng_state, set_rng_state

STATE_FILE = "training_state.pt"
HISTORY_FILE = "history.json"
SETTINGS_FILE = "settings.json"
_STAGING = ".checkpoint-staging"      # being written; ignored and replaced by the next save
_COMMITTED = ".checkpoint-committed"  # complete; moved into place by save or the next load


@dataclass
class TrainingState:
    """Where a checkpointed run stood: ``step`` optimizer steps done, the data loader
    ``batch_in_epoch`` batches into epoch ``epoch``, and the history so far."""

    step: int
    epoch: int
    batch_in_epoch: int
    tokens_seen: int
    history: dict[str, list]


# --------------------------------------------------------------------------- saving


def save_checkpoint(
    run_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    *,
    step: int,
    epoch: int,
    batch_in_epoch: int,
    tokens_seen: int,
    history: dict[str, list],
    rng_states: list[dict[str, Any]] | None = None,
) -> None:
    """Write a complete checkpoint into ``run_dir``, replacing the previous one atomically.

    ``rng_states`` holds one :func:`minigpt.runtime.runtime.rng_state` per process (index = rank);
    by default this process's.
    """
    run_dir = Path(run_dir)
    _finish_commit(run_dir)
    staging = run_dir / _STAGING
    shutil.rmtree(staging, ignore_errors=True)  # left by a save that crashed
    staging.mkdir(parents=True)
    _save_model(model, staging)
    state = {
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "tokens_seen": tokens_seen,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_states if rng_states is not None else [rng_state(model.device)],
    }
    torch.save(state, staging / STATE_FILE)
    write_json(staging / HISTORY_FILE, history, indent=None)
    os.replace(staging, run_dir / _COMMITTED)  # the commit: one rename of a complete folder
    _finish_commit(run_dir)


def _save_model(model: nn.Module, directory: Path) -> None:
    """The model's config as its family writes it, and its tensors under our names: a classifier's
    head, LoRA's tensors and quantized layers are saved as they are. Several models trained as one
    (PPO's policy and value model) save their tensors, named by module."""
    config = family_of(model).checkpoint_config(model) if hasattr(model, "cfg") else {"modules": sorted(model._modules)}
    write_checkpoint(directory, stored_once(model.state_dict()), config)


def _finish_commit(run_dir: Path) -> None:
    """Move a committed checkpoint's files into ``run_dir``. Safe to repeat, and safe
    for several processes at once: each file is moved by exactly one rename."""
    committed = run_dir / _COMMITTED
    if not committed.is_dir():
        return
    for path in sorted(committed.iterdir()):
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.replace(path, run_dir / path.name)
    with contextlib.suppress(FileNotFoundError, OSError):
        committed.rmdir()


# -------------------------------------------------------------------------- loading


def load_checkpoint(
    run_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    *,
    rank: int = 0,
) -> TrainingState:
    """Load the checkpoint in ``run_dir`` into ``model``, ``optimizer`` and ``scaler``,
    restore process ``rank``'s random generators, and return where the run stood."""
    run_dir = Path(run_dir)
    _finish_commit(run_dir)
    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {STATE_FILE}: there is no checkpoint to resume from")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle and zip errors of a damaged file
        raise ValueError(f"{state_path} is corrupt or truncated: {err}") from err

    _load_model(run_dir, model)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])

    rngs = state["rng"]
    if rank >= len(rngs):
        warnings.warn(f"{state_path} was written by {len(rngs)} process(es); process {rank} starts "
                      "from rank 0's random state, so the run will not repeat exactly", stacklevel=2)
    set_rng_state(rngs[min(rank, len(rngs) - 1)])

    history_path = run_dir / HISTORY_FILE
    history = json.loads(history_path.read_text(encoding="utf-8")) if history_path.is_file() else {}
    return TrainingState(step=state["step"], epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"],
                         tokens_seen=state["tokens_seen"], history=history)


def load_state(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a minigpt directory's ``model.safetensors`` (memory-mapped), checked:
    a readable file whose tensors share one dtype (those of quantized layers, which its config
    lists, left out: packed codes are integers). Names and shapes are the caller's to check
    (a classifier's head differs from a language model's)."""
    directory = Path(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_FILE}; is it a directory written by save_pretrained?")
    state = read_safetensors(path)
    config = read_config_json(directory) if (directory / CONFIG_FILE).is_file() else {}
    quantized = tuple(name + "." for name in (config.get(QUANTIZATION_KEY) or {}).get("layers", ()))
    problems = dtype_problems({k: v for k, v in state.items() if not k.startswith(quantized)})
    if problems:
        raise ValueError(f"{path}: " + ", ".join(problems))
    return state


def _load_model(run_dir: Path, model: nn.Module) -> None:
    """Put the checkpoint's tensors into ``model``, whatever was done to it: a classifier's
    smaller head and LoRA's extra tensors load as they were saved, every name and shape checked."""
    # Several models as one have no config of their own: the names and shapes below are the check.
    saved_cfg = family_of(model).read_config(run_dir) if hasattr(model, "cfg") else None
    if saved_cfg is not None and saved_cfg != model.cfg:
        raise ValueError(f"{run_dir} holds a model with {saved_cfg}, but the model to resume is {model.cfg}")
    state = dict(load_state(run_dir))
    expected = model.state_dict()
    # A tensor under several names (a tied head is the embedding) is saved once: fill in the others.
    names_of: dict[tuple, list[str]] = {}
    for name, tensor in expected.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride())) if tensor.numel() else name
        names_of.setdefault(key, []).append(name)
    for names in names_of.values():
        present = [n for n in names if n in state]
        for name in names:
            if present and name not in state:
                state[name] = state[present[0]]
    problems = tensor_mismatches({n: tuple(t.shape) for n, t in expected.items()}, state)
    if problems:
        raise ValueError(f"{run_dir / WEIGHTS_FILE} does not fit the model to resume: " + "; ".join(problems))
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


# ------------------------------------------------------------------ run settings


def save_settings(run_dir: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Keep a run's settings (JSON) in ``run_dir/settings.json``, written atomically."""
    write_json(Path(run_dir) / SETTINGS_FILE, settings)


def load_settings(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The settings :func:`save_settings` kept in ``run_dir``."""
    path = Path(run_dir) / SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: is {run_dir} a run directory written by 'minigpt pretrain'?")
    return json.loads(path.read_text(encoding="utf-8"))

