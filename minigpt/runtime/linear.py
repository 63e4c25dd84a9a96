"""The linear layer of every model here: ``nn.Linear`` whose CPU products run on the kernel measured fastest.

The one idea: the same float32 (or bfloat16) arithmetic can run at very different speeds
depending on which library's kernel computes it, and the faster one differs from CPU to
CPU. :mod:`minigpt.runtime.kernels` times ``F.linear`` (the BLAS) against oneDNN's inner product
for each product shape on the machine that runs it, once, and keeps the faster; this module
routes every product through that choice: the forward and both products of the backward,
each chosen on its own.

Only the order of the additions differs between the kernels, so results agree with
``F.linear`` to about 1e-6 relative in float32, as any two BLAS libraries do; on one machine
the choice is read back from the cache, so the same kernel, hence the same numbers, come out
of every run.

``linear(x, weight, bias)`` is ``F.linear`` with that routing; :class:`Linear` is an
``nn.Linear`` calling it, so state dicts, ``isinstance`` checks, LoRA and quantization see
an ordinary ``nn.Linear``. Under CPU autocast the product runs in the autocast dtype, as
``F.linear`` would. Everything else goes to ``F.linear`` unchanged: CUDA, other dtypes,
weights that are not dense, sizes that do not fit (``F.linear`` names them in its error),
and ``torch.backends.mkldnn.enabled = False``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minigpt.runtime import kernels
from minigpt.runtime.kernels import Product, row_bucket

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def product_dtype(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.dtype | None:
    """The dtype :func:`linear` computes this product in when it routes it by the kernel table
    (float32 or bfloat16 CPU tensors of sizes that fit, a dense weight, oneDNN enabled), or None
    where it goes to ``F.linear`` unchanged."""
    # Every product of every layer asks, so the checks are plain and cheap (no generators).
    if not (kernels.HAS_ONEDNN and torch.backends.mkldnn.enabled):
        return None
    autocast = torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
    if dtype not in _DTYPE_NAMES:
        return None
    for t in (x, weight, bias):
        if t is not None and not (t.is_cpu and t.layout == torch.strided and t.is_floating_point()
                                  and (autocast or t.dtype == dtype)):
            return None
    fits = (
        # Sizes that do not fit go to F.linear, whose error names the shapes (oneDNN's names none).
        weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[1] and x.numel() > 0
        and (bias is None or bias.shape == weight.shape[:1])
        # (out, in) or its transpose, densely: other strides (the query, key and value thirds of
        # Hugging Face GPT-2's fused c_attn) would take oneDNN's reference kernel, 100x slower.
        and (weight.is_contiguous() or weight.t().is_contiguous())
    )
    return dtype if fits else None


def _product(op: str, rows: int, weight: torch.Tensor) -> Product:
    return Product(op, row_bucket(rows), weight.shape[1], weight.shape[0], _DTYPE_NAMES[weight.dtype])


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    kernel = kernels.choose(_product("forward", _rows(x), weight))
    return kernels.forward(kernel, x, weight, bias)


# A custom operator around the chosen kernels, so that torch.compile keeps it in its graph
# (through the shape function below) and autograd differentiates it (through the backward below).
@torch.library.custom_op("minigpt::linear", mutates_args=())
def measured_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` by the kernel measured fastest for its shape: ``(..., in) -> (..., out)``."""
    return _forward(x, weight, bias)


@measured_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("minigpt::linear_grad_input", mutates_args=())
def linear_grad_input(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad @ weight``: ``(..., out) -> (..., in)``, by the kernel measured fastest."""
    kernel = kernels.choose(_product("grad_input", _rows(grad), weight))
    return kernels.grad_input(kernel, grad, weight)


@linear_grad_input.register_fake
def _(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return grad.new_empty((*grad.shape[:-1], weight.shape[1]))


@torch.library.custom_op("minigpt::linear_grad_weight", mutates_args=())
def linear_grad_weight(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad.T @ x``: ``(rows, out), (rows, in) -> (out, in)``, by the kernel measured fastest."""
    product = Product("grad_weight", row_bucket(grad.shape[0]), x.shape[1], grad.shape[1],
                      _DTYPE_NAMES[grad.dtype])
    return kernels.grad_weight(kernels.choose(product), grad, x)


@linear_grad_weight.register_fake
def _(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return grad.new_empty((grad.shape[1], x.shape[1]))


def input_gradient(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad @ weight``, the gradient of ``linear(x, weight)`` for ``x``: ``(..., out) -> (..., in)``,
    by the kernel measured fastest where :func:`product_dtype` allows (it is ``linear(grad, weight.T)``)."""
    if product_dtype(grad, weight.t()) is None:
        return grad @ weight
    return linear_grad_input(grad, weight)


def weight_gradient(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad.T @ x``, the gradient of ``linear(x, weight)`` for ``weight``: ``(rows, out), (rows, in)
    -> (out, in)``, by the kernel measured fastest where :func:`product_dtype` allows."""
    if product_dtype(grad.t(), x.t()) is None:
        return grad.t() @ x
    return linear_grad_weight(grad, x)


def _save_for_backward(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    grad = grad.contiguous()  # e.g. the gradient of a sum arrives expanded, with stride 0
    grad_x = grad_w = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = linear_grad_input(grad, weight)  # (..., out) @ (out, in)
    rows = grad.reshape(-1, grad.shape[-1])  # (rows, out)
    if ctx.needs_input_grad[1]:
        grad_w = linear_grad_weight(rows, x.reshape(-1, x.shape[-1]))  # (out, rows) @ (rows, in)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = rows.sum(0)
    return grad_x, grad_w, grad_bias


measured_linear.register_autograd(_backward, setup_context=_save_for_backward)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``(..., in) -> (..., out)`` with ``weight: (out, in)``,
    each product (forward, and both of the backward) by the kernel measured fastest for its shape
    where :func:`product_dtype` allows, with the same gradients."""
    dtype = product_dtype(x, weight, bias)
    if dtype is None:
        return F.linear(x, weight, bias)
    if torch.is_autocast_enabled("cpu"):  # what autocast would do to F.linear: compute in its dtype
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))):
        return measured_linear(x, weight, bias)
    # Inference calls the kernel itself: the operator's dispatch through Python costs ~15 % of a decoding step.
    return _forward(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear`: same parameters, same state dict, same results
    to float32 rounding; as fast as the faster of the BLAS and oneDNN on every CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
