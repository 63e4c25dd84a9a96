"""GRPO's advantages and loss: hand-computed values, TRL's published formula, bad input."""

import logging
import math

import pytest
import torch

from minigpt.finetuning.grpo import group_advantages, grpo_loss, k3_kl, total_rewards
from minigpt.finetuning.reward_tasks import answer_format, correct_answer, reward_table


def test_advantages_by_hand():
    # Rewards 1, 0, 0, 1: mean 0.5; unbiased std = sqrt(4 * 0.25 / 3) = 1/sqrt(3).
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]))
    a = 0.5 / (3 ** -0.5 + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([[a, -a, -a, a], [0.0, 0.0, 0.0, 0.0]]))
    unscaled = group_advantages(torch.tensor([[3.0, 1.0]]), scale=False)  # Dr. GRPO: the difference from the mean
    torch.testing.assert_close(unscaled, torch.tensor([[1.0, -1.0]]))


def test_k3_by_hand():
    # pi = 0.5, ref = 0.25: ref/pi = 0.5, so k3 = 0.5 - log 0.5 - 1; equal probabilities give 0.
    kl = k3_kl(torch.tensor([math.log(0.5), math.log(0.3)]), torch.tensor([math.log(0.25), math.log(0.3)]))
    torch.testing.assert_close(kl, torch.tensor([0.5 - math.log(0.5) - 1, 0.0]))


def _lengths_example():
    """Answer 0: one token, advantage +1; answer 1: three tokens, advantage -1 (ratio 1, beta 0)."""
    logps = torch.tensor([[-1.0, 0.0, 0.0], [-2.0, -2.0, -2.0]], requires_grad=True)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    return logps, mask, torch.tensor([1.0, -1.0])


def test_token_and_sequence_averaging_differ_as_computed_by_hand():
    logps, mask, adv = _lengths_example()
    # Per token (default): tokens' losses -1 | 1 1 1, mean over the 4 tokens = 0.5;
    # each token's gradient is -A/4.
    loss, _ = grpo_loss(logps, logps.detach(), adv, mask, beta=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.5)
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.25, 0.0, 0.0], [0.25, 0.25, 0.25]]))
    # Per sequence: answer means -1 and 1, mean 0; the short answer's token gets -1/2, the long
    # answer's tokens 1/6 each: the long wrong answer is pushed down less per token.
    logps.grad = None
    loss, _ = grpo_loss(logps, logps.detach(), adv, mask, beta=0.0, averaging="sequence")
    loss.backward()
    assert loss.item() == pytest.approx(0.0)
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.5, 0.0, 0.0], [1 / 6, 1 / 6, 1 / 6]]))


def test_clipping_by_hand():
    # ratios 1.5 (A=+1: clipped at 1.2, no gradient), 0.5 (A=+1: kept), 0.5 (A=-1: clipped at 0.8, no gradient)
    old = torch.zeros(3, 1)
    logps = torch.log(torch.tensor([[1.5], [0.5], [0.5]])).requires_grad_()
    loss, metrics = grpo_loss(logps, old, torch.tensor([1.0, 1.0, -1.0]), torch.ones(3, 1), beta=0.0)
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8) / 3)
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0], [-0.5 / 3], [0.0]]))  # d(-ratio)/dlogp = -ratio
    assert metrics["clip_ratio"].item() == pytest.approx(2 / 3)


def test_kl_term_by_hand():
    logps = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    loss, metrics = grpo_loss(logps, logps, torch.zeros(1), torch.ones(1, 1), ref_logps=ref, beta=0.1)
    k3 = 0.5 - math.log(0.5) - 1
    assert loss.item() == pytest.approx(0.1 * k3)  # advantage 0: only the KL term is left
    assert metrics["kl"].item() == pytest.approx(k3)


# --- TRL's formula ------------------------------------------------------------------------------------
# Written from TRL 0.19.0, trl/trainer/grpo_trainer.py: GRPOTrainer._generate_and_score_completions
# (advantages) and GRPOTrainer._compute_loss (loss_type "bnpo" = per token, "grpo" = per sequence).


def trl_advantages(rewards, num_generations):
    mean = rewards.view(-1, num_generations).mean(dim=1).repeat_interleave(num_generations, dim=0)
    std = rewards.view(-1, num_generations).std(dim=1).repeat_interleave(num_generations, dim=0)
    return (rewards - mean) / (std + 1e-4)


def trl_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask, beta,
             epsilon_low, epsilon_high, loss_type):
    per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * advantages.unsqueeze(1), coef_2 * advantages.unsqueeze(1))
    per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)).mean()
    return (per_token_loss * completion_mask).sum() / completion_mask.sum().clamp(min=1.0)


@pytest.mark.parametrize(("averaging", "loss_type"), [("token", "bnpo"), ("sequence", "grpo")])
def test_matches_trl_formula(averaging, loss_type):
    g = torch.Generator().manual_seed(0)
    prompts, group, tokens = 3, 4, 6
    rewards = torch.randint(0, 3, (prompts * group,), generator=g).float()
    logps = -torch.rand(prompts * group, tokens, generator=g) * 3
    old = logps + 0.3 * torch.randn(logps.shape, generator=g)  # ratios far enough from 1 to be clipped
    ref = logps + 0.5 * torch.randn(logps.shape, generator=g)
    mask = (torch.arange(tokens) < torch.randint(1, tokens + 1, (prompts * group, 1), generator=g)).float()

    ours = group_advantages(rewards.view(prompts, group)).flatten()
    torch.testing.assert_close(ours, trl_advantages(rewards, group))
    expected = trl_loss(logps, old, ref, ours, mask, 0.04, 0.2, 0.28, loss_type)
    loss, metrics = grpo_loss(logps, old, ours, mask, ref_logps=ref, beta=0.04, epsilon_high=0.28,
                              averaging=averaging)
    torch.testing.assert_close(loss, expected)
    assert 0 < metrics["clip_ratio"] < 1


# --- bad input -----------------------------------------------------------------------------------------


def test_groups_too_small_or_empty_are_refused():
    with pytest.raises(ValueError, match="group of 1 answer.*2 or more"):
        group_advantages(torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError, match="empty group"):
        group_advantages(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))


def test_loss_settings_are_checked():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="averaging must be one of token, sequence"):
        grpo_loss(x, x, torch.zeros(1), x, beta=0.0, averaging="batch")
    with pytest.raises(ValueError, match="needs ref_logps"):
        grpo_loss(x, x, torch.zeros(1), x, beta=0.1)


TASK_REWARDS = {"correct": (correct_answer, 1.0), "format": (answer_format, 0.1)}


def test_reward_table_and_totals():
    table = reward_table(TASK_REWARDS, ["1 + 2 = "] * 2, ["3", "4 + 4"])
    torch.testing.assert_close(table, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    totals, keep = total_rewards(table, TASK_REWARDS, group_size=2)
    torch.testing.assert_close(totals, torch.tensor([[1.1, 0.0]]))
    assert keep.tolist() == [True]


def test_a_reward_function_that_raises_is_named():
    def broken(prompt, answer):
        if answer == "x":
            raise KeyError("no such key")
        return 1.0

    with pytest.raises(ValueError, match=r"reward function broken raised KeyError: 'no such key' on answer 1 \('x'\)"):
        reward_table({"broken": (broken, 1.0)}, ["p", "p"], ["ok", "x"])


@pytest.mark.parametrize("value", ["1", None, float("inf"), [1.0]])
def test_a_reward_that_is_not_a_finite_number_is_refused(value):
    with pytest.raises(ValueError, match="reward function odd returned .* for answer 0 .*finite number"):
        reward_table({"odd": (lambda p, a: value, 1.0)}, ["p"], ["a"])


def test_a_nan_reward_skips_its_group_with_a_warning(caplog):
    nan_for_b = {"r": (lambda p, a: float("nan") if a == "b" else 1.0, 1.0)}
    table = reward_table(nan_for_b, ["p"] * 4, ["a", "b", "a", "a"])
    with caplog.at_level(logging.WARNING, logger="minigpt.finetuning.grpo"):
        totals, keep = total_rewards(table, nan_for_b, group_size=2)
    assert keep.tolist() == [False, True]
    assert "skipping 1 of 2 prompts: reward function r returned NaN" in caplog.text
    assert torch.isfinite(group_advantages(totals[keep])).all()


def test_reward_values_of_other_types_are_accepted():
    table = reward_table({"b": (lambda p, a: a == "x", 1.0), "t": (lambda p, a: torch.tensor(0.5), 1.0)},
                         ["p", "p"], ["x", "y"])
    torch.testing.assert_close(table, torch.tensor([[1.0, 0.5], [0.0, 0.5]]))
