"""``minigpt eval``: a model's loss and perplexity on a corpus."""

from __future__ import annotations

import argparse

from minigpt.cli.options import add_settings, given_settings

HELP = "loss and perplexity of a model on a corpus's validation split"


def add(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    from minigpt.jobs.evaluate import EvalConfig

    add_settings(p, EvalConfig(checkpoint=""), flags)


def run(args: argparse.Namespace) -> int:
    from minigpt.jobs.evaluate import EvalConfig, evaluate

    r = evaluate(EvalConfig(**given_settings(args, EvalConfig)))
    scope = "whole split" if r.whole_split else f"an estimate over its first {r.windows:,} windows"
    print(f"{r.corpus} ({r.part}, {scope}: {r.windows:,} windows of {r.context_length} tokens): "
          f"loss {r.loss:.4f}, perplexity {r.perplexity:,.2f}")
    return 0
