"""PPO: GAE, whitening, the KL-penalised rewards and the clipped losses by hand and against
TRL's PPOTrainer (trl/trainer/ppo_trainer.py and trl/trainer/utils.py, v0.11-v0.19), the
adaptive KL controller, and the job: it runs, and a stopped and resumed run equals an
uninterrupted one."""

import json
import os
import signal

import pytest
import torch
from test_jobs_dpo import SMALL, preference_file

import minigpt.jobs.ppo as job
from minigpt.finetuning.ppo import AdaptiveKLController, gae, kl_penalised_rewards, masked_whiten, ppo_losses
from minigpt.finetuning.reward import make_reward_model, save_reward_model
from minigpt.jobs.ppo import PPOConfig, finetune_ppo
from minigpt.models.gpt2.model import GPTModel

DATA_FILES = ["instruct/instruction-data-with-preference.json"]


def test_gae_by_hand():
    # Two answer tokens, gamma 1, lam 0.5: rewards (0, 1), values (0.5, 0.25).
    # delta1 = 1 - 0.25 = 0.75, A1 = 0.75; delta0 = 0 + 0.25 - 0.5 = -0.25, A0 = -0.25 + 0.5 * 0.75 = 0.125.
    rewards, values, mask = torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.25, 0.0]]), torch.tensor([[1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert advantages.tolist() == [[0.125, 0.75, 0.0]]
    assert returns[0, :2].tolist() == [0.625, 1.0]


def trl_gae(rewards, values, gamma, lam):
    """TRL PPOTrainer.train, the advantage loop (v0.11-v0.19), written out."""
    lastgaelam, reversed_ = 0, []
    for t in reversed(range(rewards.shape[1])):
        nextvalues = values[:, t + 1] if t < rewards.shape[1] - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_.append(lastgaelam)
    advantages = torch.stack(reversed_[::-1], dim=1)
    return advantages, advantages + values


def test_gae_and_whitening_equal_trl():
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]).bool()
    rewards = torch.randn(3, 6, generator=gen) * mask
    values = torch.randn(3, 6, generator=gen) * mask
    expected_adv, expected_ret = trl_gae(rewards, values, 0.9, 0.95)
    advantages, returns = gae(rewards, values, mask, 0.9, 0.95)
    assert torch.allclose(advantages[mask], expected_adv[mask], atol=1e-6)
    assert torch.allclose(returns[mask], expected_ret[mask], atol=1e-6)
    # TRL utils.masked_whiten: mean and unbiased masked variance, (x - mean) * rsqrt(var + 1e-8).
    mean = expected_adv[mask].mean()
    var = ((expected_adv - mean) ** 2)[mask].mean() * mask.sum() / (mask.sum() - 1)
    expected = (expected_adv - mean) * torch.rsqrt(var + 1e-8)
    assert torch.allclose(masked_whiten(advantages, mask)[mask], expected[mask], atol=1e-5)
    one_token = torch.zeros_like(mask)
    one_token[0, 0] = True
    with pytest.raises(ValueError, match="at least 2 answer tokens"):  # an unbiased variance needs two
        masked_whiten(advantages, one_token)


def test_rewards_are_the_score_at_the_end_minus_the_kl():
    logprobs = torch.tensor([[0.0, -1.0, -2.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0]])
    rewards, kl = kl_penalised_rewards(torch.tensor([3.0]), logprobs, ref, mask, kl_coef=0.1)
    assert kl.tolist() == [[0.0, 0.5, -1.0, 0.0]]
    assert torch.allclose(rewards, torch.tensor([[0.0, -0.05, 0.1 + 3.0, 0.0]]))


def test_clipped_losses_by_hand():
    # One token, advantage 1, ratio e^0.5 = 1.65 > 1.2: the clipped term wins, no gradient.
    new = torch.tensor([[0.5]], requires_grad=True)
    out = ppo_losses(new, torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.tensor([[1.0]]),
                     torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.tensor([[1]]), vf_coef=0.1)
    assert out.policy == pytest.approx(-1.2) and out.clipfrac == 1.0
    # Value 1 moved from 0 (clip 0.2): max((1 - 2)^2, (0.2 - 2)^2) / 2 = 1.62.
    assert out.value == pytest.approx(1.62) and out.value_clipfrac == 1.0
    assert out.approxkl == pytest.approx(0.125) and out.ratio == pytest.approx(torch.e ** 0.5, rel=1e-6)
    assert out.loss.item() == pytest.approx(-1.2 + 0.1 * 1.62, rel=1e-6)
    out.loss.backward()
    assert new.grad.item() == 0.0


def test_clipped_losses_equal_trl():
    gen = torch.Generator().manual_seed(1)
    new, old, adv, vnew, vold, ret = (torch.randn(4, 5, generator=gen) * 0.3 for _ in range(6))
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0, 3:] = False
    out = ppo_losses(new, old, adv, vnew, vold, ret, mask, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    # TRL PPOTrainer.train (v0.11-v0.19), with masked_mean over the answer tokens:
    vpredclipped = torch.clamp(vnew, vold - 0.2, vold + 0.2)
    vf_loss = 0.5 * torch.max((vnew - ret) ** 2, (vpredclipped - ret) ** 2)[mask].mean()
    ratio = torch.exp(new - old)
    pg_loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))[mask].mean()
    assert out.loss.item() == pytest.approx((pg_loss + 0.1 * vf_loss).item(), abs=1e-6)
    assert out.approxkl == pytest.approx((0.5 * ((new - old) ** 2)[mask].mean()).item(), abs=1e-6)


def test_adaptive_kl_controller():
    kl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert kl.update(12.0, 100) == pytest.approx(0.2 * (1 + 0.2 * 100 / 10000))  # error clipped at 0.2
    assert kl.update(6.0, 100) == pytest.approx(0.2 * 1.002)  # on target: unchanged
    with pytest.raises(FloatingPointError, match="diverged"):
        kl.update(float("nan"), 1)


@pytest.fixture
def models(tmp_path):
    torch.manual_seed(0)
    cfg = SMALL.__class__(**{**SMALL.__dict__, "context_length": 96})
    GPTModel(cfg).save_pretrained(tmp_path / "policy")
    save_reward_model(make_reward_model(GPTModel(cfg)), tmp_path / "rm")
    return tmp_path


def ppo_settings(tmp_path, name, **changes):
    values = dict(model=str(tmp_path / "policy"), reward_model=str(tmp_path / "rm"), output=str(tmp_path / name),
                  data=str(preference_file(tmp_path, pairs=30)), batch_size=4, minibatches=2, ppo_epochs=2,
                  lr=1e-3, max_new_tokens=6, eval_every=2, held_out=3, device="cpu", epochs=1)
    return PPOConfig(**{**values, **changes})


def test_ppo_runs_and_logs_trl_names(models, one_thread):
    m = finetune_ppo(ppo_settings(models, "run", lora_rank=2), progress=False)
    logs = json.loads((models / "run" / "ppo_logs.json").read_text())
    for name in ("objective/kl", "objective/scores", "objective/rlhf_reward", "policy/approxkl_avg",
                 "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio"):
        assert len(logs[name]) == m["updates"] == 6  # 25 training prompts // 4
    assert logs["objective/kl"][0] == pytest.approx(0.0, abs=1e-5)  # first rollout: policy = reference
    assert (models / "run" / "ppo.png").is_file() and (models / "run" / "model.safetensors").is_file()


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(models, one_thread, monkeypatch):
    whole = finetune_ppo(ppo_settings(models, "whole"), progress=False)

    calls = {"n": 0}
    real = job.ppo_update

    def stop_after_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C during the third update: it finishes, then the run stops
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(job, "ppo_update", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        finetune_ppo(ppo_settings(models, "parts"), progress=False)
    monkeypatch.setattr(job, "ppo_update", real)
    resumed = finetune_ppo(ppo_settings(models, "parts"), resume=True, progress=False)
    assert resumed["held_out_after"] == whole["held_out_after"]
    a = json.loads((models / "whole" / "ppo_logs.json").read_text())
    b = json.loads((models / "parts" / "ppo_logs.json").read_text())
    assert a["objective/scores"] == b["objective/scores"] and a["loss/policy_avg"] == b["loss/policy_avg"]


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="--quantize is not supported"):
        PPOConfig(quantize="nf4", lora_rank=4)
    with pytest.raises(ValueError, match="minibatches .* cannot exceed batch_size"):
        PPOConfig(minibatches=9, batch_size=8)
