"""int4 by hand, and PyTorch's weight-only int8/int4 kernels against the hand-written dequantizing reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minigpt import GPTModel
from minigpt.quantization import weight_only
from minigpt.quantization.layers import Linear8bit, LinearInt4
from minigpt.quantization.model import quantization_of, quantize_model
from minigpt.quantization.schemes import (
    Int8Weight,
    bits_per_weight,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    quantized_bytes,
    unpack_int4,
)
from minigpt.runtime import kernels
from minigpt.runtime.kernels import KERNEL_ENV

TINY = dict(vocab_size=96, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)


def test_int4_maps_each_groups_range_onto_0_to_15_by_hand():
    row = torch.cat([torch.linspace(-1.0, 2.0, 16).repeat(2), torch.zeros(32)])  # two groups of 32
    q = quantize_int4(row[None, :], block_size=32)
    assert q.scales.tolist() == [[pytest.approx(3 / 15), 0.0]]  # (max - min) / 15; an all-zero group: 0
    assert q.zeros.tolist() == [[pytest.approx(-1 + 8 * 3 / 15), 0.0]]  # zero = min + 8 scale
    assert unpack_int4(q)[0, :16].tolist() == list(range(16))  # the 16 levels hit exactly
    assert q.packed[0, 0].item() == 0 << 4 | 1  # two values a byte, the first in the high half
    torch.testing.assert_close(dequantize_int4(q)[0], row, rtol=0, atol=1e-6)


def test_int4_error_is_at_most_half_a_step_and_sizes_are_counted():
    w = torch.randn(48, 256)
    q = quantize_int4(w, 64)
    step = q.scales.repeat_interleave(64, dim=1)
    assert ((dequantize_int4(q) - w).abs() <= step / 2 + 1e-6).all()
    assert q.nbytes == quantized_bytes((48, 256), "int4") == 48 * 256 * bits_per_weight("int4") / 8
    ragged = quantize_int4(torch.randn(4, 100), 64)  # 100 inputs: a second group of 36, padded with zeros
    assert ragged.packed.shape == (4, 64) and ragged.scales.shape == (4, 2)
    assert dequantize_int4(ragged).shape == (4, 100)
    assert ragged.nbytes == quantized_bytes((4, 100), "int4")
    with pytest.raises(ValueError, match="groups, got shape \\(100,\\)"):
        quantize_int4(torch.randn(100))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [1, 5])
def test_packed_kernels_compute_the_dequantized_product(dtype, tolerance, rows):
    """torch's int8 and int4 kernels against x @ dequantize(q).T in float64: float32 activations to
    float32 rounding, bfloat16 ones to bfloat16's (relative to the product's summed magnitudes)."""
    # 224 inputs: 3.5 groups of 64; 101 outputs: int4's tiles of 16 rows padded (as a vocabulary's are)
    w, x = torch.randn(101, 224) * 0.02, torch.randn(rows, 224)
    for q in (quantize_int8(w), quantize_int4(w, 64)):
        if not weight_only.supports_packed(q):
            pytest.skip("this PyTorch lacks the weight-only kernels")
        dense = dequantize_int8(q) if isinstance(q, Int8Weight) else dequantize_int4(q)
        reference = x.double() @ dense.double().t()
        magnitude = x.double().abs() @ dense.double().abs().t()
        kernel = "packed_bfloat16" if dtype == torch.bfloat16 else "packed_float32"
        out = weight_only.packed_product(kernel, x, q, lambda q=q: weight_only.int4_layout(q))
        assert out.dtype == torch.float32 and out.shape == (rows, 101)
        assert ((out.double() - reference).abs() <= tolerance * magnitude).all()


@pytest.fixture
def packed_wins(monkeypatch):
    """The table decides, and it says: the bfloat16 packed kernel is the fastest."""
    monkeypatch.setenv(KERNEL_ENV, "measure")
    monkeypatch.setattr(kernels, "measure", lambda product: {"dequantize": 3.0, "packed_float32": 2.0,
                                                             "packed_bfloat16": 1.0})
    kernels._TABLES.clear()
    yield
    kernels._TABLES.clear()


@pytest.mark.parametrize("layer_type", [Linear8bit, LinearInt4])
def test_a_quantized_layer_decodes_through_the_faster_kernel_and_trains_through_the_reference(layer_type,
                                                                                               packed_wins):
    linear = nn.Linear(128, 64)
    layer = layer_type.from_linear(linear)
    x = torch.randn(2, 128)
    reference = F.linear(x, layer.dequantized_weight(), layer.bias)
    with torch.no_grad():
        assert layer._packed_kernel(x) == "packed_bfloat16"
        torch.testing.assert_close(layer(x), reference, rtol=2e-2, atol=2e-2)
    x.requires_grad_()
    assert layer._packed_kernel(x) is None  # a gradient to compute: the dequantizing reference
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)


def test_int4_layers_load_their_buffers_and_remake_the_kernels_layout(packed_wins):
    model = quantize_model(GPTModel(TINY), "int4").eval()
    assert quantization_of(model)["scheme"] == "int4" and quantization_of(model)["block_size"] == 64
    assert isinstance(model.trf_blocks[0].ff.layers[0], LinearInt4)
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        before = model(ids)
        other = quantize_model(GPTModel(TINY), "int4").eval()
        model.load_state_dict(other.state_dict())  # new weights: the cached tiled layout must follow
        torch.testing.assert_close(model(ids), other(ids), rtol=0, atol=0)
        assert not torch.allclose(before, model(ids))



def test_a_model_quantized_under_inference_mode_decodes_through_the_packed_kernels(packed_wins):
    """Tensors made under ``torch.inference_mode`` keep no version counter; the int4 layer's cached
    layout must not ask for one. The tied output head is quantized too: its 97 vocabulary rows are
    padded to the int4 kernel's tiles of 16 inside the layout and cut off again."""
    with torch.inference_mode():
        model = quantize_model(GPTModel({**TINY, "vocab_size": 97, "tie_weights": True}), "int4").eval()
        head = model.out_head
        assert isinstance(head, LinearInt4) and head.tied_to == "tok_emb"
        assert model(torch.randint(0, 97, (1, 8))).shape == (1, 8, 97)
        hidden = torch.randn(3, TINY["emb_dim"])
        assert head._packed_kernel(hidden) == "packed_bfloat16"
        torch.testing.assert_close(head(hidden), F.linear(hidden, head.dequantized_weight()), rtol=2e-2, atol=2e-2)
