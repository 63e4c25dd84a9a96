"""A model compiled for token-by-token generation.

The one idea: a decoding step has the same shape every time except for the length of the
KV cache, which grows by one token per step. ``torch.compile`` with its defaults treats
that length (an integer attribute of every attention module, and the model's
``cache_pos``) as a constant, so it would compile again at every token and give up after
a few. Compiled with dynamic shapes and those integers left symbolic, one graph serves the
prompt and one every later step: two compilations in all, whatever the length.

    model = compile_for_decoding(GPTModel.from_pretrained("gpt2-small").eval())
    generate(model, ids, 200)      # the first call compiles (about a minute on a CPU)

The compiled model gives the eager model's tokens (the same kernels, fused differently: logits
agree within float rounding). Where compiling fails it runs eagerly, with a one-line warning
(see :func:`minigpt.runtime.runtime.compile_model`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minigpt.runtime.runtime import Wrapper, compile_model

# Cache lengths stay symbolic instead of one compilation per value.
_DYNAMO_SETTINGS = {"allow_unspec_int_on_nn_module": True}


class DecodingModel(Wrapper):
    """``compiled`` (what :func:`compile_model` returned) called with the cache lengths
    symbolic; every other attribute (``cfg``, ``reset_kv_cache``, ``cache_pos``, ``device``)
    is the model's own. Save the model itself, not this wrapper."""

    wrapped = "compiled"

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, in_idx: torch.Tensor, *args: Any, use_cache: bool = False, **kwargs: Any) -> Any:
        if use_cache:
            # The cache grows here, eagerly, before the compiled step: growing inside it would make
            # the step that grows the cache a graph of its own, a third compilation.
            self.reserve_kv_cache(in_idx.shape[1])
        with torch._dynamo.config.patch(_DYNAMO_SETTINGS):
            return self.compiled(in_idx, *args, use_cache=use_cache, **kwargs)


def compile_for_decoding(model: nn.Module, **options: Any) -> nn.Module:
    """``model`` (a GPTModel or LlamaModel) through ``torch.compile(dynamic=True, **options)``
    for :func:`minigpt.generation.generate.generate` and its relatives; ``model`` itself stays eager.

    The first call with the cache (the prompt) and the second (one new token) each compile
    once; later calls reuse those graphs. Where ``torch.compile`` refuses, ``model`` comes
    back eager with a one-line warning.
    """
    compiled = compile_model(model, dynamic=True, **options)
    return model if compiled is model else DecodingModel(compiled)
