"""The Llama family as a :class:`~minigpt.models.base.Family`: SmolLM2, Qwen3 and Llama 3.2 on
the hub at pinned commits, their published shapes as presets, Hugging Face directories, and
each checkpoint's own ``tokenizer.json`` and chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minigpt.io.hub_llama import LLAMA_REPOS, download_llama
from minigpt.models.base import Family
from minigpt.models.llama.config import PRESETS
from minigpt.models.llama.hf_layout import export_llama, load_directory, read_config, recognises_llama_config
from minigpt.models.llama.model import LlamaModel
from minigpt.tokenizers.chat_template import CHAT_TEMPLATE_FILE, load_chat_template
from minigpt.tokenizers.tokenizer_json import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, load_hf_tokenizer


def _tokenizer(directory: Path | None) -> Any:
    if directory is None or not (directory / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{directory or 'random weights'} has no {TOKENIZER_FILE}: copy the tokenizer files "
                                "of the model it was fine-tuned from (tokenizer.json, tokenizer_config.json) into it")
    return load_hf_tokenizer(directory)


def _chat_template(directory: Path | None) -> str | None:
    return None if directory is None else load_chat_template(directory)


def _checkpoint_config(model: LlamaModel) -> dict[str, Any]:
    return model.cfg.to_hf()


# No load_file: Llama-family weights come as directories only (config.json + safetensors).
LLAMA = Family(
    name="llama",
    model_class=LlamaModel,
    hub_names=tuple(LLAMA_REPOS),
    presets=tuple(PRESETS),
    recognises=recognises_llama_config,
    build=LlamaModel,
    download=download_llama,
    load_directory=load_directory,
    save_pretrained=export_llama,
    checkpoint_config=_checkpoint_config,
    read_config=read_config,
    tokenizer=_tokenizer,
    chat_template=_chat_template,
    # Llama-family tokenizers and chat templates live in the checkpoint directory, so a
    # fine-tuned copy must carry these files beside its weights.
    tokenizer_files=(TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, "special_tokens_map.json", CHAT_TEMPLATE_FILE),
)
