"""Causal language models: the CausalLM interface, the attention ladder (ch. 3), one folder per family (gpt2/, llama/), the family registry, and the one loader, `load`."""
