import os

import pytest

from lightning_prune._quiet import quiet_third_party

os.environ.setdefault("WANDB_MODE", "offline")
quiet_third_party()  # the litlogger tip out of the captured logs (warnings: pyproject.toml filterwarnings)
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _no_env_callbacks(monkeypatch):
    """Tests decide themselves whether LIGHTNING_PRUNE is set."""
    monkeypatch.delenv("LIGHTNING_PRUNE", raising=False)
