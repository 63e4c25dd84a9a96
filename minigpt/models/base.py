"""What every model family offers, and what the rest of minigpt may assume of "a model".

The one idea: generation, training, LoRA, quantization, DPO, evaluation and the server never
ask which family a model belongs to. They rely on :class:`CausalLM`, an interface both GPT-2
and the Llama family satisfy without inheriting it (a ``typing.Protocol`` is checked by
shape, not ancestry). Only :mod:`minigpt.models.registry` knows which families exist, through
one :class:`Family` record each.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class CausalLM(Protocol):
    """A causal language model: ``(batch, tokens)`` ids -> ``(batch, tokens, vocab_size)`` logits.

    ``use_cache=True`` continues the sequence fed by earlier cached calls (``reset_kv_cache()``
    starts a new one); ``attention_mask`` ``(batch, past + tokens)`` marks left padding with 0;
    ``logits_to_keep=n`` returns only the last ``n`` positions' logits (0: all). ``cfg`` has at
    least ``context_length``, ``vocab_size``, ``emb_dim`` and ``n_layers``; ``tok_emb`` is the
    token embedding (NEFTune adds its noise there); every projection is an ``nn.Linear``.
    """

    # The attributes the rest of minigpt reads. @runtime_checkable makes isinstance(model, CausalLM)
    # check that these members exist (not their types or signatures).
    cfg: Any
    tok_emb: nn.Embedding

    def forward(self, in_idx: torch.Tensor, use_cache: bool = False, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0) -> torch.Tensor: ...

    def __call__(self, in_idx: torch.Tensor, use_cache: bool = False, attention_mask: torch.Tensor | None = None,
                 logits_to_keep: int = 0) -> torch.Tensor: ...

    def reset_kv_cache(self) -> None: ...

    def num_parameters(self, trainable_only: bool = False) -> int: ...


@dataclass(frozen=True)
class Family:
    """Everything minigpt needs to know about one model family, in one record.

    ``hub_names`` are published checkpoints that ``download`` fetches into a local directory;
    ``presets`` are shapes that ``build`` fills with random weights; ``recognises`` reads a
    ``config.json`` dict; ``load_directory`` builds the model whose parameters are a directory's
    memory-mapped tensors; ``save_pretrained`` writes the directory ``load_directory`` reads;
    ``checkpoint_config`` is the ``config.json`` of a training checkpoint (our tensor names),
    ``read_config`` the config a directory's ``config.json`` describes. ``tokenizer`` and
    ``chat_template`` take the model's directory (None for random weights); ``tokenizer_files``
    are the files a fine-tuned copy needs beside its weights to be read again (none where the
    tokenizer is built in); ``load_file`` reads a single state-dict file given a config (the
    book's ``.pth``), where the family has such a format.
    """

    name: str
    model_class: type[nn.Module]
    hub_names: Collection[str]
    presets: Collection[str]
    recognises: Callable[[Mapping[str, Any]], bool]
    build: Callable[[str], nn.Module]
    download: Callable[..., Path]
    load_directory: Callable[[Path], nn.Module]
    save_pretrained: Callable[[nn.Module, str | os.PathLike], Path]
    checkpoint_config: Callable[[nn.Module], dict[str, Any]]
    read_config: Callable[[Path], Any]
    tokenizer: Callable[[Path | None], Any]
    chat_template: Callable[[Path | None], str | None]
    tokenizer_files: tuple[str, ...] = ()
    load_file: Callable[[Path, Any], nn.Module] | None = None


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Raise ``ValueError`` naming the first id outside ``[0, vocab_size)``.

    Call it where ids enter (a prompt, a training batch): it reads the values, which on a
    GPU means waiting for the device, so the model's forward does it only on the CPU.
    """
    if ids.numel():
        # aminmax finds both extremes in one pass; only the two numbers travel to the host.
        low, high = (int(v) for v in torch.aminmax(ids))
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"token id {bad} is outside the vocabulary [0, {vocab_size}); "
                "was the text encoded with a different tokenizer?"
            )


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Run the ``with`` body in eval mode (no dropout), then restore the mode the module had.

    Evaluation and generation in the middle of training must not leave the model in eval
    mode, and must not switch a model that was already in eval mode to training; the
    previous mode comes back also when the body raises.
    """
    # Only the root's flag is remembered: train(was_training) sets every submodule back to it,
    # the usual whole-model state (a submodule kept in another mode on purpose is not restored).
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
