"""GPT-2's checkpoints in and out of :class:`GPTModel`: three formats, one family.

- minigpt's own directory: ``config.json`` (a :class:`GPTConfig`, our field names) +
  ``model.safetensors`` with our parameter names, optionally quantized (its config then has a
  ``quantization`` entry from which loading rebuilds the same layers);
- a Hugging Face GPT-2 directory (``config.json`` with ``n_embd`` ... + ``model.safetensors``,
  or shards), such as OpenAI's released checkpoints; the names are translated by
  :mod:`minigpt.models.gpt2.hf_layout`;
- the book's ``.pth`` state dict (``torch.save(model.state_dict(), ...)``), given a config.

The model is built on the ``meta`` device and every parameter is assigned as a view of the
memory-mapped file (:mod:`minigpt.io.weight_files`), including the transposed and split
Hugging Face ones, so loading never holds two copies of the weights
(``bench/bench_load_memory.py``). Names, downloads, quantizing and adapters are the one
loader's business (:func:`minigpt.models.load`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigpt.io.weight_files import (
    CONFIG_FILE,
    check_tensors,
    drop_tied_head,
    on_meta,
    read_config_json,
    read_weights,
    stored_once,
    write_checkpoint,
)
from minigpt.models.attention import CausalAttention, MultiHeadAttention
from minigpt.models.gpt2.config import GPTConfig
from minigpt.models.gpt2.hf_layout import config_from_hf, hf_shapes, hf_to_minigpt, strip_hf_names
from minigpt.models.gpt2.model import GPTModel
from minigpt.quantization.checkpoint import QUANTIZATION_KEY, quantization_entry, quantize_skeleton, tensor_problems


def recognises_gpt2_config(config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` describes a GPT-2: ours (``emb_dim``) or Hugging Face's (``n_embd``, ``gpt2``)."""
    return "emb_dim" in config or "n_embd" in config or config.get("model_type") == "gpt2"


def load_pth(path: str | os.PathLike, cfg: GPTConfig | Mapping[str, Any] | str | None) -> GPTModel:
    """The book's ``.pth`` state dict; ``cfg`` (a config, the book's dict or a preset) is required,
    since ``n_heads`` cannot be read from shapes."""
    path = Path(path)
    if cfg is None:
        raise ValueError(
            f"{path} holds only tensors, not the config (n_heads cannot be read from shapes): pass "
            f"it, e.g. from_pretrained({str(path)!r}, cfg=GPTConfig.from_preset('gpt2-small', qkv_bias=True))"
        )
    cfg = GPTConfig.coerce(cfg)
    try:  # weights_only: unpickling arbitrary objects could run code; mmap: no copy in memory
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise ValueError(f"{path} is corrupt or not a PyTorch state dict: {err}") from err
    state = state.get("model_state_dict", state)  # the book's model-and-optimizer checkpoint
    # The book's attention stores its causal mask as a saved buffer; ours rebuilds it.
    state = {k: v for k, v in state.items() if not k.endswith("att.mask")}
    if cfg.tie_weights:
        drop_tied_head(state, "out_head.weight", "tok_emb.weight", str(path))
    return build_model(cfg, state, source=str(path))


def _minigpt_config(config: Mapping[str, Any], source: str) -> GPTConfig:
    """Our own config fields; a ``quantization`` entry describes the tensors, not the model."""
    try:
        return GPTConfig.from_dict({k: v for k, v in config.items() if k != QUANTIZATION_KEY})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source} is not a valid minigpt config: {err}") from err


def load_config(directory: str | os.PathLike) -> GPTConfig:
    """The :class:`GPTConfig` of a directory written by :func:`save_pretrained` (quantized or not)."""
    directory = Path(directory)
    return _minigpt_config(read_config_json(directory), str(directory / CONFIG_FILE))


def load_directory(directory: Path) -> GPTModel:
    """A GPT-2 from a minigpt or Hugging Face directory (quantized if it was saved so)."""
    config = read_config_json(directory)
    if "emb_dim" in config:  # our own field names
        cfg = _minigpt_config(config, str(directory / CONFIG_FILE))
        quantization = config.get(QUANTIZATION_KEY)
        if quantization is not None:
            return _build_quantized(cfg, quantization, read_weights(directory), source=str(directory))
        return build_model(cfg, read_weights(directory), source=str(directory))
    if "n_embd" in config or "model_type" in config:  # Hugging Face's
        return _build_from_hf(config_from_hf(config, source=str(directory / CONFIG_FILE)),
                              read_weights(directory), source=str(directory))
    raise ValueError(f"{directory / CONFIG_FILE} is neither a minigpt config (emb_dim, ...) nor a Hugging Face "
                     "GPT-2 config (n_embd, ...)")


def _build_from_hf(cfg: GPTConfig, tensors: Mapping[str, torch.Tensor], source: str) -> GPTModel:
    hf = strip_hf_names(tensors)
    if cfg.tie_weights:
        drop_tied_head(hf, "lm_head.weight", "wte.weight", source)
    model = _meta_model(cfg)
    # The shapes our model needs, in Hugging Face's names: errors then name the file's tensors.
    expected = hf_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, cfg)
    check_tensors(expected, hf, source, cfg)
    # The translated tensors are views of the file's: no weight is copied.
    return _assign(model, hf_to_minigpt(hf, cfg))


def _meta_model(cfg: GPTConfig) -> GPTModel:
    with on_meta():  # allocates nothing: every parameter is replaced by the file's tensor
        return GPTModel(cfg)


def build_model(cfg: GPTConfig, state: Mapping[str, torch.Tensor], source: str) -> GPTModel:
    """A :class:`GPTModel` whose parameters *are* the given tensors (no copy).

    Every expected tensor must be present with the right shape and all share one dtype;
    the error names ``source`` and each offending tensor.
    """
    model = _meta_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # A tied head is the embedding: the file stores that matrix once, as tok_emb.weight.
    if cfg.tie_weights:
        expected.pop("out_head.weight")
    check_tensors(expected, state, source, cfg)
    return _assign(model, state)


def _build_quantized(cfg: GPTConfig, entry: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                     source: str) -> GPTModel:
    """A quantized model rebuilt from what :func:`save_pretrained` wrote
    (see :mod:`minigpt.quantization.checkpoint`)."""
    model = _meta_model(cfg)
    with on_meta():
        # Swap the meta linears for empty quantized layers of the saved scheme, so the file's packed
        # codes and scales have a place to go.
        quantize_skeleton(model, entry, source)
    expected = dict(model.state_dict())
    if _tied(model):
        expected.pop("out_head.weight")
    problems = tensor_problems(expected, state)
    if problems:
        raise ValueError(f"{source} does not match its config ({cfg}, {entry['scheme']}): " + ", ".join(problems))
    return _assign(model, state)


def _tied(model: GPTModel) -> bool:
    """Whether the head shares the embedding's weight, so the file holds it once: a tied config,
    unless quantization gave the head its own quantized copy (int8 and int4 do)."""
    return model.cfg.tie_weights and isinstance(model.out_head, nn.Linear)


def _assign(model: GPTModel, state: Mapping[str, torch.Tensor]) -> GPTModel:
    tied = _tied(model)
    # assign=True makes the meta parameters *be* the given tensors instead of copying into them
    # (a meta tensor has no memory to copy into). A tied head is absent from the file, hence
    # strict=False for it.
    model.load_state_dict(dict(state), strict=not tied, assign=True)
    if tied:
        model.out_head.weight = model.tok_emb.weight  # assign replaced the shared Parameter
    _materialize_masks(model)
    return model


def _materialize_masks(model: GPTModel) -> None:
    # Causal masks are buffers that are not saved: recreate the ones left on meta,
    # one tensor shared by every block (they are never written).
    masks: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, (MultiHeadAttention, CausalAttention)):
            n = module.mask.shape[0]
            if n not in masks:
                masks[n] = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
            module.mask = masks[n]


# ---------------------------------------------------------------------------- saving

def checkpoint_config(model: GPTModel) -> dict[str, Any]:
    """The ``config.json`` of a saved GPT: our config fields, and the quantization settings of a
    quantized model with each quantized layer's ``(out_features, in_features)``."""
    config = model.cfg.to_dict()
    entry = quantization_entry(model)
    if entry is not None:
        config[QUANTIZATION_KEY] = entry
    return config


def save_pretrained(model: GPTModel, directory: str | os.PathLike) -> Path:
    """Write minigpt's format: ``config.json`` and ``model.safetensors`` into ``directory``,
    each atomically. A tensor that appears under several names (a tied head is
    ``tok_emb.weight``, also when wrapped by LoRA) is stored once, under its first name."""
    return write_checkpoint(directory, stored_once(model.state_dict()), checkpoint_config(model))
