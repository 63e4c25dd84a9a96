"""Shared test setup: point minigpt at the offline data folder and keep caches per run."""

import os
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test downloads into its own cache, so no test sees another's files."""
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
