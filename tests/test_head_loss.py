"""The head and its cross-entropy in one, chunk by chunk: the same loss and gradients as
``F.cross_entropy`` over the whole logits, for every way the rows split into chunks, ignored
targets, autocast, and the models' own training loss."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minigpt.lora.adapters import apply_lora
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.models.llama.config import LlamaConfig
from minigpt.models.llama.model import LlamaModel
from minigpt.runtime import kernels
from minigpt.runtime.kernels import KERNEL_ENV
from minigpt.training import head_loss
from minigpt.training.head_loss import chunk_rows_for, head_cross_entropy
from minigpt.training.losses import IGNORE_INDEX, calc_loss_batch, plain_head_weight


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs tiny products."""


def _case(rows: int, emb_dim: int = 8, vocab: int = 50, dtype=torch.float32, scale: float = 0.3):
    g = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, emb_dim, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, emb_dim, generator=g) * scale).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    return hidden, weight, targets


def _loss_and_grads(loss_fn, hidden, weight, targets, upstream: float = 3.0):
    hidden.grad = weight.grad = None
    loss = loss_fn(hidden, weight, targets)
    (upstream * loss).backward()  # a gradient other than 1 arrives, as with accumulation or scaling
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


def _reference(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("rows, chunk_rows", [(16, 4), (17, 4), (3, 8), (9, 1), (8, 8), (9, 8)])
def test_equals_cross_entropy_over_the_whole_logits(rows, chunk_rows):
    # Chunks that divide the rows, leave one over, exceed them, or hold one row each.
    hidden, weight, targets = _case(rows)
    expected = _loss_and_grads(_reference, hidden, weight, targets)
    got = _loss_and_grads(lambda h, w, t: head_cross_entropy(h, w, t, chunk_rows=chunk_rows), hidden, weight, targets)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_ignored_targets_score_nothing_and_get_no_gradient():
    hidden, weight, targets = _case(13)
    targets[[0, 4, 5, 12]] = IGNORE_INDEX  # rows in the first, a middle and the last chunk
    expected = _loss_and_grads(_reference, hidden, weight, targets)
    loss, grad_hidden, grad_weight = _loss_and_grads(
        lambda h, w, t: head_cross_entropy(h, w, t, chunk_rows=4), hidden, weight, targets)
    torch.testing.assert_close((loss, grad_hidden, grad_weight), expected, rtol=1e-5, atol=1e-7)
    assert grad_hidden[[0, 4, 5, 12]].abs().max() == 0


def test_no_scored_target_is_nan_with_zero_gradients_as_in_cross_entropy():
    hidden, weight, targets = _case(5)
    targets[:] = IGNORE_INDEX
    expected = _loss_and_grads(_reference, hidden, weight, targets)
    loss, grad_hidden, grad_weight = _loss_and_grads(
        lambda h, w, t: head_cross_entropy(h, w, t, chunk_rows=2), hidden, weight, targets)
    assert expected[0].isnan() and loss.isnan()
    assert expected[1].abs().max() == grad_hidden.abs().max() == 0
    assert expected[2].abs().max() == grad_weight.abs().max() == 0


def test_no_rows_at_all_is_nan_with_zero_gradients():
    hidden, weight, targets = _case(0)
    loss = head_cross_entropy(hidden, weight, targets)
    assert loss.isnan() and _reference(hidden, weight, targets).isnan()
    loss.backward()
    assert hidden.grad.shape == (0, 8) and weight.grad.abs().max() == 0


def test_extreme_logits_stay_finite_and_exact():
    # Logits in the thousands: a loss of hundreds of nats per token, where exp() alone would overflow.
    hidden, weight, targets = _case(7, scale=300.0)
    expected = _loss_and_grads(_reference, hidden, weight, targets)
    got = _loss_and_grads(lambda h, w, t: head_cross_entropy(h, w, t, chunk_rows=3), hidden, weight, targets)
    assert expected[0] > 100 and got[0].isfinite()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_autocast_computes_the_products_in_bfloat16_as_the_reference():
    hidden, weight, targets = _case(37, emb_dim=16, vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _loss_and_grads(_reference, hidden, weight, targets)
        got = _loss_and_grads(lambda h, w, t: head_cross_entropy(h, w, t, chunk_rows=8), hidden, weight, targets)
    assert got[1].dtype == got[2].dtype == torch.float32  # gradients in the parameters' dtype
    # Both round the logits and the gradients' products to bfloat16 (8 bits of mantissa).
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-3)


def test_bfloat16_weights_get_bfloat16_gradients():
    hidden, weight, targets = _case(11, dtype=torch.bfloat16)
    expected = _loss_and_grads(_reference, hidden, weight, targets)
    got = _loss_and_grads(lambda h, w, t: head_cross_entropy(h, w, t, chunk_rows=4), hidden, weight, targets)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-3)


def test_without_gradients_only_the_loss_is_computed(monkeypatch):
    hidden, weight, targets = _case(10)
    expected = _reference(hidden, weight, targets)
    products = []
    monkeypatch.setattr(head_loss, "input_gradient", lambda *a: products.append(a) or torch.zeros(()))
    for context in (torch.no_grad(), torch.inference_mode()):
        with context:
            loss = head_cross_entropy(hidden, weight, targets, chunk_rows=4)
        torch.testing.assert_close(loss, expected)
        assert not loss.requires_grad
    assert products == []


def test_the_logits_never_exist_whole(monkeypatch):
    rows, chunk_rows = 21, 4
    hidden, weight, targets = _case(rows)
    shapes = []
    real_linear = head_loss.linear
    monkeypatch.setattr(head_loss, "linear", lambda x, w: shapes.append(tuple(x.shape)) or real_linear(x, w))
    head_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows).backward()
    assert shapes == [(4, 8)] * 5 + [(1, 8)]  # six chunks: 4 rows each and the one left over


def test_rows_without_a_scored_target_never_reach_the_head(monkeypatch):
    hidden, weight, targets = _case(11)
    targets[:6] = IGNORE_INDEX  # a prompt's positions
    shapes = []
    real_linear = head_loss.linear
    monkeypatch.setattr(head_loss, "linear", lambda x, w: shapes.append(tuple(x.shape)) or real_linear(x, w))
    head_cross_entropy(hidden, weight, targets, chunk_rows=4).backward()
    assert shapes == [(4, 8), (1, 8)]  # the 5 scored rows
    assert hidden.grad[:6].abs().max() == 0


def test_default_chunk_is_as_large_as_the_weight():
    assert chunk_rows_for(torch.empty(50257, 768)) == 768


def test_mismatched_shapes_are_named():
    hidden, weight, targets = _case(6)
    with pytest.raises(ValueError, match=r"got \(6, 8\), \(50, 8\) and \(5,\)"):
        head_cross_entropy(hidden, weight, targets[:5])


def _all_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [
    lambda: GPTModel(GPTConfig(vocab_size=96, context_length=16, emb_dim=32, n_heads=2, n_layers=2,
                               drop_rate=0.0, tie_weights=True)),
    lambda: GPTModel(GPTConfig(vocab_size=96, context_length=16, emb_dim=32, n_heads=2, n_layers=2,
                               drop_rate=0.0, tie_weights=False)),
    lambda: LlamaModel(LlamaConfig(vocab_size=96, context_length=16, emb_dim=32, n_heads=4, n_kv_heads=2,
                                   n_layers=2, hidden_dim=64)),
], ids=["gpt2-tied", "gpt2-untied", "llama"])
@pytest.mark.parametrize("kernel", ["f_linear", pytest.param("onednn", marks=pytest.mark.skipif(
    not kernels.HAS_ONEDNN, reason="PyTorch built without oneDNN"))])
def test_training_loss_and_every_gradient_equal_the_logits_path(build, kernel, monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, kernel)
    torch.manual_seed(0)
    model = build()
    assert plain_head_weight(model) is model.out_head.weight
    inputs, targets = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))
    with torch.no_grad():  # head=False stops at the final norm's output, which the head turns into the logits
        hidden = model(inputs, head=False)
        assert hidden.shape == (3, 16, 32)
        torch.testing.assert_close(model.out_head(hidden), model(inputs))
    targets[1, :7] = IGNORE_INDEX  # a prompt's positions, as instruction tuning masks them
    loss = calc_loss_batch(inputs, targets, model, "cpu")
    loss.backward()
    fused = _all_grads(model)
    model.zero_grad(set_to_none=True)
    expected = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    reference = _all_grads(model)
    assert fused.keys() == reference.keys()
    for name in reference:  # the tied embedding gets both its lookup's and the head's gradient
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)


def test_heads_it_cannot_apply_itself_take_the_logits_path():
    cfg = GPTConfig(vocab_size=96, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
    with_bias = GPTModel(cfg)
    with_bias.out_head = nn.Linear(32, 2)  # a classifier's head, with a bias
    lora = GPTModel(cfg)
    apply_lora(lora, rank=2, alpha=4, target_modules=["out_head"])
    for model in (with_bias, lora, nn.Sequential(GPTModel(cfg))):
        assert plain_head_weight(model) is None
    inputs = torch.randint(0, 96, (2, 16))
    loss = calc_loss_batch(inputs, torch.randint(0, 2, (2, 16)), with_bias, "cpu")
    assert loss.isfinite()
