"""The preference-tuning job as a notebook and the command line call it: a tiny model on a
tiny preference file, its three references agreeing where policy and reference are one
model, the files a reader looks at, NEFTune reaching the model in training only (for
instruction tuning too), a clean stop on a signal, and bad input named in the user's words."""

import json
import logging
import math
import re

import pytest
import torch
from test_jobs import signal_after_step

from minigpt.cli import build_parser, main
from minigpt.finetuning import neftune
from minigpt.finetuning.neftune import neftune_enabled
from minigpt.finetuning.preference import load_preference_data
from minigpt.io import sources
from minigpt.jobs.dpo import DPOConfig, finetune_dpo
from minigpt.jobs.instruct import InstructConfig, finetune_instructions
from minigpt.lora.adapters import merge_lora
from minigpt.lora.files import load_lora
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.training.loop import TrainingInterrupted

# Files this module reads from the data folder (without it, from the copies minigpt ships).
DATA_FILES = ["instruct/instruction-data-with-preference.json"]

SMALL = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                  tie_weights=True)
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here trains tiny models."""


def preference_file(tmp_path, pairs: int = 20):
    """``pairs`` distinct pairs, then one whose two answers are the same (dropped with a warning)."""
    colours = ["red", "green", "blue", "yellow", "white"]
    entries = [{"instruction": f"Name the colour of thing {i}.", "input": "" if i % 3 else f"thing {i}",
                "chosen": f"Thing {i} is {colours[i % 5]}.", "rejected": "I do not know."} for i in range(pairs)]
    entries.append({"instruction": "Say yes.", "input": "", "chosen": "Yes.", "rejected": "Yes."})
    path = tmp_path / f"preferences-{pairs}.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture
def base(tmp_path):
    """A tiny model saved as a run directory: the starting point of preference tuning."""
    torch.manual_seed(0)
    GPTModel(SMALL).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def settings(tmp_path, base, name="run", **changes) -> DPOConfig:
    values = dict(model=str(base), data=str(preference_file(tmp_path)), output=str(tmp_path / name), epochs=2,
                  batch_size=4, lr=1e-3, eval_every=2, eval_iter=1, max_new_tokens=3, device="cpu",
                  precision="float32")
    return DPOConfig(**{**values, **changes})


def test_defaults_follow_the_book():
    s = DPOConfig()
    assert (s.epochs, s.lr, s.beta, s.loss, s.label_smoothing) == (1, 5e-6, 0.1, "sigmoid", 0.0)
    assert s.lora_rank is None and s.precompute_ref is False and s.neftune_alpha is None and s.data is None
    assert s.model == InstructConfig().output  # it starts where instruction tuning ends
    assert s.precision == "float32"


def test_the_job_tunes_a_tiny_model_and_writes_what_a_reader_needs(tmp_path, base, caplog):
    with caplog.at_level(logging.INFO, logger="minigpt"):
        metrics = finetune_dpo(settings(tmp_path, base, eval_every=5), progress=False)
    assert "dropped 1 of 21 pairs whose chosen and rejected answers are the same" in caplog.text
    assert "val loss" in caplog.text and "perplexity" not in caplog.text  # exp of a preference loss is no perplexity
    assert metrics["examples"] == {"train": 17, "val": 1, "test": 2}
    assert metrics["reference"] == "frozen copy"
    for split in ("val_before", "val", "test"):
        assert set(metrics[split]) == set(METRICS), split
    before = metrics["val_before"]  # the policy is the reference: no reward, no preference yet
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert before["rewards/margins"] == 0 and before["rewards/accuracies"] == 0
    assert metrics["test_loss"] == metrics["test"]["loss"] and "test_perplexity" not in metrics

    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert GPTModel.from_pretrained(run).cfg == SMALL
    for plot in ("loss.png", "preference.png"):
        assert (run / plot).stat().st_size > 0
    assert not (run / "training_state.pt").exists()  # complete: no optimizer state left behind
    samples = json.loads((run / "ab_samples.json").read_text())
    assert len(samples) == metrics["ab_samples"] == 1
    assert set(samples[0]) == {"instruction", "input", "reference_response", "tuned_response", "chosen", "rejected"}
    assert samples[0]["chosen"] == "Thing 19 is white." and samples[0]["rejected"] == "I do not know."

    history = json.loads((run / "history.json").read_text())
    assert history["steps"] == [0, 5, 10]  # 17 pairs in batches of 4: 5 steps an epoch
    assert history["val_losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    margins, accuracies = history["metrics"]["train/rewards/margins"], history["metrics"]["train/rewards/accuracies"]
    assert margins[0] == 0 and margins[-1] > 0.1  # the chosen answers became likelier than the rejected ones
    assert accuracies[0] == 0 and accuracies[-1] > 0.5


def test_without_data_the_job_reads_the_books_preference_pairs(data_dir, tmp_path, base):
    metrics = finetune_dpo(settings(tmp_path, base, data=None, subset=20, epochs=1, batch_size=17, max_new_tokens=0),
                           progress=False)
    assert metrics["data"] == sources.PREFERENCE_DATA.relpath
    assert metrics["examples"] == {"train": 17, "val": 1, "test": 2}
    samples = json.loads((tmp_path / "run" / "ab_samples.json").read_text())
    assert [sample["chosen"] for sample in samples] == [load_preference_data()[19]["chosen"]]


@pytest.mark.parametrize("changes, reference", [
    ({}, "frozen copy"), (dict(precompute_ref=True), "precomputed"), (dict(lora_rank=2), "adapters off")])
def test_each_reference_starts_where_policy_and_reference_are_one_model(tmp_path, base, changes, reference):
    s = settings(tmp_path, base, epochs=1, batch_size=9, eval_every=10, max_new_tokens=0, **changes)
    metrics = finetune_dpo(s, progress=False)
    assert metrics["reference"] == reference
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    # Sigmoid DPO where the policy is its reference: ln 2 at step 0, whichever way the reference is made.
    assert history["val_losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["val_before"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history["step_losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert history["step_losses"][1] < math.log(2)  # the second step learned from the first
    assert bool(list((tmp_path / "run").glob("reference-logps-*.safetensors"))) == ("precompute_ref" in changes)
    assert (tmp_path / "run" / "adapter.safetensors").exists() == ("lora_rank" in changes)
    if "lora_rank" in changes:  # the adapter alone, on the base model, gives the saved (merged) model again
        model = GPTModel.from_pretrained(base)
        assert load_lora(model, tmp_path / "run" / "adapter.safetensors").rank == 2
        merged, saved = merge_lora(model).state_dict(), GPTModel.from_pretrained(tmp_path / "run").state_dict()
        assert merged.keys() == saved.keys()
        assert all(torch.allclose(merged[name], saved[name], atol=1e-6) for name in merged)
        name = "trf_blocks.0.att.W_query.weight"
        assert not torch.equal(saved[name], GPTModel.from_pretrained(base).state_dict()[name])  # it trained


def test_a_signal_stops_the_job_with_a_checkpoint_and_it_resumes_exactly(tmp_path, base):
    short = dict(epochs=1, batch_size=9, eval_every=1, max_new_tokens=0)  # 2 steps
    whole = finetune_dpo(settings(tmp_path, base, "whole", **short), progress=False)
    cut = settings(tmp_path, base, "cut", **short)
    with signal_after_step(1), pytest.raises(TrainingInterrupted) as stop:
        finetune_dpo(cut, progress=False)
    assert stop.value.exit_code == 130 and not (tmp_path / "cut" / "metrics.json").exists()
    resumed = finetune_dpo(DPOConfig.load(tmp_path / "cut"), resume=True, progress=False)
    assert resumed["val"] == whole["val"] and resumed["test"] == whole["test"]
    histories = [json.loads((tmp_path / run / "history.json").read_text()) for run in ("whole", "cut")]
    assert histories[0]["step_losses"] == histories[1]["step_losses"] and len(histories[1]["step_losses"]) == 2
    assert histories[0]["metrics"] == histories[1]["metrics"]


# ------------------------------------------------------------------------------ NEFTune


@pytest.fixture
def noise_calls(monkeypatch):
    """Every NEFTune noise drawn: ``(alpha, lengths, padded width)``; the noise itself unchanged."""
    calls, real = [], neftune.neftune_noise

    def recording(embeddings, lengths, alpha):
        calls.append((alpha, lengths.tolist(), embeddings.shape[1]))
        return real(embeddings, lengths, alpha)

    monkeypatch.setattr(neftune, "neftune_noise", recording)
    return calls


def test_neftune_alpha_reaches_the_instruction_job_in_training_only(tmp_path, noise_calls):
    model = GPTModel(SMALL)
    s = InstructConfig(model="tiny", data=str(instruction_file(tmp_path)), output=str(tmp_path / "run"), epochs=1,
                       lr=1e-3, max_new_tokens=3, device="cpu", precision="float32", neftune_alpha=5.0)
    finetune_instructions(s, model, progress=False)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    # One noisy forward per training step (17 examples in batches of 8); none in the evaluations and answers.
    assert len(noise_calls) == len(history["step_losses"]) == 3
    assert all(alpha == 5.0 for alpha, _, _ in noise_calls)
    assert any(min(lengths) < width for _, lengths, width in noise_calls)  # each example's own length
    assert not neftune_enabled(model)  # the model leaves the job without its noise hook


def test_neftune_alpha_reaches_the_preference_job_in_training_only(tmp_path, base, noise_calls):
    finetune_dpo(settings(tmp_path, base, epochs=1, neftune_alpha=5.0), progress=False)
    steps = len(json.loads((tmp_path / "run" / "history.json").read_text())["step_losses"])
    # One noisy forward per step (the policy's, over chosen and rejected at once); none for the reference,
    # the evaluations or the answers.
    assert steps == 5 and len(noise_calls) == steps
    assert all(len(lengths) == 2 * 4 for _, lengths, _ in noise_calls[:-1])  # 4 pairs: 8 sequences
    assert all(alpha == 5.0 for alpha, _, _ in noise_calls)
    assert any(min(lengths) < width for _, lengths, width in noise_calls)


def instruction_file(tmp_path):
    data = tmp_path / "instructions.json"
    data.write_text(json.dumps([{"instruction": f"Count to {i}.", "input": "", "output": " ".join(
        map(str, range(1, i + 2)))} for i in range(20)]))
    return data


@pytest.mark.parametrize("task", ["instruct", "dpo"])
def test_the_command_line_passes_neftune_alpha(tmp_path, base, noise_calls, capsys, task):
    out = tmp_path / "run"
    data = instruction_file(tmp_path) if task == "instruct" else preference_file(tmp_path)
    assert main(["finetune", task, "--model", str(base), "--data", str(data), "--epochs", "1", "--batch-size", "8",
                 "--max-new-tokens", "0", "--output", str(out), "--device", "cpu", "--neftune-alpha", "10"]) == 0
    steps = len(json.loads((out / "history.json").read_text())["step_losses"])
    assert steps == 3 and len(noise_calls) == steps and all(alpha == 10.0 for alpha, _, _ in noise_calls)
    assert json.loads((out / "settings.json").read_text())["neftune_alpha"] == 10.0
    printed = capsys.readouterr().out
    assert f"metrics.json in {out}" in printed
    if task == "dpo":
        assert "validation: reward accuracy 0.0% -> " in printed


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("task, extra, words", [
    ("dpo", ["--beta", "0"], "--beta must be more than 0"),
    ("dpo", ["--beta", "-0.5"], "--beta must be more than 0"),
    ("dpo", ["--label-smoothing", "0.1", "--loss", "ipo"], "--label-smoothing applies to the sigmoid loss only"),
    ("dpo", ["--neftune-alpha", "0"], "--neftune-alpha must be more than 0"),
    ("instruct", ["--neftune-alpha", "-5"], "--neftune-alpha must be more than 0"),
])
def test_bad_settings_are_named_in_the_users_words(tmp_path, capsys, task, extra, words):
    assert main(["finetune", task, "--model", "no-such-model", "--output", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"minigpt finetune: error: {words}") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_bad_loss_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["finetune", "dpo", "--loss", "squared"])
    assert exit.value.code == 2
    assert re.search(r"argument --loss: invalid choice: 'squared' \(choose from '?sigmoid'?, '?ipo'?, '?hinge'?\)",
                     capsys.readouterr().err)
    with pytest.raises(ValueError, match="the loss must be one of sigmoid, ipo, hinge, got 'squared'"):
        DPOConfig(loss="squared")


def test_missing_or_bad_data_is_named_before_a_model_loads(tmp_path, capsys):
    missing = tmp_path / "nowhere.json"
    assert main(["finetune", "dpo", "--model", "no-such-model", "--data", str(missing),
                 "--output", str(tmp_path / "run")]) == 2
    assert f"{missing} does not exist: the preference data must be a JSON file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "chosen": "b", "rejected": "c"}, {"instruction": "d",
                                                                                      "chosen": "e"}]))
    assert main(["finetune", "dpo", "--model", "no-such-model", "--data", str(bad),
                 "--output", str(tmp_path / "run")]) == 2
    assert "entry 1 has no 'rejected' field" in capsys.readouterr().err


def test_too_few_pairs_for_three_splits_are_refused(tmp_path, base):
    with pytest.raises(ValueError, match="each part needs one at least: use 20 pairs or more"):
        finetune_dpo(settings(tmp_path, base, data=str(preference_file(tmp_path, pairs=5))), progress=False)


def test_help_shows_the_preference_options_with_their_defaults():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["finetune"]
    dpo = next(a for a in sub._actions if a.dest == "technique").choices["dpo"]
    helps = {a.option_strings[0]: a.help for a in dpo._actions if a.option_strings}
    assert "(default: 0.1)" in helps["--beta"] and "(default: sigmoid)" in helps["--loss"]
    assert "(default: 5e-06)" in helps["--lr"] and "(default: 1)" in helps["--epochs"]
    assert "(default: off)" in helps["--precompute-ref"] and "(default: off)" in helps["--neftune-alpha"]
    assert "(default: no LoRA)" in helps["--lora-rank"]
