"""What several benchmarks share: timing that takes turns, and a random GPT-2 checkpoint.

Imported by the scripts in this folder (``python bench/<script>.py`` puts the folder on the path).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path


def interleaved_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each run; the runs take turns, so drifting clock speeds or
    background load hit all of them alike instead of whichever ran last."""
    for run in runs.values():
        run()  # warm-up: allocator, kernels, caches
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine_fields() -> dict[str, object]:
    """Where a benchmark ran and which kernels it used, for its JSON line: the CPU model, its
    instruction set, torch's threads, the kernel forced by ``MINIGPT_LINEAR_KERNEL`` (or
    ``measured``) and the table of choices (:mod:`minigpt.runtime.kernels`): product -> chosen kernel."""
    from minigpt.quantization import weight_only  # noqa: F401 - registers the int8/int4 products
    from minigpt.runtime import kernels

    table = kernels.kernel_table()
    return {"cpu": kernels.cpu_model(), "isa": kernels.instruction_set(), "threads": table.machine["threads"],
            "kernel": kernels.forced_kernel() or "measured",
            "kernels": {p.key: min(seconds, key=seconds.__getitem__) for p, seconds in table.rows()}}


def random_gpt2_checkpoint(directory: Path) -> None:
    """A gpt2-small-shaped Hugging Face checkpoint with random weights (tied head, as OpenAI's)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    with torch.device("meta"):  # transformers' init is slow on CPU; the tensors are filled below
        hf = GPT2LMHeadModel(GPT2Config())
    hf.to_empty(device="cpu")
    hf.tie_weights()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.02)
    hf.save_pretrained(directory)
