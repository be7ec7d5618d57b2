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
    check_callback_conformance(lambda: lp.create_callback(name), tmp_path, max_epochs=3, resume_epoch=1)
