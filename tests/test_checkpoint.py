"""Checkpoints: a round trip restores everything, a crash at any moment of a save leaves
a loadable and consistent checkpoint, and damaged files give errors that name them."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt.lora.adapters import apply_lora
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.training.checkpoint import (
    STATE_FILE,
    load_checkpoint,
    load_settings,
    save_checkpoint,
    save_settings,
)
from minigpt.training.optim import create_optimizer

CFG = GPTConfig(vocab_size=64, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here trains tiny models."""


def _trained(steps: int = 2):
    model = GPTModel(CFG)
    optimizer = create_optimizer(model, lr=1e-2)
    for _ in range(steps):
        model(torch.randint(0, 64, (2, 8))).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _save(run_dir, model, optimizer, step):
    save_checkpoint(run_dir, model, optimizer, step=step, epoch=1, batch_in_epoch=3,
                    tokens_seen=100 * step, history={"step_losses": [float(step)]})


def _fresh():
    model = GPTModel(CFG)
    return model, create_optimizer(model, lr=1e-2)


def _assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_round_trip_restores_weights_optimizer_position_and_random_state(tmp_path):
    model, optimizer = _trained()
    _save(tmp_path, model, optimizer, step=2)
    after_save = (torch.rand(3), random.random(), np.random.rand())

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    restored, restored_opt = _fresh()
    state = load_checkpoint(tmp_path, restored, restored_opt)

    assert (state.step, state.epoch, state.batch_in_epoch, state.tokens_seen) == (2, 1, 3, 200)
    assert state.history == {"step_losses": [2.0]}
    _assert_same_weights(model, restored)
    for p, q in zip(model.parameters(), restored.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][key], restored_opt.state[q][key])
    assert (torch.rand(3), random.random(), np.random.rand())[1:] == after_save[1:]
    torch.manual_seed(1)  # the torch draw again, compared as tensors
    load_checkpoint(tmp_path, restored, restored_opt)
    assert torch.equal(torch.rand(3), after_save[0])


def test_a_run_directory_loads_with_from_pretrained(tmp_path):
    model, optimizer = _trained()
    _save(tmp_path, model, optimizer, step=2)
    _assert_same_weights(model, GPTModel.from_pretrained(tmp_path))


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    old, optimizer = _trained(1)
    _save(tmp_path, old, optimizer, step=1)
    new, new_opt = _trained(3)

    def dies_half_way(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, new, new_opt, step=3)
    monkeypatch.undo()

    restored, restored_opt = _fresh()
    assert load_checkpoint(tmp_path, restored, restored_opt).step == 1
    _assert_same_weights(old, restored)
    _save(tmp_path, new, new_opt, step=3)  # the debris does not get in the way
    assert load_checkpoint(tmp_path, restored, restored_opt).step == 3


def test_a_crash_after_the_commit_is_completed_by_the_next_load(tmp_path, monkeypatch):
    old, optimizer = _trained(1)
    _save(tmp_path, old, optimizer, step=1)
    new, new_opt = _trained(3)
    real_replace, moved = os.replace, []

    def dies_after_moving_one_file(src, dst):
        if Path(src).parent.name == ".checkpoint-committed":
            if moved:
                raise KeyboardInterrupt
            moved.append(src)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_after_moving_one_file)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, new, new_opt, step=3)
    monkeypatch.undo()

    restored, restored_opt = _fresh()
    assert load_checkpoint(tmp_path, restored, restored_opt).step == 3
    _assert_same_weights(new, restored)


_SAVE_FOREVER = textwrap.dedent("""
    import sys, torch
    from minigpt.training.checkpoint import save_checkpoint
    from minigpt.models.gpt2.config import GPTConfig
    from minigpt.models.gpt2.model import GPTModel
    from minigpt.training.optim import create_optimizer
    model = GPTModel(GPTConfig(vocab_size=4096, context_length=64, emb_dim=128, n_heads=2, n_layers=2))
    optimizer = create_optimizer(model, lr=1e-3)
    model(torch.zeros(1, 1, dtype=torch.long)).sum().backward()
    optimizer.step()  # the optimizer state (two moments per weight) is now twice the model
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
        save_checkpoint(sys.argv[1], model, optimizer, step=step, epoch=0, batch_in_epoch=0,
                        tokens_seen=step, history={"step": [step]})
        print(step, flush=True)
""")


@pytest.mark.parametrize("fraction", [0.2, 0.45, 0.7, 0.9])
def test_killing_the_process_mid_save_never_leaves_a_corrupt_checkpoint(tmp_path, fraction):
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        while int(proc.stdout.readline() or 0) < 3:  # a few complete saves first
            assert proc.poll() is None, "the saving process died on its own"
        start = time.perf_counter()
        proc.stdout.readline()
        time.sleep(fraction * (time.perf_counter() - start))  # kill it this far into the next save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    model = GPTModel(GPTConfig(vocab_size=4096, context_length=64, emb_dim=128, n_heads=2, n_layers=2))
    state = load_checkpoint(tmp_path, model, create_optimizer(model, lr=1e-3))
    assert state.step >= 3 and state.history == {"step": [state.step]}
    assert all(torch.all(p == state.step) for p in model.parameters())  # weights of that very step


def test_damaged_training_state_names_the_file(tmp_path):
    model, optimizer = _trained()
    _save(tmp_path, model, optimizer, step=2)
    path = tmp_path / STATE_FILE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{STATE_FILE} is corrupt or truncated"):
        load_checkpoint(tmp_path, *_fresh())


def test_truncated_weights_name_the_file_and_the_tensor(tmp_path):
    model, optimizer = _trained()
    _save(tmp_path, model, optimizer, step=2)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt or truncated: tensor '[\w.]+'"):
        GPTModel.from_pretrained(tmp_path)


def test_weights_that_do_not_match_the_config_name_the_tensors(tmp_path):
    model, optimizer = _trained()
    _save(tmp_path, model, optimizer, step=2)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "emb_dim": 32}))
    with pytest.raises(ValueError, match=r"tok_emb\.weight: file has \(64, 16\), model expects \(64, 32\)"):
        GPTModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layers": 2}))
    with pytest.raises(ValueError, match=r"missing tensors \['trf_blocks\.1\."):
        GPTModel.from_pretrained(tmp_path)


def test_resuming_into_a_different_model_is_refused(tmp_path):
    model, optimizer = _trained()
    _save(tmp_path, model, optimizer, step=2)
    other = GPTModel(GPTConfig.from_dict({**CFG.to_dict(), "drop_rate": 0.1}))
    with pytest.raises(ValueError, match="drop_rate=0.0.*but the model to resume is.*drop_rate=0.1"):
        load_checkpoint(tmp_path, other, create_optimizer(other, 1e-3))


def test_missing_checkpoint_and_settings_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        load_checkpoint(tmp_path, *_fresh())
    with pytest.raises(FileNotFoundError, match="settings.json does not exist"):
        load_settings(tmp_path)
    save_settings(tmp_path, {"corpus": "python-docs", "train": {"lr": 0.001}})
    assert load_settings(tmp_path) == {"corpus": "python-docs", "train": {"lr": 0.001}}


def _classifier_with_lora(tied: bool):
    """A language model turned into a 2-class classifier (a smaller, untied head), with
    LoRA adapters on every linear layer: tensors a plain GPT checkpoint does not have."""
    model = GPTModel(GPTConfig.from_dict({**CFG.to_dict(), "tie_weights": tied}))
    if not tied:
        model.out_head = torch.nn.Linear(CFG.emb_dim, 2)
    apply_lora(model, rank=2, alpha=4)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_a_classifier_or_lora_model_round_trips_exactly(tmp_path, tied):
    torch.manual_seed(0)
    model = _classifier_with_lora(tied)
    optimizer = create_optimizer(model, lr=1e-2)
    for _ in range(2):
        model(torch.randint(0, 64, (2, 8))).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    _save(tmp_path, model, optimizer, step=2)

    torch.manual_seed(1)
    restored = _classifier_with_lora(tied)
    restored_opt = create_optimizer(restored, lr=1e-2)
    assert load_checkpoint(tmp_path, restored, restored_opt).step == 2
    _assert_same_weights(model, restored)
    assert any("lora" in name for name in restored.state_dict())
    if tied:  # still one shared matrix, not two copies
        assert restored.out_head.linear.weight is restored.tok_emb.weight
    x = torch.randint(0, 64, (1, 8))
    assert torch.equal(model.eval()(x), restored.eval()(x))
    with pytest.raises(ValueError, match="does not fit the model to resume: missing tensors"):
        plain = GPTModel(GPTConfig.from_dict({**CFG.to_dict(), "tie_weights": tied}))
        load_checkpoint(tmp_path, plain, create_optimizer(plain, 1e-2))



def test_a_llama_family_model_with_lora_checkpoints_and_resumes(tmp_path):
    from minigpt.models.llama.config import LlamaConfig
    from minigpt.models.llama.model import LlamaModel

    cfg = LlamaConfig(vocab_size=64, emb_dim=16, n_heads=4, n_kv_heads=2, hidden_dim=32, n_layers=1,
                      context_length=8, tie_weights=True)

    def built():
        torch.manual_seed(0)
        model = LlamaModel(cfg)
        apply_lora(model, rank=2, alpha=4)
        return model, create_optimizer(model, lr=1e-2)

    model, optimizer = built()
    model(torch.randint(0, 64, (2, 8))).sum().backward()
    optimizer.step()
    _save(tmp_path, model, optimizer, step=1)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"  # Hugging Face's config

    restored, restored_opt = built()
    assert load_checkpoint(tmp_path, restored, restored_opt).step == 1
    _assert_same_weights(model, restored)
    other = LlamaModel(LlamaConfig(**{**cfg.__dict__, "n_layers": 2}))
    with pytest.raises(ValueError, match="holds a model with"):
        load_checkpoint(tmp_path, other, create_optimizer(other, lr=1e-2))
