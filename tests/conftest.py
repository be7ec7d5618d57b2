import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _no_env_callbacks(monkeypatch):
    """Tests decide themselves whether LIGHTNING_PRUNE is set."""
    monkeypatch.delenv("LIGHTNING_PRUNE", raising=False)
