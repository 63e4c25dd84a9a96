"""Linear4bit / Linear8bit and quantize_model: outputs, gradients, memory, and whole models."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from minigpt.data.corpora import load_corpus
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.quantization.layers import QUANTIZED_LAYERS, Linear4bit, Linear8bit
from minigpt.quantization.model import (
    dequantize_model,
    is_quantized,
    quantization_of,
    quantize_linear,
    quantize_model,
    weight_bytes,
)
from minigpt.quantization.schemes import dequantize_int8, dequantize_nf4, quantize_int8, quantize_nf4, quantized_bytes
from minigpt.runtime.linear import Linear

logger = logging.getLogger(__name__)

TINY = dict(vocab_size=96, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)


def expected_weight(linear: nn.Linear, scheme: str) -> torch.Tensor:
    if scheme == "int8":
        return dequantize_int8(quantize_int8(linear.weight))
    return dequantize_nf4(quantize_nf4(linear.weight, 64, double_quant=scheme == "nf4-dq"))


@pytest.mark.parametrize("scheme", ["nf4", "nf4-dq", "int8"])
def test_forward_is_a_linear_with_the_dequantized_weight(scheme):
    torch.manual_seed(0)
    linear = nn.Linear(100, 37)  # 3700 weights: the last block of 64 is padded
    layer = quantize_linear(linear, scheme)
    assert isinstance(layer, Linear8bit if scheme == "int8" else Linear4bit) and layer.scheme == scheme
    assert (layer.in_features, layer.out_features) == (100, 37)
    x = torch.randn(3, 5, 100)
    weight = expected_weight(linear, scheme)
    torch.testing.assert_close(layer.dequantized_weight(), weight, rtol=0, atol=0)
    torch.testing.assert_close(layer(x), F.linear(x, weight, linear.bias), rtol=1e-6, atol=1e-6)


def test_quantized_tensors_are_frozen_buffers():
    layer = Linear4bit.from_linear(nn.Linear(128, 64), "nf4-dq")
    assert list(layer.parameters()) == []
    assert sorted(layer.state_dict()) == ["bias", "packed", "scale_codes", "scale_factors", "scale_mean"]
    assert sorted(Linear8bit.from_linear(nn.Linear(8, 4, bias=False)).state_dict()) == ["data", "scales"]


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_backward_equals_a_float_layer_with_the_dequantized_weight(scheme):
    torch.manual_seed(1)
    linear = nn.Linear(64, 192)
    layer = quantize_linear(linear, scheme)
    reference = nn.Linear(64, 192)
    with torch.no_grad():
        reference.weight.copy_(expected_weight(linear, scheme))
        reference.bias.copy_(linear.bias)
    x1 = torch.randn(4, 7, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    upstream = torch.randn(4, 7, 192)
    (layer(x1) * upstream).sum().backward()
    (reference(x2) * upstream).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)


def _saved_for_backward(layer: nn.Module, x: torch.Tensor) -> list[int]:
    """Sizes of the tensors autograd keeps from ``layer(x)`` until backward."""
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        layer(x).sum().backward()
    return saved


def test_backward_keeps_no_dequantized_weight():
    """Nothing of the weight's size waits for backward: it is dequantized again there."""
    linear = nn.Linear(256, 512).requires_grad_(False)
    x = torch.randn(2, 256, requires_grad=True)
    assert 256 * 512 in _saved_for_backward(linear, x)  # a float layer keeps its weight for grad_x
    assert all(n < 256 * 512 / 4 for n in _saved_for_backward(Linear4bit.from_linear(linear, "nf4"), x))
    assert x.grad.shape == x.shape


def test_compute_dtype_bfloat16():
    torch.manual_seed(2)
    linear = nn.Linear(64, 32)
    layer = Linear4bit.from_linear(linear, "nf4", compute_dtype=torch.bfloat16)
    assert layer.dequantized_weight().dtype == torch.bfloat16
    x = torch.randn(8, 64)
    out = layer(x)
    assert out.dtype == torch.float32  # computed in bfloat16, handed back in the input's dtype
    torch.testing.assert_close(out, F.linear(x, expected_weight(linear, "nf4"), linear.bias), rtol=0.02, atol=0.05)


def test_to_moves_the_buffers():
    layer = Linear4bit.from_linear(nn.Linear(64, 64), "nf4-dq")
    moved = layer.to("meta")
    assert moved.device.type == "meta"
    assert all(t.is_meta for t in moved.state_dict().values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_numbers_on_cuda():
    torch.manual_seed(7)
    linear = nn.Linear(256, 128)
    on_cpu = Linear4bit.from_linear(linear, "nf4-dq", compute_dtype=torch.bfloat16)
    moved = Linear4bit.from_linear(linear, "nf4-dq", compute_dtype=torch.bfloat16).to("cuda")
    made_there = Linear4bit.from_linear(linear.to("cuda"), "nf4-dq", compute_dtype=torch.bfloat16)
    assert moved.device.type == "cuda" and made_there.device.type == "cuda"
    assert torch.equal(made_there.packed.cpu(), on_cpu.packed)
    x = torch.randn(4, 256)
    torch.testing.assert_close(moved(x.cuda()).cpu(), on_cpu(x), rtol=0.02, atol=0.02)
    x = x.cuda().requires_grad_(True)
    made_there(x).sum().backward()
    assert x.grad.shape == x.shape


def test_state_dict_loads_into_an_empty_layer():
    torch.manual_seed(3)
    source = Linear4bit.from_linear(nn.Linear(48, 41), "nf4-dq", block_size=32)
    target = Linear4bit(48, 41, block_size=32, double_quant=True)
    target.load_state_dict(source.state_dict())
    x = torch.randn(3, 48)
    assert torch.equal(target(x), source(x))
    int8 = Linear8bit.from_linear(nn.Linear(48, 41))
    empty = Linear8bit(48, 41)
    empty.load_state_dict(int8.state_dict())
    assert torch.equal(empty(x), int8(x))


def test_from_linear_on_meta_makes_buffers_of_the_right_shapes():
    with torch.device("meta"):
        layer = quantize_linear(nn.Linear(768, 3072), "nf4-dq")
    assert layer.device.type == "meta"
    assert layer.quantized_bytes() == quantized_bytes((3072, 768), "nf4-dq")
    with pytest.raises(ValueError, match="Linear8bit"):
        Linear4bit.from_linear(nn.Linear(64, 64), "int8")


def test_quantize_model_replaces_the_block_linears_only():
    model = GPTModel(TINY)
    quantize_model(model, "nf4")
    quantized = [name for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]
    assert len(quantized) == 6 * TINY["n_layers"]  # query, key, value, out_proj, two feed-forward
    assert all(name.startswith("trf_blocks.") for name in quantized)
    assert type(model.out_head) is Linear and type(model.tok_emb) is nn.Embedding
    assert not any(isinstance(m, nn.Linear) for m in model.trf_blocks.modules())
    assert is_quantized(model) and not is_quantized(GPTModel(TINY))
    settings = quantization_of(model)
    assert settings["scheme"] == "nf4" and settings["block_size"] == 64
    assert settings["modules"] == quantized
    assert quantization_of(GPTModel(TINY)) is None


def test_quantize_model_skip_patterns():
    model = quantize_model(GPTModel(TINY), "int8", skip=("out_head", "ff.*"))
    assert isinstance(model.trf_blocks[0].att.W_query, Linear8bit)
    assert type(model.trf_blocks[1].ff.layers[0]) is Linear
    everything = quantize_model(GPTModel(TINY), "nf4-dq", skip=())
    assert isinstance(everything.out_head, Linear4bit)


def test_quantize_model_refuses_bad_requests():
    model = quantize_model(GPTModel(TINY), "nf4")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int8")
    with pytest.raises(ValueError, match="nf4, nf4-dq, int8, int4"):
        quantize_model(GPTModel(TINY), "int2")
    with pytest.raises(ValueError, match="power of two"):
        quantize_model(GPTModel(TINY), "nf4", block_size=96)
    with pytest.raises(TypeError, match="list"):
        quantize_model(GPTModel(TINY), "nf4", skip="out_head")
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.Embedding(4, 4)), "nf4")
    mixed = GPTModel(TINY)
    mixed.trf_blocks[0].att.W_query = quantize_linear(mixed.trf_blocks[0].att.W_query, "nf4")
    mixed.trf_blocks[0].att.W_key = quantize_linear(mixed.trf_blocks[0].att.W_key, "int8")
    with pytest.raises(ValueError, match="different settings"):
        quantization_of(mixed)


def test_weight_bytes_counts_what_is_stored():
    model = GPTModel(TINY)
    shapes = [tuple(m.weight.shape) for m in model.trf_blocks.modules() if isinstance(m, nn.Linear)]
    assert weight_bytes(model.trf_blocks) == 4 * sum(a * b for a, b in shapes)
    for scheme in ("nf4", "nf4-dq", "int8", "int4"):
        quantized = quantize_model(GPTModel(TINY), scheme)
        assert weight_bytes(quantized.trf_blocks) == sum(quantized_bytes(s, scheme) for s in shapes)


def test_dequantize_model_gives_plain_linears_computing_the_same():
    torch.manual_seed(4)
    model = quantize_model(GPTModel(TINY), "nf4-dq").eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    with torch.no_grad():
        expected = model(ids)
        dequantize_model(model)
        got = model(ids)
    assert not is_quantized(model)
    assert type(model.trf_blocks[0].ff.layers[0]) is Linear
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no quantized layers"):
        dequantize_model(model)


def test_gpt2_shaped_logits_stay_close_under_nf4():
    """GPT-2 small's matrix shapes (4 of its 12 blocks) with random weights."""
    torch.manual_seed(5)
    model = GPTModel(GPTConfig.from_preset("gpt2-small", n_layers=4, drop_rate=0.0)).eval()
    ids = torch.randint(0, 50257, (1, 64))
    with torch.no_grad():
        reference = model(ids)
        nf4 = quantize_model(model, "nf4")(ids)
        int8 = quantize_model(dequantize_model(model), "int8")(ids)  # nf4's rounding, then int8's on top
    nf4_delta, int8_delta = (nf4 - reference).abs(), (int8 - nf4).abs()
    logger.info("gpt2-small shapes, 4 blocks: |delta logit| under nf4: max %.4f mean %.4f (logit std %.4f)",
                nf4_delta.max(), nf4_delta.mean(), reference.std())
    # Random weights are the hard case (every block adds its error to nearly flat logits),
    # yet the logits move by a fraction of their spread.
    assert nf4_delta.mean() < 0.25 * reference.std()
    assert nf4_delta.max() < 2 * reference.std()
    assert int8_delta.mean() < nf4_delta.mean() / 4  # 8 bits are 16 times finer


def _char_batches(text: str, vocab: dict[str, int], context: int, generator: torch.Generator, n: int):
    ids = torch.tensor([vocab[c] for c in text])
    starts = torch.randint(0, len(ids) - context - 1, (n,), generator=generator)
    windows = torch.stack([ids[s:s + context + 1] for s in starts])
    return windows[:, :-1], windows[:, 1:]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())


def test_trained_model_perplexity_barely_moves_under_nf4(one_thread):
    """A small character model trained for a few seconds on Tiny Shakespeare, then quantized."""
    text = load_corpus("tiny-shakespeare")[:300_000]
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    train, val = text[:270_000], text[270_000:]
    torch.manual_seed(6)
    model = GPTModel(dict(TINY, vocab_size=len(vocab), context_length=64, emb_dim=128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(6)
    for _ in range(100):
        loss = _loss(model, _char_batches(train, vocab, 64, generator, 8))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    val_batch = _char_batches(val, vocab, 64, generator, 64)
    with torch.no_grad():
        float_ppl = _loss(model, val_batch).exp().item()
        nf4_ppl = _loss(quantize_model(model, "nf4-dq"), val_batch).exp().item()
    logger.info("validation perplexity float32 %.3f, nf4-dq %.3f (%+.2f%%)",
                float_ppl, nf4_ppl, 100 * (nf4_ppl / float_ppl - 1))
    assert float_ppl < 0.5 * len(vocab)  # it did learn something
    assert nf4_ppl < 1.03 * float_ppl
