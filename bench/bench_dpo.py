"""One DPO step with each of the three references, against one supervised instruction step.

The policy is the same in every case: a model of the ``gpt2-small`` shape (random weights,
GPT-2's layout: query/key/value bias, head tied to the token embedding, dropout 0) with
LoRA of rank 16 (alpha 16) on every linear layer of the blocks and on the head. A DPO
step on ``batch`` pairs of ``tokens`` tokens is the policy's forward and backward over the
chosen and the rejected sequences (one forward over both, ``2 * batch`` rows), the
reference's log-probabilities of the same pairs, and an AdamW step. The references:

* ``deep_copy``: a frozen copy of the model (``minigpt.dpo.FrozenReference``), made after
  the baseline below, so its bytes count;
* ``adapters_off``: the policy itself with its LoRA updates switched off
  (``minigpt.dpo.AdaptersOffReference``): no second model;
* ``precomputed``: the reference's log-probabilities computed once before training (here
  before the baseline, as a run does before its first step) and carried by the batch.

The yardstick is one supervised instruction step (``minigpt.instruction.instruction_loss``)
of the same LoRA model on ``batch`` sequences of ``tokens`` tokens (the prompt's targets
masked, as in the DPO batch). Each of the four runs in its own fresh process, so one's peak
memory cannot hide another's. Reported per run:

* ``step_s``: the median time of ``--steps`` steps after ``--warmup`` untimed ones;
* ``peak_growth_mb``: the peak resident set size (``VmHWM``) during the steps, warm-up
  included, minus the resident size (``VmRSS``) right after the model was built (and, for
  ``precomputed``, its log-probabilities computed); the peak is reset at that point
  (``/proc/self/clear_refs``), so building the model does not count. The runs use glibc's
  ``MALLOC_MMAP_THRESHOLD_=131072``: every block of 128 KiB or more is given back to the
  system when freed, so the resident size follows the tensors alive. (By default glibc
  keeps freed blocks of up to 32 MiB for reuse; the resident size then also holds what
  earlier steps left behind, and each step's peak grows by some of it.)

and the ratios of both to the supervised step, plus the two checks: the memory that
switching the adapters off saves against the deep copy, as a share of the model's bytes
(expected >= 0.9), and the precomputed reference's step time over the deep copy's
(expected <= 0.8). Prints one JSON line. CPU only; ``--tiny`` is a quick check (the
``tiny`` preset, 4 pairs of 64 tokens, seconds)::

    python bench/bench_dpo.py [--tiny] [--steps 2] [--warmup 1] [--rank 16] [--threads N]
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


# --- one worker: one strategy, in its own process ----------------------------------------------


def build_policy(preset: str, rank: int):
    """The LoRA policy: the same random weights and adapters in every process."""
    import torch

    from minigpt.config import GPTConfig
    from minigpt.lora import apply_lora
    from minigpt.model import GPTModel

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

    from minigpt.instruction import TokenizedExample, collate_instructions
    from minigpt.preference import PreferenceExample, collate_preferences

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

    from minigpt.dpo import AdaptersOffReference

    reference, rows = AdaptersOffReference(model), []
    for i in range(pairs["num_scored"]):
        one = {k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in pairs.items()}
        rows.append(torch.stack(reference.logps(one), dim=1))
    chosen, rejected = torch.cat(rows).T
    return {**pairs, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


def run_strategy(strategy: str, preset: str, rank: int, steps: int, warmup: int, threads: int | None) -> dict:
    """Build the policy, then time ``warmup + steps`` steps of ``strategy`` and measure the
    peak memory growth over the process after the build."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from minigpt.dpo import AdaptersOffReference, DPOLoss, FrozenReference
    from minigpt.instruction import instruction_loss
    from minigpt.losses import loss_and_metrics

    model, report = build_policy(preset, rank)
    sft, pairs = batches(preset, model.cfg.vocab_size)
    batch = sft if strategy == "sft" else pairs
    if strategy == "precomputed":
        batch = precompute(model, pairs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-6)
    gc.collect()
    baseline, was_reset = resident_kib(), reset_peak()

    if strategy == "sft":
        loss_fn = instruction_loss
    elif strategy == "deep_copy":
        loss_fn = DPOLoss(FrozenReference(model))  # the copy is made here, after the baseline
    elif strategy == "adapters_off":
        loss_fn = DPOLoss(AdaptersOffReference(model))
    else:
        loss_fn = DPOLoss(None)  # the batch carries the reference's log-probabilities
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        loss, _ = loss_and_metrics(loss_fn(model, batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"strategy": strategy, "step_s": statistics.median(times[warmup:]), "times": times,
            "baseline_mb": baseline / 1024, "peak_growth_mb": (peak_kib() - baseline) / 1024,
            "peak_reset": was_reset, "model_mb": model_bytes(model) / 2**20,
            "trainable_params": report.trainable, "threads": torch.get_num_threads()}


# --- the driver --------------------------------------------------------------------------------


def run_in_subprocess(strategy: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", strategy, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--rank", str(args.rank)]
    command += (["--tiny"] if args.tiny else []) + (["--threads", str(args.threads)] if args.threads else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}  # read by glibc at start-up
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the {strategy} run failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(runs: dict[str, dict], preset: str, args: argparse.Namespace) -> dict:
    batch, tokens, prompt = SHAPES[preset]
    sft, deep, off, pre = (runs[s] for s in STRATEGIES)
    model_mb = sft["model_mb"]
    saved_fraction = (deep["peak_growth_mb"] - off["peak_growth_mb"]) / model_mb
    time_ratio = pre["step_s"] / deep["step_s"]
    return {
        "bench": "dpo_step", "shape": preset, "weights": "random",
        "batch": batch, "tokens": tokens, "prompt_tokens": prompt, "lora_rank": args.rank,
        "trainable_params": sft["trainable_params"], "model_mb": round(model_mb, 1),
        "threads": sft["threads"], "warmup": args.warmup, "steps": args.steps,
        "measure": "median step time; peak RSS growth over the RSS after the model is built, fresh process each",
        "malloc": f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}",
        "step_s": {s: round(r["step_s"], 3) for s, r in runs.items()},
        "peak_growth_mb": {s: round(r["peak_growth_mb"], 1) for s, r in runs.items()},
        "time_vs_sft": {s: round(r["step_s"] / sft["step_s"], 3) for s, r in runs.items()},
        "memory_vs_sft": {s: round(r["peak_growth_mb"] / sft["peak_growth_mb"], 3) for s, r in runs.items()},
        "adapters_off_saves_of_model": round(saved_fraction, 3),
        "precomputed_time_vs_deep_copy": round(time_ratio, 3),
        "expected": {"adapters_off_saves_of_model": ">= 0.9", "precomputed_time_vs_deep_copy": "<= 0.8"},
        "as_expected": saved_fraction >= 0.9 and time_ratio <= 0.8,
        "peak_reset": all(r["peak_reset"] for r in runs.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny preset, 4 pairs of 64 tokens: a quick check")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per strategy")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (their memory counts)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    parser.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    preset = "tiny" if args.tiny else "gpt2-small"
    if args.worker:
        print(json.dumps(run_strategy(args.worker, preset, args.rank, args.steps, args.warmup, args.threads)))
        return
    runs = {strategy: run_in_subprocess(strategy, args) for strategy in STRATEGIES}
    print(json.dumps(summary(runs, preset, args)))


if __name__ == "__main__":
    main()
