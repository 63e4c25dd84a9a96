"""NF4, double quantization and int8, checked against the published code values, references
written here from the definitions, and torchao's NF4 tensor."""

from __future__ import annotations

import statistics

import pytest
import torch

from minigpt.quantization.schemes import (
    NF4_CODE,
    NF4_OFFSET,
    SCHEMES,
    bits_per_weight,
    check_block_size,
    check_scheme,
    dequantize_int8,
    dequantize_nf4,
    dequantize_scales,
    nearest_code,
    nf4_code_values,
    quantize_int8,
    quantize_nf4,
    quantized_bytes,
)

# From the QLoRA paper's code (bitsandbytes' NF4 table), digit for digit.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def reference_nf4(w: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blockwise absmax NF4 from the definition: (indices (n_blocks, block), absmax (n_blocks,), dequantized)."""
    flat = w.reshape(-1).float()
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % block_size)])
    blocks = flat.view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    normalized = blocks / absmax[:, None]
    code = torch.tensor(PUBLISHED_NF4)
    # Brute force: the distance to each of the 16 values, the smallest wins.
    indices = (normalized[..., None] - code).abs().argmin(dim=-1)
    return indices, absmax, (code[indices] * absmax[:, None]).view(-1)[:w.numel()].view(w.shape)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte, the first in the high bits."""
    return torch.stack([packed // 16, packed % 16], dim=-1).view(-1).long()


def test_code_values_are_the_published_ones():
    assert NF4_CODE.dtype == torch.float32
    assert NF4_CODE.tolist() == torch.tensor(PUBLISHED_NF4).tolist()
    assert (NF4_CODE == 0).sum() == 1 and NF4_CODE.min() == -1 and NF4_CODE.max() == 1


def test_code_values_come_from_normal_quantiles():
    assert torch.equal(nf4_code_values(), NF4_CODE)
    # Once more with the standard library's normal distribution, in float64 throughout.
    normal = statistics.NormalDist()

    def quantiles(n: int) -> list[float]:  # of n probabilities from the offset to the median, the median left out
        return [normal.inv_cdf(NF4_OFFSET + (0.5 - NF4_OFFSET) * i / (n - 1)) for i in range(n - 1)]

    values = sorted(quantiles(9) + [0.0] + [-q for q in quantiles(8)])
    expected = torch.tensor(values, dtype=torch.float64) / max(values)
    torch.testing.assert_close(nf4_code_values().double(), expected, rtol=0, atol=1e-6)
    # 8 positive and 7 negative values: the code is asymmetric, and zero is exact.
    assert (NF4_CODE > 0).sum() == 8 and (NF4_CODE < 0).sum() == 7


def test_nearest_code_picks_the_closest_value():
    x = torch.linspace(-1.2, 1.2, 10001)
    brute = (x[:, None] - NF4_CODE).abs().argmin(dim=1)
    assert torch.equal(nearest_code(x).long(), brute)
    assert nearest_code(x).dtype == torch.uint8


@pytest.mark.parametrize("shape", [(64, 128), (7, 13), (3000,)])
def test_nf4_round_trip_equals_the_reference(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    q = quantize_nf4(w, block_size=64)
    indices, absmax, expected = reference_nf4(w, 64)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == indices.numel() // 2
    assert torch.equal(unpack(q.packed), indices.view(-1))
    assert torch.equal(q.scales, absmax)
    assert q.shape == shape
    assert torch.equal(dequantize_nf4(q), expected)
    assert torch.equal(dequantize_nf4(q, torch.bfloat16), expected.to(torch.bfloat16))


def test_padding_is_zero_and_dropped_again():
    w = torch.ones(5, 5)  # 25 values: one block of 32, 7 of them padding
    q = quantize_nf4(w, block_size=32)
    indices = unpack(q.packed)
    assert indices[:25].tolist() == [15] * 25  # 1.0 is the top code
    assert indices[25:].tolist() == [7] * 7     # zero is exact
    assert torch.equal(dequantize_nf4(q), w)


def test_all_zero_block_stays_zero():
    w = torch.zeros(4, 64)
    w[0, 0] = 3.0
    out = dequantize_nf4(quantize_nf4(w, double_quant=True, scale_block_size=2))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, w, rtol=0, atol=3e-2)


def test_double_quant_matches_the_definition():
    torch.manual_seed(1)
    w = torch.randn(96, 640)  # 960 blocks of 64: 3.75 blocks of 256 scales, the last one short
    plain, dq = quantize_nf4(w), quantize_nf4(w, double_quant=True)
    assert torch.equal(dq.packed, plain.packed)  # the 4-bit codes do not change, only the scales' storage
    assert dq.scales is None and dq.scale_codes.dtype == torch.int8 and dq.scale_codes.numel() == 960
    mean = plain.scales.mean()
    centred = plain.scales - mean
    expected = torch.empty(960)
    for start in range(0, 960, 256):  # int8 absmax of each block of 256 centred scales
        block = centred[start:start + 256]
        factor = 128 / block.abs().max()
        expected[start:start + 256] = (block * factor).round().clamp(-128, 127) / factor + mean
    torch.testing.assert_close(dequantize_scales(dq), expected, rtol=0, atol=1e-6)
    # An int8 scale is off by at most half a step (absmax / 128) of its block, except a largest
    # positive one: it maps to 128, which the clamp to 127 cuts by a whole step.
    for start in range(0, 960, 256):
        block = centred[start:start + 256]
        error = (dequantize_scales(dq) - plain.scales)[start:start + 256].abs()
        top = block == block.abs().max()
        assert error[~top].max() <= block.abs().max() / 256 + 1e-6
        assert (error[top] <= block.abs().max() / 128 + 1e-6).all()
    torch.testing.assert_close(dequantize_nf4(dq), dequantize_nf4(plain), rtol=0, atol=0.02 * w.abs().max())


def _away_from_decision_boundaries(w: torch.Tensor, codes: list[torch.Tensor], block_size: int) -> torch.Tensor:
    """``w`` with every value that is within 1e-4 (relative to its block's absmax) of a midpoint
    between two codes of any of ``codes`` moved off it (the block maxima are never moved)."""
    blocks = w.reshape(-1, block_size).clone()
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    midpoints = torch.cat([(c[1:] + c[:-1]) / 2 for c in codes])
    near = ((blocks / absmax)[..., None] - midpoints).abs().min(dim=-1).values < 1e-4
    blocks[near] += 5e-4 * absmax.expand_as(blocks)[near]
    return blocks.view(w.shape)


def test_nf4_dq_equals_torchao():
    nf4_tensor = pytest.importorskip(
        "torchao.quantization.quantize_.workflows.nf4.nf4_tensor", reason="torchao is not installed")
    torch.manual_seed(2)
    w = torch.randn(128, 256)  # 32768 values: 512 blocks of 64, 2 blocks of 256 scales (torchao needs whole ones)
    reference = nf4_tensor.to_nf4(w, 64, 256)
    # torchao's table holds the codes rounded to 4 decimals (-0.6962 for -0.6961928...): a value
    # within 5e-5 of the midpoint between two codes may round to different codes. Keep off those.
    w = _away_from_decision_boundaries(w, [NF4_CODE, reference.nf4], 64)
    reference = nf4_tensor.to_nf4(w, 64, 256)
    ours = quantize_nf4(w, 64, double_quant=True, scale_block_size=256)
    assert torch.equal(ours.packed, reference.quantized_data)
    assert torch.equal(ours.scale_codes, reference.quantized_scalers)
    assert torch.equal(ours.scale_factors, reference.quantization_factor)
    assert torch.equal(ours.scale_mean, reference.scaler_mean)
    theirs = reference.get_original_weight()
    scales = dequantize_scales(ours).repeat_interleave(64).view(w.shape)
    assert ((dequantize_nf4(ours) - theirs).abs() <= 5e-5 * scales + 1e-7).all()


def test_nf4_beats_uniform_int4_on_normal_weights():
    torch.manual_seed(3)
    w = torch.randn(256, 1024)
    nf4_error = (dequantize_nf4(quantize_nf4(w, 64)) - w).abs().mean()
    # Uniform 4-bit absmax with the same blocks: levels -7..7 times absmax / 7.
    blocks = w.view(-1, 64)
    step = blocks.abs().amax(dim=1, keepdim=True) / 7
    int4_error = ((blocks / step).round() * step - blocks).abs().mean()
    assert nf4_error < 0.9 * int4_error, (nf4_error, int4_error)


def test_int8_per_row_absmax():
    torch.manual_seed(4)
    w = torch.randn(48, 80) * torch.linspace(0.01, 1.0, 48)[:, None]  # rows of very different sizes
    q = quantize_int8(w)
    assert q.data.dtype == torch.int8 and q.data.shape == (48, 80) and q.scales.shape == (48,)
    scales = w.abs().amax(dim=1) / 127
    torch.testing.assert_close(q.scales, scales, rtol=0, atol=0)
    assert torch.equal(q.data, (w / scales[:, None]).round().to(torch.int8))
    assert (q.data.abs().amax(dim=1) == 127).all()  # each row's largest value uses the full range
    error = (dequantize_int8(q) - w).abs()
    assert (error <= scales[:, None] / 2 + 1e-7).all()
    assert dequantize_int8(q, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(768, 3072), (1000, 7), (50,)])
def test_byte_counts_match_the_tensors(shape):
    w = torch.randn(shape)
    for scheme in ("nf4", "nf4-dq"):
        q = quantize_nf4(w, double_quant=scheme == "nf4-dq")
        assert q.nbytes == quantized_bytes(shape, scheme) == quantized_bytes(w.numel(), scheme)
    if len(shape) == 2:
        assert quantize_int8(w).nbytes == quantized_bytes(shape, "int8")


def test_bits_per_weight():
    assert bits_per_weight("nf4") == 4.5
    assert bits_per_weight("nf4-dq") == pytest.approx(4.127, abs=5e-4)
    assert bits_per_weight("nf4", block_size=128) == 4.25
    assert bits_per_weight("int8") == 8 and bits_per_weight("int8", row_length=768) == 8 + 32 / 768
    # Against real tensors of a GPT-2 feed-forward matrix (the one scale mean is 32 bits in 2.4M weights).
    w = torch.randn(768, 3072)
    for scheme in ("nf4", "nf4-dq"):
        measured = 8 * quantize_nf4(w, double_quant=scheme == "nf4-dq").nbytes / w.numel()
        assert measured == pytest.approx(bits_per_weight(scheme), abs=1e-4)
    assert 8 * quantize_int8(w).nbytes / w.numel() == pytest.approx(bits_per_weight("int8", row_length=3072))


def test_unknown_scheme_lists_the_choices():
    with pytest.raises(ValueError, match="nf4, nf4-dq, int8, int4"):
        check_scheme("fp4")
    with pytest.raises(ValueError, match="choose one of"):
        bits_per_weight("int2")
    assert bits_per_weight("int4") == 5 and bits_per_weight("int4", block_size=128) == 4.5
    assert all(check_scheme(s) == s for s in SCHEMES)


@pytest.mark.parametrize("bad", [0, -64, 48, 100, 1, 64.0, True])
def test_block_size_must_be_a_power_of_two(bad):
    with pytest.raises(ValueError, match="power of two"):
        check_block_size(bad)
    with pytest.raises(ValueError, match="block size"):
        quantize_nf4(torch.randn(128), block_size=bad)
    with pytest.raises(ValueError, match="scale block size"):
        quantize_nf4(torch.randn(128), scale_block_size=bad)


def test_bad_tensors_are_refused():
    with pytest.raises(TypeError, match="floating-point"):
        quantize_nf4(torch.arange(64))
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.randn(64))
    with pytest.raises(ValueError, match="2-D"):
        quantized_bytes(64, "int8")
    assert check_block_size(64) == 64
