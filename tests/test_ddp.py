"""Multi-process training: 2 CPU processes (gloo) with half the batch each follow the
same loss curve as 1 process with the whole batch, evaluate over every window, and stop
together on Ctrl-C; the loader's sharding and the one-process case of every helper."""

import json
import os
import signal
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minigpt.data.windows import GPTDataset
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.training.checkpoint import STATE_FILE
from minigpt.training.config import TrainConfig
from minigpt.training.distributed import (
    ShardSampler,
    init_distributed,
    mean_over_ranks,
    rank_and_world_size,
    rng_state_of_all_ranks,
    sharded_loader,
    sum_over_ranks,
)
from minigpt.training.loop import TrainingInterrupted, train_model
from minigpt.training.losses import next_token_loss

CFG = GPTConfig(vocab_size=96, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
TIMEOUT_S = 180


def _train(batch_size: int, run_dir=None, val_windows: int = 8, loss_fn=next_token_loss):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (16 * 40 + 1,), generator=g)
    train_set = GPTDataset(ids[:16 * 32 + 1], max_length=16, stride=16)
    val_set = GPTDataset(ids[16 * 32:16 * (32 + val_windows) + 1], max_length=16, stride=16)
    train = sharded_loader(train_set, batch_size, shuffle=True, seed=3)
    val = sharded_loader(val_set, batch_size, shuffle=False)
    torch.manual_seed(0)
    model = GPTModel(CFG)
    config = TrainConfig(max_steps=4, lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_every=2, eval_iter=1,
                         grad_accum=2, precision="float32")
    return train_model(model, train, val, config, device="cpu", run_dir=run_dir, progress=False, loss_fn=loss_fn)


def _worker(rank: int, world_size: int, port: int, out_dir: str, batch_size: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        history = _train(batch_size, run_dir=os.path.join(out_dir, "run"))
        with open(os.path.join(out_dir, f"history{rank}.json"), "w") as f:
            json.dump(history.to_dict(), f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_follow_the_single_process_loss_curve(tmp_path):
    single = _train(batch_size=8)

    context = mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), 4), nprocs=2, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"2-process training did not finish in {TIMEOUT_S} s")

    ranks = [json.loads((tmp_path / f"history{r}.json").read_text()) for r in range(2)]
    for history in ranks:  # every process logs the global (averaged) numbers
        assert history["step_losses"] == pytest.approx(single.step_losses, abs=1e-5)
        assert history["val_losses"] == pytest.approx(single.val_losses, abs=1e-5)
        assert history["tokens_seen"] == single.tokens_seen  # global: batch * processes * accum
    assert (tmp_path / "run" / STATE_FILE).is_file()  # written by rank 0
    assert len(torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)["rng"]) == 2  # one per process


def _ctrl_c_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Rank 0 alone gets a Ctrl-C in step 2; the validation split has 5 windows (3 + 2)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=TIMEOUT_S))
    calls = 0

    def loss_fn(model, batch):
        nonlocal calls
        calls += model.training
        if rank == 0 and calls == 3:  # the first micro-batch of step 2
            os.kill(os.getpid(), signal.SIGINT)
        return next_token_loss(model, batch)

    try:
        _train(4, run_dir=os.path.join(out_dir, "run"), val_windows=5, loss_fn=loss_fn)
        result = {"stopped": None}
    except TrainingInterrupted as stop:
        result = {"stopped": stop.step, "code": stop.exit_code, "calls": calls}
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"result{rank}.json"), "w") as f:
        json.dump(result, f)


def _spawn(worker, args: tuple) -> None:
    context = mp.spawn(worker, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"2-process training did not finish in {TIMEOUT_S} s")


@pytest.mark.slow
def test_a_ctrl_c_in_one_process_stops_all_after_the_same_step_and_evaluation_covers_every_window(tmp_path):
    single = _train(batch_size=8, val_windows=5)  # one validation batch of 5 windows
    _spawn(_ctrl_c_worker, (2, _free_port(), str(tmp_path)))
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2)]
    assert results == [{"stopped": 2, "code": 130, "calls": 4}, {"stopped": 2, "code": 0, "calls": 4}]
    saved = json.loads((tmp_path / "run" / "history.json").read_text())
    assert saved["steps"] == [0, 2] and saved["step_losses"] == pytest.approx(single.step_losses[:2], abs=1e-5)
    # 3 + 2 windows in the two processes: the same mean as one process over all 5.
    assert saved["val_losses"] == pytest.approx(single.val_losses[:2], abs=1e-5)


# ------------------------------------------------------------------ one process, sharding


def test_shards_together_hold_the_shared_order_once():
    order = list(ShardSampler(11, 0, 1, shuffle=True, seed=5, drop_last=False))
    for drop_last, kept, sizes in ((True, 9, [3, 3, 3]), (False, 11, [4, 4, 3])):
        samplers = [ShardSampler(11, r, 3, shuffle=True, seed=5, drop_last=drop_last) for r in range(3)]
        shards = [list(s) for s in samplers]
        assert [len(s) for s in shards] == [len(s) for s in samplers] == sizes
        # Process r holds items r, r + 3, ... of the one shared order: dealt out, each once.
        assert [shards[i % 3][i // 3] for i in range(kept)] == order[:kept]


def test_the_order_is_a_pure_function_of_seed_and_epoch():
    sampler = ShardSampler(20, 0, 1, shuffle=True, seed=5, drop_last=True)
    first = list(sampler)
    assert first == list(ShardSampler(20, 0, 1, shuffle=True, seed=5, drop_last=True)) and sorted(first) == \
        list(range(20))
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(ShardSampler(20, 0, 1, shuffle=False, seed=5, drop_last=True)) == list(range(20))


def test_a_training_loader_drops_a_short_last_batch_and_an_evaluation_loader_keeps_it():
    windows = GPTDataset(torch.arange(16 * 5 + 1), max_length=16, stride=16)  # 5 windows
    assert [len(x) for x, _ in sharded_loader(windows, 2, shuffle=True)] == [2, 2]
    assert [len(x) for x, _ in sharded_loader(windows, 2, shuffle=False)] == [2, 2, 1]
    assert [len(x) for x, _ in sharded_loader(windows, 2, shuffle=False, drop_last=True)] == [2, 2]


def test_one_process_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_and_world_size() == (0, 1) == init_distributed(torch.device("cpu"))
    assert sum_over_ranks([1.5, 2], torch.device("cpu")) == [1.5, 2]
    assert mean_over_ranks([1.5, 2], torch.device("cpu")) == [1.5, 2]
    (state,) = rng_state_of_all_ranks(torch.device("cpu"))
    assert torch.equal(state["torch"], torch.get_rng_state())
