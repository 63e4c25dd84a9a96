"""``minigpt compare``: the fine-tuned model against its base on a golden set, and the forgetting check."""

from __future__ import annotations

import argparse

from minigpt.cli.options import add_settings, given_settings

HELP = "win rate of a fine-tuned model against its base (blind, both orders) and both perplexities"


def add(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    from minigpt.jobs.compare import CompareConfig

    add_settings(p, CompareConfig(base=""), flags)


def run(args: argparse.Namespace) -> int:
    from minigpt.jobs.compare import CompareConfig, compare

    result = compare(CompareConfig(**given_settings(args, CompareConfig)))
    print(result.report, end="")
    print(f"\nanswers, verdicts and report in {result.output}/ (comparison.jsonl, report.md, win_rate.png)")
    return 0
