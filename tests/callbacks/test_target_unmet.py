"""A size target that the removable groups cannot reach is said to be unmet, with what was reached and what
blocked it."""

from __future__ import annotations

import warnings

import pytest

from lightning_prune.callbacks.group_lasso import GroupLassoPruning
from lightning_prune.testing import fit_tiny, tiny_classifier

FAST = {"max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 1}


def test_an_unreachable_target_is_said_to_be_unmet_with_the_blockers(tmp_path):
    # only layer4's groups may go: half of the FLOPs cannot be removed
    cb = GroupLassoPruning(target_flops=0.3, finalize_step=0.5, include=["*layer4*"], verbose=False)
    with pytest.warns(UserWarning, match=r"`target_flops=0.3` is not reached: the compressed model keeps"
                                         r" 0\.\d+ of the dense FLOPs") as record:
        fit_tiny([cb], tmp_path, model=tiny_classifier("test_resnet"), **FAST)
    message = next(str(w.message) for w in record if "is not reached" in str(w.message))
    reached = cb.size_metrics()["prune/flops_remaining"]
    assert reached > 0.3 and f"keeps {reached:.3f} of the dense FLOPs" in message
    assert "of the Conv/Linear weights are in no removable channel group" in message
    assert "HINT: `pruning.skipped`" in message


def test_a_reachable_target_gives_no_warning(tmp_path):
    cb = GroupLassoPruning(target_flops=0.5, finalize_step=0.5, verbose=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is not reached.*")
        fit_tiny([cb], tmp_path, model=tiny_classifier("test_resnet"), **FAST)
    assert cb.size_metrics()["prune/flops_remaining"] <= 0.5
