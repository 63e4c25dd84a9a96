"""``minigpt download``: OpenAI's GPT-2 weights, or a Llama-family checkpoint, verified by SHA-256."""

from __future__ import annotations

import argparse

HELP = "download OpenAI's GPT-2 weights or a Llama-family checkpoint (SmolLM2, Qwen3, Llama 3.2), verified by SHA-256"


def add(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    from minigpt.io.hub import default_weights_dir
    from minigpt.models.registry import known_names

    p.add_argument("name", metavar="NAME", help=f"a published checkpoint: {', '.join(known_names())}")
    p.add_argument("--weights-dir", help=f"where to keep them (default: {default_weights_dir()})")


def run(args: argparse.Namespace) -> int:
    from minigpt.models.registry import did_you_mean, family_of_name, known_names

    family = family_of_name(args.name)
    if family is None:
        raise ValueError(f"{args.name!r} is not a published checkpoint: {did_you_mean(args.name, known_names())}"
                         f"choose one of {', '.join(known_names())}")
    directory = family.download(args.name, args.weights_dir)
    print(f"{args.name} is in {directory}")
    return 0
