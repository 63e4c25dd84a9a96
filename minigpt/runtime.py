"""Where and in what precision the model runs, and the random state a run depends on.

The one idea: the same code runs on a laptop CPU, an Apple GPU or a CUDA GPU, and what
changes between them is chosen here, in one place:

* :func:`select_device`: the device to run on (the best available one by default);
* :func:`resolve_precision`, :func:`autocast`, :func:`grad_scaler`: mixed precision.
  Matrix products may run in bfloat16 or float16 while weights, gradients and the
  optimizer stay float32. :func:`default_precision` is float32 on a CPU, so that a run
  repeats bit for bit on every CPU, whatever its instruction set; ``"auto"`` (bfloat16
  where the hardware computes it natively) is an explicit choice there;
* :func:`rng_state`, :func:`set_rng_state`: every random generator a run draws from,
  captured and restored, so that a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import random
import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch

PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def select_device(name: str | torch.device | None = None) -> torch.device:
    """The device called ``name`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``), or the
    best available one: a CUDA GPU, then Apple's MPS, then the CPU."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for, but PyTorch sees no CUDA GPU")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} was asked for, but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# --------------------------------------------------------------------------- precision


def has_fast_bfloat16(device: torch.device | str) -> bool:
    """Whether the hardware computes in bfloat16 natively (CUDA since Ampere; CPUs with
    AVX-512-BF16 or AMX). Elsewhere bfloat16 is emulated and slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"bfloat16"`` where it is fast, else ``"float32"``; checks the others."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bfloat16" if has_fast_bfloat16(device) else "float32"
    if precision == "float16" and device.type != "cuda":
        raise ValueError("float16 training needs CUDA (loss scaling); on this device use bfloat16 or float32")
    if precision == "bfloat16" and not has_fast_bfloat16(device):
        warnings.warn(f"{device.type} has no native bfloat16: it is emulated and slower than float32",
                      stacklevel=2)
    return precision


def default_precision(device: torch.device | str) -> str:
    """The precision to use when none is asked for: ``"float32"`` everywhere but CUDA.

    On a CPU, float32 gives the same numbers, bit for bit, on every CPU: whether it has
    native bfloat16 (AVX-512-BF16, AMX) must not change what a run learns. On a CUDA GPU
    it is what ``"auto"`` resolves to (bfloat16 since Ampere), where the speed-up is large
    and runs are not bit-exact anyway.
    """
    device = torch.device(device)
    return resolve_precision("auto", device) if device.type == "cuda" else "float32"


def autocast(device: torch.device | str, precision: str) -> AbstractContextManager:
    """Context in which matrix products run in ``precision`` (a no-op for float32).

    Weights, gradients and the optimizer stay float32 (mixed precision); only the
    activations are computed in 16 bits.
    """
    if precision == "float32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, precision))


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, active for float16 only: it multiplies the loss so that small
    gradients do not underflow in 16 bits, and skips steps whose gradients overflowed.
    (bfloat16 has float32's exponent range and needs none.)"""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "float16")


# ----------------------------------------------------------------------- random states


def rng_state(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The state of every generator training may draw from: torch (CPU and CUDA),
    Python's ``random`` and NumPy's global generator, as tensors and plain values only
    (so that ``torch.load(weights_only=True)`` reads them back)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": np_state["state"]["pos"],
                  "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
    }
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
