"""The linear layer of every model here: ``nn.Linear`` whose float32 CPU products run on oneDNN.

The one idea: the same float32 arithmetic can run at very different speeds depending on
which library's kernel computes it. PyTorch's float32 ``F.linear`` on a CPU calls the BLAS
it was built with (Intel MKL in the pip wheels), which on AMD processors reaches about half
of the float32 peak (it picks its code path by vendor). oneDNN, which PyTorch ships too, picks
its kernels by instruction set alone. On the 2-core AMD EPYC (AVX-512) the benchmarks ran on,
oneDNN is 1.7-2.9x faster at gpt2-small's shapes: a batch-1 decoding step reads the weights
at about 34 GB/s instead of 18, and a training step's matrix products run about 1.5x faster,
backward included.

It stays float32: only the order of the additions differs, so results agree with
``F.linear`` to about 1e-6 relative, as any two BLAS libraries do. No lower precision is
used anywhere (that is bfloat16 autocast's job, and it is opt-in).

``linear(x, weight, bias)`` is ``F.linear`` with that routing; :class:`Linear` is an
``nn.Linear`` calling it, so state dicts, ``isinstance`` checks, LoRA and quantization see
an ordinary ``nn.Linear``. Everything else goes to ``F.linear`` unchanged: CUDA, other
dtypes, autocast (which chooses the dtype itself), products too small to repay oneDNN's
fixed cost per call, weights that are not dense, sizes that do not fit (``F.linear`` names
them in its error), and ``torch.backends.mkldnn.enabled = False``, the switch to turn it off.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# oneDNN's fixed cost per call (~20 us) pays off from about 2M multiply-adds (rows x in x out), or
# from a 1 MiB weight: streaming that from memory takes longer than the fixed cost, even for one row.
MIN_ONEDNN_MACS = 2**21
MIN_ONEDNN_WEIGHTS = 2**18


def on_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`linear` sends this product to oneDNN (a large enough product of float32
    tensors on a CPU, a dense weight, outside autocast, with oneDNN enabled) instead of ``F.linear``."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (
        _HAS_ONEDNN
        and torch.backends.mkldnn.enabled
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.layout == torch.strided
                for t in tensors)
        # Sizes that do not fit go to F.linear, whose error names the shapes (oneDNN's names none).
        and weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[1]
        and (bias is None or bias.shape == weight.shape[:1])
        and (weight.numel() >= MIN_ONEDNN_WEIGHTS or x.numel() * weight.shape[0] >= MIN_ONEDNN_MACS)
        # (out, in) or its transpose, densely: other strides (the query, key and value thirds of
        # Hugging Face GPT-2's fused c_attn) would take oneDNN's reference kernel, 100x slower.
        and (weight.is_contiguous() or weight.t().is_contiguous())
        and not torch.is_autocast_enabled("cpu")
    )


def _inner_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # "none": no fused activation


# A custom operator around the kernel, so that torch.compile keeps it in its graph (through the
# shape function below) and autograd differentiates it (through the backward below).
@torch.library.custom_op("minigpt::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN's inner product: ``(..., in) -> (..., out)``."""
    return _inner_product(x, weight, bias)


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _save_for_backward(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    # Both backward products are linear layers too: grad @ W has weight W.T, grad.T @ x has weight x.T.
    x, weight = ctx.saved_tensors
    grad = grad.contiguous()  # e.g. the gradient of a sum arrives expanded, with stride 0
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = onednn_linear(grad, weight.t(), None)  # (..., out) @ (out, in)
    rows = grad.reshape(-1, grad.shape[-1])  # (rows, out)
    if ctx.needs_input_grad[1]:  # (out, rows) @ (rows, in)
        inputs = x.reshape(-1, x.shape[-1])
        if weight.shape[0] > weight.shape[1]:  # oneDNN runs faster with the larger operand as the weight
            grad_weight = onednn_linear(inputs.t(), rows.t(), None).t()
        else:
            grad_weight = onednn_linear(rows.t(), inputs.t(), None)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = rows.sum(0)
    return grad_x, grad_weight, grad_bias


onednn_linear.register_autograd(_backward, setup_context=_save_for_backward)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``(..., in) -> (..., out)`` with ``weight: (out, in)``,
    computed by oneDNN where :func:`on_onednn` says so, with the same gradients."""
    if not on_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))):
        return onednn_linear(x, weight, bias)
    # Inference calls the kernel itself: the operator's dispatch through Python costs ~15 % of a decoding step.
    return _inner_product(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear`: same parameters, same state dict, same results
    to float32 rounding; faster on CPUs where oneDNN outruns the BLAS."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
