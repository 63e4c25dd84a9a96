"""Hugging Face's GPT-2 format and ours: one table of tensor names, and the config fields.

OpenAI released GPT-2 in TensorFlow; the Hugging Face hub publishes it as a
``config.json`` (``n_embd``, ``n_layer`` ...) and a ``model.safetensors`` whose tensor
names follow ``transformers``' ``GPT2LMHeadModel``. :data:`HF_TO_MINIGPT` is the whole
correspondence with our parameter names; :func:`hf_to_minigpt` and :func:`minigpt_to_hf`
apply it in each direction, and :func:`config_from_hf` / :func:`config_to_hf` translate the
config. :func:`export_hf` writes a directory that ``transformers`` loads with our logits.

Both formats use the same two file names and the one writer,
:func:`minigpt.io.weight_files.write_checkpoint`.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from minigpt.io.weight_files import write_checkpoint
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.model import GPTModel

# The one mapping between Hugging Face GPT-2 tensors and our parameters ({i}: block index).
# how: "=" same tensor; "T" transposed, because HF's Conv1D stores (in, out) while
# nn.Linear stores (out, in); "q"/"k"/"v": the first/second/third of the fused c_attn
# tensor's last dimension, [query | key | value]; "qT"...: that third, transposed.
#   minigpt parameter                     Hugging Face tensor ("transformer." optional)  how
HF_TO_MINIGPT: tuple[tuple[str, str, str], ...] = (
    ("tok_emb.weight",                     "wte.weight",               "="),
    ("pos_emb.weight",                     "wpe.weight",               "="),
    ("trf_blocks.{i}.norm1.scale",         "h.{i}.ln_1.weight",        "="),
    ("trf_blocks.{i}.norm1.shift",         "h.{i}.ln_1.bias",          "="),
    ("trf_blocks.{i}.att.W_query.weight",  "h.{i}.attn.c_attn.weight", "qT"),
    ("trf_blocks.{i}.att.W_key.weight",    "h.{i}.attn.c_attn.weight", "kT"),
    ("trf_blocks.{i}.att.W_value.weight",  "h.{i}.attn.c_attn.weight", "vT"),
    ("trf_blocks.{i}.att.W_query.bias",    "h.{i}.attn.c_attn.bias",   "q"),
    ("trf_blocks.{i}.att.W_key.bias",      "h.{i}.attn.c_attn.bias",   "k"),
    ("trf_blocks.{i}.att.W_value.bias",    "h.{i}.attn.c_attn.bias",   "v"),
    ("trf_blocks.{i}.att.out_proj.weight", "h.{i}.attn.c_proj.weight", "T"),
    ("trf_blocks.{i}.att.out_proj.bias",   "h.{i}.attn.c_proj.bias",   "="),
    ("trf_blocks.{i}.norm2.scale",         "h.{i}.ln_2.weight",        "="),
    ("trf_blocks.{i}.norm2.shift",         "h.{i}.ln_2.bias",          "="),
    ("trf_blocks.{i}.ff.layers.0.weight",  "h.{i}.mlp.c_fc.weight",    "T"),
    ("trf_blocks.{i}.ff.layers.0.bias",    "h.{i}.mlp.c_fc.bias",      "="),
    ("trf_blocks.{i}.ff.layers.2.weight",  "h.{i}.mlp.c_proj.weight",  "T"),
    ("trf_blocks.{i}.ff.layers.2.bias",    "h.{i}.mlp.c_proj.bias",    "="),
    ("final_norm.scale",                   "ln_f.weight",              "="),
    ("final_norm.shift",                   "ln_f.bias",                "="),
    ("out_head.weight",                    "lm_head.weight",           "="),  # untied heads only
)
# Causal-mask buffers that older GPT-2 files (OpenAI's included) store; we build our own.
_HF_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(masked_)?bias")


def strip_hf_names(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face file's tensors with the optional ``transformer.`` prefix removed and
    the stored causal-mask buffers (``h.{i}.attn.bias``, ``h.{i}.attn.masked_bias``) dropped."""
    # Files saved from GPT2LMHeadModel prefix the trunk with "transformer.", GPT2Model's do not.
    hf = {name.removeprefix("transformer."): t for name, t in tensors.items()}
    return {name: t for name, t in hf.items() if not _HF_MASK_BUFFER.fullmatch(name)}


def _rows(cfg: GPTConfig) -> Iterator[tuple[str, str, str]]:
    """:data:`HF_TO_MINIGPT` with ``{i}`` expanded for every block."""
    for ours, theirs, how in HF_TO_MINIGPT:
        if ours == "out_head.weight" and cfg.tie_weights:
            continue
        for i in range(cfg.n_layers) if "{i}" in ours else [0]:
            yield ours.format(i=i), theirs.format(i=i), how


def hf_to_minigpt(hf: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 tensors (no ``transformer.`` prefix) -> our state dict, as views.

    ``h.{i}.attn.c_attn.weight`` of shape ``(emb, 3*emb)`` becomes three ``(emb, emb)``
    views, transposed: no tensor is copied.
    """
    state = {}
    for ours, theirs, how in _rows(cfg):
        tensor = hf[theirs]
        if how[0] in "qkv":  # c_attn is [query | key | value] along its last dimension
            tensor = tensor.chunk(3, dim=-1)["qkv".index(how[0])]
        # Conv1D's (in, out) becomes nn.Linear's (out, in). .T and chunk make views, so the parameter
        # still points into the memory-mapped file.
        state[ours] = tensor.T if how.endswith("T") else tensor
    return state


def minigpt_to_hf(state: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> Hugging Face GPT-2 tensors (no ``transformer.`` prefix)."""
    hf: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor]] = {}
    for ours, theirs, how in _rows(cfg):
        if ours not in state:  # query/key/value biases of a qkv_bias=False model
            continue
        # Back to Conv1D's (in, out) layout.
        tensor = state[ours].T if how.endswith("T") else state[ours]
        if how[0] in "qkv":
            fused.setdefault(theirs, []).append(tensor)  # rows come in q, k, v order
        else:
            hf[theirs] = tensor
    for theirs, parts in fused.items():
        # Fuse q, k, v along the output axis, the last one in the (in, out) layout: a (emb, 3*emb)
        # weight, or a (3*emb,) bias.
        hf[theirs] = torch.cat(parts, dim=-1)
    for i in range(cfg.n_layers):  # Hugging Face's c_attn always has a bias: ours is zero
        hf.setdefault(f"h.{i}.attn.c_attn.bias", state["tok_emb.weight"].new_zeros(3 * cfg.emb_dim))
    return hf


def hf_shapes(shapes: Mapping[str, tuple[int, ...]], cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """:func:`minigpt_to_hf` for shapes alone: our ``{name: shape}`` -> Hugging Face's.

    Loading checks a file against these before touching a tensor, so errors name the
    file's tensors; computing them needs no tensor (not even on the ``meta`` device).
    """
    hf: dict[str, tuple[int, ...]] = {}
    for ours, theirs, how in _rows(cfg):
        if ours not in shapes:
            continue
        # A transposed tensor's shape is the reversed shape.
        shape = tuple(reversed(shapes[ours])) if how.endswith("T") else tuple(shapes[ours])
        if how[0] in "qkv" and theirs in hf:  # fused along the last dimension
            shape = (*shape[:-1], shape[-1] + hf[theirs][-1])
        hf[theirs] = shape
    for i in range(cfg.n_layers):
        hf.setdefault(f"h.{i}.attn.c_attn.bias", (3 * cfg.emb_dim,))
    return hf


# Values transformers' GPT2Config assumes for fields a config.json leaves out.
_HF_DEFAULTS = dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.1,
                    embd_pdrop=0.1, attn_pdrop=0.1, tie_word_embeddings=True)


def config_from_hf(config: Mapping[str, Any], source: str = "config") -> GPTConfig:
    """A Hugging Face ``GPT2Config`` dict -> :class:`GPTConfig`; refuses variants we cannot run.

    minigpt has one dropout rate; it takes ``resid_pdrop`` (OpenAI's three rates are all 0.1).
    """
    # Fields a config.json leaves out take transformers' defaults, so it reads as transformers reads it.
    c = {**_HF_DEFAULTS, **config}
    unsupported = [
        f"{field}={c.get(field)!r}" for field, ok in (
            ("model_type", c.get("model_type", "gpt2") == "gpt2"),
            # Our GELU is PyTorch's tanh approximation: gelu_new's formula, fused.
            ("activation_function", c.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh")),
            ("layer_norm_epsilon", c.get("layer_norm_epsilon", 1e-5) == 1e-5),
            ("n_inner", c.get("n_inner") in (None, 4 * c["n_embd"])),
            ("scale_attn_weights", c.get("scale_attn_weights", True) is True),
            ("scale_attn_by_inverse_layer_idx", not c.get("scale_attn_by_inverse_layer_idx", False)),
            ("reorder_and_upcast_attn", not c.get("reorder_and_upcast_attn", False)),
            ("add_cross_attention", not c.get("add_cross_attention", False)),
        ) if not ok
    ]
    if unsupported:
        raise ValueError(f"{source} describes a GPT-2 variant minigpt does not implement: "
                         f"{', '.join(unsupported)}")
    if len({c["resid_pdrop"], c["embd_pdrop"], c["attn_pdrop"]}) > 1:
        warnings.warn(f"{source}: minigpt uses one dropout rate everywhere; taking "
                      f"resid_pdrop={c['resid_pdrop']} (embd_pdrop={c['embd_pdrop']}, "
                      f"attn_pdrop={c['attn_pdrop']})", stacklevel=2)
    # HF's GPT-2 always has query/key/value biases (c_attn.bias), hence qkv_bias=True;
    # n_positions is the context length (n_ctx in the oldest files).
    return GPTConfig(
        vocab_size=c["vocab_size"], context_length=c.get("n_positions", c.get("n_ctx", 1024)),
        emb_dim=c["n_embd"], n_heads=c["n_head"], n_layers=c["n_layer"],
        drop_rate=float(c["resid_pdrop"]), qkv_bias=True, tie_weights=bool(c["tie_word_embeddings"]),
    )


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """:class:`GPTConfig` -> the ``config.json`` of a Hugging Face ``GPT2LMHeadModel``."""
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
        "tie_word_embeddings": cfg.tie_weights,
    }


def export_hf(model: GPTModel, directory: str | os.PathLike) -> Path:
    """Write a Hugging Face directory that ``GPT2LMHeadModel.from_pretrained`` loads
    with the same logits (Conv1D weights transposed, query/key/value fused into c_attn)."""
    hf = minigpt_to_hf(model.state_dict(), model.cfg)
    # GPT2LMHeadModel keeps the trunk under "transformer." and the head at the top level.
    tensors = {name if name == "lm_head.weight" else f"transformer.{name}": t for name, t in hf.items()}
    return write_checkpoint(directory, tensors, config_to_hf(model.cfg))
