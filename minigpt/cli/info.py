"""``minigpt info``: the model presets, their parameter counts and memory."""

from __future__ import annotations

import argparse

HELP = "list the model presets with parameter counts and memory"


def add(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    """No options."""


def run(args: argparse.Namespace) -> int:
    from minigpt.jobs.info import preset_sizes

    print(f"{'preset':<12} {'layers':>6} {'heads':>5} {'emb_dim':>7} {'context':>7} "
          f"{'params':>15} {'tied head':>15} {'float32':>10} {'bfloat16':>10}")
    for p in preset_sizes():
        n, cfg = p.parameters, p.cfg
        print(f"{p.name:<12} {cfg.n_layers:>6} {cfg.n_heads:>5} {cfg.emb_dim:>7} {cfg.context_length:>7} "
              f"{n:>15,} {p.tied_parameters:>15,} {n * 4 / 2**30:>8.2f}GB {n * 2 / 2**30:>8.2f}GB")
    print("'params' is the preset as configured; 'tied head' shares the output head with the "
          "token embedding, as OpenAI's GPT-2 checkpoints do.")
    return 0
