"""The exactness proof's own machinery (lightning_prune.graph.proof): the copies that share the randomised
weights, and a failing group's reason found in the check's own two forwards."""

from __future__ import annotations

import torch
from torch import nn

from lightning_prune.graph import analyse_channels
from lightning_prune.graph.proof import _sharing_copy, check_removal, compare_outputs


class _Net(nn.Module):
    calls = 0

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)
        self.register_buffer("offset", torch.zeros(3))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        type(self).calls += 1
        return self.fc2(self.act(self.fc1(x))) + self.offset


class _Centred(nn.Module):
    def forward(self, h):
        return h - h.mean(-1, keepdim=True)


class _CentredNet(_Net):
    """``_Net`` with the hidden units centred: a mean over the units, which a group found on ``_Net`` does not
    know of (the masked zeros count in the mean, the sliced units do not)."""

    def __init__(self) -> None:
        super().__init__()
        self.centre = _Centred()

    def forward(self, x):
        type(self).calls += 1
        return self.fc2(self.centre(self.act(self.fc1(x)))) + self.offset


def test_a_sharing_copy_shares_the_parameters_and_nothing_else():
    model = _Net()
    copy = _sharing_copy(model)
    assert all(a is b for a, b in zip(model.parameters(), copy.parameters()))
    assert copy.offset is not model.offset and torch.equal(copy.offset, model.offset)
    copy.fc1.register_forward_hook(lambda *args: None)
    copy.register_forward_pre_hook(lambda *args: None)
    copy.cache["x"] = torch.ones(1)
    copy.fc2.bias = nn.Parameter(torch.zeros(3))  # (slicing replaces parameters)
    assert not model.fc1._forward_hooks and not model._forward_pre_hooks and model.cache == {}
    assert model.fc2.bias is not copy.fc2.bias
    x = torch.randn(2, 6)
    torch.testing.assert_close(_sharing_copy(model)(x), model(x))


def test_a_failing_group_is_located_within_the_check_s_own_two_forwards():
    x = torch.randn(4, 6)
    [group] = [g for g in analyse_channels(_Net().eval(), x).groups if g.name == "fc1"]
    model = _CentredNet().eval()
    _CentredNet.calls = 0
    why = check_removal(model, x, [group], 1e-6, locate=True)
    assert why is not None and why.startswith("the outputs differ by"), why
    assert why.endswith("; first differs at `fc2` (Linear)"), why
    assert _CentredNet.calls == 2  # the sliced and the masked model, each module's output recorded in them
    _CentredNet.calls = 0
    assert check_removal(model, x, [group], 1e-6) == why.split(";")[0]
    assert _CentredNet.calls == 2


def test_compare_outputs_is_the_largest_relative_difference():
    a = torch.tensor([[1.0, -4.0], [2.0, 0.5]], dtype=torch.float64)
    b = a.clone()
    b[0, 1] = -3.0
    assert compare_outputs(a, b, 1e-6) == 0.25
    b[1, 0] = float("nan")
    assert compare_outputs(a, b, 1e-6) != compare_outputs(a, b, 1e-6)  # NaN propagates
    assert compare_outputs(a, a[:1], 1e-6) == float("inf")
    assert compare_outputs((a, {"k": a}), (a, {"k": a}), 1e-6) == 0.0


def test_a_zero_initialised_head_gets_random_weights_in_the_proof_copy():
    """Mixer's, gMixer's and SAM2-Hiera's classifier heads start at zero: every output was the same whatever
    was removed, and the masked-vs-sliced check passed by chance. The proof's copy draws them at random."""
    from lightning_prune.graph.proof import randomised_copy

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    nn.init.zeros_(model[2].weight)
    clone = randomised_copy(model)
    assert float(clone[2].weight.std()) > 0.1 and float(model[2].weight.abs().sum()) == 0.0
    assert torch.equal(clone[0].weight, model[0].weight.double())  # (a trained weight stays)
