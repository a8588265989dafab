"""Shared fixtures. Offline always: no test may reach a model hub."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Built-in models are built once per checkout into a git-ignored folder, not the user's ~/.cache.
os.environ.setdefault("CASTBOOK_HOME", str(REPO / ".castbook-cache"))

import pytest  # noqa: E402 - the environment above must be set before any import


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests. On two shared cores under load, one thread is
    about 4x faster for the tiny models than two threads fighting (measured in test_trainer)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
