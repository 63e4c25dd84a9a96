"""The job behind ``minigpt info``: the size of every model preset, its memory in each format,
and (``--kernels``) which kernel computes each matrix product on this machine.

The one idea: a model's size is its parameter count, and its memory is that count times
the bytes of one number (4 in float32, 2 in bfloat16). Quantized (``--quantize``), the
weight matrices of the transformer blocks take 8 bits (int8) or about 4 (int4, nf4, nf4-dq) per
number plus their scales (:func:`minigpt.quantization.schemes.quantized_bytes`), and so does
the output head under int8 and int4 (:func:`minigpt.quantization.model.default_skip`), while the
embeddings, the norms and the biases stay in float32. The presets are
built on PyTorch's ``meta`` device, which records shapes without allocating anything, so
even GPT-2 XL is counted in an instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from minigpt.models.gpt2.config import PRESETS, GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.models.llama.config import PRESETS as LLAMA_PRESETS
from minigpt.models.llama.config import LlamaConfig
from minigpt.models.llama.model import LlamaModel
from minigpt.quantization import weight_only  # noqa: F401 - registers the int8 and int4 products with the kernel table
from minigpt.quantization.model import default_skip, linears_to_quantize, tied_weights
from minigpt.quantization.schemes import quantized_bytes
from minigpt.runtime.kernels import KernelTable, Product, kernel_table

FORMATS: tuple[str, ...] = ("float32", "bfloat16", "int8", "int4", "nf4", "nf4-dq")  # the columns of the memory table


@dataclass
class PresetSize:
    """A preset's config and parameter count, as configured and with the output head tied
    to the token embedding (as OpenAI's GPT-2 checkpoints are), and the bytes of the
    configured model in each of :data:`FORMATS`."""

    name: str
    cfg: GPTConfig | LlamaConfig
    parameters: int
    tied_parameters: int
    memory: dict[str, int] = field(default_factory=dict)


def model_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of ``model`` in each of :data:`FORMATS`: all of it in float32 or bfloat16, or the
    linears each scheme quantizes by default (``quantize_model``: the blocks', and for int8 and
    int4 the head's too) quantized and the rest in float32. Works on a ``meta`` model: only shapes are read."""
    total = sum(p.numel() for p in model.parameters())
    sizes = {"float32": 4 * total, "bfloat16": 2 * total}
    # A tied head's matrix stays in float32 as the embedding: its quantized copy comes on top.
    ties = tied_weights(model)
    for scheme in FORMATS[2:]:
        names = linears_to_quantize(model, default_skip(scheme))
        shapes = [tuple(model.get_submodule(name).weight.shape) for name in names]
        replaced = [shape for name, shape in zip(names, shapes, strict=True) if name not in ties]
        rest = 4 * (total - sum(out * in_ for out, in_ in replaced))
        sizes[scheme] = rest + sum(quantized_bytes(shape, scheme) for shape in shapes)
    return sizes


def preset_sizes() -> list[PresetSize]:
    """Every preset of :data:`minigpt.models.gpt2.config.PRESETS`, in its order."""
    sizes = []
    for name in PRESETS:
        cfg = GPTConfig.from_preset(name)
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = GPTModel(cfg)
            tied = GPTModel(GPTConfig.from_preset(name, tie_weights=True)).num_parameters()
        sizes.append(PresetSize(name, cfg, model.num_parameters(), tied, model_bytes(model)))
    return sizes


def llama_sizes() -> list[PresetSize]:
    """The Llama-family presets (:data:`minigpt.models.llama.config.PRESETS`), as published: their heads
    are tied or not as the checkpoints have them, so both counts are the same."""
    sizes = []
    for name in LLAMA_PRESETS:
        with torch.device("meta"):
            model = LlamaModel(name)
        n = model.num_parameters()
        sizes.append(PresetSize(name, model.cfg, n, n, model_bytes(model)))
    return sizes


def decoding_products(preset: str = "gpt2-small") -> list[Product]:
    """The products one batch-1 decoding step of ``preset`` runs: each distinct linear shape,
    one row, in float32 and bfloat16, and the int8 and int4 ones of the linears those schemes quantize."""
    with torch.device("meta"):
        model = GPTModel(preset)
    quantized = set(linears_to_quantize(model, default_skip("int8")))
    shapes = {(name in quantized, m.in_features, m.out_features)  # (quantized by int8 and int4?, in, out)
              for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    ops = {False: ("float32", "bfloat16"), True: ("float32", "bfloat16", "int8", "int4")}
    return [Product("forward" if op in ("float32", "bfloat16") else op, 1, n_in, n_out,
                    op if op in ("float32", "bfloat16") else "float32")
            for quantized_too, n_in, n_out in sorted(shapes) for op in ops[quantized_too]]


def kernel_choices(preset: str = "gpt2-small") -> KernelTable:
    """This machine's kernel table (:mod:`minigpt.runtime.kernels`), with ``preset``'s batch-1 decoding
    products measured first where they are missing; every other row is a product some run used."""
    table = kernel_table()
    for product in decoding_products(preset):
        table.timing(product)
    return table
