"""Every callback this plugin registers keeps lightning-prune's callback contract with all defaults.

This is the check a third-party plugin's own test suite runs: the conformance helper from the core
constructs the callback through its entry point, fits real steps on a tiny timm model, checks that the
model stays a plain timm model, and resumes from a checkpoint to exactly the uninterrupted result.
"""

import pytest
import torch

import lightning_prune as lp
from lightning_prune.functional import kept_count
from lightning_prune.testing import check_callback_conformance, tiny_classifier
from lightning_prune_baselines import (
    channel_groups,
    first_k_channel_masks,
    first_k_keep,
    random_channel_masks,
)

NAMES = ["first_k", "random_channels", "random_unstructured"]


@pytest.mark.parametrize("name", NAMES)
def test_default_construction_keeps_the_contract(tmp_path, name):
    state = check_callback_conformance(
        lambda: lp.create_callback(name), tmp_path, max_epochs=2, limit_train_batches=2
    )
    assert state["updated_at_step"] == 1 and state["current_target"] == pytest.approx(0.5)
    if name == "first_k":  # neither prune_step nor prune_epoch: step 0, so after the first batch
        assert state["prune_at_step"] == 0
    else:  # one shot at the start (sparsity_end_step=0), the window open to the end (end_step=1.0)
        assert state["schedule"] == [0, 2**62, 0, 0]
    if name == "random_unstructured":  # weights only, half of each
        assert state.get("keep") is None
        assert all(int(m.sum()) == kept_count(m.numel(), 0.5) for m in state["masks"].values())
        return
    # channel units: half of every group's units, in every tensor they touch; the masks are exactly those of
    # the one-shot helper on the same LightningModule (seed=None is what seed_everything set: 0)
    sizes = [g.size for g in channel_groups(tiny_classifier())]
    assert [k.numel() for k in state["keep"]] == sizes
    assert all(int(k.sum()) == kept_count(k.numel(), 0.5) for k in state["keep"])
    if name == "first_k":
        assert all(torch.equal(k, first_k_keep(k.numel(), 0.5)) for k in state["keep"])
        expected = first_k_channel_masks(tiny_classifier(), 0.5)
    else:
        expected = random_channel_masks(tiny_classifier(), 0.5, seed=0)
    assert set(expected) <= set(state["masks"])
    for mask_name, mask in state["masks"].items():  # the targets no unit touches stay whole
        whole = bool(mask.all())
        assert torch.equal(mask, expected[mask_name]) if mask_name in expected else whole, mask_name


@pytest.mark.parametrize("model_name", ["test_efficientnet", "test_convnext", "test_vit"])
def test_conformance_on_other_timm_families(tmp_path, model_name):
    state = check_callback_conformance(
        lambda: lp.create_callback(
            "random_channels", target_sparsity=0.3, sparsity_end_step=5, every_n_steps=2, verbose=False
        ),
        tmp_path,
        model_name=model_name,
        max_epochs=2,
        limit_train_batches=3,
    )
    # the schedule (updates at steps 1, 3, 5) crosses the resume point (step 3)
    assert state["updated_at_step"] == 5 and state["current_target"] == pytest.approx(0.3)
    assert state["schedule"] == [0, 2**62, 0, 5]  # the window stays open (end_step=1.0); the ramp ends at 5
    assert any(isinstance(m, torch.Tensor) and not bool(m.all()) for m in state["masks"].values())
    sizes = [g.size for g in channel_groups(tiny_classifier(model_name))]
    assert [k.numel() for k in state["keep"]] == sizes
    assert all(int(k.sum()) == kept_count(k.numel(), 0.3) for k in state["keep"])
