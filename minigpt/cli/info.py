"""``minigpt info``: the model presets, their parameter counts and memory in each format."""

from __future__ import annotations

import argparse

HELP = "list the model presets with parameter counts and memory (full precision and quantized)"


def add(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    """No options."""


def _size(n: int) -> str:
    return f"{n / 2**30:.2f}GB" if n >= 2**30 else f"{n / 2**20:.0f}MB"


def run(args: argparse.Namespace) -> int:
    from minigpt.jobs.info import FORMATS, llama_sizes, preset_sizes

    header = (f"{'layers':>6} {'heads':>5} {'emb_dim':>7} {'context':>7} {'params':>15} {'tied head':>15}"
              + "".join(f" {name:>9}" for name in FORMATS))
    for family, sizes in (("preset", preset_sizes()), ("llama family", llama_sizes())):
        if family != "preset":
            print()
        print(f"{family:<22} {header}")
        for p in sizes:
            cfg = p.cfg
            print(f"{p.name:<22} {cfg.n_layers:>6} {cfg.n_heads:>5} {cfg.emb_dim:>7} {cfg.context_length:>7} "
                  f"{p.parameters:>15,} {p.tied_parameters:>15,}"
                  + "".join(f" {_size(p.memory[name]):>9}" for name in FORMATS))
    print("'params' is the preset as configured; 'tied head' shares the output head with the token embedding, "
          "as OpenAI's GPT-2 checkpoints do (the Llama family as published). Memory is the configured model's; "
          "int8, nf4 and nf4-dq (--quantize) store the blocks' weight matrices in 8 or about 4 bits, and keep the "
          "embeddings, the output head, the norms and the biases in float32.")
    return 0
