"""Multi-process training: 2 CPU processes (gloo) with half the batch each follow the
same loss curve as 1 process with the whole batch."""

import json
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minigpt.checkpoint import STATE_FILE
from minigpt.config import GPTConfig
from minigpt.data import GPTDataset
from minigpt.distributed import sharded_loader
from minigpt.model import GPTModel
from minigpt.training import TrainConfig, train_model

CFG = GPTConfig(vocab_size=96, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
TIMEOUT_S = 180


def _train(batch_size: int, run_dir=None):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (16 * 40 + 1,), generator=g)
    train_set = GPTDataset(ids[:16 * 32 + 1], max_length=16, stride=16)
    val_set = GPTDataset(ids[16 * 32:], max_length=16, stride=16)
    train = sharded_loader(train_set, batch_size, shuffle=True, seed=3)
    val = sharded_loader(val_set, batch_size, shuffle=False)
    torch.manual_seed(0)
    model = GPTModel(CFG)
    config = TrainConfig(max_steps=4, lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_every=2, eval_iter=1,
                         grad_accum=2, precision="float32")
    return train_model(model, train, val, config, device="cpu", run_dir=run_dir, progress=False)


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
