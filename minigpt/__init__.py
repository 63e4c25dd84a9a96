"""minigpt: a from-scratch, educational GPT-2 in pure PyTorch.

Read the concepts in the order of the book's chapters: ``tokenizer``, ``bpe``,
``data`` and ``corpora`` (ch. 2), ``attention`` (ch. 3), ``config``, ``layers`` and
``model`` (ch. 4), ``generation``, ``plots`` and ``weights`` (ch. 5),
``classification`` (ch. 6), ``instruction`` and ``judges`` (ch. 7) and ``lora``
(appendix E); ``training`` is the loop of ch. 5 and appendix D.

The package is built in layers; each imports only from the layers listed before it:

1. files: ``files`` (data folder, cache, atomic writes), ``download``, ``sources``
   (every pinned file);
2. concepts: ``config``, ``attention``, ``layers``, ``model``, ``tokenizer``, ``bpe``,
   ``data``, ``corpora``, ``generation``, ``lora``, ``plots``, ``state_dict``;
3. weights: ``weights``, ``hf_gpt2``, ``hub`` (published checkpoints in and out);
4. runtime: ``runtime`` (device, precision), ``distributed``, ``interrupt``;
5. training: ``losses``, ``optim``, ``checkpoint``, ``training``;
6. techniques: ``classification``, ``labelled_data``, ``instruction``, ``judges``;
7. jobs: ``minigpt.jobs`` (pretrain, evaluate, fine-tune), each settings plus one function;
8. the command line: ``cli``.

The one exception: ``GPTModel.from_pretrained`` and ``save_pretrained`` import
``weights`` when called, so a model can load itself.
"""

from minigpt.generation.generate import generate, stream_generate, text_to_token_ids, token_ids_to_text
from minigpt.models.gpt2.config import PRESETS, GPTConfig
from minigpt.models.gpt2.model import GPTModel

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
