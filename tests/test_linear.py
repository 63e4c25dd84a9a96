"""minigpt.linear: nn.Linear's products on oneDNN, float32 all the way, the same gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import profile

from minigpt import GPTConfig, GPTModel
from minigpt.linear import Linear, linear, on_onednn
from minigpt.llama import LlamaConfig, LlamaModel

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")

TINY_GPT = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                     qkv_bias=True)
TINY_LLAMA = LlamaConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=2,
                         hidden_dim=64, head_dim=8)


def float64_reference(x, weight, bias):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


def inputs(x_shape, out_features=48, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, generator=g)
    weight = torch.randn(out_features, x_shape[-1], generator=g)
    return x, weight, (torch.randn(out_features, generator=g) if bias else None)


@needs_onednn
@pytest.mark.parametrize("x_shape", [(40,), (1, 40), (7, 40), (2, 3, 40), (0, 40)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_equals_float64_to_float32_rounding(x_shape, bias):
    x, weight, b = inputs(x_shape, bias=bias)
    assert on_onednn(x, weight, b)
    out = linear(x, weight, b)
    assert out.shape == F.linear(x, weight, b).shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), float64_reference(x, weight, b), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_strided_inputs_and_transposed_weights():
    """Weights loaded from Hugging Face's (in, out) layout are transposed views; sliced inputs are strided."""
    x, weight, b = inputs((5, 80))
    x = x[:, ::2]
    weight_in_out = weight[:, :40].t().contiguous()  # stored (in, out), as HF's Conv1D keeps it
    out = linear(x, weight_in_out.t(), b)
    torch.testing.assert_close(out.double(), float64_reference(x, weight_in_out.t(), b), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True)],
                         ids=["all", "input_only", "weights_only"])
def test_gradients_equal_float64(needs):
    """Training (everything), a frozen base under LoRA (the input only) and a first layer (the weights only)."""
    x, weight, b = inputs((2, 3, 40))
    for t, wanted in zip((x, weight, b), needs, strict=True):
        t.requires_grad_(wanted)
    upstream = torch.randn(2, 3, 48)
    (linear(x, weight, b) * upstream).sum().backward()

    leaves = [t.detach().double().requires_grad_(wanted) for t, wanted in zip((x, weight, b), needs, strict=True)]
    (F.linear(*leaves) * upstream.double()).sum().backward()
    for t, ref in zip((x, weight, b), leaves, strict=True):
        if ref.grad is None:
            assert t.grad is None
        else:
            torch.testing.assert_close(t.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_the_gradient_of_a_sum_arrives_expanded_and_still_works():
    x, weight, b = inputs((3, 40))
    weight.requires_grad_()
    linear(x, weight, b).sum().backward()  # grad_out is a stride-0 expanded tensor of ones
    torch.testing.assert_close(weight.grad, x.sum(0).expand(48, 40), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_only_float32_on_a_cpu_outside_autocast_goes_to_onednn(monkeypatch):
    x, weight, b = inputs((2, 40))
    assert on_onednn(x, weight, b)
    assert not on_onednn(x.bfloat16(), weight.bfloat16(), b.bfloat16())
    assert not on_onednn(x.double(), weight.double(), b.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not on_onednn(x, weight, b)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # the off switch: the BLAS, bit for bit
    assert not on_onednn(x, weight, b)
    assert torch.equal(linear(x, weight, b), F.linear(x, weight, b))


def test_autocast_still_chooses_the_dtype():
    layer = Linear(40, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 40)).dtype == torch.bfloat16


def test_linear_is_an_nn_linear_with_its_state_dict():
    plain = nn.Linear(40, 48)
    layer = Linear(40, 48)
    assert isinstance(layer, nn.Linear) and layer.state_dict().keys() == plain.state_dict().keys()
    layer.load_state_dict(plain.state_dict())
    x = torch.randn(3, 40)
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("model_class, cfg", [(GPTModel, TINY_GPT), (LlamaModel, TINY_LLAMA)],
                         ids=["gpt", "llama"])
def test_every_product_of_a_model_runs_on_onednn(model_class, cfg):
    """Both families' layers and heads: no float32 product is left to the BLAS (aten::addmm / aten::mm)."""
    model = model_class(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    with torch.no_grad(), profile() as prof:
        model(ids)
    names = {event.key for event in prof.key_averages()}
    assert "mkldnn::_linear_pointwise" in names
    assert not names & {"aten::addmm", "aten::mm"}


@needs_onednn
def test_a_training_step_gives_the_gradients_of_the_blas_path(monkeypatch):
    torch.manual_seed(0)
    model = GPTModel(TINY_GPT)
    ids = torch.randint(0, TINY_GPT.vocab_size, (2, 12))

    def gradients():
        model.zero_grad()
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    ours = gradients()
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    blas = gradients()
    for name, grad in ours.items():
        torch.testing.assert_close(grad, blas[name], rtol=1e-4, atol=1e-6, msg=name)
