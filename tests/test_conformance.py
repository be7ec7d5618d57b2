"""Every registered callback (built-in or plugin) keeps the contract of lightning_prune.testing."""

import importlib
from pathlib import Path

import pytest
import tomllib
from lightning.pytorch.callbacks import Callback

import lightning_prune as lp
from lightning_prune.testing import check_callback_conformance

REGISTERED = sorted(lp.list_callbacks())
ROOT = Path(__file__).resolve().parents[1]


def _declared(pyproject):
    """``{name: "module:Class"}`` of a pyproject's ``lightning_prune.callbacks`` entry points."""
    with open(pyproject, "rb") as f:
        return tomllib.load(f)["project"]["entry-points"]["lightning_prune.callbacks"]


@pytest.mark.parametrize("pyproject", [ROOT / "pyproject.toml",
                                       ROOT / "plugins" / "lightning-prune-baselines" / "pyproject.toml"])
def test_every_declared_callback_is_registered_and_loads_its_class(pyproject):
    declared = _declared(pyproject)
    assert declared, f"{pyproject} declares no callback"
    callbacks = lp.list_callbacks()
    for name, path in declared.items():
        assert name in callbacks, f"{name} ({path}) is declared in {pyproject.name} but not registered"
        info = callbacks[name]
        assert info.object_path == path and not info.broken, (name, info.object_path, info.error)
        module, _, attr = path.partition(":")
        assert lp.get_callback(name) is getattr(importlib.import_module(module), attr), name
        assert issubclass(lp.get_callback(name), Callback), name


@pytest.mark.parametrize("name", REGISTERED)
def test_registered_callback_conforms(name, tmp_path):
    info = lp.list_callbacks()[name]
    assert not info.broken, info.error
    assert info.summary, f"{info.object_path} has no docstring summary"
    # evolution's default cadence is a generation every 5 epochs (the Spartan-training article's):
    # fit long enough
    max_epochs = 5 if name == "evolution" else 3
    check_callback_conformance(lambda: lp.create_callback(name), tmp_path, max_epochs=max_epochs,
                               resume_epoch=1)


class Idle(lp.PruningCallback):
    """Resolves its targets and never prunes."""


def test_conformance_fails_for_a_callback_that_does_nothing(tmp_path):
    with pytest.raises(AssertionError, match="Idle changed nothing"):
        check_callback_conformance(lambda: Idle(verbose=False), tmp_path, max_epochs=2)
