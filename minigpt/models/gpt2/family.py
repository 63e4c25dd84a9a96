"""GPT-2 as a :class:`~minigpt.models.base.Family`: OpenAI's four sizes on the hub, our presets,
minigpt's and Hugging Face's directories, the book's ``.pth``, and tiktoken's GPT-2 encoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minigpt.io.hub import GPT2_REPOS, download_gpt2
from minigpt.models.base import Family
from minigpt.models.gpt2.config import PRESETS
from minigpt.models.gpt2.model import GPTModel
from minigpt.models.gpt2.weights import (
    checkpoint_config,
    load_config,
    load_directory,
    load_pth,
    recognises_gpt2_config,
    save_pretrained,
)
from minigpt.tokenizers.gpt2 import get_gpt2_tokenizer


def _tokenizer(directory: Path | None) -> Any:
    return get_gpt2_tokenizer()  # every GPT-2 shares OpenAI's encoding: nothing to read from the directory


def _no_chat_template(directory: Path | None) -> None:
    return None  # GPT-2 was never trained on chat turns


GPT2 = Family(
    name="gpt2",
    model_class=GPTModel,
    hub_names=tuple(GPT2_REPOS),
    presets=tuple(PRESETS),
    recognises=recognises_gpt2_config,
    build=GPTModel,
    download=download_gpt2,
    load_directory=load_directory,
    save_pretrained=save_pretrained,
    checkpoint_config=checkpoint_config,
    read_config=load_config,
    tokenizer=_tokenizer,
    chat_template=_no_chat_template,
    # The book's .pth holds tensors only: the caller supplies the config (load(..., cfg=...)).
    load_file=load_pth,
)
