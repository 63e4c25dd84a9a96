"""Which layers LoRA adapts: patterns on dotted module names.

The one idea: a model names every submodule by its path (``trf_blocks.3.att.W_query``),
so "the query projection of every block" is the pattern ``W_query``. A pattern matches a
name when it equals it or one of its dot-separated endings, with ``fnmatch`` wildcards::

    "W_query"             the query projection of every block
    "att.*"               every attention projection
    "ff.layers.0"         every first feed-forward layer
    "trf_blocks.1[01].*"  all linears of blocks 10 and 11

The layers LoRA can wrap are ``nn.Linear`` and the quantized linears of
:mod:`minigpt.quantization.layers` (QLoRA).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn

from minigpt.quantization.layers import QUANTIZED_LAYERS

# Every linear layer of the transformer blocks plus the output (or classification) head:
# the book's choice, and the one that gets closest to full fine-tuning.
DEFAULT_TARGETS: tuple[str, ...] = ("trf_blocks.*", "out_head")
LINEAR_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, *QUANTIZED_LAYERS)  # what LoRA wraps


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether ``pattern`` matches the dotted ``name`` or one of its endings."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def match_targets(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the linear layers (:data:`LINEAR_LAYERS`) that any of ``patterns`` matches,
    in model order; each pattern must match one at least."""
    if not patterns:
        raise ValueError("target_modules is empty; pass None for the default targets")
    linears = [name for name, m in model.named_modules() if isinstance(m, LINEAR_LAYERS)]
    unmatched = [p for p in patterns if not any(pattern_matches(p, name) for name in linears)]
    if unmatched:
        # One pattern per kind of layer: block numbers replaced by "*".
        kinds = sorted({re.sub(r"(?<=\.)\d+(?=\.)", "*", name) for name in linears})
        raise ValueError(
            f"target_modules patterns {unmatched} match no nn.Linear layer of the model; a pattern "
            f"matches a dotted module name or one of its endings, the model's linear layers "
            f"are {kinds}"
        )
    return [name for name in linears if any(pattern_matches(p, name) for p in patterns)]
