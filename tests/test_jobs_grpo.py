"""The GRPO job on a tiny model: the files a reader looks at, a clean stop on a signal (in the
warm-up and in GRPO) that resumes exactly, the loss on bad rewards, and bad settings named in
the user's words."""

import json
import math

import pytest
import torch
from test_jobs import signal_after_step

from minigpt.cli import main
from minigpt.finetuning.grpo import GRPOLoss, collate_prompts, tokenize_prompts
from minigpt.finetuning.reference import FrozenReference
from minigpt.finetuning.reward_tasks import load_task
from minigpt.finetuning.rollout import RolloutSettings
from minigpt.jobs.grpo import GRPOConfig, finetune_grpo
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer
from minigpt.training.loop import TrainingInterrupted

SMALL = GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                  tie_weights=True)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here trains tiny models."""


@pytest.fixture
def base(tmp_path):
    torch.manual_seed(0)
    GPTModel(SMALL).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def settings(tmp_path, base, name="run", **changes) -> GRPOConfig:
    values = dict(model=str(base), output=str(tmp_path / name), subset=8, batch_size=4, group_size=3, epochs=1,
                  eval_every=1, eval_iter=1, max_new_tokens=2, lr=1e-3, sft_steps=0, device="cpu")
    return GRPOConfig(**{**values, **changes})


def test_the_job_writes_the_model_plots_and_accuracies(tmp_path, base):
    metrics = finetune_grpo(settings(tmp_path, base, sft_steps=2), progress=False)
    out = tmp_path / "run"
    for name in ("model.safetensors", "loss.png", "grpo.png", "metrics.json", "sft/model.safetensors"):
        assert (out / name).is_file(), name
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert metrics["prompts"] == {"train": 8, "test": 80}
    assert 0 <= metrics["accuracy_before"] <= 1 and 0 <= metrics["accuracy"] <= 1
    history = json.loads((out / "history.json").read_text())
    assert history["steps"] == [0, 1, 2]
    # The policy starts as its reference: KL 0 at step 0, then it moves.
    assert history["metrics"]["val/kl"][0] == pytest.approx(0.0, abs=1e-6)
    assert history["metrics"]["train/kl"][-1] > 0
    assert all(math.isfinite(x) for x in history["step_losses"])


@pytest.mark.parametrize("sft_steps", [0, 2])
def test_a_signal_stops_the_job_and_it_resumes_exactly(tmp_path, base, sft_steps):
    # With a warm-up the signal comes in it (its step 1 is logged first); without, in GRPO.
    whole = finetune_grpo(settings(tmp_path, base, "whole", sft_steps=sft_steps), progress=False)
    with signal_after_step(1), pytest.raises(TrainingInterrupted) as stop:
        finetune_grpo(settings(tmp_path, base, "cut", sft_steps=sft_steps), progress=False)
    assert stop.value.exit_code == 130 and not (tmp_path / "cut" / "metrics.json").exists()
    resumed = finetune_grpo(GRPOConfig.load(tmp_path / "cut"), resume=True, progress=False)
    assert resumed == whole
    histories = [json.loads((tmp_path / run / "history.json").read_text()) for run in ("whole", "cut")]
    assert histories[0]["step_losses"] == histories[1]["step_losses"]
    assert histories[0]["metrics"] == histories[1]["metrics"]


def _loss_and_batch(reward, group_size=2):
    torch.manual_seed(0)
    model, tokenizer = GPTModel(SMALL), get_gpt2_tokenizer()
    sampling = RolloutSettings(max_new_tokens=2, eos_id=50256, pad_id=50256)
    loss_fn = GRPOLoss({"r": (reward, 1.0)}, tokenizer, sampling, group_size, reference=FrozenReference(model))
    prompts = [p.prompt for p in load_task("arithmetic").train[:2]]
    return model, loss_fn, collate_prompts(tokenize_prompts(prompts, tokenizer, SMALL.context_length, 2))


def test_a_reward_that_is_always_nan_stops_the_step_with_a_clear_error():
    model, loss_fn, batch = _loss_and_batch(lambda prompt, answer: float("nan"))
    with pytest.raises(ValueError, match="every group of this batch has a NaN reward"):
        loss_fn(model, batch)


def test_the_loss_is_finite_and_kl_is_zero_at_the_start():
    model, loss_fn, batch = _loss_and_batch(lambda prompt, answer: float(len(answer)))
    loss, metrics = loss_fn(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and metrics["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert model.tok_emb.weight.grad is not None


def test_a_prompt_longer_than_the_context_is_named():
    # "1 + 2 = " is 5 tokens: with 27 answer tokens it fills the 32 positions exactly; the second is 4 longer.
    with pytest.raises(ValueError, match="prompt 1 has 9 tokens; with max_new_tokens=27 it needs 36 positions"):
        tokenize_prompts(["1 + 2 = ", "1 + 2 + 3 + 4 = "], get_gpt2_tokenizer(), 32, 27)


@pytest.mark.parametrize(("args", "message"), [
    (["--group-size", "1"], "--group-size must be at least 2"),
    (["--reward", "no_such_module_here:f"], "cannot import module 'no_such_module_here'"),
    (["--reward", "minigpt.finetuning.reward_tasks"], "not of the form module:function"),
])
def test_bad_settings_are_named_in_the_users_words(tmp_path, capsys, args, message):
    assert main(["finetune", "grpo", "--output", str(tmp_path / "run"), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_trains_on_a_reward_given_by_name(tmp_path, base, capsys):
    code = main(["finetune", "grpo", "--model", str(base), "--output", str(tmp_path / "run"), "--subset", "4",
                 "--batch-size", "4", "--group-size", "2", "--epochs", "1", "--eval-iter", "1", "--max-new-tokens",
                 "2", "--sft-steps", "1", "--reward", "minigpt.finetuning.reward_tasks:answer_format", "--beta", "0",
                 "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert "held-out accuracy (greedy answers): " in out and "saved the model, loss.png, grpo.png" in out
    assert "train/rewards/answer_format/mean" in json.loads((tmp_path / "run" / "history.json").read_text())["metrics"]
