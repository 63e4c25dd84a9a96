"""The Llama family's checkpoints from the Hugging Face hub (SmolLM2, Qwen3, Llama 3.2), each at a pinned commit.

The one idea: a name is a repository and a commit; ``huggingface_hub.snapshot_download`` fetches the
weights (one file or shards), the config and the tokenizer files, checking each large file against the
hub's SHA-256. Llama is gated: without a token the error says how to get access.
"""

from __future__ import annotations

import os
from pathlib import Path

from minigpt.io.files import data_dir
from minigpt.io.hub import (
    QuietBar,
    env_true,
    hf_cache_dir,
    hub_endpoint,
    hub_offline_constant,
    network_errors,
    weights_dir_setting,
)
from minigpt.io.weight_files import CONFIG_FILE

# name -> (repository, pinned commit, gated): the published checkpoints minigpt's LlamaModel loads.
LLAMA_REPOS: dict[str, tuple[str, str, bool]] = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M", "93efa2f097d58c2a74874c7e644dbc9b0cee75a2", False),
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "12fd25f77366fa6b3b4b768ec3050bf629380bac", False),
    "smollm2-360m": ("HuggingFaceTB/SmolLM2-360M", "f8027fd0eaeea54caa13c31d31b9fdc459c38b49", False),
    "smollm2-360m-instruct": ("HuggingFaceTB/SmolLM2-360M-Instruct", "a10cc1512eabd3dde888204e902eca88bddb4951", False),
    "qwen3-0.6b": ("Qwen/Qwen3-0.6B", "a9c98e602b9d36d2a2f7ba1eb0f5f31e4e8e5143", False),
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B", "4e20de362430cd3b72f300e6b0f18e50e7166e08", True),
    "llama-3.2-1b-instruct": ("meta-llama/Llama-3.2-1B-Instruct", "9213176726f574b556790deb65791e0c5aa438b6", True),
}


# The weights (one file or shards and their index), the config and the tokenizer with its chat template.
LLAMA_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
               "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja")


def download_llama(name: str, weights_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """A local directory with the Llama-family checkpoint ``name`` (:data:`LLAMA_REPOS`) at its pinned
    commit: ``$MINIGPT_DATA_DIR/<name>/`` if it has a ``config.json``, else ``<weights_dir>/<name>/``
    (default ``$MINIGPT_WEIGHTS_DIR``) or the Hugging Face cache, downloading what is missing there
    (``huggingface_hub`` checks each large file against the hub's SHA-256).

    A gated model (Llama) needs an access token: without ``HF_TOKEN`` (or a ``huggingface-cli
    login``) it raises ``PermissionError`` saying how to get access.
    """
    if name not in LLAMA_REPOS:
        raise ValueError(f"{name!r} is not a Llama-family name; known: {', '.join(LLAMA_REPOS)}")
    repo, revision, gated = LLAMA_REPOS[name]
    local = data_dir()
    if local is not None and (local / name / CONFIG_FILE).is_file():
        return local / name
    folder = weights_dir_setting(weights_dir)
    if folder is not None and (folder / name / CONFIG_FILE).is_file():
        return folder / name  # an earlier download
    from huggingface_hub import get_token, snapshot_download
    from huggingface_hub.errors import GatedRepoError

    offline = env_true("HF_HUB_OFFLINE") or hub_offline_constant()
    if gated and not offline and get_token() is None:
        raise PermissionError(_gated_message(name, repo))
    kwargs = {} if progress else {"tqdm_class": QuietBar}
    try:
        path = snapshot_download(repo, revision=revision, cache_dir=str(hf_cache_dir()),
                                 local_dir=folder / name if folder is not None else None,
                                 allow_patterns=list(LLAMA_FILES), endpoint=hub_endpoint(), library_name="minigpt",
                                 local_files_only=offline, **kwargs)
    except GatedRepoError as err:
        raise PermissionError(_gated_message(name, repo)) from err
    except network_errors() as err:
        where = folder / name if folder is not None else f"$MINIGPT_DATA_DIR/{name}/"
        raise ConnectionError(f"could not download {name} ({repo} at {revision[:8]}): {type(err).__name__}: {err}. "
                              f"Without internet, put its {CONFIG_FILE}, weights and tokenizer files in {where}"
                              ) from err
    return Path(path)


def _gated_message(name: str, repo: str) -> str:
    return (f"{name} ({repo}) is a gated model: accept its licence at https://huggingface.co/{repo} while "
            "logged in, create a read token at https://huggingface.co/settings/tokens, and set it as HF_TOKEN "
            "(export HF_TOKEN=hf_...) or run `huggingface-cli login`; then try again.")
