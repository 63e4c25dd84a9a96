"""The ``quantize`` setting the jobs share (``--quantize nf4|nf4-dq|int8|int4``), and a model loaded with it.

The one idea: every job that loads a model can load it quantized
(:mod:`minigpt.quantized_linear`): the block linears in 4 or 8 bits, dequantized inside each
matrix product, the embeddings and the output head in full precision. Weights from a file
are quantized layer by layer while loading (:func:`minigpt.weights.load_pretrained`);
random weights of a preset are quantized once built. Fine-tuning a quantized model trains
LoRA adapters on it (QLoRA), since the quantized weights themselves cannot train.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from torch import nn

from minigpt.model import GPTModel
from minigpt.pretrained import load_model
from minigpt.quantization import SCHEMES, check_scheme
from minigpt.quantized_linear import quantize_model

QUANTIZE_HELP = ("load the weights quantized: nf4 (4-bit NormalFloat, blocks of 64), nf4-dq (nf4 with its "
                 "scales quantized too), int8 (per-row absmax) or int4 (groups of 64, scale and zero each); "
                 "int8 and int4 decode through PyTorch's weight-only kernels where they are measured faster; "
                 "embeddings and output head stay full precision")


def quantize_field() -> Any:
    """The ``quantize`` field of a job's settings (None: full precision)."""
    return field(default=None, metadata={"help": QUANTIZE_HELP, "none": "full precision", "choices": SCHEMES})


def check_quantize(scheme: str | None) -> None:
    """``scheme`` is None or one of :data:`minigpt.quantization.SCHEMES` (the error lists them)."""
    if scheme is not None:
        check_scheme(scheme)


def load_quantized(source: str | None, preset: str, scheme: str | None) -> nn.Module:
    """The weights of ``source`` (a GPT-2 or Llama-family name, or a directory:
    :func:`minigpt.pretrained.load_model`), or random weights of the GPT-2 ``preset`` when
    it is None, quantized with ``scheme`` when given."""
    if source:
        return load_model(source, quantize=scheme)
    model = GPTModel(preset)
    return quantize_model(model, scheme) if scheme else model
