"""``minigpt eval``: a model's loss and perplexity on a corpus, the sliding-window perplexity
of a whole text (``--perplexity``), or benchmarks through lm-evaluation-harness (``--tasks``)."""

from __future__ import annotations

import argparse

from minigpt.cli.options import add_settings, given_settings

HELP = ("loss and perplexity of a model on a corpus's validation split, of a whole text (--perplexity), "
        "or benchmark scores (--tasks)")
SHARED = ("checkpoint", "batch_size", "device", "quantize")  # options both jobs read


def add(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    from minigpt.jobs.evaluate import EvalConfig
    from minigpt.jobs.harness import HarnessConfig

    add_settings(p, EvalConfig(checkpoint=""), flags)
    benchmarks = p.add_argument_group("benchmarks (lm-evaluation-harness, an optional extra: minigpt[eval])")
    add_settings(benchmarks, HarnessConfig(checkpoint=""), flags, skip=SHARED)


def run(args: argparse.Namespace) -> int:
    from minigpt.jobs.evaluate import EvalConfig, evaluate, evaluate_perplexity
    from minigpt.jobs.harness import HarnessConfig, results_table, run_tasks

    if getattr(args, "tasks", None) is not None:
        print(results_table(run_tasks(HarnessConfig(**given_settings(args, HarnessConfig)))))
        return 0
    settings = EvalConfig(**given_settings(args, EvalConfig))
    if settings.perplexity is not None:
        p = evaluate_perplexity(settings)
        print(f"{settings.perplexity} ({p.tokens:,} tokens scored in {p.windows:,} windows of {p.context_length} "
              f"tokens, stride {p.stride}): loss {p.loss:.4f}, perplexity {p.perplexity:,.2f}")
        return 0
    r = evaluate(settings)
    scope = "whole split" if r.whole_split else f"an estimate over its first {r.windows:,} windows"
    print(f"{r.corpus} ({r.part}, {scope}: {r.windows:,} windows of {r.context_length} tokens): "
          f"loss {r.loss:.4f}, perplexity {r.perplexity:,.2f}")
    return 0
