"""``minigpt download``: OpenAI's GPT-2 weights, verified by SHA-256."""

from __future__ import annotations

import argparse

HELP = "download OpenAI's GPT-2 weights, verified by SHA-256"


def add(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    from minigpt.hub import GPT2_REPOS, default_weights_dir

    p.add_argument("name", choices=list(GPT2_REPOS))
    p.add_argument("--weights-dir", help=f"where to keep them (default: {default_weights_dir()})")


def run(args: argparse.Namespace) -> int:
    from minigpt.hub import download_gpt2

    print(f"{args.name} is in {download_gpt2(args.name, args.weights_dir)}")
    return 0
