"""Shared test setup: point minigpt at the offline data folder and keep caches per run."""

import base64
import os
from pathlib import Path

import pytest
import tiktoken
import torch
from tiktoken_ext.openai_public import r50k_pat_str

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"

# Tests must never reach the network: the data folder supplies every real file.
os.environ.setdefault("MINIGPT_DATA_DIR", str(DEFAULT_DATA))


@pytest.fixture(scope="session")
def data_path() -> Path:
    path = Path(os.environ["MINIGPT_DATA_DIR"])
    if not path.is_dir():
        pytest.skip(f"data folder {path} is missing; set MINIGPT_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def gpt2(data_path) -> tiktoken.Encoding:
    """Reference GPT-2 BPE, built straight from tiktoken's own file in the data folder
    (independent of minigpt's tokenizer code)."""
    lines = (data_path / "gpt2" / "r50k_base.tiktoken").read_bytes().splitlines()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257,
    )


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test downloads into its own cache, so no test sees another's files."""
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU two threads
    waiting for each other make each step several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
