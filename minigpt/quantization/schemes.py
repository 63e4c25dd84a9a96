"""Weight quantization by hand: 4-bit NormalFloat (NF4) with double quantization, and 8-bit absmax.

The one idea: a weight matrix is stored as small integers plus a few float scales, and turned
back into floats (dequantized) right before each matrix product. Memory per weight:

    float32   32 bits
    bfloat16  16 bits
    int8       8 bits + one float32 scale per output row              (about 8.04 for GPT-2's rows)
    nf4        4 bits + one float32 scale per block of 64              = 4.5 bits
    nf4-dq     4 bits + one int8 scale per block of 64
                      + one float32 factor per 256 scales              = about 4.127 bits
    int4       4 bits + a float32 scale and zero per group of 64 in a row = 5 bits

**Blockwise absmax (NF4).** The flattened weight is cut into blocks of ``block_size`` values;
each block is divided by its absolute maximum (so it lies in [-1, 1]), each value is replaced
by the index of the nearest of the 16 code values in :data:`NF4_CODE`, and two 4-bit indices
are packed into one byte. Dequantizing looks the codes up and multiplies by the block's scale.
A small block keeps one outlier from flattening the resolution of all other weights.

**Why a normal code.** Pretrained weights are roughly normally distributed, so a code whose
values sit at equally spaced *quantiles* of a normal distribution uses each of its 16 values
about equally often; a uniform 4-bit grid wastes levels on the rare large values. See
:func:`nf4_code_values` for the construction (QLoRA, Dettmers et al. 2023, section 3).

**Double quantization.** With blocks of 64, the float32 scales alone cost 32 / 64 = 0.5 bits
per weight. The scales are quantized too: subtract their mean (they are all positive, so this
centres them), then int8 absmax in blocks of ``scale_block_size`` = 256, keeping one float32
factor per block of scales and the mean. This is the scheme of torchao's ``NF4Tensor``; the
QLoRA paper quantizes the scales to an 8-bit *float* code instead, which costs the same bits.

**int8.** Symmetric absmax per output row: ``scale = max|row| / 127``, ``q = round(w / scale)``.
This is LLM.int8()'s weight format without its outlier path (LLM.int8() also keeps the few
input features with large activations in 16 bits; here every feature is 8-bit).

**int4.** Asymmetric, group-wise along each row: a group of ``block_size`` consecutive inputs
of one output row (the last one padded with zeros) maps its range [min, max] onto 0..15,
``scale = (max - min) / 15``, ``q = round((w - min) / scale)``, and stores ``zero = min + 8
scale``, so that ``w = (q - 8) scale + zero``: the layout of PyTorch's CPU weight-only int4
kernel (``torch._weight_int4pack_mm_for_cpu``), which :mod:`minigpt.quantization.weight_only` feeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

SCHEMES: tuple[str, ...] = ("nf4", "nf4-dq", "int8", "int4")

# The 16 NormalFloat-4 values exactly as published with QLoRA (bitsandbytes' NF4 table).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

# QLoRA's outermost quantile: 1/2 * (1/(2*15) + 1 - 1/(2*16)), so that the extreme codes
# are not at the infinite 0th and 100th percentiles.
NF4_OFFSET = 0.9677083


def nf4_code_values(offset: float = NF4_OFFSET) -> torch.Tensor:
    """Re-derive :data:`NF4_CODE` from quantiles of the standard normal distribution: ``(16,)`` float32.

    An asymmetric code with an exact zero (padding and zero weights stay zero)::

        positive = Phi^-1(linspace(offset, 0.5, 9)[:-1])   # 8 quantiles above the median
        negative = -Phi^-1(linspace(offset, 0.5, 8)[:-1])  # 7 quantiles below it
        code = sorted(positive + [0] + negative) / max     # normalised to [-1, 1]

    ``Phi^-1`` is the normal quantile function (``torch.special.ndtri``). With 8 positive and
    7 negative values plus zero, all 16 four-bit patterns are used and 0 is represented exactly.
    """
    # As published: probabilities in float32, quantiles in float64, the code itself in float32.
    def quantiles(n: int) -> torch.Tensor:
        return torch.special.ndtri(torch.linspace(offset, 0.5, n)[:-1].double()).float()

    values = torch.cat([quantiles(9), torch.zeros(1), -quantiles(8)]).sort().values
    return values / values.max()


def check_scheme(name: str) -> str:
    """Return ``name`` if it is one of :data:`SCHEMES`; otherwise raise ValueError listing them."""
    if name not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    return name


def check_block_size(n: int, what: str = "block size") -> int:
    """Return ``n`` if it is a power of two of at least 2 (two 4-bit codes share a byte); else ValueError."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2 or n & (n - 1):
        raise ValueError(f"{what} must be a power of two of at least 2 (e.g. 64), got {n!r}")
    return n


@dataclass
class NF4Weight:
    """A tensor in blockwise NF4: what :func:`quantize_nf4` returns and :func:`dequantize_nf4` reads.

    ``packed``: uint8 ``(n_blocks * block_size // 2,)``, two code indices per byte, the first
    value in the high 4 bits. Without double quantization ``scales`` is float32 ``(n_blocks,)``
    and the three ``scale_*`` tensors are None; with it ``scales`` is None and the scales are
    ``scale_codes`` int8 ``(n_blocks,)``, ``scale_factors`` float32 ``(ceil(n_blocks / scale_block_size),)``
    and ``scale_mean`` float32 ``()``. ``shape`` is the original shape; a flattened size that is not
    a multiple of ``block_size`` was padded with zeros, which dequantizing drops again.
    """

    packed: torch.Tensor
    scales: torch.Tensor | None
    scale_codes: torch.Tensor | None
    scale_factors: torch.Tensor | None
    scale_mean: torch.Tensor | None
    shape: tuple[int, ...]
    block_size: int
    scale_block_size: int

    @property
    def double_quant(self) -> bool:
        return self.scales is None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that hold the data, by field name (the None ones left out)."""
        return {f.name: t for f in fields(self) if isinstance(t := getattr(self, f.name), torch.Tensor)}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())


@dataclass
class Int8Weight:
    """A 2-D weight in per-row absmax int8: ``data`` int8 ``(out, in)``, ``scales`` float32 ``(out,)``."""

    data: torch.Tensor
    scales: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"data": self.data, "scales": self.scales}

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes


@dataclass
class Int4Weight:
    """A 2-D ``(out, in)`` weight in group-wise asymmetric int4: ``packed`` uint8 ``(out, padded / 2)``
    (two values a byte, the first in the high half; ``padded``: ``in`` rounded up to whole groups),
    ``scales`` and ``zeros`` float32 ``(out, padded / block_size)``."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    in_features: int

    @property
    def block_size(self) -> int:
        return 2 * self.packed.shape[1] // self.scales.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scales": self.scales, "zeros": self.zeros}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())


def _absmax_divisor(absmax: torch.Tensor) -> torch.Tensor:
    # An all-zero block has scale 0; divide it by 1 instead, so its values stay 0 rather than NaN.
    return torch.where(absmax > 0, absmax, torch.ones_like(absmax))


def nearest_code(x: torch.Tensor, code: torch.Tensor = NF4_CODE) -> torch.Tensor:
    """Index of the nearest value of the sorted ``code`` for each element of ``x``: uint8, shape of ``x``.

    The midpoints between neighbouring codes are the decision boundaries; ``bucketize``
    finds each value's interval without forming the (elements x 16) distance table.
    A value exactly on a midpoint goes to the lower code.
    """
    code = code.to(x.device, torch.float32)
    midpoints = (code[1:] + code[:-1]) / 2
    return torch.bucketize(x.float(), midpoints, out_int32=True).to(torch.uint8)


def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = False,
                 scale_block_size: int = 256) -> NF4Weight:
    """Blockwise absmax NF4 of ``w`` (any shape, any float dtype): see the module docstring."""
    check_block_size(block_size)
    check_block_size(scale_block_size, "scale block size")
    if not w.is_floating_point():
        raise TypeError(f"only floating-point tensors can be quantized, got {w.dtype}")
    # Blocks run over the flattened weight, row after row: a block may straddle two rows.
    flat = w.detach().reshape(-1).float()
    n_blocks = math.ceil(flat.numel() / block_size)
    if n_blocks * block_size != flat.numel():
        # Zeros are exact in NF4 and never raise a block's absmax: the padding changes nothing.
        flat = torch.nn.functional.pad(flat, (0, n_blocks * block_size - flat.numel()))
    blocks = flat.view(n_blocks, block_size)
    # Block absmax: each block is scaled by its own largest magnitude, so one outlier only coarsens
    # the other values of its block, not the whole matrix.
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    # blocks / absmax lies in [-1, 1], the range of the code; each value becomes a 4-bit index 0..15.
    indices = nearest_code(blocks / _absmax_divisor(absmax)[:, None]).view(-1)
    # Two codes per byte: the even-indexed value in the high nibble, the odd one in the low nibble;
    # block_size is even, so a byte never spans two blocks.
    packed = indices[0::2] << 4 | indices[1::2]
    q = NF4Weight(packed, absmax, None, None, None, tuple(w.shape), block_size, scale_block_size)
    if double_quant:
        # Double quantization: the float32 scales (0.5 bits per weight at block 64) become int8 codes.
        q.scale_codes, q.scale_factors, q.scale_mean = _quantize_scales(absmax, scale_block_size)
        q.scales = None
    return q


def _quantize_scales(scales: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: ``(n,)`` float32 scales -> int8 codes ``(n,)``, factors ``(ceil(n / block_size),)``, mean.

    As torchao's NF4Tensor: ``factor = 256 / (2 * absmax)`` of each block of centred scales,
    ``code = clamp(round(centred * factor), -128, 127)``.
    """
    # Absmax scales are all positive: centring them first spends the int8 range on their spread
    # instead of their offset.
    mean = scales.mean()
    centred = scales - mean
    n_blocks = math.ceil(centred.numel() / block_size)
    padded = torch.nn.functional.pad(centred, (0, n_blocks * block_size - centred.numel()))
    # 256 / (2 * absmax) maps [-absmax, absmax] onto [-128, 128]; the clamp keeps +128 at 127.
    factors = 256 / (2 * _absmax_divisor(padded.view(n_blocks, block_size).abs().amax(dim=1)))
    codes = (padded.view(n_blocks, block_size) * factors[:, None]).round().clamp(-128, 127)
    return codes.view(-1)[:scales.numel()].to(torch.int8), factors, mean


def dequantize_scales(q: NF4Weight) -> torch.Tensor:
    """The float32 block scales of ``q``, ``(n_blocks,)``: stored as is, or decoded from int8."""
    if q.scales is not None:
        return q.scales
    factors = q.scale_factors.repeat_interleave(q.scale_block_size)[:q.scale_codes.numel()]
    # Undo both steps: divide by the block's factor, add the mean back.
    return q.scale_codes / factors + q.scale_mean


# The two code values of every possible byte, ``(256, 2)``: byte ``16 * i + j`` holds codes i and j.
# One lookup per byte unpacks both halves at once.
_NF4_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Back to floats: ``code[index] * scale`` for every element, in ``dtype``, shape ``q.shape``."""
    pairs = _NF4_PAIRS.to(q.packed.device)
    # pairs[packed] is (n_bytes, 2), high nibble's value first, so view(-1) restores the order.
    values = pairs[q.packed.int()].view(-1, q.block_size) * dequantize_scales(q)[:, None]  # (n_blocks, block_size)
    # Drop the zero padding of the last block, then restore the original shape.
    return values.view(-1)[:math.prod(q.shape)].view(q.shape).to(dtype)


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Symmetric absmax int8 per output row of a 2-D ``(out, in)`` weight."""
    if w.dim() != 2:
        raise ValueError(f"int8 quantization keeps one scale per row of a 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach().float()
    # int8 per-row absmax: each output row's largest |w| maps to 127; symmetric, so 0 stays 0
    # and -128 is never used.
    scales = w.abs().amax(dim=1) / 127  # (out,)
    # round to nearest; the clamp only guards float rounding at the row's maximum.
    data = (w / _absmax_divisor(scales)[:, None]).round().clamp(-127, 127).to(torch.int8)
    return Int8Weight(data, scales)


def dequantize_int8(q: Int8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``data * scale`` of each row: ``(out, in)`` in ``dtype``."""
    return (q.data.float() * q.scales[:, None]).to(dtype)


def quantize_int4(w: torch.Tensor, block_size: int = 64) -> Int4Weight:
    """Group-wise asymmetric int4 of a 2-D ``(out, in)`` weight, ``block_size`` inputs a group."""
    check_block_size(block_size)
    if w.dim() != 2:
        raise ValueError(f"int4 quantizes the rows of a 2-D weight in groups, got shape {tuple(w.shape)}")
    padding = -w.shape[1] % block_size  # zero inputs up to whole groups: they meet zero activations
    padded = torch.nn.functional.pad(w.detach().float(), (0, padding))
    groups = padded.view(w.shape[0], -1, block_size)  # (out, groups, block_size)
    low = groups.amin(-1)
    high = groups.amax(-1)
    scales = (high - low) / 15
    q = ((groups - low[..., None]) / _absmax_divisor(scales)[..., None]).round().clamp(0, 15).to(torch.uint8)
    q = q.view(w.shape[0], -1)
    return Int4Weight(q[:, 0::2] << 4 | q[:, 1::2], scales, low + 8 * scales, w.shape[1])


def unpack_int4(q: Int4Weight) -> torch.Tensor:
    """The integers 0..15 of ``q``: ``(out, in)`` uint8."""
    return torch.stack([q.packed >> 4, q.packed & 15], dim=-1).view(q.packed.shape[0], -1)


def dequantize_int4(q: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - 8) * scale + zero`` of each group: ``(out, in)`` in ``dtype``."""
    values = unpack_int4(q).view(*q.scales.shape, -1).float() - 8  # (out, groups, block_size)
    weight = (values * q.scales[..., None] + q.zeros[..., None]).view(q.packed.shape[0], -1)
    return weight[:, :q.in_features].to(dtype)


def bits_per_weight(scheme: str, block_size: int = 64, scale_block_size: int = 256,
                    row_length: int | None = None) -> float:
    """Average bits per weight of ``scheme`` for a large tensor (the one scale mean of nf4-dq is left out).

    ``int8`` keeps one float32 scale per row: give ``row_length`` (``in_features``) to count it,
    or get the bare 8 bits.
    """
    check_scheme(scheme)
    check_block_size(block_size)
    check_block_size(scale_block_size, "scale block size")
    if scheme == "int8":
        return 8 + (32 / row_length if row_length else 0.0)
    if scheme == "nf4":
        return 4 + 32 / block_size
    if scheme == "int4":
        return 4 + 64 / block_size
    # nf4-dq: 4 bits + an int8 code per block + a float32 factor per scale_block_size blocks.
    return 4 + 8 / block_size + 32 / (block_size * scale_block_size)


def quantized_bytes(shape: int | Sequence[int], scheme: str, block_size: int = 64,
                    scale_block_size: int = 256) -> int:
    """Exact bytes that :func:`quantize_nf4` / :func:`quantize_int8` store for a tensor of ``shape``
    (a plain element count is enough for the nf4 schemes; int8 needs the 2-D shape)."""
    check_scheme(scheme)
    check_block_size(block_size)
    check_block_size(scale_block_size, "scale block size")
    if scheme == "int8":
        if isinstance(shape, int) or len(shape) != 2:
            raise ValueError(f"int8 keeps one scale per row: give the 2-D (out, in) shape, got {shape!r}")
        return shape[0] * shape[1] + 4 * shape[0]
    numel = shape if isinstance(shape, int) else math.prod(shape)
    if scheme == "int4":
        if isinstance(shape, int) or len(shape) != 2:
            raise ValueError(f"int4 groups the inputs of each row: give the 2-D (out, in) shape, got {shape!r}")
        groups = math.ceil(shape[1] / block_size)
        return shape[0] * groups * (block_size // 2 + 8)
    n_blocks = math.ceil(numel / block_size)
    packed = n_blocks * block_size // 2
    if scheme == "nf4":
        return packed + 4 * n_blocks
    # packed codes + one int8 per block + float32 factors + the float32 mean.
    return packed + n_blocks + 4 * math.ceil(n_blocks / scale_block_size) + 4
