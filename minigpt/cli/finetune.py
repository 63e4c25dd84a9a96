"""``minigpt finetune classify|instruct|dpo|reward|ppo|grpo``: the fine-tuning jobs."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from minigpt.cli.options import add_settings, fill_default_precision, given_settings, interruptible

HELP = ("fine-tune a GPT to classify texts, to follow instructions, to prefer the answers people do, or to answer "
        "checkable questions right")


FINETUNE = {  # task -> (its settings class and job function in minigpt.jobs.<task>, one-line help)
    "classify": ("ClassifyConfig", "finetune_classifier", "train a text classifier (book ch. 6), e.g. a spam filter"),
    "instruct": ("InstructConfig", "finetune_instructions",
                 "instruction fine-tuning (book ch. 7) with answers and their scores"),
    "dpo": ("DPOConfig", "finetune_dpo", "preference tuning with DPO: an instruction-tuned model learns which of "
                                         "two answers people prefer"),
    "reward": ("RewardConfig", "finetune_reward", "train a reward model on preference pairs: a GPT that scores "
                                                  "an answer, for PPO"),
    "ppo": ("PPOConfig", "finetune_ppo", "RLHF with PPO: an instruction-tuned model learns to raise a reward "
                                         "model's score, held near its start by a KL penalty"),
    "grpo": ("GRPOConfig", "finetune_grpo", "reinforcement learning with GRPO: answers sampled in groups, scored by "
                                            "a checker (a task, or --reward module:function)"),
}


def _finetune_job(task: str) -> tuple[type, Callable[..., dict[str, Any]]]:
    module = importlib.import_module(f"minigpt.jobs.{task}")
    return getattr(module, FINETUNE[task][0]), getattr(module, FINETUNE[task][1])


def add(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    # "technique", not "task": a job may have a --task of its own (grpo's checked task)
    tasks = p.add_subparsers(dest="technique", required=True)
    for name, (_, _, help) in FINETUNE.items():
        task = tasks.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        add_settings(task, _finetune_job(name)[0](), flags)
        task.add_argument("--resume", metavar="OUTPUT", help="continue the interrupted run in OUTPUT")
        task.set_defaults(parser=task)  # a mistyped option is shown with this task's usage


def run(args: argparse.Namespace) -> int:
    cls, job = _finetune_job(args.technique)
    given = given_settings(args, cls)
    if args.resume:  # options given replace the run's own settings
        settings = dataclasses.replace(cls.load(args.resume), **{**given, "output": args.resume})
    else:
        fill_default_precision(given, given.get("device"))
        settings = cls(**given)
    if args.technique == "instruct" and not (settings.judge_model or settings.judge_url):
        print("no judge given (--judge-model or --judge-url): reporting the test loss and perplexity only")
    m = interruptible(lambda: job(settings, resume=bool(args.resume)),
                       f"minigpt finetune {args.technique} --resume {settings.output}")
    if args.technique == "grpo":
        print(f"held-out accuracy (greedy answers): {m['accuracy_before']:.1%} -> {m['accuracy']:.1%}; test: reward "
              f"{m['test']['reward']:.3f}" + (f", KL {m['test']['kl']:.4f}" if "kl" in m["test"] else ""))
        saved = "the model, loss.png, grpo.png"
    elif args.technique == "classify":
        before = m["accuracy_before"]
        after = m["accuracy"]
        print(f"accuracy: train {after['train']:.1%}, validation {after['val']:.1%}, test {after['test']:.1%} "
              f"(test before fine-tuning: {before['test']:.1%})")
        saved = "the classifier, loss.png, accuracy.png"
    elif args.technique == "instruct":
        print(f"test loss {m['test_loss']:.3f}, perplexity {m['test_perplexity']:,.1f}")
        if m["judge_score"] is not None:
            print(f"judge score {m['judge_score']:.1f} / 100 over {m['judged']} of {m['responses']} responses")
        saved = "the model, loss.png, responses.json"
    elif args.technique == "reward":
        before = m["val_before"]
        val = m["val"]
        test = m["test"]
        print(f"validation: accuracy {before['accuracy']:.1%} -> {val['accuracy']:.1%}, margin "
              f"{before['margin']:.3f} -> {val['margin']:.3f}; test: accuracy {test['accuracy']:.1%}, "
              f"margin {test['margin']:.3f}")
        saved = "the reward model, loss.png, reward.png"
    elif args.technique == "ppo":
        before = m["held_out_before"]
        after = m["held_out_after"]
        print(f"held-out prompts: reward-model score {before['score_mean']:.3f} (sd {before['score_std']:.3f}) -> "
              f"{after['score_mean']:.3f}, KL to the reference {after['kl_mean']:.3f}")
        saved = "the policy, ppo.png, ppo_logs.json"
    else:
        before = m["val_before"]
        val = m["val"]
        test = m["test"]
        print(f"validation: reward accuracy {before['rewards/accuracies']:.1%} -> {val['rewards/accuracies']:.1%}, "
              f"reward margin {before['rewards/margins']:.3f} -> {val['rewards/margins']:.3f}; test: reward accuracy "
              f"{test['rewards/accuracies']:.1%}, reward margin {test['rewards/margins']:.3f}")
        saved = f"the model{', its adapter' if settings.lora_rank else ''}, loss.png, preference.png, ab_samples.json"
    print(f"saved {saved} and metrics.json in {settings.output}")
    if settings.quantize:
        print(f"(QLoRA: the {settings.quantize} base was dequantized to merge the adapters; the saved model is "
              "full precision)")
    return 0
