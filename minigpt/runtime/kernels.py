"""Which library computes each matrix product: both are timed here, on this machine, once.

The one idea: the same product ``x @ W.T`` runs at very different speeds depending on whose
kernel computes it, and which is faster depends on the CPU, so no constant can decide it.
``F.linear`` calls the BLAS PyTorch was built with (Intel MKL in the pip wheels, which picks
its code path by vendor: half speed on some AMD CPUs, ahead of oneDNN on some Intel ones);
oneDNN's inner product (``torch.ops.mkldnn``) picks its kernels by instruction set.

Batch-1 decoding makes the difference large: a matrix-vector product does 2 FLOPs per weight
it reads, far below what the cores could compute meanwhile, so its speed is the rate at
which the kernel reads memory (GB/s). With many rows (prefill, training) each weight is
reused for every row, the product is bound by arithmetic instead, and another kernel may win.

So a :class:`Product` (which product of a linear layer: the forward or one of the backward;
its rows, bucketed to a power of two; sizes; dtype) has both kernels timed on tensors of
its shape the first time it is met, the faster is kept, and the table is saved under the
cache directory (:mod:`minigpt.io.files`) in a file named after this machine: CPU model,
instruction set, torch version, thread count. The next process reads the choice instead of
measuring: the same kernel, hence the same summation order and results, on one machine.

``MINIGPT_LINEAR_KERNEL=f_linear`` or ``=onednn`` forces one kernel for every product (for
tests, and for comparing results bit for bit); unset or ``measure``, the table decides.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from minigpt.io.files import CACHE_DIR_ENV, cache_dir, write_json

KERNEL_ENV = "MINIGPT_LINEAR_KERNEL"
KERNELS: tuple[str, ...] = ("f_linear", "onednn")
OPS: tuple[str, ...] = ("forward", "grad_input", "grad_weight")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Rows beyond this bucket are timed at it: by then each weight is reused so often that the
# product is bound by arithmetic, and timing a (rows x 50,257) head at 4,096 rows would take seconds.
MAX_TIMED_ROWS = 256
# A timed weight is read from copies filling this many bytes, more than a CPU's caches hold: a
# (768 x 768) float32 weight (2.4 MB) timed alone would stay in the cache and read far faster
# than a model's 500 MB of weights stream from memory when decoding.
STREAM_BYTES = 2**27
HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Product(NamedTuple):
    """One matrix product of a linear layer with an ``(out_features, in_features)`` weight.

    ``rows`` is the number of token vectors (bucketed by :func:`row_bucket`):

    * ``forward``: ``(rows, in) @ W.T -> (rows, out)``;
    * ``grad_input``: ``(rows, out) @ W -> (rows, in)``, the gradient for the layer's input;
    * ``grad_weight``: ``(rows, out).T @ (rows, in) -> (out, in)``, the gradient for ``W``;
    * ``int8``, ``int4``: the forward of a weight stored in 8 or 4 bits (:mod:`minigpt.quantization.weight_only`),
      with ``dtype`` the activations'.

    A named tuple, not a dataclass: every product of every layer builds one to look its kernel
    up, and a tuple is built and hashed several times faster.
    """

    op: str
    rows: int
    in_features: int
    out_features: int
    dtype: str = "float32"

    @property
    def key(self) -> str:
        """How the table names it: ``"forward float32 1x768->3072"``."""
        return f"{self.op} {self.dtype} {self.rows}x{self.in_features}->{self.out_features}"

    @classmethod
    def from_key(cls, key: str) -> Product:
        op, dtype, shape = key.split()
        rows, in_features, out_features = map(int, shape.replace("->", "x").split("x"))
        return cls(op, rows, in_features, out_features, dtype)

    @property
    def flops(self) -> int:
        """FLOPs of one timed call: rows beyond MAX_TIMED_ROWS are timed at that many."""
        return 2 * min(self.rows, MAX_TIMED_ROWS) * self.in_features * self.out_features

    @property
    def weight_bytes(self) -> float:
        """Bytes of the stored weight (its scales left out): 1 a weight in int8, half in int4."""
        itemsize = {"int8": 1, "int4": 0.5}.get(self.op, DTYPES[self.dtype].itemsize)
        return self.in_features * self.out_features * itemsize


def row_bucket(rows: int) -> int:
    """The power of two at or above ``rows``: products of 33 to 64 rows share one measurement."""
    return 1 << max(rows - 1, 0).bit_length()


# ------------------------------------------------------------------------------ the kernels


def onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN's inner product: ``(..., in) -> (..., out)``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # "none": no fused activation


def forward(kernel: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``(..., in) -> (..., out)`` by ``kernel``."""
    return onednn_product(x, weight, bias) if kernel == "onednn" else F.linear(x, weight, bias)


def grad_input(kernel: str, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad @ W``: ``(..., out) -> (..., in)``. It is a linear layer too, whose weight is ``W.T``."""
    return onednn_product(grad, weight.t()) if kernel == "onednn" else grad @ weight


def grad_weight(kernel: str, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad.T @ x``: ``(rows, out), (rows, in) -> (out, in)``."""
    if kernel != "onednn":
        return grad.t() @ x
    if grad.shape[1] > x.shape[1]:  # oneDNN runs faster with the larger operand as its weight
        return onednn_product(x.t(), grad.t()).t()
    return onednn_product(grad.t(), x.t())


def copies_beyond_the_caches(nbytes: int) -> int:
    """How many copies of a weight of ``nbytes`` fill STREAM_BYTES (at least 1, at most 64)."""
    return max(1, min(STREAM_BYTES // max(nbytes, 1), 64))


def in_turn(items: list[Any]) -> Callable[[], Any]:
    """A function returning ``items`` one after the other, round and round."""
    turn = itertools.cycle(items)
    return lambda: next(turn)


def streamed(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A function returning copies of ``tensor`` in turn, as many as fill STREAM_BYTES: each call
    then reads a weight that is not in the caches, as a decoding step reads each layer's weight."""
    return in_turn([tensor] + [tensor.clone() for _ in range(copies_beyond_the_caches(tensor.nbytes) - 1)])


def float_runners(product: Product) -> dict[str, Callable[[], torch.Tensor]]:
    """A call of each kernel on random tensors of ``product``'s shape (rows capped at MAX_TIMED_ROWS)."""
    dtype = DTYPES[product.dtype]
    rows = min(product.rows, MAX_TIMED_ROWS)
    weight = streamed(torch.randn(product.out_features, product.in_features, dtype=dtype))
    x = torch.randn(rows, product.in_features, dtype=dtype)
    grad = torch.randn(rows, product.out_features, dtype=dtype)
    calls = {"forward": lambda kernel: lambda: forward(kernel, x, weight(), None),
             "grad_input": lambda kernel: lambda: grad_input(kernel, grad, weight()),
             "grad_weight": lambda kernel: lambda: grad_weight(kernel, grad, x)}
    return {kernel: calls[product.op](kernel) for kernel in KERNELS if HAS_ONEDNN or kernel == "f_linear"}


# Each kind of product and how to time its candidate kernels; minigpt.quantization.weight_only adds "int8" and "int4".
RUNNERS: dict[str, Callable[[Product], dict[str, Callable[[], torch.Tensor]]]] = dict.fromkeys(OPS, float_runners)


def measure(product: Product, budget_s: float = 0.05, repeats: tuple[int, int] = (5, 50)) -> dict[str, float]:
    """Seconds per call of each candidate kernel on ``product`` (rows capped at MAX_TIMED_ROWS).

    The kernels take turns, after a warm-up call each, for ``repeats[0]`` rounds and then until
    each has run ``budget_s`` or ``repeats[1]`` rounds, and each keeps its fastest run: other
    programs on the machine only ever add time (a thread that waits for a busy core can lose
    a whole scheduling slice, milliseconds), never remove it.
    """
    runs = RUNNERS[product.op](product)
    times: dict[str, list[float]] = {kernel: [] for kernel in runs}
    with torch.no_grad():
        for run in runs.values():
            run()
        for round_ in range(repeats[1]):
            if round_ >= repeats[0] and min(sum(t) for t in times.values()) >= budget_s:
                break
            for kernel, run in runs.items():
                start = time.perf_counter()
                run()
                times[kernel].append(time.perf_counter() - start)
    return {kernel: min(t) for kernel, t in times.items()}


# ------------------------------------------------------------------------------- the machine


@cache
def cpu_model() -> str:
    """The CPU's name as the operating system reports it, with its family and model numbers."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        return platform.processor() or platform.machine()
    info = {}
    for name, _, value in (line.partition(":") for line in reversed(lines)):  # reversed: the first CPU's wins
        info[name.strip()] = value.strip()
    family = info.get("cpu family", "?")
    model = info.get("model", "?")
    return f"{info.get('model name', platform.machine())} (family {family} model {model})"


@cache
def instruction_set() -> str:
    """The vector instructions torch uses here, and whether bfloat16 is native (AVX512-BF16, AMX)."""
    flags = [torch.backends.cpu.get_cpu_capability()]
    if torch.cpu._is_avx512_bf16_supported():
        flags.append("AVX512-BF16")
    if torch.cpu._is_amx_tile_supported():
        flags.append("AMX")
    return " ".join(flags)


def machine() -> dict[str, str | int]:
    """What the table is keyed by: a change in any of these measures the kernels again."""
    return {"cpu": cpu_model(), "isa": instruction_set(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def table_path(machine_key: dict[str, str | int] | None = None) -> Path:
    """The table's file: ``<cache>/kernels/<hash of the machine>.json``."""
    name = hashlib.sha256(json.dumps(machine_key or machine(), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"{name}.json"


# --------------------------------------------------------------------------------- the table


def forced_kernel() -> str | None:
    """The kernel ``MINIGPT_LINEAR_KERNEL`` forces, or None where the measured table decides."""
    return _forced(os.environ.get(KERNEL_ENV, ""))


@cache  # read at every product: the variable's text is parsed once
def _forced(value: str) -> str | None:
    value = value.strip()
    if value in ("", "measure"):
        return None
    if value not in KERNELS:
        raise ValueError(f"{KERNEL_ENV}={value!r} is not a kernel: set it to one of {', '.join(KERNELS)}, "
                         "or to 'measure' (or unset it) to time both on this machine")
    if value == "onednn" and not HAS_ONEDNN:
        raise ValueError(f"{KERNEL_ENV}=onednn, but this PyTorch has no oneDNN: set it to f_linear or unset it")
    return value


class KernelTable:
    """The measured seconds of each kernel per :class:`Product`, saved in :func:`table_path`."""

    def __init__(self, path: Path, machine_key: dict[str, str | int]) -> None:
        self.path = path  # where it is saved, and what it was measured on
        self.machine = machine_key
        self.seconds: dict[str, dict[str, float]] = self._read()
        self._choices: dict[Product, str] = {}  # what choose() answered: a dictionary lookup per product

    def _read(self) -> dict[str, dict[str, float]]:
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: measure again and overwrite it
            return {}
        return saved.get("seconds", {}) if saved.get("machine") == self.machine else {}

    def timing(self, product: Product) -> dict[str, float]:
        """Seconds per call of each kernel on ``product``: from the table, or measured now and saved."""
        if product.key not in self.seconds:
            measured = measure(product)
            self.seconds = {**self._read(), **self.seconds, product.key: measured}  # keep other processes' rows
            write_json(self.path, {"machine": self.machine, "seconds": self.seconds})
        return self.seconds[product.key]

    def choose(self, product: Product) -> str:
        """The faster kernel for ``product``."""
        if product not in self._choices:
            timing = self.timing(product)
            self._choices[product] = min(timing, key=timing.__getitem__)
        return self._choices[product]

    def rows(self) -> list[tuple[Product, dict[str, float]]]:
        """Every measured product with its timings, in a stable order."""
        order = {op: i for i, op in enumerate(OPS)}
        products = sorted((Product.from_key(k) for k in self.seconds),
                          key=lambda p: (p.dtype, order.get(p.op, 9), p.rows, p.in_features, p.out_features))
        return [(p, self.seconds[p.key]) for p in products]


_TABLES: dict[tuple[str | None, int], KernelTable] = {}


def kernel_table() -> KernelTable:
    """This machine's table (one per cache folder and thread count, read from disk once)."""
    # Keyed by the variable's text, not the folder's path: every product asks, and resolving
    # a path (the home folder, ~) would cost more than a small product itself.
    where = (os.environ.get(CACHE_DIR_ENV), torch.get_num_threads())
    if where not in _TABLES:
        _TABLES[where] = KernelTable(table_path(machine()), machine())
    return _TABLES[where]


def choose(product: Product) -> str:
    """The kernel that computes ``product``: the faster one measured here, unless the environment
    forces one (a forced float kernel makes quantized layers dequantize, the reference path)."""
    if forced := forced_kernel():
        return forced if product.op in OPS else "dequantize"
    return kernel_table().choose(product)

