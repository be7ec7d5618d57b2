"""Gates on channel groups: attaching, folding, masks (lightning_prune.core.gates), and the channel math they
use."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch
from torch import nn

from lightning_prune.core.gates import Gate, GateSet, ScaleGate, unit_masks
from lightning_prune.errors import InvalidArgumentError
from lightning_prune.functional.channels import (
    capture_mask,
    gate_l1_penalty,
    gate_l1_subgradient,
    keep_mask,
)
from lightning_prune.graph import analyse_channels, restricted_norm_hooks, slice_units
from lightning_prune.testing import TINY_MODELS
from tests.helpers import random_gates, trained_looking

FAMILIES = list(TINY_MODELS)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return trained_looking(timm.create_model(name, num_classes=10, **TINY_MODELS.get(name, {})))


def _x(name: str) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ functional
def test_l1_subgradient_matches_autograd_and_capture():
    g = torch.tensor([0.5, -0.2, 0.0, 2.0, -0.005], requires_grad=True)
    lam = torch.tensor([1e-2, 1e-2, 1e-2, 2e-2, 1e-2])
    gate_l1_penalty(g, lam).backward()
    torch.testing.assert_close(gate_l1_subgradient(g.detach(), lam), g.grad)
    assert float(gate_l1_penalty(g.detach(), 0.1)) == pytest.approx(0.1 * 2.705)
    captured = capture_mask(g, torch.zeros(5, dtype=torch.bool), threshold=0.01)
    assert captured.tolist() == [False, False, True, False, True]
    # once captured, always captured
    assert capture_mask(torch.ones(5), captured, 0.01).tolist() == captured.tolist()
    assert keep_mask(g, 0.3).tolist() == [True, False, False, True, False]
    assert keep_mask(g, 0.0).tolist() == [True, True, False, True, True]


# ------------------------------------------------------------------ gates
def _groups(model, x, **kwargs):
    return analyse_channels(model, x, **kwargs).groups


@pytest.mark.parametrize("name", FAMILIES)
def test_gates_fold_keeps_outputs(name):
    """With random gates attached (coupled streams too), folding them into the readers and removing the hooks
    keeps the eval outputs; the model's state_dict keys never change."""
    model, x = _model(name), _x(name)
    plain = model(x)
    groups = _groups(model, x)
    gates = GateSet(groups, [ScaleGate(g.size) for g in groups])
    keys = set(model.state_dict())
    gates.attach(model)
    torch.testing.assert_close(model(x), plain)  # gates start at 1
    with torch.no_grad():
        for gate in gates.gates:
            gate.weight.uniform_(0.2, 1.5)
    gated = model(x)
    assert not torch.allclose(gated, plain)
    assert set(model.state_dict()) == keys  # gates are not submodules of the model
    gates.fold_(model)
    gates.detach()
    torch.testing.assert_close(model(x), gated, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_closed_gates_masks_and_restricted_norms_equal_the_sliced_model(name):
    """Zero gates, then folded + masked + restricted norms: the same outputs as the physically sliced
    model."""
    model, x = _model(name), _x(name)
    groups = _groups(model, x)
    gates, keep = random_gates(groups)
    gates.attach(model)
    gated = model(x)  # closed gates already leave the norms' statistics
    gates.detach()
    gates.fold_(model)
    with torch.no_grad():
        for name_, mask in unit_masks(model, groups, keep).items():
            model.get_parameter(name_).mul_(mask)
    gates.restrict_norms(model, keep)
    masked = model(x)
    gates.release_norms()
    torch.testing.assert_close(masked, gated, atol=1e-5, rtol=1e-4)
    removed = {g.name: (~k).nonzero().flatten().tolist() for g, k in zip(groups, keep)}
    slice_units(model, groups, removed)
    torch.testing.assert_close(model(x), masked, atol=1e-5, rtol=1e-4)


def test_zero_gate_zeroes_the_readers_in_training_mode_too():
    model, x = _model("test_efficientnet").train(), _x("test_efficientnet")
    groups = _groups(model, x)
    group = next(g for g in groups if any(s.module == "blocks.4.0.conv_pwl" for s in g.input_sites()))
    site = next(s for s in group.input_sites() if s.module == "blocks.4.0.conv_pwl")
    gates = GateSet([group], [ScaleGate(group.size)])
    gates.attach(model)
    with torch.no_grad():
        gates.gates[0].weight[::2] = 0
    seen = {}
    model.blocks[4][0].conv_pwl.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]),
                                                          prepend=False)
    model(x)
    closed = [c for c, u in zip(site.channels, site.units) if u % 2 == 0]
    opened = [c for c, u in zip(site.channels, site.units) if u % 2 == 1]
    assert (seen["x"][:, closed] == 0).all() and (seen["x"][:, opened] != 0).any()


class CountingGate(Gate):
    """A stochastic plug-in gate (like hard-concrete): a new random value per forward."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.log_alpha = nn.Parameter(torch.zeros(size))
        self.calls = 0

    def compute(self, training: bool) -> torch.Tensor:
        self.calls += 1
        if training:
            return torch.sigmoid(self.log_alpha + torch.randn(self.size))
        return torch.sigmoid(self.log_alpha)


def test_plug_in_gate_samples_once_per_forward_for_shared_sites():
    model, x = _model("test_resnet").train(), _x("test_resnet")
    groups = _groups(model, x)
    assert any(len(g.input_sites()) > 1 for g in groups)  # a residual stream: several readers, one gate
    gates = GateSet(groups, [CountingGate(g.size) for g in groups])
    gates.attach(model)
    model(x)
    model(x)
    assert all(gate.calls == 2 for gate in gates.gates)  # every site of a group shares one sample
    gates.detach()
    model(x)
    assert all(gate.calls == 2 for gate in gates.gates)
    pickle.loads(pickle.dumps(gates))  # hook handles are process-local


def test_gateset_validation_and_state():
    model, x = _model("test_resnet"), _x("test_resnet")
    groups = _groups(model, x)
    with pytest.raises(InvalidArgumentError, match="gate of size"):
        GateSet(groups[:1], [ScaleGate(groups[0].size + 1)])
    with pytest.raises(InvalidArgumentError, match="groups but"):
        GateSet(groups, [])
    gates = GateSet(groups, [ScaleGate(g.size, init=0.5) for g in groups])
    other = GateSet(groups, [ScaleGate(g.size) for g in groups])
    other.load_state_dict(gates.state_dict())
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(gates.gates, other.gates))
    with pytest.raises(KeyError, match="same model"):
        GateSet(groups[:1], [ScaleGate(groups[0].size)]).load_state_dict(gates.state_dict())


def test_restricted_norm_hooks_turn_themselves_off_once_the_norm_is_sliced():
    model, x = _model("test_vit"), _x("test_vit")
    groups = _groups(model, x)
    stream = next(g for g in groups if g.norm_sites())
    removed = {stream.name: [0, 3]}
    handles = restricted_norm_hooks(model, [stream], removed)
    restricted = model(x)
    slice_units(model, [stream], removed)  # the hooks are still there, on smaller norms
    torch.testing.assert_close(model(x), restricted, atol=1e-5, rtol=1e-4)
    for h in handles:
        h.remove()
