"""Losses: the book's cross-entropy, the pluggable loss function, and means over a loader
that count every scored target once (a last short batch included), compared with one
cross-entropy over all the targets at once."""

import math

import pytest
import torch
import torch.nn.functional as F

from minigpt.data.windows import GPTDataset
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.training.distributed import sharded_loader
from minigpt.training.losses import (
    IGNORE_INDEX,
    calc_loss_batch,
    calc_loss_loader,
    evaluate_model,
    evaluation_scope,
    input_tokens,
    loss_and_metrics,
    next_token_loss,
    perplexity,
    scored_targets,
    summed_loss,
    summed_loss_and_metrics,
    to_device,
)

CFG = GPTConfig(vocab_size=96, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs tiny models."""


def _windows(n_windows: int, seed: int = 2) -> GPTDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (n_windows * CFG.context_length + 1,), generator=g)
    return GPTDataset(ids, max_length=CFG.context_length, stride=CFG.context_length)


def test_calc_loss_batch_is_cross_entropy_over_every_position():
    model = GPTModel(CFG).eval()
    inputs, targets = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    logits = model(inputs)
    expected = F.cross_entropy(logits.reshape(-1, 96), targets.reshape(-1))
    assert torch.allclose(calc_loss_batch(inputs, targets, model, "cpu"), expected)


def test_calc_loss_batch_ignores_targets_of_minus_100():
    model = GPTModel(CFG).eval()
    inputs, targets = torch.randint(0, 96, (1, 16)), torch.randint(0, 96, (1, 16))
    masked = targets.clone()
    masked[0, 5:] = -100
    logits = model(inputs)
    expected = F.cross_entropy(logits[0, :5], targets[0, :5])
    assert torch.allclose(calc_loss_batch(inputs, masked, model, "cpu"), expected)
    assert IGNORE_INDEX == -100


def test_next_token_loss_takes_the_model_then_the_batch():
    model = GPTModel(CFG).eval()
    inputs, targets = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    assert torch.equal(next_token_loss(model, (inputs, targets)), calc_loss_batch(inputs, targets, model, "cpu"))


def test_calc_loss_loader_averages_the_first_batches_and_refuses_an_empty_loader():
    model = GPTModel(CFG).eval()
    val = sharded_loader(_windows(8), 2, shuffle=False)
    batches = list(val)[:3]
    expected = sum(calc_loss_batch(x, y, model, "cpu").item() for x, y in batches) / 3
    assert calc_loss_loader(val, model, "cpu", num_batches=3) == pytest.approx(expected)
    with pytest.raises(ValueError, match="nothing to measure.*shorter context length.*larger share"):
        calc_loss_loader([], model, "cpu")


def test_the_loss_over_a_loader_is_the_mean_over_every_scored_target_a_short_last_batch_included():
    model = GPTModel(CFG).eval()
    loader = sharded_loader(_windows(5), 2, shuffle=False)  # batches of 2, 2 and 1 windows
    assert [len(x) for x, _ in loader] == [2, 2, 1]
    # Mask a different share of each batch's targets, as fine-tuning's padding does.
    batches = [(x, y.masked_fill(torch.arange(16) >= 16 - 5 * i, IGNORE_INDEX)) for i, (x, y) in enumerate(loader)]
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    expected = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    assert calc_loss_loader(batches, model, "cpu") == pytest.approx(expected.item(), rel=1e-6)
    mean_of_means = sum(calc_loss_batch(x, y, model, "cpu").item() for x, y in batches) / 3
    assert calc_loss_loader(batches, model, "cpu") != pytest.approx(mean_of_means, rel=1e-6)
    total, count = summed_loss(batches, model, "cpu")
    assert count == int((targets != IGNORE_INDEX).sum()) and total / count == calc_loss_loader(batches, model, "cpu")


def test_a_fully_masked_batch_counts_for_nothing_instead_of_making_the_mean_nan():
    model = GPTModel(CFG).eval()
    x, y = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    masked = torch.full_like(y, IGNORE_INDEX)
    assert calc_loss_loader([(x, y), (x, masked)], model, "cpu") == pytest.approx(
        calc_loss_batch(x, y, model, "cpu").item())
    with pytest.raises(ValueError, match="nothing to measure"):
        calc_loss_loader([(x, masked)], model, "cpu")


def test_scored_targets_and_input_tokens_read_the_usual_batch_shapes():
    x, y = torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 16, dtype=torch.long)
    y[0, :4] = IGNORE_INDEX
    assert scored_targets((x, y)) == 28 and scored_targets([x, y]) == 28
    assert scored_targets({"inputs": x, "targets": y}) == 28
    assert scored_targets({"chosen": x, "rejected": x}) == 2  # no targets: one per row
    assert input_tokens((x, y)) == 32 and input_tokens({"inputs": x[:1]}) == 16


def test_a_dict_batch_may_state_its_own_counts():
    pairs = {"chosen_ids": torch.zeros(3, 10, dtype=torch.long), "rejected_ids": torch.zeros(3, 10, dtype=torch.long),
             "num_scored": 3, "num_tokens": 60}
    assert scored_targets(pairs) == 3 and input_tokens(pairs) == 60
    assert scored_targets({**pairs, "num_scored": torch.tensor(5)}) == 5
    assert to_device(pairs, "meta")["num_scored"] == 3  # counts travel unchanged


def test_a_loss_may_return_metrics_that_are_averaged_like_the_loss():
    loss = torch.tensor(2.0)
    assert loss_and_metrics(loss) == (loss, {})
    assert loss_and_metrics((loss, {"acc": 0.5})) == (loss, {"acc": 0.5})

    def loss_fn(model, batch):  # the batch's mean loss, and a figure per batch
        return batch["value"].mean(), {"double": 2 * batch["value"].mean(), "count": float(len(batch["value"]))}

    # Batches of 3 and 1 items: every item weighs the same, as for the loss.
    loader = [{"value": torch.tensor([1.0, 2.0, 3.0])}, {"value": torch.tensor([10.0])}]
    total, count, sums = summed_loss_and_metrics(loader, None, "cpu", loss_fn=loss_fn)
    assert (total, count) == (16.0, 4)
    assert sums == {"double": 32.0, "count": 10.0}  # 3 * 3 + 1 * 1
    assert summed_loss(loader, None, "cpu", loss_fn=loss_fn) == (16.0, 4)
    assert calc_loss_loader(loader, None, "cpu", loss_fn=loss_fn) == 4.0
    assert summed_loss_and_metrics(loader, None, "cpu", num_batches=1, loss_fn=loss_fn)[2]["double"] == 12.0
    # A plain loss has no metrics.
    assert summed_loss_and_metrics([{"value": torch.ones(2)}], None, "cpu",
                                   loss_fn=lambda m, b: b["value"].mean())[2] == {}


def test_a_loss_function_gets_the_model_and_the_batch_on_the_device():
    seen = []

    def loss_fn(model, batch):
        seen.append(batch)
        return next_token_loss(model, (batch["inputs"], batch["targets"]))

    model = GPTModel(CFG).eval()
    loader = [{"inputs": x, "targets": y, "note": "kept"} for x, y in sharded_loader(_windows(4), 2, shuffle=False)]
    expected = calc_loss_loader([(b["inputs"], b["targets"]) for b in loader], model, "cpu")
    assert calc_loss_loader(loader, model, "cpu", loss_fn=loss_fn) == expected
    assert len(seen) == 2 and seen[0]["note"] == "kept"


def test_to_device_moves_every_tensor_of_nested_batches():
    x = torch.ones(2)
    moved = to_device({"a": (x, [x, 3]), "b": "text", "c": x}, "meta")
    assert moved["a"][0].device.type == "meta" and moved["a"][1][0].device.type == "meta"
    assert moved["a"][1][1] == 3 and moved["b"] == "text" and moved["c"].device.type == "meta"
    assert isinstance(moved["a"], tuple) and isinstance(moved["a"][1], list)


def test_evaluate_model_turns_dropout_off_and_restores_the_mode():
    model = GPTModel(CFG)
    train = sharded_loader(_windows(4, seed=1), 2, shuffle=False)
    val = sharded_loader(_windows(4), 2, shuffle=False)
    for mode in (True, False):
        model.train(mode)
        losses = evaluate_model(model, train, val, "cpu", eval_iter=None)
        assert model.training is mode
        model.eval()
        assert losses == (calc_loss_loader(train, model, "cpu"), calc_loss_loader(val, model, "cpu"))


def test_evaluation_scope_says_whether_a_loss_is_an_estimate():
    loader = sharded_loader(_windows(5), 2, shuffle=False)  # 3 batches
    assert evaluation_scope(loader, None) == "whole split"
    assert evaluation_scope(loader, 3) == "whole split"
    assert evaluation_scope(loader, 2) == "estimate over 2 of 3 batches"


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(50257)) == pytest.approx(50257)
    assert perplexity(1e6) == math.inf
