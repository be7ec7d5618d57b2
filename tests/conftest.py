import os

import pytest

# one torch thread, as `make test` runs the suite: a test comparing its run with a child process's (kill and
# resume, DDP) compares the same kernels (a bare `pytest` would otherwise use every core in the parent only)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from lightning_prune._quiet import quiet_third_party  # noqa: E402

os.environ.setdefault("WANDB_MODE", "offline")
quiet_third_party()  # the litlogger tip out of the captured logs (warnings: pyproject.toml filterwarnings)
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _no_env_callbacks(monkeypatch):
    """Tests decide themselves whether LIGHTNING_PRUNE is set."""
    monkeypatch.delenv("LIGHTNING_PRUNE", raising=False)
