"""The jobs as a notebook calls them: the word-pair measure of the main job, splits that
cannot be evaluated refused before training, pretraining's final validation loss agreeing
with `evaluate`, precision defaults that no CPU changes, and both fine-tuning jobs
stopping on a signal and resuming exactly."""

import json
import logging
import math
import os
import signal

import pytest
import torch

from minigpt.finetuning.classification import classify, load_classifier
from minigpt.jobs.classify import ClassifyConfig, finetune_classifier
from minigpt.jobs.dpo import DPOConfig
from minigpt.jobs.evaluate import EvalConfig, evaluate
from minigpt.jobs.info import preset_sizes
from minigpt.jobs.instruct import InstructConfig, finetune_instructions
from minigpt.jobs.pretrain import PretrainConfig, default_prompt, pretrain, windows, word_pair_share, words
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.models.loader import load
from minigpt.runtime import runtime
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer
from minigpt.training.config import TrainConfig
from minigpt.training.loop import TrainingInterrupted

SMALL = GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=2,
                  drop_rate=0.0, tie_weights=True)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here trains tiny models."""


def tiny_pretraining(**changes) -> PretrainConfig:
    """The-verdict (shipped) with 32-token windows: a run of a few seconds."""
    loop = dict(max_steps=4, lr=3e-3, min_lr=3e-4, warmup_steps=1, eval_every=2, eval_iter=2, precision="float32",
                sample_tokens=5)
    loop.update({k: changes.pop(k) for k in list(changes) if k in TrainConfig.__dataclass_fields__})
    return PretrainConfig(**{"corpus": "the-verdict", "context_length": 32, "batch_size": 2, **changes},
                          train=TrainConfig(**loop))


# --------------------------------------------------------------------- word pairs


def test_words_are_lower_cased_letters_with_inner_apostrophes():
    assert words("Call'd Katharina, fair -- and 2 virtuous?\nYES") == \
        ["call'd", "katharina", "fair", "and", "virtuous", "yes"]


@pytest.mark.parametrize("sample, share", [
    ("the cat on the mat sat", 3 / 5),  # (the cat) (on the) (the mat) occur; (cat on) (mat sat) do not
    ("The cat, sat.", 1.0),             # case and punctuation do not matter
    ("sat the", 0.0),                   # words of the corpus, but never in this order
    ("cat", 0.0),                       # one word: no pair
    ("", 0.0),
    ("cat sat cat sat", 2 / 3),         # each pair counts where it occurs: (cat sat) twice, (sat cat) never
])
def test_word_pair_share_by_hand(sample, share):
    assert word_pair_share(sample, "the cat sat on the mat") == pytest.approx(share)


def test_default_prompt_starts_a_paragraph_with_its_first_words():
    text = "tail of a speech.\n\nGREMIO:\nGood morrow, neighbour Baptista.\n"
    assert default_prompt(text) == "GREMIO:\nGood morrow, neighbour"
    assert default_prompt("end<|endoftext|>The while statement is used") == "The while statement is"


def test_windows_need_one_token_more_than_the_context():
    assert [windows(n, 4) for n in (4, 5, 8, 9, 13)] == [0, 1, 1, 2, 3]


def test_preset_sizes_count_gpt2_small_as_openai_does():
    sizes = {size.name: size for size in preset_sizes()}
    small = sizes["gpt2-small"]
    # OpenAI's 124,439,808 has the tied head and query/key/value biases (3 x 768 per block), which the preset omits.
    assert small.tied_parameters + 12 * 3 * 768 == 124_439_808
    assert small.parameters - small.tied_parameters == 50257 * 768  # an untied head is one more matrix
    assert sizes["tiny"].parameters == sizes["tiny"].tied_parameters  # tiny is tied already


# ----------------------------------------------------------------------- pretrain


def test_pretrain_writes_a_run_whose_final_loss_evaluate_repeats(tmp_path):
    result = pretrain(tiny_pretraining(), tmp_path / "run", device="cpu", progress=False)
    for name in ("config.json", "model.safetensors", "training_state.pt", "history.json", "settings.json",
                 "loss.png", "lr.png", "samples.txt"):
        assert (tmp_path / "run" / name).is_file(), name
    h = result.history
    assert h.steps == [0, 2, 4] and all(math.isfinite(v) for v in h.val_losses)
    assert len(result.pair_shares) == 3 and all(0 <= s <= 1 for s in result.pair_shares)
    # the-verdict's last 10 %: 515 tokens, (515 - 33) // 32 + 1 = 16 windows of 32 (+1) tokens, all scored
    assert (result.val_windows, result.val_tokens) == (16, 16 * 32)
    evaluated = evaluate(EvalConfig(checkpoint=str(tmp_path / "run"), batch_size=2, device="cpu"))
    assert evaluated.whole_split and evaluated.windows == result.val_windows
    assert evaluated.loss == pytest.approx(result.val_loss, abs=1e-6)
    assert "word pairs found in the corpus" in (tmp_path / "run" / "samples.txt").read_text()


def test_the_verdict_with_default_batches_gives_finite_validation_losses(tmp_path):
    # 515 validation tokens make 4 windows of 128, fewer than a batch of 8: none may be dropped.
    settings = PretrainConfig(corpus="the-verdict", batch_size=8,
                              train=TrainConfig(max_steps=1, eval_every=1, precision="float32"))
    result = pretrain(settings, tmp_path / "run", device="cpu", progress=False)
    assert result.val_windows == 4 and all(math.isfinite(v) for v in result.history.val_losses)
    assert math.isfinite(result.val_loss)


@pytest.mark.parametrize("changes, words_of_the_message", [
    (dict(context_length=1024), ["validation split", "context_length", "val_ratio", "larger corpus"]),
    (dict(context_length=256, val_ratio=0.5, batch_size=16), ["training split", "batch_size"]),
])
def test_a_split_without_windows_is_refused_before_training(tmp_path, changes, words_of_the_message):
    with pytest.raises(ValueError) as err:
        pretrain(tiny_pretraining(**changes), tmp_path / "run", device="cpu", progress=False)
    for word in words_of_the_message:
        assert word in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing started


def test_precision_defaults_stay_float32_where_the_cpu_has_fast_bfloat16(monkeypatch):
    monkeypatch.setattr(runtime, "has_fast_bfloat16", lambda device: True)
    assert runtime.resolve_precision("auto", "cpu") == "bfloat16"  # the patch is seen
    assert runtime.default_precision("cpu") == "float32"
    assert TrainConfig().precision == "float32"
    assert PretrainConfig().train.precision == "float32"
    assert ClassifyConfig().precision == "float32" and InstructConfig().precision == "float32"
    assert DPOConfig().precision == "float32"


def test_pretrain_stops_on_a_signal_with_a_checkpoint_and_resumes_exactly(tmp_path):
    settings = tiny_pretraining(max_steps=6, eval_every=1)
    whole = pretrain(settings, tmp_path / "whole", device="cpu", progress=False).history
    with signal_after_step(2), pytest.raises(TrainingInterrupted) as stop:
        pretrain(settings, tmp_path / "cut", device="cpu", progress=False)
    assert stop.value.exit_code == 130 and stop.value.step >= 2
    samples = (tmp_path / "cut" / "samples.txt").read_text()  # a stopped run shows what it learned so far
    assert "--- step 0 " in samples and "--- step 2 " in samples and (tmp_path / "cut" / "loss.png").is_file()
    resumed = pretrain(PretrainConfig.load(tmp_path / "cut"), tmp_path / "cut", resume=True, device="cpu",
                       progress=False).history
    assert resumed.step_losses == whole.step_losses and resumed.val_losses == whole.val_losses


class signal_after_step(logging.Handler):
    """Send this process ``signum`` once the training loop logs the evaluation of ``step``
    (the loop's own handler turns it into a clean stop)."""

    def __init__(self, step: int, signum: int = signal.SIGINT) -> None:
        super().__init__()
        self.step, self.signum, self.sent = step, signum, False

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not self.sent and message.startswith("step") and int(message.split()[1]) >= self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def __enter__(self):
        self.logger = logging.getLogger("minigpt.training.loop")
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc_info):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)


# ----------------------------------------------------------------------- fine-tuning


def test_load_takes_a_name_a_directory_or_a_preset(tmp_path):
    GPTModel(SMALL).save_pretrained(tmp_path)
    assert load(str(tmp_path)).cfg == SMALL
    assert load("tiny").cfg == GPTConfig.from_preset("tiny")
    with pytest.raises(ValueError, match="not a model minigpt knows: did you mean 'gpt2-small'.* smollm2-135m"):
        load("gpt2-smal")
    assert load("random:smollm2-135m", dtype=torch.bfloat16).tok_emb.weight.dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="runs/does-not-exist not found"):
        load("runs/does-not-exist")


def spam_like(tmp_path, rows: int = 40):
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(rows)))
    return data


def test_classifier_job_stops_on_sigterm_and_resumes_exactly(tmp_path):
    base = tmp_path / "base"
    GPTModel(SMALL).save_pretrained(base)
    settings = dict(model=str(base), data=str(spam_like(tmp_path, 80)), epochs=2, batch_size=4, lr=1e-3,
                    eval_every=2, eval_iter=1, lora_rank=2, device="cpu")
    whole = finetune_classifier(ClassifyConfig(**settings, output=str(tmp_path / "whole")), progress=False)
    cut = ClassifyConfig(**settings, output=str(tmp_path / "cut"))
    with signal_after_step(4, signal.SIGTERM), pytest.raises(TrainingInterrupted) as stop:
        finetune_classifier(cut, progress=False)
    assert stop.value.exit_code == 143
    assert not (tmp_path / "cut" / "metrics.json").exists()
    resumed = finetune_classifier(ClassifyConfig.load(tmp_path / "cut"), resume=True, progress=False)
    assert resumed == whole  # the same accuracies and test loss
    history = [json.loads((tmp_path / run / "history.json").read_text()) for run in ("whole", "cut")]
    assert history[0]["step_losses"] == history[1]["step_losses"]
    model, labels = load_classifier(tmp_path / "cut")  # LoRA merged, saved as a classifier
    assert labels == ["a", "b"] and classify("text 3", model, get_gpt2_tokenizer(), labels) in labels


def test_instruction_job_needs_an_entry_in_each_split(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"say {i}", "input": "", "output": str(i)} for i in range(5)]))
    with pytest.raises(ValueError, match="each part needs one at least"):
        finetune_instructions(InstructConfig(model="tiny", data=str(data), output=str(tmp_path / "run")))


def test_instruction_job_trains_answers_and_saves_a_loadable_model(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Count to {i}.", "input": "", "output": " ".join(
        map(str, range(1, i + 2)))} for i in range(20)]))
    base = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                     tie_weights=True)
    settings = InstructConfig(model="tiny", data=str(data), output=str(tmp_path / "run"), epochs=1, lr=1e-3,
                              max_new_tokens=3, device="cpu")
    metrics = finetune_instructions(settings, GPTModel(base), progress=False)
    assert metrics["examples"] == {"train": 17, "val": 1, "test": 2} and metrics["judge_score"] is None
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    assert len(json.loads((tmp_path / "run" / "responses.json").read_text())) == 2
    assert GPTModel.from_pretrained(tmp_path / "run").cfg == base
    assert json.loads((tmp_path / "run" / "history.json").read_text())["steps"] == [0, 3]  # 17 / 8: 3 batches
    assert not (tmp_path / "run" / "training_state.pt").exists()  # complete: no optimizer state left behind
