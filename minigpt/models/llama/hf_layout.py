"""Hugging Face Llama-family checkpoints (Llama 3.x, SmolLM2, Qwen3) in and out of :class:`LlamaModel`.

A checkpoint directory holds ``config.json`` (read by :meth:`LlamaConfig.from_hf`) and
``model.safetensors``, or several shards listed in ``model.safetensors.index.json``.
:data:`HF_TO_MINIGPT` is the whole correspondence of tensor names: every tensor is
used as it is (``transformers``' ``nn.Linear`` stores ``(out, in)`` like ours), so
loading only renames. As for GPT-2 (:mod:`minigpt.models.gpt2.weights`), the files are memory-mapped,
the model is built on the ``meta`` device and its parameters *are* the file's tensors:
loading never holds two copies.

:func:`load_directory` reads a directory (names and downloads are the one loader's,
:func:`minigpt.models.load`); :func:`export_llama` writes a directory that ``transformers``
loads with the same logits.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from minigpt.io.weight_files import (
    CONFIG_FILE,
    check_tensors,
    drop_tied_head,
    on_meta,
    read_config_json,
    read_weights,
    write_checkpoint,
)
from minigpt.models.llama.config import MODEL_TYPES, LlamaConfig
from minigpt.models.llama.model import LlamaModel
from minigpt.models.llama.rope import RoPE

# No transposes here: HF's Llama uses nn.Linear, which stores (out, in) like ours.
# minigpt parameter                 Hugging Face tensor ({i}: block index)
HF_TO_MINIGPT: tuple[tuple[str, str], ...] = (
    ("tok_emb.weight",                  "model.embed_tokens.weight"),
    ("trf_blocks.{i}.norm1.weight",     "model.layers.{i}.input_layernorm.weight"),
    ("trf_blocks.{i}.att.W_query.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("trf_blocks.{i}.att.W_key.weight",   "model.layers.{i}.self_attn.k_proj.weight"),
    ("trf_blocks.{i}.att.W_value.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("trf_blocks.{i}.att.out_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("trf_blocks.{i}.att.W_query.bias",   "model.layers.{i}.self_attn.q_proj.bias"),   # attention_bias only
    ("trf_blocks.{i}.att.W_key.bias",     "model.layers.{i}.self_attn.k_proj.bias"),
    ("trf_blocks.{i}.att.W_value.bias",   "model.layers.{i}.self_attn.v_proj.bias"),
    ("trf_blocks.{i}.att.out_proj.bias",  "model.layers.{i}.self_attn.o_proj.bias"),
    ("trf_blocks.{i}.att.q_norm.weight",  "model.layers.{i}.self_attn.q_norm.weight"),  # Qwen3 only
    ("trf_blocks.{i}.att.k_norm.weight",  "model.layers.{i}.self_attn.k_norm.weight"),
    ("trf_blocks.{i}.norm2.weight",     "model.layers.{i}.post_attention_layernorm.weight"),
    # SwiGLU: fc1 is the gate (through SiLU), fc2 the up projection, fc3 the down projection.
    ("trf_blocks.{i}.ff.fc1.weight",    "model.layers.{i}.mlp.gate_proj.weight"),
    ("trf_blocks.{i}.ff.fc2.weight",    "model.layers.{i}.mlp.up_proj.weight"),
    ("trf_blocks.{i}.ff.fc3.weight",    "model.layers.{i}.mlp.down_proj.weight"),
    ("final_norm.weight",               "model.norm.weight"),
    ("out_head.weight",                 "lm_head.weight"),  # untied heads only
)


def name_map(cfg: LlamaConfig, ours: set[str] | None = None) -> dict[str, str]:
    """``{our name: Hugging Face name}`` for every tensor of a model of this config
    (``ours``: the names our model has; rows it lacks, e.g. biases, are left out)."""
    rows = {}
    for mine, theirs in HF_TO_MINIGPT:
        for i in range(cfg.n_layers) if "{i}" in mine else [0]:
            rows[mine.format(i=i)] = theirs.format(i=i)
    # Optional rows (biases, Qwen3's q/k norms) are kept only where the model has them.
    return {k: v for k, v in rows.items() if ours is None or k in ours}


def recognises_llama_config(config: dict) -> bool:
    """Whether a ``config.json`` describes a Llama-family model (``model_type`` ``llama`` or ``qwen3``)."""
    return config.get("model_type") in MODEL_TYPES


def read_config(directory: Path) -> LlamaConfig:
    """The :class:`LlamaConfig` of a directory's ``config.json``, with errors naming the file."""
    return LlamaConfig.from_hf(read_config_json(directory), source=str(directory / CONFIG_FILE))


def load_directory(directory: Path) -> LlamaModel:
    """A :class:`LlamaModel` whose parameters *are* the directory's tensors (in the file's dtype)."""
    cfg = read_config(directory)
    tensors = dict(read_weights(directory))
    source = str(directory)
    if cfg.tie_weights:
        drop_tied_head(tensors, "lm_head.weight", "model.embed_tokens.weight", source)
    with on_meta():  # allocates nothing: every parameter is replaced by the file's tensor
        model = LlamaModel(cfg)
    names = name_map(cfg, set(model.state_dict()))
    if cfg.tie_weights:
        names.pop("out_head.weight")
    shapes = model.state_dict()
    check_tensors({theirs: tuple(shapes[ours].shape) for ours, theirs in names.items()}, tensors, source, cfg)
    # Renaming only: every value is still the memory-mapped tensor of the file.
    state = {ours: tensors[theirs] for ours, theirs in names.items()}
    # assign=True: the parameters become the file's tensors, in the file's dtype, not copies.
    model.load_state_dict(state, strict=not cfg.tie_weights, assign=True)
    if cfg.tie_weights:
        model.out_head.weight = model.tok_emb.weight  # assign replaced the shared Parameter
    for module in model.modules():
        if isinstance(module, RoPE):  # its tables are not saved: compute them for real
            module.build_tables("cpu")
    return model


def llama_to_hf(model: LlamaModel) -> dict[str, torch.Tensor]:
    """Our state dict -> Hugging Face's tensors (the tied head stored once, as the embedding)."""
    state = model.state_dict()
    names = name_map(model.cfg)
    if model.cfg.tie_weights:
        names.pop("out_head.weight")
    # Anything outside the name table (LoRA's A and B, quantized buffers) has no place in HF's format.
    unknown = sorted(set(state) - set(name_map(model.cfg)))
    if unknown:
        raise ValueError(f"cannot export {unknown[:3]}{' ...' if len(unknown) > 3 else ''}: the Hugging Face format "
                         "has plain linear layers only; merge LoRA adapters first (minigpt.lora.adapters.merge_lora) "
                         "and export an unquantized model")
    return {theirs: state[ours] for ours, theirs in names.items() if ours in state}


def export_llama(model: LlamaModel, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers`` (``AutoModelForCausalLM``)
    loads with the same logits, each file atomically."""
    # torch_dtype tells transformers which dtype the weights were saved in.
    config = {**model.cfg.to_hf(), "torch_dtype": str(model.tok_emb.weight.dtype).removeprefix("torch.")}
    return write_checkpoint(directory, llama_to_hf(model), config)

