"""Training: AdamW groups, the schedule, and the loop's promises (bit-exact repetition,
exact resume, also after Ctrl-C, NaN stop, evaluation over every window, float32 by default
on every CPU), plus `minigpt pretrain`/`eval` end to end."""

import json
import logging
import math
import os
import random
import signal
import warnings

import numpy as np
import pytest
import torch

import minigpt.runtime.runtime as runtime
import minigpt.training.loop as training
from minigpt.cli import main
from minigpt.data.windows import GPTDataset
from minigpt.models.base import evaluating
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.runtime.runtime import default_precision, resolve_precision
from minigpt.training.checkpoint import load_checkpoint
from minigpt.training.config import TrainConfig
from minigpt.training.distributed import sharded_loader
from minigpt.training.loop import History, TrainingInterrupted, train_model
from minigpt.training.losses import calc_loss_loader, next_token_loss
from minigpt.training.optim import create_optimizer, lr_at_step, param_groups
from minigpt.training.plots import plot_losses, plot_lr

CFG = GPTConfig(vocab_size=96, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here trains tiny models."""


def _ids(n_windows: int, seed: int = 1) -> torch.Tensor:
    # A noisy counting pattern: learnable, so the loss really moves.
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n_windows * CFG.context_length + 1) % 40
    return torch.where(torch.rand(ids.shape, generator=g) < 0.2, torch.randint(0, 96, ids.shape, generator=g), ids)


def _loaders(batch_size: int = 4):
    n = CFG.context_length
    train = sharded_loader(GPTDataset(_ids(24), max_length=n, stride=n), batch_size, shuffle=True, seed=7)
    val = sharded_loader(GPTDataset(_ids(8, seed=2), max_length=n, stride=n), batch_size, shuffle=False)
    return train, val


def _config(**changes) -> TrainConfig:
    base = dict(max_steps=8, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=2, eval_iter=2,
                grad_accum=2, precision="float32")
    return TrainConfig(**{**base, **changes})


def _train(config: TrainConfig | None = None, model_seed: int = 0, batch_size: int = 4, model=None, **kwargs):
    torch.manual_seed(model_seed)
    model = model if model is not None else GPTModel(CFG)
    train, val = _loaders(batch_size)
    history = train_model(model, train, val, config or _config(), device="cpu", progress=False, **kwargs)
    return model, history


# -------------------------------------------------------------- optimizer and schedule


@pytest.mark.parametrize("tied", [False, True])
def test_weight_decay_applies_to_weight_matrices_only(tied):
    model = GPTModel(GPTConfig.from_dict({**CFG.to_dict(), "tie_weights": tied}))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    name = {id(p): n for n, p in model.named_parameters()}
    decayed = {name[id(p)] for p in decay["params"]}
    # Every linear layer's matrix (attention, feed-forward, an untied output head) and nothing else:
    # no embedding (a tied head is the embedding), bias, or LayerNorm scale/shift.
    expected = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                and m.weight is not model.tok_emb.weight}
    assert decayed == {f"{n}.weight" for n in expected}
    assert ("out_head.weight" in decayed) is not tied
    # Each parameter exactly once, shared ones included.
    all_ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())


def test_frozen_parameters_are_left_out_of_the_optimizer():
    model = GPTModel(CFG)
    model.tok_emb.weight.requires_grad_(False)
    optimizer = create_optimizer(model, lr=1e-3)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(model.tok_emb.weight) not in optimized and id(model.pos_emb.weight) in optimized


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    def lr(step):
        return lr_at_step(step, max_lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)

    assert lr(0) == pytest.approx(1e-4)     # 1/10 of the peak
    assert lr(4) == pytest.approx(5e-4)     # 5/10
    assert lr(9) == pytest.approx(1e-3)     # warm-up done
    assert lr(10) == pytest.approx(1e-3)    # cosine starts at the peak
    assert lr(35) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi / 4)))  # a quarter in
    assert lr(60) == pytest.approx(5.5e-4)  # half-way: the mean of peak and floor
    assert lr(110) == pytest.approx(1e-4) and lr(500) == pytest.approx(1e-4)


def test_history_records_the_schedule_and_evaluations():
    _, history = _train()
    assert history.steps == [0, 2, 4, 6, 8]  # 0: the untrained model, the curves' starting point
    assert history.tokens_seen == [2 * 2 * 4 * 16 * k for k in range(5)]  # steps*accum*batch*tokens
    assert history.lrs == [lr_at_step(s, 1e-2, 1e-3, 2, 8) for s in range(8)]
    assert len(history.step_losses) == len(history.grad_norms) == 8
    assert history.val_losses[-1] < history.val_losses[0]
    assert history.precision == "float32"
    assert History.from_dict(json.loads(json.dumps(history.to_dict()))) == history


def _loss_with_metrics(model, batch):
    """next_token_loss plus two figures: the loss doubled, and the batch's share of target ids below 20."""
    loss = next_token_loss(model, batch)
    return loss, {"double": 2 * loss.detach(), "low": (batch[1] < 20).float().mean().item()}


def test_metrics_a_loss_returns_are_recorded_per_evaluation_and_split(caplog):
    with caplog.at_level(logging.INFO, logger="minigpt.training.loop"):
        model, history = _train(_config(eval_iter=None), loss_fn=_loss_with_metrics)
    assert sorted(history.metrics) == ["train/double", "train/low", "val/double", "val/low"]
    assert all(len(values) == len(history.steps) == 5 for values in history.metrics.values())
    # Each is the mean over the evaluated batches, weighted like the loss (by scored targets).
    for train_loss, val_loss, train_double, val_double in zip(history.train_losses, history.val_losses,
                                                              history.metrics["train/double"],
                                                              history.metrics["val/double"], strict=True):
        assert train_double == pytest.approx(2 * train_loss) and val_double == pytest.approx(2 * val_loss)
    _, val = _loaders()
    targets = torch.cat([y for _, y in val])
    assert history.metrics["val/low"][-1] == pytest.approx((targets < 20).float().mean().item())
    assert "val   double" in caplog.text and "train double" in caplog.text
    assert "perplexity" not in caplog.text  # exp of a loss that is not next-token cross-entropy means nothing
    # The same run without metrics has the same losses, and records none.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="minigpt.training"):
        _, plain = _train(_config(eval_iter=None))
    assert plain.val_losses == history.val_losses and plain.metrics == {}
    assert f"(perplexity {math.exp(plain.val_losses[-1]):,.1f}, " in caplog.text  # the next-token loss has one
    # Saved and read back with the history; a history saved before metrics existed still loads.
    assert History.from_dict(json.loads(json.dumps(history.to_dict()))) == history
    old = {k: v for k, v in plain.to_dict().items() if k != "metrics"}
    assert History.from_dict(old) == plain


def test_a_resumed_run_records_the_same_metrics(tmp_path):
    _, full = _train(run_dir=tmp_path / "full", loss_fn=_loss_with_metrics)
    calls = 0

    def crash_in_step_6(model, batch):
        nonlocal calls
        calls += model.training
        if calls == 11:
            raise KeyboardInterrupt  # the process dies mid-step; the checkpoint of step 4 stays
        return _loss_with_metrics(model, batch)

    with pytest.raises(KeyboardInterrupt):
        _train(run_dir=tmp_path / "cut", loss_fn=crash_in_step_6)
    _, resumed = _train(run_dir=tmp_path / "cut", resume=True, loss_fn=_loss_with_metrics)
    assert resumed.metrics == full.metrics and resumed.val_losses == full.val_losses


# ------------------------------------------------------------------ the loop's promises


def test_same_seed_same_data_gives_the_same_loss_curve_bit_for_bit():
    _, first = _train()
    _, second = _train()
    assert first.step_losses == second.step_losses
    assert first.val_losses == second.val_losses
    _, other_init = _train(model_seed=1)
    assert other_init.step_losses != first.step_losses


def test_resumed_run_repeats_the_uninterrupted_one_exactly(tmp_path):
    # 24 windows, batch 4, 2 micro-batches per step: 3 steps per epoch. Checkpoints every
    # 2 steps; the crash comes in step 6, so the run resumes from step 4, mid-epoch 1.
    full_model, full = _train(run_dir=tmp_path / "full")

    calls = 0

    def crash_in_step_6(model, batch):
        nonlocal calls
        calls += model.training
        if calls == 11:
            raise KeyboardInterrupt  # the process dies mid-step
        return next_token_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        _train(run_dir=tmp_path / "cut", loss_fn=crash_in_step_6)
    # A new process: other RNG states and other initial weights, all to be overwritten.
    torch.manual_seed(999), random.seed(999), np.random.seed(999)
    resumed_model, resumed = _train(run_dir=tmp_path / "cut", resume=True, model_seed=5)

    assert resumed.step_losses == full.step_losses
    assert resumed.val_losses == full.val_losses
    assert resumed.tokens_seen == full.tokens_seen
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def _press_ctrl_c_in_step(step: int, grad_accum: int = 2, signum: int = signal.SIGINT):
    """A loss function that sends ``signum`` to this very process during the first
    micro-batch of optimizer step ``step``, as a Ctrl-C in the terminal would."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += model.training
        if calls["n"] == (step - 1) * grad_accum + 1:
            os.kill(os.getpid(), signum)
        return next_token_loss(model, batch)

    return loss_fn, calls


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_finishes_the_step_saves_and_the_resumed_run_repeats_the_uninterrupted_one(tmp_path, signum, code):
    full_model, full = _train(run_dir=tmp_path / "full")
    handler = signal.getsignal(signum)
    loss_fn, calls = _press_ctrl_c_in_step(3, signum=signum)
    with pytest.raises(TrainingInterrupted) as stopped:
        _train(run_dir=tmp_path / "cut", loss_fn=loss_fn)
    assert (stopped.value.step, stopped.value.run_dir, stopped.value.exit_code) == (3, tmp_path / "cut", code)
    assert calls["n"] == 6  # both micro-batches of step 3, and nothing after it
    assert signal.getsignal(signum) is handler  # the usual Ctrl-C is back
    restored = GPTModel(CFG)
    assert load_checkpoint(tmp_path / "cut", restored, create_optimizer(restored, 1e-3)).step == 3

    torch.manual_seed(999), random.seed(999), np.random.seed(999)  # a new process
    resumed_model, resumed = _train(run_dir=tmp_path / "cut", resume=True, model_seed=5)
    assert resumed == full  # every loss, learning rate, gradient norm and evaluation, bit for bit
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_second_ctrl_c_during_the_save_is_ignored_until_the_save_is_complete(tmp_path, monkeypatch):
    real_save = training.save_checkpoint

    def save_while_pressed_again(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the impatient second Ctrl-C
        real_save(*args, **kwargs)

    monkeypatch.setattr(training, "save_checkpoint", save_while_pressed_again)
    loss_fn, _ = _press_ctrl_c_in_step(1)
    with pytest.raises(TrainingInterrupted) as stopped:
        _train(run_dir=tmp_path, loss_fn=loss_fn)
    assert stopped.value.step == 1
    restored = GPTModel(CFG)
    state = load_checkpoint(tmp_path, restored, create_optimizer(restored, 1e-3))
    assert state.step == 1 and len(state.history["step_losses"]) == 1


def test_ctrl_c_without_a_run_dir_stops_after_the_step_and_says_nothing_was_saved():
    loss_fn, calls = _press_ctrl_c_in_step(2)
    with pytest.raises(TrainingInterrupted, match="after step 2; nothing was saved") as stopped:
        _train(loss_fn=loss_fn)
    assert stopped.value.run_dir is None and calls["n"] == 4
    assert isinstance(stopped.value, KeyboardInterrupt)  # code that knows only Ctrl-C still stops


def test_nan_loss_stops_naming_the_step_after_saving_the_last_good_weights(tmp_path):
    calls = 0

    def nan_in_step_5(model, batch):
        nonlocal calls
        calls += model.training
        loss = next_token_loss(model, batch)
        return loss * float("nan") if calls == 5 else loss

    model = GPTModel(CFG)
    with pytest.raises(FloatingPointError, match="step 5") as err:
        _train(_config(grad_accum=1), run_dir=tmp_path, loss_fn=nan_in_step_5, model=model)
    assert str(tmp_path) in str(err.value)
    restored = GPTModel(CFG)
    state = load_checkpoint(tmp_path, restored, create_optimizer(restored, 1e-3))
    assert state.step == 4 and len(state.history["step_losses"]) == 4
    for a, b in zip(model.state_dict().values(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b) and torch.isfinite(b).all()  # the update of step 5 was not applied


def test_gradient_accumulation_equals_one_big_batch():
    cfg = GPTConfig.from_dict({**CFG.to_dict(), "drop_rate": 0.0})
    torch.manual_seed(0)
    big, small = GPTModel(cfg), GPTModel(cfg)
    small.load_state_dict(big.state_dict())
    # The sampler's order is the same, so 4 micro-batches of 2 hold the 8 windows of one batch.
    _, one = _train(_config(max_steps=3, grad_accum=1), batch_size=8, model=big)
    _, four = _train(_config(max_steps=3, grad_accum=4), batch_size=2, model=small)
    assert one.step_losses == pytest.approx(four.step_losses, abs=1e-5)


def test_gradient_checkpointing_changes_memory_not_results():
    _, plain = _train(_config(max_steps=3))
    _, recomputed = _train(_config(max_steps=3, gradient_checkpointing=True))
    assert recomputed.step_losses == pytest.approx(plain.step_losses, abs=1e-6)


def test_bfloat16_autocast_trains_close_to_float32():
    _, fp32 = _train(_config(max_steps=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "emulated bfloat16 is slow" on CPUs without it
        _, bf16 = _train(_config(max_steps=4, precision="bfloat16"))
    assert bf16.step_losses == pytest.approx(fp32.step_losses, rel=0.02)


def test_auto_precision_trains_in_bfloat16_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(runtime, "has_fast_bfloat16", lambda device: True)  # whatever this CPU has
    _, auto = _train(_config(max_steps=2, precision="auto"))
    _, fp32 = _train(_config(max_steps=2, precision="float32"))
    assert auto.precision == "bfloat16"
    assert auto.step_losses != fp32.step_losses  # really computed in bfloat16
    assert auto.step_losses == pytest.approx(fp32.step_losses, rel=0.02)


def _broken_backend(graph_module, example_inputs):
    raise RuntimeError("no C++ compiler found")


def test_compile_that_fails_trains_eagerly_after_one_warning_exactly_like_eager(tmp_path, monkeypatch):
    _, eager = _train(_config(max_steps=3), run_dir=tmp_path / "eager")
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=_broken_backend))
    with pytest.warns(UserWarning, match="torch.compile failed") as caught:
        model, fell_back = _train(_config(max_steps=3, compile=True), run_dir=tmp_path / "compiled")
    assert sum("torch.compile failed" in str(w.message) for w in caught) == 1
    assert fell_back.step_losses == eager.step_losses and fell_back.val_losses == eager.val_losses
    saved = GPTModel.from_pretrained(tmp_path / "compiled")  # the model's own keys, no wrapper prefix
    for name, value in model.state_dict().items():
        assert torch.equal(saved.state_dict()[name], value), name


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_a_checkpoint_that_resumes(tmp_path):
    cfg = GPTConfig.from_dict({**CFG.to_dict(), "drop_rate": 0.0})  # compiled dropout draws other masks

    def model():
        torch.manual_seed(0)
        return GPTModel(cfg)

    _, eager = _train(_config(max_steps=4), model=model())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # compiled for real: no fallback warning
        _, compiled = _train(_config(max_steps=4, compile=True), run_dir=tmp_path, model=model())
    assert compiled.step_losses == pytest.approx(eager.step_losses, rel=1e-4)
    _, resumed = _train(_config(max_steps=6, compile=True), run_dir=tmp_path, resume=True, model=model())
    assert resumed.steps[-1] == 6 and resumed.step_losses[:4] == compiled.step_losses


def test_evaluation_never_drops_a_short_last_batch():
    n = CFG.context_length
    train, _ = _loaders()
    val = sharded_loader(GPTDataset(_ids(3, seed=2), max_length=n, stride=n), 4, shuffle=False)
    assert len(val) == 1  # 3 windows: fewer than the batch size of 4
    torch.manual_seed(0)
    model = GPTModel(CFG)
    history = train_model(model, train, val, _config(max_steps=2, eval_iter=None), device="cpu", progress=False)
    assert all(math.isfinite(v) for v in history.val_losses)
    with evaluating(model):  # the loop's final number is the whole split's, as `minigpt eval` measures it
        assert history.val_losses[-1] == calc_loss_loader(val, model, "cpu")


def test_an_empty_validation_split_is_an_error_before_training_that_says_what_to_change():
    n = CFG.context_length
    train, _ = _loaders()
    # 3 windows, batches of 4, incomplete batches dropped: no batch at all
    val = sharded_loader(GPTDataset(_ids(3, seed=2), max_length=n, stride=n), 4, shuffle=False, drop_last=True)
    assert len(val) == 0
    model = GPTModel(CFG)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="validation split is shorter than one window; use a shorter context"):
        train_model(model, train, val, _config(), device="cpu", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # not one step taken


def test_every_default_stays_float32_on_a_cpu_with_fast_bfloat16(monkeypatch):
    base = {k: v for k, v in _config(max_steps=2).__dict__.items() if k != "precision"}
    _, plain = _train(TrainConfig(**base))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(runtime, "bfloat16_speedup", lambda rows: 1.5)  # and measured faster
    assert resolve_precision("auto", torch.device("cpu")) == "bfloat16"  # the pretence works
    assert TrainConfig().precision == default_precision("cpu") == "float32"
    _, patched = _train(TrainConfig(**base))
    assert patched.precision == "float32" and patched.step_losses == plain.step_losses


def test_samples_are_drawn_with_their_own_seed_and_leave_training_unchanged(char_tokenizer):
    sampled = _config(max_steps=4, sample_prompt="A1", sample_tokens=6)
    assert (sampled.sample_temperature, sampled.sample_top_k) == (0.8, 40)
    _, first = _train(sampled, tokenizer=char_tokenizer)
    _, second = _train(sampled, tokenizer=char_tokenizer)
    _, silent = _train(_config(max_steps=4))
    assert first.samples == second.samples and all(s.startswith("A1") and len(s) == 8 for s in first.samples)
    assert first.step_losses == silent.step_losses and first.val_losses == silent.val_losses


def test_settings_errors_name_the_setting():
    with pytest.raises(ValueError, match="^max_steps must be at least 1, got 0"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="^eval_iter must be at least 1"):
        TrainConfig(eval_iter=0)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="^sample_temperature must be 0"):
        TrainConfig(sample_temperature=-1)
    with pytest.raises(ValueError, match=r"^grad_clip must be 0 or more \(0 or None: no clipping\), got -1"):
        TrainConfig(grad_clip=-1)


def test_plots_are_pngs_with_tokens_seen_on_a_second_axis(tmp_path):
    _, history = _train(_config(max_steps=4))
    fig = plot_losses(history, tmp_path / "loss.png")
    plot_lr(history, tmp_path / "lr.png")
    for name in ("loss.png", "lr.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    (ax,) = fig.axes
    top = ax.child_axes[0]  # the secondary x-axis
    assert top.get_xlabel() == "tokens seen" and ax.get_xlabel() == "optimizer steps"
    assert fig._repr_png_().startswith(b"\x89PNG")  # shows itself in a notebook


# ---------------------------------------------------------------------- the CLI job


def test_pretrain_cli_writes_a_run_that_generate_eval_and_resume_use(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["pretrain", "--corpus", "the-verdict", "--context-length", "32", "--batch-size", "2",
            "--steps", "2", "--eval-every", "1", "--eval-iter", "1", "--warmup", "1",
            "--precision", "float32", "--prompt", "Every effort", "--out-dir", str(tmp_path), "--name", "run"]
    assert main(args) == 0
    assert "validation loss" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "training_state.pt", "history.json",
                 "settings.json", "loss.png", "lr.png", "samples.txt"):
        assert (run / name).is_file(), name
    assert json.loads((run / "settings.json").read_text())["train"]["max_steps"] == 2
    assert "--- step 2" in (run / "samples.txt").read_text()

    assert main(["generate", "--checkpoint", str(run), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert main(["eval", "--checkpoint", str(run), "--max-batches", "2", "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out

    assert main(args) == 2  # the run exists: no silent overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(["pretrain", "--resume", str(run), "--steps", "3"]) == 0  # nothing else needed
    assert len(json.loads((run / "history.json").read_text())["step_losses"]) == 3
