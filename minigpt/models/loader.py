"""One door to every pretrained model minigpt knows: GPT-2 or the Llama family, with its tokenizer.

The one idea: a model is named by a known name (``gpt2-small``, ``smollm2-135m``, ...) or a
directory, and what it *is* follows from that name or from the directory's ``config.json``
(``model_type`` ``"llama"``/``"qwen3"`` is the Llama family, anything else GPT-2). Its text
goes through the tokenizer it was trained with: the directory's own ``tokenizer.json`` (read by
the from-scratch BPE, :mod:`minigpt.tokenizers.tokenizer_json`) or, for GPT-2, tiktoken's GPT-2 encoding.

    model = load_model("smollm2-135m", quantize="nf4")    # (batch, tokens) ids -> (batch, tokens, vocab)
    tokenizer = load_tokenizer("smollm2-135m")
    template = chat_template_of("smollm2-135m-instruct")   # Jinja text, or None
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigpt.tokenizers.chat_template import load_chat_template
from minigpt.models.llama.hf_layout import load_llama
from minigpt.tokenizers.tokenizer_json import load_hf_tokenizer
from minigpt.io.hub import GPT2_REPOS, LLAMA_REPOS, download_llama
from minigpt.models.llama.model import MODEL_TYPES
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer
from minigpt.models.gpt2.weights import CONFIG_FILE, load_pretrained

TOKENIZER_FILE = "tokenizer.json"


def is_llama(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` names a Llama-family checkpoint (a known name, or a directory
    whose ``config.json`` has a Llama-family ``model_type``)."""
    if str(name_or_path) in LLAMA_REPOS:
        return True
    config = Path(name_or_path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") in MODEL_TYPES
    except (json.JSONDecodeError, AttributeError):
        return False  # the GPT-2 loader reports a broken config with its own clear error


def load_model(name_or_path: str | os.PathLike, *, quantize: str | None = None, device: str | torch.device = "cpu",
               weights_dir: str | os.PathLike | None = None, progress: bool = True) -> nn.Module:
    """A GPT-2 (:class:`~minigpt.models.gpt2.model.GPTModel`) or Llama-family (:class:`~minigpt.models.llama.model.LlamaModel`)
    model from a known name or a directory; ``quantize`` (``"nf4"``, ``"nf4-dq"``, ``"int8"``)
    loads its blocks' linear layers quantized."""
    if is_llama(name_or_path):
        return load_llama(name_or_path, quantize=quantize, device=device, weights_dir=weights_dir,
                          progress=progress)
    return load_pretrained(name_or_path, device=device, weights_dir=weights_dir, progress=progress, quantize=quantize)


def _directory(name_or_path: str | os.PathLike, weights_dir: str | os.PathLike | None, progress: bool) -> Path | None:
    """The local directory of a Llama-family name or path (downloading it if needed), else None."""
    if str(name_or_path) in LLAMA_REPOS:
        return download_llama(str(name_or_path), weights_dir, progress=progress)
    path = Path(name_or_path)
    return path if path.is_dir() else None


def load_tokenizer(name_or_path: str | os.PathLike, *, weights_dir: str | os.PathLike | None = None,
                   progress: bool = True) -> Any:
    """The tokenizer a model was trained with: its directory's ``tokenizer.json`` for the Llama
    family (an error if it has none), tiktoken's GPT-2 encoding for GPT-2 names and directories.

    Either has ``encode(text, allowed_special=...)``, ``decode(ids)``, ``decode_bytes(ids)``,
    ``eot_token`` and ``n_vocab``."""
    if str(name_or_path) in GPT2_REPOS or not is_llama(name_or_path):
        return get_gpt2_tokenizer()
    directory = _directory(name_or_path, weights_dir, progress)
    if directory is None or not (directory / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{name_or_path} has no {TOKENIZER_FILE}: copy the tokenizer files of the model it "
                                "was fine-tuned from (tokenizer.json, tokenizer_config.json) into it")
    return load_hf_tokenizer(directory)


def chat_template_of(name_or_path: str | os.PathLike, *, weights_dir: str | os.PathLike | None = None,
                     progress: bool = True) -> str | None:
    """The Jinja chat template a Llama-family checkpoint ships (``tokenizer_config.json`` or
    ``chat_template.jinja``), or None: GPT-2 and base models have none."""
    if str(name_or_path) in GPT2_REPOS or not is_llama(name_or_path):
        return None
    directory = _directory(name_or_path, weights_dir, progress)
    return None if directory is None else load_chat_template(directory)
