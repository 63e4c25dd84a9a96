"""``minigpt generate``: continue a prompt, printing each piece as soon as it is whole."""

from __future__ import annotations

import argparse
import dataclasses

from minigpt.cli.options import add_settings, given_settings

HELP = "continue a prompt"


def add(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    from minigpt.jobs.generate import GenerateConfig

    source = p.add_mutually_exclusive_group()
    add_settings(source, GenerateConfig(), flags, skip=[f.name for f in dataclasses.fields(GenerateConfig)
                                                         if f.name not in ("model", "checkpoint", "preset")])
    add_settings(p, GenerateConfig(), flags, skip=("model", "checkpoint", "preset"))


def run(args: argparse.Namespace) -> int:
    from minigpt.jobs.generate import GenerateConfig, generate_text

    generation = generate_text(GenerateConfig(**given_settings(args, GenerateConfig)))
    print(generation.prompt, end="", flush=True)
    for piece in generation.pieces:
        print(piece, end="", flush=True)
    print()
    return 0
