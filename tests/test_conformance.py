"""Every registered callback (built-in or plugin) keeps the contract of lightning_prune.testing."""

import pytest

import lightning_prune as lp
from lightning_prune.testing import check_callback_conformance

REGISTERED = sorted(lp.list_callbacks())


def test_builtins_are_all_registered():
    assert "magnitude" in REGISTERED


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
