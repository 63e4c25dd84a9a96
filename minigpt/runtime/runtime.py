"""Where and in what precision the model runs, and the random state a run depends on.

The one idea: the same code runs on a laptop CPU, an Apple GPU or a CUDA GPU, and what
changes between them is chosen here, in one place:

* :func:`select_device`: the device to run on (the best available one by default);
* :func:`resolve_precision`, :func:`autocast`, :func:`grad_scaler`: mixed precision.
  Matrix products may run in bfloat16 or float16 while weights, gradients and the
  optimizer stay float32. :func:`default_precision` is float32 on a CPU, so that a run
  repeats bit for bit on every CPU, whatever its instruction set; ``"auto"`` (bfloat16
  where it is faster: on a CPU, where the hardware computes it natively *and* its
  products were measured faster than float32's, :func:`bfloat16_speedup`)
  is an explicit choice there;
* :func:`compile_model`, :func:`compile_with_loss`: the model (and its loss) through
  ``torch.compile`` (fused kernels, fewer Python calls), or eagerly with a one-line
  warning where compiling fails;
* :func:`rng_state`, :func:`set_rng_state`: every random generator a run draws from,
  captured and restored, so that a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from minigpt.runtime.kernels import MAX_TIMED_ROWS, Product, kernel_table, row_bucket

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
# The seeds torch.manual_seed accepts: a signed or an unsigned 64-bit integer
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


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


# The products of one GPT-2 block (query, key, value and output projections; the feed-forward's two):
# what "is bfloat16 faster here" is asked about, in decoding (one row) and in training (many).
BLOCK_SHAPES: tuple[tuple[int, int], ...] = ((768, 768), (768, 3072), (3072, 768))


def bfloat16_speedup(rows: int) -> float:
    """How many times faster a block's forward products run in bfloat16 than in float32, each
    dtype on its faster kernel, as measured here (rows: 1 for decoding, many for training).
    Above 1 bfloat16 wins on this CPU; native bfloat16 instructions alone do not prove it."""
    table = kernel_table()

    def seconds(dtype: str) -> float:
        return sum(min(table.timing(Product("forward", row_bucket(rows), n_in, n_out, dtype)).values())
                   for n_in, n_out in BLOCK_SHAPES)

    return seconds("float32") / seconds("bfloat16")


def has_fast_bfloat16(device: torch.device | str, rows: int = MAX_TIMED_ROWS) -> bool:
    """Whether bfloat16 products are faster than float32 ones on ``device``: CUDA since Ampere;
    a CPU with AVX-512-BF16 or AMX whose bfloat16 products of ``rows`` rows (1: decoding, many:
    training) were measured faster than its float32 ones. Elsewhere bfloat16 is slower."""
    return no_fast_bfloat16_reason(device, rows) is None


def no_fast_bfloat16_reason(device: torch.device | str, rows: int = MAX_TIMED_ROWS) -> str | None:
    """Why ``"auto"`` stays float32 on ``device`` (``None`` where bfloat16 is faster)."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return None
        return "this GPU has no native bfloat16 (it arrived with Ampere, compute capability 8.0)"
    if device.type == "cpu":
        if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
            return ("this CPU has neither AVX-512-BF16 nor AMX: its bfloat16 matrix products are emulated, "
                    "slower than float32")
        speedup = bfloat16_speedup(rows)  # measured once on this machine, then read from the cache
        if speedup <= 1:
            return (f"this CPU's bfloat16 products of {rows} rows were measured {1 / speedup:.2f}x slower than its "
                    "float32 ones (minigpt info --kernels)")
        return None
    return f"bfloat16 autocast is not used on {device.type}"


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
        warnings.warn(f"bfloat16 asked for on {device.type}, where it is emulated and slower than float32: "
                      f"{no_fast_bfloat16_reason(device)}", stacklevel=2)
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


# ---------------------------------------------------------------------------- compiling


class Wrapper(nn.Module):
    """A module wrapped around another (its submodule ``wrapped``, named by the class): every
    attribute the wrapper lacks is the wrapped module's (``cfg``, ``reset_kv_cache``, ...)."""

    wrapped = ""  # the name of the submodule every other attribute comes from

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name == "_modules":
                raise
            return getattr(self._modules[self.wrapped], name)


class CompiledModel(Wrapper):
    """``model`` called through ``compiled`` (its ``torch.compile``), or eagerly once that failed.

    ``torch.compile`` compiles lazily, at the first call with new input shapes, so a failure
    (no C++ compiler, an operation it cannot trace) shows only then: that call is answered by
    the eager model, one warning says why, and every later call stays eager. Any other
    attribute is the model's own (``cfg``, ``reset_kv_cache``, ``no_sync`` of a DDP wrapper);
    ``train()``/``eval()`` reach it. Save the model itself: this wrapper adds a key prefix.
    """

    wrapped = "eager"

    def __init__(self, model: nn.Module, compiled: nn.Module) -> None:
        super().__init__()
        self.eager = model
        object.__setattr__(self, "compiled", compiled)  # not a submodule: the same weights again
        self.fell_back = False
        self.training = model.training

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.fell_back:
            from torch._dynamo.exc import TorchDynamoException  # loaded by torch.compile already

            try:
                return self.compiled(*args, **kwargs)
            except TorchDynamoException as err:  # compiler errors only: the model's own errors pass
                self.fell_back = True
                _warn_compile_failed(err)
        return self.eager(*args, **kwargs)


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """``model`` through ``torch.compile(model, **options)`` with an eager fallback
    (:class:`CompiledModel`), or ``model`` itself with a one-line warning where
    ``torch.compile`` refuses at once (e.g. a Python version it does not support yet).

    The first call of each new input shape compiles (seconds to minutes on a CPU); later
    calls run the compiled kernels. ``model`` is left as it was, eager: use it for anything
    whose shapes change on every call (token-by-token generation with a growing cache).
    """
    try:
        compiled = torch.compile(model, **options)
    except Exception as err:  # whatever it is, the eager model still works
        _warn_compile_failed(err)
        return model
    return CompiledModel(model, compiled)


class _WithLoss(nn.Module):
    """``loss_fn(model, batch)`` as one module: compiled, the loss joins the model's graph."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Any:
        return self.loss_fn(self.model, batch)


def compile_with_loss(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any],
                      **options: Any) -> Callable[[Any], Any]:
    """``batch -> loss_fn(model, batch)`` compiled as one graph, with :func:`compile_model`'s
    fallback. The loss over the logits (a float32 copy, the softmax, its gradient) is then
    fused with the output head instead of running as separate passes over ``(batch x
    tokens, vocab)`` tensors: for a small model with GPT-2's 50,257-token vocabulary, most
    of a step. A model wrapped in ``DistributedDataParallel`` is compiled alone (its
    gradient hooks split the graph anyway); the loss then runs eagerly."""
    if isinstance(model, DistributedDataParallel):
        return partial(loss_fn, compile_model(model, **options))
    return compile_model(_WithLoss(model, loss_fn), **options)


def _warn_compile_failed(err: BaseException) -> None:
    message = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    warnings.warn(f"torch.compile failed ({type(err).__name__}: {message}); running the model "
                  "eagerly (uncompiled) instead", stacklevel=3)


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
