"""The ``quantize`` setting the jobs share (``--quantize nf4|nf4-dq|int8|int4``), and a model loaded with it.

The one idea: every job that loads a model can load it quantized
(:mod:`minigpt.quantization.layers`): the block linears in 4 or 8 bits, dequantized inside each
matrix product, the embeddings and the output head in full precision. Weights from a file
are quantized layer by layer while loading (:func:`minigpt.models.load`), random weights of a
preset once built. Fine-tuning a quantized model trains
LoRA adapters on it (QLoRA), since the quantized weights themselves cannot train.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from minigpt.quantization.schemes import SCHEMES, check_scheme

QUANTIZE_HELP = ("load the weights quantized: nf4 (4-bit NormalFloat, blocks of 64), nf4-dq (nf4 with its "
                 "scales quantized too), int8 (per-row absmax) or int4 (groups of 64, scale and zero each); "
                 "int8 and int4 decode through PyTorch's weight-only kernels where they are measured faster; "
                 "embeddings and output head stay full precision")


def quantize_field() -> Any:
    """The ``quantize`` field of a job's settings (None: full precision)."""
    return field(default=None, metadata={"help": QUANTIZE_HELP, "none": "full precision", "choices": SCHEMES})


def check_quantize(scheme: str | None) -> None:
    """``scheme`` is None or one of :data:`minigpt.quantization.schemes.SCHEMES` (the error lists them)."""
    if scheme is not None:
        check_scheme(scheme)
