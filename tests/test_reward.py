"""The reward model: its loss by hand and against TRL's RewardTrainer formula, scores read at
the last real token (padding changes nothing), saving and loading, the job end to end from
the command line, and bad input named."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_jobs_dpo import SMALL, preference_file

from minigpt.cli import main
from minigpt.finetuning.preference import PreferenceDataset
from minigpt.finetuning.reward import (
    RewardLoss,
    answer_ends,
    load_reward_model,
    make_reward_model,
    reward_loss,
    save_reward_model,
    score_texts,
)
from minigpt.jobs.reward import RewardConfig, finetune_reward
from minigpt.models.gpt2.model import GPTModel

DATA_FILES = ["instruct/instruction-data-with-preference.json"]


def test_loss_by_hand():
    # One pair with gap 1: -log sigmoid(1) = log(1 + e^-1) = 0.31326...
    loss, metrics = reward_loss(torch.tensor([2.0]), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert metrics["accuracy"].item() == 1.0 and metrics["margin"].item() == 1.0
    # Gap 1 with margin 1: -log sigmoid(0) = log 2; centering 0.1 * mean((2 + 1)^2) = 0.9.
    loss, _ = reward_loss(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0]), center_coefficient=0.1)
    assert loss.item() == pytest.approx(math.log(2) + 0.9, abs=1e-6)


def test_loss_equals_trl_reward_trainer():
    # TRL RewardTrainer.compute_loss (trl/trainer/reward_trainer.py, v0.9-v0.19):
    #   loss = -logsigmoid(r_chosen - r_rejected - margin).mean()
    #   loss += center_rewards_coefficient * torch.mean((r_chosen + r_rejected) ** 2)
    gen = torch.Generator().manual_seed(0)
    chosen, rejected, margin = (torch.randn(16, generator=gen) * 3 for _ in range(3))
    expected = -F.logsigmoid(chosen - rejected - margin).mean() + 0.01 * torch.mean((chosen + rejected) ** 2)
    loss, metrics = reward_loss(chosen, rejected, margin, center_coefficient=0.01)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert metrics["accuracy"].item() == pytest.approx((chosen > rejected).float().mean().item())
    # Large gaps stay finite (logsigmoid, not log of sigmoid).
    assert torch.isfinite(reward_loss(torch.tensor([-200.0]), torch.tensor([200.0]))[0])


def test_scores_are_read_at_the_last_real_token_whatever_the_padding():
    torch.manual_seed(0)
    model = make_reward_model(GPTModel(SMALL)).eval()
    alone = score_texts(model, [[1, 2, 3]], [[4, 5]])
    padded = score_texts(model, [[1, 2, 3], [7] * 10], [[4, 5], [8]])  # the first row gets right padding
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(alone[0], model(torch.tensor([[1, 2, 3, 4, 5]]))[0, -1, 0], atol=1e-6)
    with pytest.raises(ValueError, match="text 0 has 70 tokens, more than the reward model's context of 64"):
        score_texts(model, [[1] * 60], [[2] * 10])


def test_the_loss_scores_each_answer_at_its_end_of_text(tmp_path):
    entries = json.loads(preference_file(tmp_path, pairs=4).read_text())[:4]
    batch = PreferenceDataset(entries).collate_fn()(PreferenceDataset(entries).examples)
    ends = answer_ends(batch["chosen_mask"])
    assert all(batch["chosen_ids"][i, ends[i]] == 50256 for i in range(4))  # each answer's end-of-text
    torch.manual_seed(0)
    model = make_reward_model(GPTModel(SMALL)).eval()
    loss, metrics = RewardLoss()(model, batch)
    prompts = [PreferenceDataset(entries).examples[i].prompt for i in range(4)]
    chosen = score_texts(model, prompts, [PreferenceDataset(entries).examples[i].chosen for i in range(4)])
    rejected = score_texts(model, prompts, [PreferenceDataset(entries).examples[i].rejected for i in range(4)])
    assert torch.allclose(loss, reward_loss(chosen, rejected)[0], atol=1e-5)


def test_saved_reward_model_loads_with_the_same_scores(tmp_path):
    torch.manual_seed(0)
    model = make_reward_model(GPTModel(SMALL)).eval()
    save_reward_model(model, tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm")
    assert torch.equal(score_texts(model, [[1, 2]], [[3]]), score_texts(loaded, [[1, 2]], [[3]]))
    with pytest.raises(FileNotFoundError, match="has no reward_model.json"):
        load_reward_model(tmp_path)


def test_finetune_reward_learns_the_pairs_and_score_reads_the_result(tmp_path, capsys, one_thread):
    torch.manual_seed(0)
    GPTModel(SMALL).save_pretrained(tmp_path / "base")
    s = RewardConfig(model=str(tmp_path / "base"), data=str(preference_file(tmp_path, pairs=40)),
                     output=str(tmp_path / "rm"), epochs=3, batch_size=4, lr=1e-3, eval_every=5, eval_iter=1,
                     device="cpu")
    m = finetune_reward(s, progress=False)
    assert m["val"]["accuracy"] == 1.0 and m["val"]["margin"] > m["val_before"]["margin"]
    assert (tmp_path / "rm" / "reward.png").is_file()
    assert main(["score", "--reward-model", str(tmp_path / "rm"), "--prompt", "Name the colour of thing 3.",
                 "--answer", "Thing 3 is yellow.", "--answer", "I do not know."]) == 0
    good, bad = (float(line.split()[0]) for line in capsys.readouterr().out.splitlines())
    assert good > bad


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: the preference data"):
        RewardConfig(data=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="center_rewards must be 0 or more"):
        RewardConfig(center_rewards=-1.0)
