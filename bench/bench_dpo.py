"""One DPO step with each of the three references, against one supervised instruction step.

The policy is the same in every case: a model of the ``gpt2-small`` shape (random weights,
GPT-2's layout: query/key/value bias, head tied to the token embedding, dropout 0) with
LoRA of rank 16 (alpha 16) on every linear layer of the blocks and on the head. A DPO
step on ``batch`` pairs of ``tokens`` tokens is the policy's forward and backward over the
chosen and the rejected sequences (one forward over both, ``2 * batch`` rows), the
reference's log-probabilities of the same pairs, and an AdamW step. The references:

* ``deep_copy``: a frozen copy of the model (``minigpt.finetuning.reference.FrozenReference``), made after
  the baseline below, so its bytes count;
* ``adapters_off``: the policy itself with its LoRA updates switched off
  (``minigpt.finetuning.reference.AdaptersOffReference``): no second model;
* ``precomputed``: the reference's log-probabilities computed once before training (here
  before the baseline, as a run does before its first step) and carried by the batch.

The yardstick is one supervised instruction step (``minigpt.finetuning.instruction.instruction_loss``)
of the same LoRA model on ``batch`` sequences of ``tokens`` tokens (the prompt's targets
masked, as in the DPO batch). Reported for each of the four:

* ``step_s``: the median time of ``--steps`` timed rounds after ``--warmup`` untimed ones,
  all four in one process taking turns, one step each per round, so that a change of the
  machine's load hits all alike;
* ``peak_growth_mb``: in a fresh process per strategy, so that one's peak cannot hide
  another's, the peak resident set size (``VmHWM``) during ``--memory-steps`` steps (the
  second one holds the optimizer's state too) minus the resident size (``VmRSS``) right
  after the model was built (and, for ``precomputed``, its log-probabilities computed); the
  peak is reset at that point (``/proc/self/clear_refs``), so building the model does not
  count. These runs use glibc's ``MALLOC_MMAP_THRESHOLD_=131072``: every block of 128 KiB
  or more is given back to the system when freed, so the resident size follows the tensors
  alive. (By default glibc keeps freed blocks of up to 32 MiB for reuse; the resident size
  then also holds what earlier steps left behind, and each step's peak grows by some of it,
  enough to hide the deep copy.)

and the ratios of both to the supervised step, plus the two checks: the memory that
switching the adapters off saves against the deep copy, as a share of the model's bytes
(expected >= 0.9), and the precomputed reference's step time over the deep copy's
(expected <= 0.8). Prints one JSON line. CPU only; ``--tiny`` is a quick check (the
``tiny`` preset, 4 pairs of 64 tokens, seconds)::

    python bench/bench_dpo.py [--tiny] [--steps 2] [--warmup 1] [--memory-steps 2] [--rank 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine_fields

STRATEGIES = ("sft", "deep_copy", "adapters_off", "precomputed")
MMAP_THRESHOLD = "131072"  # bytes: blocks this large are returned to the system when freed
SHAPES = {"gpt2-small": (4, 256, 64), "tiny": (4, 64, 16)}  # (batch, tokens, prompt tokens)


# --- memory ------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def resident_kib() -> int:
    """This process's resident set size now (the peak so far where ``/proc`` is missing)."""
    now = _status_kib("VmRSS")
    return now if now is not None else _max_rss_kib()


def peak_kib() -> int:
    """The peak resident set size since the last :func:`reset_peak` (or since the start)."""
    peak = _status_kib("VmHWM")
    return peak if peak is not None else _max_rss_kib()


def _max_rss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def reset_peak() -> bool:
    """Make the peak resident size start again from the current one (Linux: writing 5 to
    ``/proc/self/clear_refs``); False where that is not possible (the peak then also
    covers what happened before)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# --- the model, the batches, the steps --------------------------------------------------------


def build_policy(preset: str, rank: int):
    """The LoRA policy: the same random weights and adapters in every process."""
    import torch

    from minigpt.lora.adapters import apply_lora
    from minigpt.models.gpt2.config import GPTConfig
    from minigpt.models.gpt2.model import GPTModel

    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset(preset, qkv_bias=True, tie_weights=True, drop_rate=0.0))
    report = apply_lora(model, rank=rank, alpha=rank)
    return model.train(), report


def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights)."""
    tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in [*model.parameters(), *model.buffers()]}
    return sum(tensors.values())


def batches(preset: str, vocab_size: int) -> tuple[tuple, dict]:
    """``(instruction batch, preference batch)`` of random ids, every sequence exactly
    ``tokens`` long, the first ``prompt`` tokens a prompt that is not scored."""
    import torch

    from minigpt.finetuning.instruction import TokenizedExample, collate_instructions
    from minigpt.finetuning.preference import PreferenceExample, collate_preferences

    batch, tokens, prompt = SHAPES[preset]
    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab_size - 1, (n,), generator=g).tolist()  # never end-of-text

    # collate_instructions appends one end-of-text and drops the last position: tokens wide.
    sft = collate_instructions([TokenizedExample(ids(tokens), prompt) for _ in range(batch)], mask_instruction=True)
    pairs = collate_preferences([PreferenceExample(ids(prompt), ids(tokens - prompt), ids(tokens - prompt))
                                 for _ in range(batch)])
    return sft, pairs


def precompute(model, pairs: dict) -> dict:
    """The batch with the base model's log-probabilities in it, one pair at a time (so that
    what this leaves behind in memory is small)."""
    import torch

    from minigpt.finetuning.reference import AdaptersOffReference

    reference, rows = AdaptersOffReference(model), []
    for i in range(pairs["num_scored"]):
        one = {k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in pairs.items()}
        rows.append(torch.stack(reference.logps(one), dim=1))
    chosen, rejected = torch.cat(rows).T
    return {**pairs, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


def loss_for(strategy: str, model, batches_: tuple[tuple, dict, dict]):
    """``(loss function, batch)`` of one strategy; for ``deep_copy`` the copy is made here."""
    from minigpt.finetuning.dpo import DPOLoss
    from minigpt.finetuning.instruction import instruction_loss
    from minigpt.finetuning.reference import AdaptersOffReference, FrozenReference

    sft, pairs, precomputed = batches_
    if strategy == "sft":
        return instruction_loss, sft
    if strategy == "deep_copy":
        return DPOLoss(FrozenReference(model)), pairs
    if strategy == "adapters_off":
        return DPOLoss(AdaptersOffReference(model)), pairs
    return DPOLoss(None), precomputed  # the batch carries the reference's log-probabilities


def setup(preset: str, rank: int, threads: int | None, strategies: tuple[str, ...]):
    """The policy, its optimizer, and the batches the ``strategies`` need."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    model, report = build_policy(preset, rank)
    sft, pairs = batches(preset, model.cfg.vocab_size)
    precomputed = precompute(model, pairs) if "precomputed" in strategies else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-6)
    return model, report, optimizer, (sft, pairs, precomputed)


def step(model, optimizer, loss_fn, batch) -> float:
    """One optimizer step; returns its wall time in seconds."""
    from minigpt.training.losses import loss_and_metrics

    start = time.perf_counter()
    loss, _ = loss_and_metrics(loss_fn(model, batch))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure_memory(strategy: str, preset: str, rank: int, steps: int, threads: int | None) -> dict:
    """Peak resident growth over ``steps`` steps of ``strategy``, above the process after the build."""
    import torch

    model, report, optimizer, batches_ = setup(preset, rank, threads, (strategy,))
    gc.collect()
    baseline, was_reset = resident_kib(), reset_peak()
    loss_fn, batch = loss_for(strategy, model, batches_)  # the deep copy counts: it is made after the baseline
    for _ in range(steps):
        step(model, optimizer, loss_fn, batch)
    return {"strategy": strategy, "baseline_mb": baseline / 1024, "peak_growth_mb": (peak_kib() - baseline) / 1024,
            "peak_reset": was_reset, "model_mb": model_bytes(model) / 2**20,
            "trainable_params": report.trainable, "threads": torch.get_num_threads()}


def measure_time(preset: str, rank: int, steps: int, warmup: int, threads: int | None) -> dict:
    """Every strategy's steps, taking turns (so a change of machine load hits all alike):
    the median of ``steps`` timed rounds after ``warmup`` untimed ones."""
    model, _, optimizer, batches_ = setup(preset, rank, threads, STRATEGIES)
    runs = {strategy: loss_for(strategy, model, batches_) for strategy in STRATEGIES}
    times: dict[str, list[float]] = {strategy: [] for strategy in STRATEGIES}
    for _ in range(warmup + steps):
        for strategy, (loss_fn, batch) in runs.items():
            times[strategy].append(step(model, optimizer, loss_fn, batch))
    return {"step_s": {k: statistics.median(v[warmup:]) for k, v in times.items()}, "times": times}


# --- the driver --------------------------------------------------------------------------------


def run_in_subprocess(worker: str, args: argparse.Namespace, env: dict[str, str] | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", worker, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--memory-steps", str(args.memory_steps), "--rank", str(args.rank)]
    command += (["--tiny"] if args.tiny else []) + ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"the {worker} run failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(memory: dict[str, dict], timing: dict, preset: str, args: argparse.Namespace) -> dict:
    batch, tokens, prompt = SHAPES[preset]
    seconds, growth = timing["step_s"], {s: r["peak_growth_mb"] for s, r in memory.items()}
    sft = memory["sft"]
    saved_fraction = (growth["deep_copy"] - growth["adapters_off"]) / sft["model_mb"]
    time_ratio = seconds["precomputed"] / seconds["deep_copy"]
    return {
        "bench": "dpo_step", "shape": preset, "weights": "random",
        "batch": batch, "tokens": tokens, "prompt_tokens": prompt, "lora_rank": args.rank,
        "trainable_params": sft["trainable_params"], "model_mb": round(sft["model_mb"], 1),
        "threads": sft["threads"], "warmup": args.warmup, "steps": args.steps, "memory_steps": args.memory_steps,
        "measure": "median step time, strategies taking turns in one process; peak RSS growth over the RSS after "
                   "the model is built, a fresh process per strategy",
        "malloc": f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} (memory runs only)",
        "step_s": {s: round(v, 3) for s, v in seconds.items()},
        "peak_growth_mb": {s: round(v, 1) for s, v in growth.items()},
        "time_vs_sft": {s: round(v / seconds["sft"], 3) for s, v in seconds.items()},
        "memory_vs_sft": {s: round(v / growth["sft"], 3) for s, v in growth.items()},
        "adapters_off_saves_of_model": round(saved_fraction, 3),
        "precomputed_time_vs_deep_copy": round(time_ratio, 3),
        "expected": {"adapters_off_saves_of_model": ">= 0.9", "precomputed_time_vs_deep_copy": "<= 0.8"},
        "as_expected": saved_fraction >= 0.9 and time_ratio <= 0.8,
        "peak_reset": all(r["peak_reset"] for r in memory.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny preset, 4 pairs of 64 tokens: a quick check")
    parser.add_argument("--steps", type=int, default=2, help="timed rounds (one step of each strategy per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--memory-steps", type=int, default=2,
                        help="steps of each memory run (the second has the optimizer's state)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run; 0: torch's default (on a shared machine, threads waiting for "
                             "each other make steps many times slower, and unevenly)")
    parser.add_argument("--worker", choices=(*STRATEGIES, "time"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    preset = "tiny" if args.tiny else "gpt2-small"
    if args.worker == "time":
        print(json.dumps(measure_time(preset, args.rank, args.steps, args.warmup, args.threads)))
    elif args.worker:
        print(json.dumps(measure_memory(args.worker, preset, args.rank, args.memory_steps, args.threads)))
    else:
        memory_env = {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}  # read by glibc at start-up
        memory = {strategy: run_in_subprocess(strategy, args, memory_env) for strategy in STRATEGIES}
        print(json.dumps({**summary(memory, run_in_subprocess("time", args), preset, args), **machine_fields()}))


if __name__ == "__main__":
    main()
