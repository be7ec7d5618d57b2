import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(autouse=True)
def _no_env_callbacks(monkeypatch):
    """No callback from a LIGHTNING_PRUNE set in the developer's shell leaks into these Trainers."""
    monkeypatch.delenv("LIGHTNING_PRUNE", raising=False)
