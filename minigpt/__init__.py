"""minigpt: a from-scratch, educational GPT in pure PyTorch.

The package is built in layers, one folder each; a folder imports only the folders listed
before it (``pyproject.toml`` states it as an import-linter contract, and a test finds no
import cycle anywhere):

1. ``io``: data folder and cache, atomic writes, verified downloads, the registry of pinned
   files, the hub, family-neutral checkpoint files;
2. ``tokenizers``: simple tokenizers, BPE from scratch, GPT-2's encoding, ``tokenizer.json``,
   chat templates (ch. 2, 8);
3. ``data``: sliding windows of token ids and the named corpora (ch. 2);
4. ``runtime``: device, precision, compile, RNG state, the linear layer's CPU kernel;
5. ``quantization``: NF4 and int8 by hand, quantized layers (appendix F);
6. ``lora``: LoRA by hand (appendix E);
7. ``models``: the ``CausalLM`` interface, the attention ladder (ch. 3), ``gpt2/`` (ch. 4-5)
   and ``llama/`` (ch. 8), the family registry and the one loader, ``minigpt.models.load``;
8. ``generation``: sampling, the KV cache in use, ragged batches, compiled decoding;
9. ``training``: the one loop, losses, optimizer, checkpoints, Ctrl-C, torchrun, plots (ch. 5, D);
10. ``finetuning``: prompt formats, classification, instructions, NEFTune, preference data, DPO
    (ch. 6-7);
11. ``evaluation``: perplexity, judges, the pairwise win rate, ROUGE-L, the lm-eval bridge;
12. ``jobs``: each command's settings and function; 13. ``serving``: the API, the page, the
    terminal chat; 14. ``cli``: the ``minigpt`` command.
"""

from minigpt.generation.generate import generate, stream_generate
from minigpt.generation.text import text_to_token_ids, token_ids_to_text
from minigpt.models import CausalLM, load
from minigpt.models.gpt2.config import PRESETS, GPTConfig
from minigpt.models.gpt2.model import GPTModel
from minigpt.models.llama.config import LlamaConfig
from minigpt.models.llama.model import LlamaModel

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CausalLM",
    "GPTConfig",
    "GPTModel",
    "LlamaConfig",
    "LlamaModel",
    "generate",
    "load",
    "stream_generate",
    "text_to_token_ids",
    "token_ids_to_text",
]
