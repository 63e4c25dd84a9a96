"""Several processes training one model (``torchrun``), with one process as the special case.

The one idea: ``n`` processes each take ``1/n`` of every batch, compute gradients on their
share, and average the gradients before the optimizer step
(``DistributedDataParallel`` does that inside ``backward``). Together they take exactly
the step one process would take with the whole batch. What that needs from us:

* :func:`init_distributed`: join the process group ``torchrun`` describes;
* :func:`sharded_loader`: one shared, reproducible data order, dealt out to the processes;
* :func:`mean_over_ranks`, :func:`sum_over_ranks`: numbers every process agrees on;
* :func:`rng_state_of_all_ranks`: every process's random state, for the checkpoint.

Without ``torch.distributed`` every helper here works for one process (rank 0 of 1).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from minigpt.runtime.runtime import rng_state


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 without torch.distributed)."""
    if _active():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR`` ...): NCCL between GPUs, gloo between CPU processes.
    Returns ``(rank, world_size)``; ``(0, 1)`` when not started by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _active():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank_and_world_size()


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over all processes (``values`` itself with one process)."""
    if not _active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value averaged over all processes (``values`` itself with one process)."""
    _, world_size = rank_and_world_size()
    return [v / world_size for v in sum_over_ranks(values, device)]


def rng_state_of_all_ranks(device: torch.device) -> list[dict[str, Any]]:
    """Every process's RNG state (a list indexed by rank), gathered for rank 0 to save."""
    state = rng_state(device)
    if not _active():
        return [state]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


class ShardSampler(Sampler[int]):
    """Process ``rank`` of ``world_size``'s share of one order of ``length`` items.

    The order is ``0, 1, ...`` or, with ``shuffle``, a permutation drawn from a generator
    seeded ``seed + epoch`` (call :meth:`set_epoch` before each epoch): a pure function of
    ``(seed, epoch)``, so a resumed run finds its place again. Process ``r`` gets the
    items ``r, r + n, r + 2n, ...`` of that order. ``drop_last`` first cuts the order to
    a multiple of ``n``, so that every process gets as many items (training needs that:
    each step waits for every process); without it nothing is left out and the last
    processes may get one item fewer (evaluation needs that: every item counts once).
    """

    def __init__(self, length: int, rank: int, world_size: int, *, shuffle: bool, seed: int, drop_last: bool):
        self.length = length
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.length, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.drop_last:
            order = order[:self.length - self.length % self.world_size]
        return iter(order[self.rank::self.world_size])

    def __len__(self) -> int:
        if self.drop_last:
            return self.length // self.world_size
        return len(range(self.rank, self.length, self.world_size))


def sharded_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, *, drop_last: bool | None = None
) -> DataLoader:
    """A loader whose order is a pure function of ``(seed, epoch)``, split across processes.

    See :class:`ShardSampler`: across processes the batches of one step together hold
    exactly the windows one process would get with ``n`` times the batch size. One
    process is the case ``n = 1``.

    ``drop_last`` (default: ``shuffle``): leave out the windows that do not fill a last
    batch. A training loader (shuffled) drops them, so that every step sees a full batch
    and the next epoch brings them back in another order; an evaluation loader
    (not shuffled) keeps every window, so that a loss over it covers the whole split.
    """
    drop_last = shuffle if drop_last is None else drop_last
    rank, world_size = rank_and_world_size()
    sampler = ShardSampler(len(dataset), rank, world_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    # Our own generator: each iter(DataLoader) draws a seed, which must not come from the
    # global RNG, whose state (dropout) the checkpoint restores.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed))
