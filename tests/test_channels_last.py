"""Channels-last and non-contiguous weights: masks, gates, compression and fusion.

A mask has its weight's memory layout, the fused ``uint8`` view the mask multiply uses is never a
reinterpretation of differently laid-out bytes, a model converted after its masks were made
(``model.to(memory_format=torch.channels_last)`` in the LightningModule's own ``on_fit_start``, which runs
after the callbacks') is still masked, and every callback works on a channels-last model.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import lightning_prune as lp
from lightning_prune.core.masks import MaskSet, _uint8_view
from lightning_prune.core.reparam import count_layers, plan_reparameterization, set_lambda, wrap_activations
from lightning_prune.core.targets import resolve_targets
from lightning_prune.testing import fit_tiny, tiny_classifier
from tests.helpers import Invariants, fast_callback

CL = torch.channels_last
NAMES = sorted(lp.list_callbacks())
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def _half_mask(param: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return torch.rand(param.shape, generator=torch.Generator().manual_seed(seed)) > 0.5


def test_masks_have_the_weights_layout():
    conv = nn.Conv2d(4, 8, 3).to(memory_format=CL)
    linear = nn.Linear(6, 5)
    linear.weight = nn.Parameter(torch.randn(6, 5).t())  # a transposed, non-contiguous weight
    masks = MaskSet()
    masks.add("conv.weight", conv.weight)
    masks.add("linear.weight", linear.weight)
    assert masks["conv.weight"].stride() == conv.weight.stride()
    want = {"conv.weight": _half_mask(conv.weight), "linear.weight": _half_mask(linear.weight, 1)}
    before = {n: masks.param(n).detach().clone() for n in want}
    masks.update(want)  # contiguous masks in: stored in the weight's layout, applied elementwise
    for name, mask in want.items():
        param = masks.param(name)
        assert masks[name].stride() == param.stride() and torch.equal(masks[name], mask)
        assert torch.equal(param.detach(), before[name] * mask)


def test_masks_do_not_alias_the_callers_tensor():
    conv = nn.Conv2d(2, 2, 1)
    masks = MaskSet()
    masks.add("w", conv.weight)
    given = _half_mask(conv.weight)
    masks.update({"w": given})
    given.fill_(True)
    assert not masks["w"].all()


def test_uint8_view_never_reinterprets_other_strides():
    param = torch.randn(8, 4, 3, 3).to(memory_format=CL)
    for mask in (_half_mask(param),  # contiguous: other strides than the channels-last weight
                 _half_mask(param.transpose(0, 1)).transpose(0, 1),  # non-contiguous
                 torch.ones(1, 1, 1, 1, dtype=torch.bool).expand(8, 4, 3, 3)):  # broadcast, stride 0
        view = _uint8_view(mask, param)
        assert view.dtype == torch.uint8 and view.stride() == param.stride()
        assert torch.equal(view.bool(), mask)
        out = param.clone()
        torch._foreach_mul_([out], [view])
        assert torch.equal(out, param * mask)


def test_masks_follow_a_model_converted_after_they_were_made():
    """``param.data`` snapshots would go on zeroing the old storage while the model trains on the new one."""
    model = timm.create_model("test_resnet", num_classes=10)
    masks = MaskSet.for_targets(resolve_targets(model))
    masks.update({n: _half_mask(masks.param(n), i) for i, n in enumerate(masks.names())})
    model.to(memory_format=CL)  # new storage for every 4-d weight
    with torch.no_grad():
        for name in masks.names():
            masks.param(name).add_(1.0)  # an optimizer step on the new storage
    masks.apply_()
    for name, mask in masks.items():
        param = masks.param(name)
        assert not param.detach()[~mask].any(), name
        assert mask.stride() == param.stride(), name


class ConvertsItself(lp.ImageClassifier):
    """Converts itself to channels-last in its own ``on_fit_start`` (after the callbacks' ones)."""

    def on_fit_start(self) -> None:
        self.to(memory_format=CL)


def test_a_module_converting_itself_at_fit_start_stays_masked(tmp_path):
    model = ConvertsItself("test_resnet", num_classes=10, scheduler="none", weight_decay=0.0)
    pruner = lp.GradualMagnitudePruning(target_sparsity=0.5, every_n_steps=2, sparsity_end_step=1,
                                        verbose=False)
    spy = Invariants(pruner)
    fit_tiny([pruner, spy], tmp_path, model=model, max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    assert spy.steps == 4 and model.model.layer1[0].conv1.weight.is_contiguous(memory_format=CL)
    assert pruner.masks.sparsity() == pytest.approx(0.5, abs=0.01)


CL_CASES = NAMES  # 1-3 s each


@pytest.mark.parametrize("name", CL_CASES)
def test_every_callback_on_a_channels_last_model(name, tmp_path):
    """Masks zero the weights at every step in the weights' own layout, gates act, the callback does its job,
    and the model stays channels-last. (Trajectories are not compared with a contiguous run: on this tiny
    model a 1e-6 difference of the channels-last kernels after one step grows to 1e-2 within six.)"""
    torch.manual_seed(0)
    model = tiny_classifier().to(memory_format=CL)
    callback = fast_callback(name)
    spy = Invariants(callback)
    fit_tiny([callback, spy], tmp_path, model=model, max_epochs=2, limit_train_batches=3, limit_val_batches=0)
    assert spy.steps == 6
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(m.weight.is_contiguous(memory_format=CL) for m in convs), "training lost the layout"
    if isinstance(callback, lp.GroupLassoPruning | lp.L0Pruning):
        assert callback.finalized and spy.gates_seen >= 3
    elif isinstance(callback, lp.PruningCallback) and name != "lottery_ticket":
        assert callback.masks.sparsity() > 0
    elif isinstance(callback, lp.ActivationDecay):
        assert callback.lam == 1.0


def test_gates_fold_and_compress_exactly_on_a_channels_last_model(tmp_path):
    """Group-LASSO gates on a channels-last model, compressed inside the fit: the smaller model computes what
    the masked one computed."""
    torch.manual_seed(0)
    model = tiny_classifier().to(memory_format=CL)
    gl = lp.GroupLassoPruning(lam=0.2, finalize_step=3, target_flops=0.6, round_to=1, verbose=False)
    fit_tiny([gl], tmp_path, model=model, max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    assert gl.finalized
    masked, masked_params = _eval(model), sum(p.numel() for p in model.parameters())
    lp.compress(model, round_to=1)
    assert sum(p.numel() for p in model.parameters()) < masked_params
    torch.testing.assert_close(_eval(model), masked, rtol=1e-4, atol=1e-4)


def _eval(module):
    was = module.training
    module.eval()
    with torch.no_grad():
        out = module(X)
    module.train(was)
    return out


def test_fusion_on_a_channels_last_model():
    model = timm.create_model("test_resnet", num_classes=10)
    wrap_activations(model, plan_reparameterization(model).decay, 0.0)
    set_lambda(model, 1.0)
    model = model.to(memory_format=CL).eval()
    layers = count_layers(model)
    with torch.no_grad():
        before = model(X)
        fused = lp.reparameterize(model)
        after = fused(X)
    assert count_layers(fused) < layers
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
