"""Every channel callback warns at setup when the Trainer's precision or the model's mode keep it from acting
(lightning_prune.callbacks._setup_checks), so that nothing is silently a no-op (sharded strategies are
refused: tests/callbacks/test_sharded.py)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from lightning.pytorch.plugins.precision import BitsandbytesPrecision, Precision, TransformerEnginePrecision
from lightning.pytorch.strategies import SingleDeviceStrategy

import lightning_prune as lp
from lightning_prune.callbacks._setup_checks import cannot_act_reasons
from lightning_prune.testing import fit_tiny, tiny_classifier

#: a plain precision plugin that the checks take for bitsandbytes (which needs its package and a GPU)
SwappingLookalike = type("BitsandbytesPrecision", (Precision,), {})
ONE_STEP = {"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 0}


def _trainer(strategy=SingleDeviceStrategy, precision=Precision):
    return SimpleNamespace(strategy=strategy.__new__(strategy), precision_plugin=precision.__new__(precision))


@pytest.mark.parametrize(("trainer", "match"), [
    (_trainer(precision=BitsandbytesPrecision), r"X cannot prune under BitsandbytesPrecision: it replaces"),
    (_trainer(precision=TransformerEnginePrecision), r"under TransformerEnginePrecision"),
])
def test_each_reason_is_one_message(trainer, match):
    (reason,) = cannot_act_reasons(trainer, tiny_classifier(), "X")
    assert re.search(match, reason), reason


def test_a_plain_trainer_and_a_module_in_train_mode_give_no_reason():
    assert cannot_act_reasons(_trainer(), tiny_classifier(), "X", sampled_in_training=True) == []
    module = tiny_classifier().eval()
    assert cannot_act_reasons(_trainer(), module, "X") == []  # deterministic gates act in eval mode too
    (reason,) = cannot_act_reasons(_trainer(), module, "X", sampled_in_training=True)
    assert "in eval mode at the start of the fit" in reason and "model.train()" in reason


@pytest.mark.parametrize("make", [lambda: lp.GroupLassoPruning(finalize_step=1.0, verbose=False),
                                  lambda: lp.L0Pruning(finalize_step=1.0, verbose=False)],
                         ids=["group_lasso", "l0"])
def test_the_gate_callbacks_warn_at_setup_under_a_layer_swapping_precision(make, tmp_path):
    with pytest.warns(UserWarning, match=r"Pruning cannot prune under BitsandbytesPrecision"):
        fit_tiny([make()], tmp_path, plugins=[SwappingLookalike()], **ONE_STEP)


def test_l0_warns_for_a_module_left_in_eval_mode(tmp_path):
    with pytest.warns(UserWarning, match=r"L0Pruning: the LightningModule is in eval mode"):
        fit_tiny([lp.L0Pruning(finalize_step=1.0, verbose=False)], tmp_path, model=tiny_classifier().eval(),
                 **ONE_STEP)
