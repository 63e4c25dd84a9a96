"""The job behind ``minigpt info``: the size of every model preset.

The one idea: a model's size is its parameter count, and its memory is that count times
the bytes of one number (4 in float32, 2 in bfloat16). The presets are built on PyTorch's
``meta`` device, which records shapes without allocating anything, so even GPT-2 XL is
counted in an instant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minigpt.config import PRESETS, GPTConfig
from minigpt.model import GPTModel


@dataclass
class PresetSize:
    """A preset's config and parameter count, as configured and with the output head tied
    to the token embedding (as OpenAI's GPT-2 checkpoints are)."""

    name: str
    cfg: GPTConfig
    parameters: int
    tied_parameters: int


def preset_sizes() -> list[PresetSize]:
    """Every preset of :data:`minigpt.config.PRESETS`, in its order."""
    sizes = []
    for name in PRESETS:
        cfg = GPTConfig.from_preset(name)
        with torch.device("meta"):  # shapes only: nothing is allocated
            n = GPTModel(cfg).num_parameters()
            tied = GPTModel(GPTConfig.from_preset(name, tie_weights=True)).num_parameters()
        sizes.append(PresetSize(name, cfg, n, tied))
    return sizes
