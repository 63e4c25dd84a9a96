"""Quantized linear layers: the weight lives in 4 or 8 bits and is dequantized inside ``forward``.

The one idea: ``Linear4bit`` / ``Linear8bit`` compute ``x @ W.T + b`` like ``nn.Linear``, but
hold only the packed weight and its scales (buffers, not parameters: they never train), and
build the float ``W`` (in ``compute_dtype``) for the one matrix product that needs it.

The memory trick that makes QLoRA worth it is in the backward pass. Autograd would keep the
dequantized ``W`` alive until backward, one float copy of every layer at once; instead
:class:`DequantizedMatmul` saves nothing but a reference to the layer and dequantizes again
to compute ``grad_x = grad_out @ W``. The weight is frozen, so no gradient for ``W`` is formed;
trainable LoRA adapters added on top (``minigpt.lora.adapters``) get theirs as usual.

Workflow::

    quantize_model(model, "nf4-dq")   # every nn.Linear of the blocks -> Linear4bit, in place
    quantization_of(model)            # {"scheme": "nf4-dq", "block_size": 64, ...}
    weight_bytes(model.trf_blocks)    # about 0.13 x the float32 bytes
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from minigpt.quantization import weight_only
from minigpt.quantization.schemes import (
    Int4Weight,
    Int8Weight,
    NF4Weight,
    check_block_size,
    check_scheme,
    dequantize_int4,
    dequantize_int8,
    dequantize_nf4,
    quantize_int4,
    quantize_int8,
    quantize_nf4,
)
from minigpt.runtime import kernels
from minigpt.runtime.linear import linear as linear_product


class DequantizedMatmul(torch.autograd.Function):
    """``x @ W.T`` with ``W = layer.dequantized_weight()``, rebuilt in backward instead of saved.

    ``x``: ``(..., in)`` in the layer's compute dtype -> ``(..., out)``. Gradient for ``x`` only.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: _QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer  # a reference, not a tensor: nothing of size (out, in) is kept
        ctx.x_dtype = x.dtype
        # The float weight lives only for this product; it is freed when forward returns.
        return linear_product(x, layer.dequantized_weight())

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        # Under autocast grad_out may come in another dtype than the weight; the gradient takes x's.
        # Dequantize again instead of saving W: compute traded for one float weight per layer of memory.
        weight = ctx.layer.dequantized_weight()
        return linear_product(grad_out, weight.to(grad_out.dtype).t()).to(ctx.x_dtype), None  # grad_out @ W


class _QuantizedLinear(nn.Module):
    """What both layers share: sizes, the frozen bias, forward, and ``nn.Linear``-like reporting."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        # The module whose float weight this layer's was tied to (GPT-2's output head and its token
        # embedding), set by minigpt.quantization.model: dequantizing leaves the two apart and says so
        # in the model's config (untie_in_config).
        self.tied_to: str | None = None
        # A buffer, not a parameter: the whole base layer is frozen, bias included.
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _packed_kernel(self, x: torch.Tensor) -> str | None:
        """The weight-only kernel (minigpt.quantization.weight_only) measured fastest for ``x``, or None where the
        reference path runs: a gradient to compute, another device, or the dequantizing kernel won."""
        if self.scheme not in ("int8", "int4") or x.device.type != "cpu" or x.numel() == 0 \
                or self.compute_dtype not in (torch.float32, torch.bfloat16) or (torch.is_grad_enabled()
                                                                               and x.requires_grad):
            return None
        if not weight_only.supports_packed(self.quantized()):
            return None
        product = kernels.Product(self.scheme, kernels.row_bucket(x.numel() // x.shape[-1]), self.in_features,
                                  self.out_features, str(self.compute_dtype).removeprefix("torch."))
        kernel = kernels.choose(product)
        return None if kernel == "dequantize" else kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_features) -> (..., out_features)``, computed in ``compute_dtype``, returned in x's dtype."""
        # x is cast to the compute dtype, the dequantized weight's (or the packed kernel's activations).
        kernel = self._packed_kernel(x)
        if kernel is None:
            out = DequantizedMatmul.apply(x.to(self.compute_dtype), self)
        else:  # the packed integers read directly, never a float copy of the weight
            out = weight_only.packed_product(kernel, x.to(self.compute_dtype), self.quantized(), self._int4_layout)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)

    @property
    def device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def quantized_bytes(self) -> int:
        """Bytes of the stored weight (packed values and scales), the bias left out."""
        return sum(t.nbytes for name, t in self.named_buffers() if name != "bias")

    def _int4_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}")


class Linear4bit(_QuantizedLinear):
    """An ``nn.Linear`` whose ``(out, in)`` weight is stored in blockwise NF4 (see minigpt.quantization.schemes).

    Buffers: ``packed`` uint8, then either ``scales`` float32 (``nf4``) or ``scale_codes`` int8,
    ``scale_factors`` float32 and ``scale_mean`` float32 (``nf4-dq``), and ``bias`` (or None).
    The constructor makes empty buffers of the right shapes, ready for ``load_state_dict``;
    :meth:`from_linear` quantizes an existing layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, block_size: int = 64,
                 double_quant: bool = False, scale_block_size: int = 256,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype, device)
        self.block_size = check_block_size(block_size)
        self.scale_block_size = check_block_size(scale_block_size, "scale block size")
        self.double_quant = double_quant
        # The same block count quantize_nf4 computes, so load_state_dict finds buffers of matching shapes.
        n_blocks = math.ceil(in_features * out_features / block_size)
        self.register_buffer("packed", torch.zeros(n_blocks * block_size // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("scale_codes", torch.zeros(n_blocks, dtype=torch.int8, device=device))
            n_factors = math.ceil(n_blocks / scale_block_size)
            self.register_buffer("scale_factors", torch.ones(n_factors, device=device))
            self.register_buffer("scale_mean", torch.zeros((), device=device))
        else:
            self.register_buffer("scales", torch.zeros(n_blocks, device=device))

    @property
    def scheme(self) -> str:
        return "nf4-dq" if self.double_quant else "nf4"

    @classmethod
    def from_quantized(cls, q: NF4Weight, bias: torch.Tensor | None = None,
                       compute_dtype: torch.dtype = torch.float32) -> Linear4bit:
        """A layer holding ``q`` (a 2-D ``(out, in)`` weight) and a copy of ``bias``."""
        if len(q.shape) != 2:
            raise ValueError(f"a linear layer's weight is 2-D (out, in), got shape {q.shape}")
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, bias is not None, block_size=q.block_size,
                    double_quant=q.double_quant, scale_block_size=q.scale_block_size,
                    compute_dtype=compute_dtype, device=q.packed.device)
        for name, tensor in q.tensors().items():
            setattr(layer, name, tensor)  # assigning a tensor to a buffer's name replaces the buffer
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str = "nf4", block_size: int = 64,
                    compute_dtype: torch.dtype = torch.float32, scale_block_size: int = 256) -> Linear4bit:
        """Quantize ``linear``'s weight to ``scheme`` ("nf4" or "nf4-dq"), on the weight's device."""
        if check_scheme(scheme) not in ("nf4", "nf4-dq"):
            raise ValueError(f"Linear4bit stores 'nf4' or 'nf4-dq', not {scheme!r}; use Linear8bit for 'int8'")
        q = quantize_nf4(linear.weight, block_size, scheme == "nf4-dq", scale_block_size)
        return cls.from_quantized(q, linear.bias, compute_dtype)

    def quantized(self) -> NF4Weight:
        """The stored weight as an :class:`NF4Weight` (the buffers themselves, not copies)."""
        if self.double_quant:
            scales = (None, self.scale_codes, self.scale_factors, self.scale_mean)
        else:
            scales = (self.scales, None, None, None)
        return NF4Weight(self.packed, *scales, (self.out_features, self.in_features),
                         self.block_size, self.scale_block_size)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight, ``(out_features, in_features)`` in ``compute_dtype`` (a new tensor each call)."""
        return dequantize_nf4(self.quantized(), self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme}, block_size={self.block_size}"


class Linear8bit(_QuantizedLinear):
    """An ``nn.Linear`` whose weight is stored as int8 with one float32 scale per output row.

    Buffers: ``data`` int8 ``(out, in)``, ``scales`` float32 ``(out,)``, ``bias`` (or None).
    """

    scheme = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype, device)
        self.register_buffer("data", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, device=device))

    @classmethod
    def from_quantized(cls, q: Int8Weight, bias: torch.Tensor | None = None,
                       compute_dtype: torch.dtype = torch.float32) -> Linear8bit:
        """A layer holding ``q`` and a copy of ``bias``."""
        out_features, in_features = q.data.shape
        layer = cls(in_features, out_features, bias is not None, compute_dtype=compute_dtype, device=q.data.device)
        layer.data = q.data
        layer.scales = q.scales
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.float32) -> Linear8bit:
        """Quantize ``linear``'s weight to per-row int8, on the weight's device."""
        return cls.from_quantized(quantize_int8(linear.weight), linear.bias, compute_dtype)

    def quantized(self) -> Int8Weight:
        return Int8Weight(self.data, self.scales)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight, ``(out_features, in_features)`` in ``compute_dtype`` (a new tensor each call)."""
        return dequantize_int8(self.quantized(), self.compute_dtype)


class LinearInt4(_QuantizedLinear):
    """An ``nn.Linear`` whose weight is stored in group-wise asymmetric int4 (see minigpt.quantization).

    Buffers: ``packed`` uint8 ``(out, padded / 2)``, ``scales`` and ``zeros`` float32 ``(out, groups)``,
    ``bias`` (or None), ``padded`` being ``in`` rounded up to whole groups of ``block_size``.
    """

    scheme = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, block_size: int = 64,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype, device)
        self.block_size = check_block_size(block_size)
        groups = math.ceil(in_features / block_size)  # the last one padded with zeros
        self.register_buffer("packed", torch.zeros(out_features, groups * block_size // 2, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("scales", torch.zeros(out_features, groups, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, device=device))
        self._layout: tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64,
                    compute_dtype: torch.dtype = torch.float32) -> LinearInt4:
        """Quantize ``linear``'s weight to int4 in groups of ``block_size`` inputs, on the weight's device."""
        q = quantize_int4(linear.weight, block_size)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, block_size=block_size,
                    compute_dtype=compute_dtype, device=q.packed.device)
        layer.packed = q.packed
        layer.scales = q.scales
        layer.zeros = q.zeros
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    def quantized(self) -> Int4Weight:
        return Int4Weight(self.packed, self.scales, self.zeros, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight, ``(out_features, in_features)`` in ``compute_dtype`` (a new tensor each call)."""
        return dequantize_int4(self.quantized(), self.compute_dtype)

    def _int4_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int4 kernel's layout of the weight, made on first use and again whenever it is replaced."""
        # An in-place load bumps the version counter; a tensor made under inference_mode has none.
        version = (self.packed.data_ptr(), None if self.packed.is_inference() else self.packed._version)
        if self._layout is None or self._layout[0] != version:
            self._layout = (version, weight_only.int4_layout(self.quantized()))
        return self._layout[1]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme=int4, block_size={self.block_size}"


QUANTIZED_LAYERS: tuple[type[nn.Module], ...] = (Linear4bit, Linear8bit, LinearInt4)


