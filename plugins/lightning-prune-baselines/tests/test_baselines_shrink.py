"""The channel baselines shrink while training: ``compress=True`` removes the pruned units inside the fit."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from unit_checks import removed_units

from lightning_prune.graph import slice_units
from lightning_prune.testing import check_callback_conformance, fit_tiny, tiny_classifier
from lightning_prune_baselines import FirstKChannels, RandomChannels, RandomUnstructured

FAST = {"max_epochs": 3, "limit_train_batches": 3, "limit_val_batches": 1}
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
# equal up to float64 rounding (float32 would part by ~1e-4 after a few steps, differently on every CPU)
EXACT64 = {"atol": 1e-10, "rtol": 1e-8}


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


class _Sizes(Callback):
    """``{global_step: parameter count}`` at the start of every training batch."""

    def __init__(self):
        self.seen: dict[int, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[trainer.global_step] = _params(pl_module)


def _eval(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


#: momentum through a convnet's channels and Adam's moments through a ViT's heads and qkv; every optimizer's
#: state on the kept units: tests/callbacks/test_shrink.py::test_every_optimizer_state_follows_the_kept_units;
#: the other two pairs run with -m slow
@pytest.mark.parametrize(("name", "optimizer"), [
    ("test_resnet", "sgd"), ("test_vit", "adamw"),
    pytest.param("test_resnet", "adamw", marks=pytest.mark.slow),
    pytest.param("test_vit", "sgd", marks=pytest.mark.slow),
])
def test_first_k_trains_the_small_model_as_the_masked_one(name, optimizer, tmp_path):
    """Same seed, same data: pruned at step 2 and removed at once, the fit ends where the masked fit ends
    (sliced the same way afterwards): the optimizer state followed the kept units. In float64: the claim is
    exactness, and float32 trajectories part after a few steps on another CPU's kernels."""
    kwargs = {"optimizer": optimizer, "lr": 0.05 if optimizer == "sgd" else 3e-3, "momentum": 0.9,
              "weight_decay": 1e-3}
    torch.manual_seed(0)
    small = tiny_classifier(name, **kwargs)
    shrinking, sizes = FirstKChannels(0.5, prune_step=2, compress=True, verbose=False), _Sizes()
    fit_tiny([shrinking, sizes], tmp_path / "a", model=small, precision="64-true", **FAST)
    torch.manual_seed(0)
    masked = tiny_classifier(name, **kwargs)
    reference = FirstKChannels(0.5, prune_step=2, verbose=False)
    fit_tiny([reference], tmp_path / "b", model=masked, precision="64-true", **FAST)

    dense = sizes.seen[0]
    assert sizes.seen[1] == dense and sizes.seen[2] < 0.7 * dense  # removed once global_step reached 2
    assert shrinking.shrink.removed == removed_units(reference.groups, reference.keep)
    slice_units(masked, reference.groups, shrinking.shrink.removed)
    state = small.state_dict()
    assert state.keys() == masked.state_dict().keys()
    for key, value in masked.state_dict().items():
        if value.is_floating_point() and not (optimizer == "adamw" and key.endswith("attn.qkv.bias")):
            # (the k part of a qkv bias has a zero gradient: Adam turns float noise into lr-sized steps)
            torch.testing.assert_close(state[key], value, **EXACT64, msg=lambda m, key=key: f"{key}: {m}")
    torch.testing.assert_close(_eval(small, X.double()), _eval(masked, X.double()), **EXACT64)
    held = {id(p) for g in shrinking_optimizer(small).param_groups for p in g["params"]}
    assert held == {id(p) for p in small.parameters()}


def shrinking_optimizer(module):
    return module.trainer.optimizers[0]


def test_random_channels_remove_the_units_once_the_schedule_reached_the_target(tmp_path):
    pruner = RandomChannels(0.5, sparsity_end_step=4, every_n_steps=2, seed=1, compress=True, verbose=False)
    sizes = _Sizes()
    fit_tiny([pruner, sizes], tmp_path, model=tiny_classifier(), **FAST)
    dense = sizes.seen[0]
    # masks at steps 0, 2, 4 (the end of batches 0, 2, 4)
    assert all(sizes.seen[s] == dense for s in range(5))
    assert all(sizes.seen[s] < 0.7 * dense for s in range(5, 9))  # the target is reached at step 4: removed
    assert pruner.current_target == 0.5 and pruner.shrink.removed


def test_compress_step_one_removes_the_units_at_the_end_of_training(tmp_path):
    pruner, sizes = FirstKChannels(0.5, compress=True, compress_step=1.0, verbose=False), _Sizes()
    _, model = fit_tiny([pruner, sizes], tmp_path, model=tiny_classifier(), **FAST)
    assert len(set(sizes.seen.values())) == 1  # dense throughout the fit
    assert _params(model) < 0.7 * sizes.seen[0] and pruner.shrink.removed


@pytest.mark.parametrize("make", [
    lambda: FirstKChannels(0.5, prune_step=2, compress=True, verbose=False),
    lambda: RandomChannels(0.5, sparsity_end_step=4, every_n_steps=2, seed=2, compress=True, verbose=False),
], ids=["first_k", "random_channels"])
def test_a_checkpoint_of_the_smaller_model_resumes_onto_a_fresh_module(make, tmp_path):
    state = check_callback_conformance(make, tmp_path, max_epochs=4, resume_epoch=3, plain_model=False)
    assert state["shrink"]["removed"]


def test_compressing_before_the_masks_are_final_is_refused(tmp_path):
    pruner = RandomChannels(0.5, sparsity_end_step=6, every_n_steps=2, compress=True, compress_step=3,
                            verbose=False)
    with pytest.raises(MisconfigurationException,
                       match=r"resolves to step 3, before the masks are final \(step 6\)"):
        fit_tiny([pruner], tmp_path, model=tiny_classifier(), **FAST)


@pytest.mark.parametrize(("make", "match"), [
    (lambda: FirstKChannels(compress_step=3), r"`compress_step`/`compress_epoch` of FirstKChannels need"),
    (lambda: RandomChannels(compress=True, compress_step=3, compress_epoch=1),
     r"Pass only one of `compress_step`"),
    (lambda: FirstKChannels(compress="yes"), r"`compress` must be True or False"),
])
def test_bad_arguments(make, match):
    with pytest.raises(MisconfigurationException, match=match):
        make()


def test_weight_level_baselines_offer_no_compression():
    with pytest.raises(TypeError, match="compress"):
        RandomUnstructured(compress=True)
