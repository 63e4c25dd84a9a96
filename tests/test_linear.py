"""minigpt.runtime.linear: nn.Linear's products on the kernel measured fastest, float32 all the way, the same gradients.

The kernel is forced by MINIGPT_LINEAR_KERNEL (tests/conftest.py); every test here passes with either."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import profile

from minigpt import GPTConfig, GPTModel
from minigpt.models.llama.config import LlamaConfig
from minigpt.models.llama.model import LlamaModel
from minigpt.runtime.kernels import KERNEL_ENV
from minigpt.runtime.linear import Linear, input_gradient, linear, product_dtype, weight_gradient

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")

SMALL_GPT = GPTConfig(vocab_size=1000, context_length=64, emb_dim=256, n_heads=4, n_layers=2, drop_rate=0.0,
                      qkv_bias=True)
SMALL_LLAMA = LlamaConfig(vocab_size=1000, context_length=64, emb_dim=256, n_heads=4, n_kv_heads=2, n_layers=2,
                          hidden_dim=512, head_dim=64)
IN, OUT = 1024, 2048


def float64_reference(x, weight, bias):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


def assert_float32_accurate(out, x, weight, bias):
    """Within 1e-5 of the float64 result, relative to the summed magnitudes |x| @ |W|.T + |b|:
    float32 rounding, summed in any order, stays well below it (bfloat16 would be near 1e-2)."""
    magnitude = float64_reference(x.abs(), weight.abs(), None if bias is None else bias.abs())
    error = (out.double() - float64_reference(x, weight, bias)).abs()
    assert out.dtype == torch.float32 and (error <= 1e-5 * magnitude).all(), (error / magnitude).max()


def inputs(x_shape, out_features=OUT, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, generator=g)
    weight = torch.randn(out_features, x_shape[-1], generator=g)
    return x, weight, (torch.randn(out_features, generator=g) if bias else None)


@needs_onednn
@pytest.mark.parametrize("x_shape", [(IN,), (1, IN), (7, IN), (2, 3, IN)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_equals_float64_to_float32_rounding(x_shape, bias):
    x, weight, b = inputs(x_shape, bias=bias)
    assert product_dtype(x, weight, b) == torch.float32
    out = linear(x, weight, b)
    assert out.shape == F.linear(x, weight, b).shape
    assert_float32_accurate(out, x, weight, b)


@needs_onednn
def test_strided_inputs_and_transposed_weights():
    """Weights loaded from Hugging Face's (in, out) layout are transposed views; sliced inputs are strided."""
    x, weight, b = inputs((5, 2 * IN))
    x = x[:, ::2]
    weight_in_out = weight[:, :IN].t().contiguous()  # stored (in, out), as HF's Conv1D keeps it
    assert product_dtype(x, weight_in_out.t(), b)
    assert_float32_accurate(linear(x, weight_in_out.t(), b), x, weight_in_out.t(), b)


@needs_onednn
def test_weights_with_gaps_between_rows_stay_with_f_linear():
    """A third of Hugging Face GPT-2's fused (in, 3 out) c_attn, transposed, is how a loaded model's
    query, key and value look: oneDNN would take its reference kernel for it, far slower."""
    c_attn = torch.randn(IN, 3 * OUT)
    query = c_attn[:, :OUT].t()  # (out, in) with strides (1, 3 out)
    x = torch.randn(4, IN)
    assert not product_dtype(x, query)
    assert torch.equal(linear(x, query), F.linear(x, query))


@needs_onednn
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True)],
                         ids=["all", "input_only", "weights_only"])
def test_gradients_equal_float64(needs):
    """Training (everything), a frozen base under LoRA (the input only) and a first layer (the weights only)."""
    x, weight, b = inputs((2, 3, IN))
    for t, wanted in zip((x, weight, b), needs, strict=True):
        t.requires_grad_(wanted)
    upstream = torch.randn(2, 3, OUT)
    (linear(x, weight, b) * upstream).sum().backward()

    leaves = [t.detach().double().requires_grad_(wanted) for t, wanted in zip((x, weight, b), needs, strict=True)]
    (F.linear(*leaves) * upstream.double()).sum().backward()
    for t, ref in zip((x, weight, b), leaves, strict=True):
        if ref.grad is None:
            assert t.grad is None
        else:
            torch.testing.assert_close(t.grad.double(), ref.grad, rtol=1e-4, atol=1e-5 * ref.grad.abs().max().item())


@needs_onednn
def test_the_gradient_of_a_sum_arrives_expanded_and_still_works():
    x, weight, b = inputs((3, IN))
    weight.requires_grad_()
    linear(x, weight, b).sum().backward()  # grad_out is a stride-0 expanded tensor of ones
    torch.testing.assert_close(weight.grad, x.sum(0).expand(OUT, IN), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("route", ["onednn", "f_linear", "mkldnn off"])
def test_the_backward_products_on_their_own_equal_autograds(route, monkeypatch):
    # input_gradient and weight_gradient, called outside autograd (a loss that writes its own
    # backward), give what autograd gives linear(x, W): on either kernel, and on the BLAS when oneDNN is off.
    if route == "mkldnn off":
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    else:
        monkeypatch.setenv(KERNEL_ENV, route)
    x, weight, _ = inputs((5, IN))
    grad = torch.randn(5, OUT, generator=torch.Generator().manual_seed(1))
    x.requires_grad_()
    weight.requires_grad_()
    F.linear(x, weight).backward(grad)
    torch.testing.assert_close(input_gradient(grad, weight.detach()), x.grad, rtol=1e-5, atol=1e-4)
    got = weight_gradient(grad, x.detach())
    assert got.shape == (OUT, IN)
    torch.testing.assert_close(got, weight.grad, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_float32_and_bfloat16_cpu_products_are_routed_others_go_to_f_linear(monkeypatch):
    x, weight, b = inputs((2, IN))
    assert product_dtype(x, weight, b) == torch.float32
    assert product_dtype(x[:1, :8], weight[:1, :8]) == torch.float32  # however small: the table decides
    assert product_dtype(x.bfloat16(), weight.bfloat16(), b.bfloat16()) == torch.bfloat16
    assert product_dtype(x.double(), weight.double(), b.double()) is None
    assert product_dtype(x.half(), weight.half(), b.half()) is None
    assert product_dtype(x, weight.bfloat16(), b) is None  # mixed dtypes: F.linear's error says so
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert product_dtype(x, weight, b) == torch.bfloat16  # computed in autocast's dtype, as F.linear would
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # the off switch: the BLAS, bit for bit
    assert product_dtype(x, weight, b) is None
    assert torch.equal(linear(x, weight, b), F.linear(x, weight, b))


@needs_onednn
@pytest.mark.parametrize("weight_shape, bias_shape, message", [
    ((OUT, IN // 2), None, "cannot be multiplied"),
    ((OUT, IN), (7,), "must match the existing size"),
], ids=["weight", "bias"])
def test_sizes_that_do_not_fit_get_f_linears_error(weight_shape, bias_shape, message):
    """oneDNN's own error names no shape; F.linear's says what did not fit."""
    x = torch.randn(2, IN)
    weight, bias = torch.randn(weight_shape), None if bias_shape is None else torch.randn(bias_shape)
    assert not product_dtype(x, weight, bias)
    with pytest.raises(RuntimeError, match=message):
        linear(x, weight, bias)


def test_autocast_still_chooses_the_dtype():
    layer = Linear(IN, OUT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, IN)).dtype == torch.bfloat16


def test_linear_is_an_nn_linear_with_its_state_dict():
    plain = nn.Linear(IN, OUT)
    layer = Linear(IN, OUT)
    assert isinstance(layer, nn.Linear) and layer.state_dict().keys() == plain.state_dict().keys()
    layer.load_state_dict(plain.state_dict())
    x = torch.randn(3, IN)
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("model_class, cfg", [(GPTModel, SMALL_GPT), (LlamaModel, SMALL_LLAMA)],
                         ids=["gpt", "llama"])
@pytest.mark.parametrize("kernel", ["onednn", "f_linear"])
def test_every_product_of_a_model_runs_on_the_forced_kernel(model_class, cfg, kernel, monkeypatch):
    """Both families' layers and heads: forced to oneDNN no float32 product is left to the BLAS
    (aten::addmm / aten::mm), and forced to F.linear none goes to oneDNN."""
    monkeypatch.setenv(KERNEL_ENV, kernel)
    model = model_class(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.no_grad(), profile() as prof:
        model(ids)
    names = {event.key for event in prof.key_averages()}
    assert ("mkldnn::_linear_pointwise" in names) == (kernel == "onednn")
    assert bool(names & {"aten::addmm", "aten::mm"}) == (kernel == "f_linear")


@needs_onednn
def test_a_training_step_gives_the_same_gradients_on_either_kernel(monkeypatch):
    torch.manual_seed(0)
    model = GPTModel(SMALL_GPT)
    ids = torch.randint(0, SMALL_GPT.vocab_size, (2, 65))

    def gradients():
        model.zero_grad()
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    monkeypatch.setenv(KERNEL_ENV, "onednn")
    ours = gradients()
    monkeypatch.setenv(KERNEL_ENV, "f_linear")
    blas = gradients()
    for name, grad in ours.items():
        torch.testing.assert_close(grad, blas[name], rtol=1e-4, atol=1e-6, msg=name)


@needs_onednn
def test_torch_compile_keeps_the_product_in_one_graph_with_its_gradient():
    layer = Linear(IN, OUT)
    x = torch.randn(3, IN, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break would raise
    out = compiled(x)
    out.sum().backward()
    assert torch.equal(out, layer(x))  # the same operator, compiled or not
    grad = x.grad.clone()
    x.grad = None
    layer(x).sum().backward()
    assert torch.equal(grad, x.grad)
