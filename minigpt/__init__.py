"""minigpt: a from-scratch, educational GPT-2 in pure PyTorch.

Read the modules in the order of the book's chapters: ``tokenizer`` and ``data``
(ch. 2), ``attention`` (ch. 3), ``layers`` and ``model`` (ch. 4), ``generation``,
``training`` and ``weights`` (ch. 5), ``classification`` (ch. 6),
``instruction`` (ch. 7) and ``lora`` (appendix E).
"""

from minigpt.config import PRESETS, GPTConfig
from minigpt.generation import generate, stream_generate, text_to_token_ids, token_ids_to_text
from minigpt.model import GPTModel

__version__ = "0.1.0"

__all__ = [
    "GPTConfig",
    "GPTModel",
    "PRESETS",
    "generate",
    "stream_generate",
    "text_to_token_ids",
    "token_ids_to_text",
]
