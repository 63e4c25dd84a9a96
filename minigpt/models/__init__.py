"""Causal language models: the :class:`CausalLM` interface, the attention ladder (ch. 3), one
folder per family (``gpt2/``, ``llama/``), the family registry, and the one loader, :func:`load`."""

from minigpt.models.base import CausalLM, Family
from minigpt.models.loader import chat_template_of, load, load_tokenizer, save_pretrained

__all__ = ["CausalLM", "Family", "chat_template_of", "load", "load_tokenizer", "save_pretrained"]
