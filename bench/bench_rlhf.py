"""PPO against GRPO and DPO on one model: rollout tokens/s, the time of one update, peak memory, and
what the LoRA-off reference saves.

The model: a ``tiny``-preset GPT (random weights, context 128) with LoRA of rank 8 on every
linear layer. Reported, each in this one process taking turns (``bench.common.interleaved_seconds``):

* ``rollout_tok_s``: answer tokens sampled per second by ``minigpt.finetuning.rollout.sample_rollouts``
  (``--prompts`` prompts of 48 tokens, ``--new-tokens`` answer tokens, KV cache);
* ``ppo_update_s``: one PPO update (rollout, scoring by a reward model, GAE, ``ppo_epochs`` = 2
  passes of 2 minibatches) with the reference as the adapters-off policy and as a frozen copy;
* ``grpo_step``: one GRPO step on ``--prompts`` arithmetic prompts, a group of 4 answers each
  (rollout, exact-match and format rewards, the clipped objective with the k3 KL term to the
  adapters-off reference): no reward model and no value model;
* ``dpo_step``: one DPO step on as many pairs of the same length (adapters-off reference);
* ``peak_growth_mb``: the growth of the peak resident set size (``VmHWM``, reset through
  ``/proc/self/clear_refs``) over each measurement;
* ``frozen_copy_mb``: the bytes a frozen reference copy holds, which the adapters-off reference
  does not.

Run: ``python bench/bench_rlhf.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import machine_fields

from minigpt.finetuning.dpo import DPOLoss
from minigpt.finetuning.grpo import GRPOLoss, collate_prompts, tokenize_prompts
from minigpt.finetuning.preference import PreferenceExample, collate_preferences
from minigpt.finetuning.reference import AdaptersOffReference, FrozenReference
from minigpt.finetuning.reward import make_reward_model
from minigpt.finetuning.reward_tasks import arithmetic_task
from minigpt.finetuning.rollout import RolloutSettings, sample_rollouts
from minigpt.jobs.ppo import PolicyAndValue, PPOConfig, ppo_update
from minigpt.lora.adapters import apply_lora
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer
from minigpt.training.optim import create_optimizer


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peaks then include earlier work
        pass


def measured(fn) -> tuple[float, float]:
    """``(seconds, peak growth in MB)`` of one call."""
    reset_peak()
    base = peak_mb()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, peak_mb() - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny")
    policy = GPTModel(cfg)
    apply_lora(policy, 8, 8)
    reward_model = make_reward_model(GPTModel(cfg)).eval().requires_grad_(False)
    models = PolicyAndValue(policy, make_reward_model(GPTModel(cfg)))
    optimizer = create_optimizer(models, 1e-5)
    prompts = [torch.randint(0, 50000, (48,)).tolist() for _ in range(args.prompts)]
    rollout_settings = RolloutSettings(max_new_tokens=args.new_tokens)
    s = PPOConfig(batch_size=args.prompts, ppo_epochs=2, minibatches=2, max_new_tokens=args.new_tokens)
    references = {"adapters_off": AdaptersOffReference(policy), "frozen_copy": FrozenReference(policy)}
    pairs = [PreferenceExample(p, torch.randint(0, 50000, (args.new_tokens,)).tolist(),
                               torch.randint(0, 50000, (args.new_tokens,)).tolist()) for p in prompts]
    batch = collate_preferences(pairs)
    dpo = DPOLoss(references["adapters_off"])

    def dpo_step() -> None:
        optimizer.zero_grad()
        dpo(policy, batch)[0].backward()
        optimizer.step()

    tokenizer = get_gpt2_tokenizer()
    task = arithmetic_task()
    problems = [problem.prompt for problem in task.train[: args.prompts]]
    grpo_batch = collate_prompts(tokenize_prompts(problems, tokenizer, cfg.context_length, args.new_tokens))
    grpo = GRPOLoss(task.rewards, tokenizer, rollout_settings, group_size=4, reference=references["adapters_off"])

    def grpo_step() -> None:
        optimizer.zero_grad()
        grpo(policy, grpo_batch)[0].backward()
        optimizer.step()

    runs = {
        "rollout": lambda: sample_rollouts(policy, prompts, rollout_settings),
        **{f"ppo_update[{name}]": (lambda ref=ref: ppo_update(models, optimizer, ref, reward_model, prompts, s,
                                                               rollout_settings, 0.05))
           for name, ref in references.items()},
        "grpo_step": grpo_step,
        "dpo_step": dpo_step,
    }
    results: dict[str, dict[str, float]] = {name: {"seconds": [], "peak_growth_mb": 0.0} for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            seconds, growth = measured(fn)
            results[name]["seconds"].append(seconds)
            results[name]["peak_growth_mb"] = max(results[name]["peak_growth_mb"], growth)
    report = {name: {"median_s": sorted(r["seconds"])[len(r["seconds"]) // 2],
                     "peak_growth_mb": round(r["peak_growth_mb"], 1)} for name, r in results.items()}
    report["rollout"]["tok_s"] = args.prompts * args.new_tokens / report["rollout"]["median_s"]
    copy = references["frozen_copy"].model
    report["frozen_copy_mb"] = sum(p.numel() * p.element_size() for p in copy.parameters()) / 2**20
    print(json.dumps({"benchmark": "rlhf", **machine_fields(), **report}))


if __name__ == "__main__":
    main()
