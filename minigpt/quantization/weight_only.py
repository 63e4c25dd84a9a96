"""Weight-only int8 and int4 products: PyTorch's CPU kernels read the small integers directly.

The one idea: decoding one token reads every weight once, so its speed is bytes per token
over the memory's bandwidth. Stored in 8 or 4 bits, a weight is 4x or 8x fewer bytes than
in float32, but only if the kernel reads those bytes: dequantizing first (the reference
path of :mod:`minigpt.quantization.layers`) writes a float copy of the whole weight and reads
it back, more traffic than float32 itself. PyTorch ships CPU kernels that multiply by the
packed integers and apply the scales inside the product: ``torch._weight_int8pack_mm``
(int8, one scale per output row) and ``torch._weight_int4pack_mm_for_cpu`` (int4 in groups,
a scale and zero per group, in a tiled layout made once by ``_convert_weight_to_int4pack_for_cpu``).

Their speed depends on the activations' dtype (on one Intel CPU the int8 kernel ran 1.2-2.2x
faster than float32 ``F.linear`` with bfloat16 activations and 6x slower with float32 ones),
so the candidates, dequantizing included, are timed like every other product
(:mod:`minigpt.runtime.kernels`) and the fastest kept. A bfloat16 variant rounds the activations to
bfloat16 on the way in; its effect on the tokens is measured by ``bench/bench_generate.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch

from minigpt.quantization.schemes import (
    Int4Weight,
    Int8Weight,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from minigpt.runtime import kernels
from minigpt.runtime.kernels import Product

ACTIVATIONS = {"packed_float32": torch.float32, "packed_bfloat16": torch.bfloat16}
KERNELS: tuple[str, ...] = ("dequantize", *ACTIVATIONS)


def int8_packed(x: torch.Tensor, q: Int8Weight, dtype: torch.dtype) -> torch.Tensor:
    """``x @ (data * scales).T`` by ``torch._weight_int8pack_mm``, activations in ``dtype``:
    ``(..., in) -> (..., out)`` in ``x``'s dtype."""
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    out = torch._weight_int8pack_mm(rows, q.data, q.scales.to(dtype))  # scales applied per output column
    return out.view(*x.shape[:-1], -1).to(x.dtype)


INT4_TILE = 16  # the int4 kernel's tiles hold 16 output rows; other counts are padded up to it


def int4_layout(q: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 kernel's operands: the integers in its tiled layout, and ``(groups, out, 2)`` scale
    and zero pairs, ``out`` padded up to whole tiles (50,257 vocabulary rows -> 50,272)."""
    padding = -q.packed.shape[0] % INT4_TILE
    # The padded rows are all zero: integers 0 with scale 0 and zero point 0 dequantize to 0,
    # so their outputs are 0 and int4_packed cuts them off.
    integers = torch.nn.functional.pad(unpack_int4(q).int(), (0, 0, 0, padding))
    tiled = torch._convert_weight_to_int4pack_for_cpu(integers, 1)
    scales_and_zeros = torch.stack([q.scales.t(), q.zeros.t()], dim=-1)  # (groups, out, 2)
    return tiled, torch.nn.functional.pad(scales_and_zeros, (0, 0, 0, padding)).contiguous()


def int4_packed(x: torch.Tensor, layout: tuple[torch.Tensor, torch.Tensor], block_size: int,
                dtype: torch.dtype, out_features: int) -> torch.Tensor:
    """``x @ dequantize_int4(q).T`` by ``torch._weight_int4pack_mm_for_cpu`` from :func:`int4_layout`'s
    operands, activations in ``dtype``: ``(..., in) -> (..., out_features)`` in ``x``'s dtype."""
    tiled, scales_and_zeros = layout
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    rows = torch.nn.functional.pad(rows, (0, 2 * tiled.shape[1] - rows.shape[1]))  # the padded inputs: zeros
    out = torch._weight_int4pack_mm_for_cpu(rows, tiled, block_size, scales_and_zeros.to(dtype))
    return out[:, :out_features].reshape(*x.shape[:-1], out_features).to(x.dtype)  # the padded rows cut off


def packed_product(kernel: str, x: torch.Tensor, q: Int8Weight | Int4Weight,
                   int4: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``x @ W.T`` by one of the packed :data:`KERNELS` (``int4`` gives the int4 layout, made once)."""
    if isinstance(q, Int8Weight):
        return int8_packed(x, q, ACTIVATIONS[kernel])
    return int4_packed(x, int4(), q.block_size, ACTIVATIONS[kernel], q.packed.shape[0])


def supports_packed(q: Int8Weight | Int4Weight) -> bool:
    """Whether PyTorch's kernels take this weight (int4: groups of 32 to 256 inputs)."""
    if isinstance(q, Int8Weight):
        return hasattr(torch, "_weight_int8pack_mm")
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and q.block_size in (32, 64, 128, 256)


def _runners(product: Product) -> dict[str, Callable[[], torch.Tensor]]:
    """A call of each candidate on a random weight of ``product``'s shape, quantized, read from
    copies beyond the caches (:func:`minigpt.runtime.kernels.streamed`) as when decoding."""
    dtype = kernels.DTYPES[product.dtype]
    weight = torch.randn(product.out_features, product.in_features) * 0.02
    x = torch.randn(min(product.rows, kernels.MAX_TIMED_ROWS), product.in_features, dtype=dtype)
    q = quantize_int8(weight) if product.op == "int8" else quantize_int4(weight, 64)
    copies = [q] + [replace(q, **{name: t.clone() for name, t in q.tensors().items()})
                    for _ in range(kernels.copies_beyond_the_caches(q.nbytes) - 1)]
    dense = dequantize_int8 if isinstance(q, Int8Weight) else dequantize_int4
    weights = kernels.in_turn(copies)
    runs = {"dequantize": lambda: kernels.forward("f_linear", x, dense(weights(), dtype), None)}
    if supports_packed(q):
        # int4: each copy with its tiled layout, made once here as a layer makes it once
        pairs = kernels.in_turn([(c, int4_layout(c) if isinstance(c, Int4Weight) else None) for c in copies])

        def packed(kernel: str) -> torch.Tensor:
            stored, layout = pairs()
            return packed_product(kernel, x, stored, lambda: layout)

        for kernel in ACTIVATIONS:
            runs[kernel] = partial(packed, kernel)
    return runs


kernels.RUNNERS.update(int8=_runners, int4=_runners)
