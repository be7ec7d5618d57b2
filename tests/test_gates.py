"""Channel groups, gates and folding (lightning_prune.gates, lightning_prune.functional.channels)."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch
from torch import nn

from lightning_prune.errors import InvalidArgumentError
from lightning_prune.functional.channels import (
    capture_mask,
    channel_view,
    fold_scale,
    gate_l1_penalty,
    gate_l1_subgradient,
    keep_mask,
    zero_channels,
)
from lightning_prune.gates import (
    Gate,
    GateSet,
    ScaleGate,
    example_inputs_for,
    find_channel_groups,
    traced_root,
)
from lightning_prune.testing import TINY_MODELS, tiny_classifier

FAMILIES = list(TINY_MODELS)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **TINY_MODELS.get(name, {}))
    with torch.no_grad():  # trained-looking BatchNorms: nonzero biases and statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
        for pname, p in model.named_parameters():
            if pname.endswith("gamma"):  # ConvNeXt's layer scale starts at 1e-6: make the blocks matter
                p.fill_(1.0)
    return model.eval()


def _x(name: str) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ functional
def test_fold_scale_keeps_conv_bn_linear_outputs():
    """Folding beta into W keeps outputs unchanged (conv+bias, BatchNorm affine, Linear)."""
    torch.manual_seed(0)
    conv, lin, bn = nn.Conv2d(3, 6, 3, bias=True), nn.Linear(5, 4), nn.BatchNorm2d(6).eval()
    bn.bias.data.normal_(), bn.running_mean.normal_()
    x, z = torch.randn(2, 3, 8, 8), torch.randn(3, 5)
    s6, s4 = torch.randn(6), torch.randn(4)
    gated_conv, gated_lin = conv(x) * channel_view(s6, 4), lin(z) * channel_view(s4, 2, -1)
    gated_bn = bn(conv(x)) * channel_view(s6, 4)
    for layer, s in ((conv, s6), (lin, s4)):
        w, b = fold_scale(layer.weight.data, layer.bias.data, s)
        layer.weight.data, layer.bias.data = w, b
    torch.testing.assert_close(conv(x), gated_conv)
    torch.testing.assert_close(lin(z), gated_lin)
    conv.weight.data, conv.bias.data = fold_scale(conv.weight.data, conv.bias.data, 1 / s6)  # undo
    bn.weight.data, bn.bias.data = fold_scale(bn.weight.data, bn.bias.data, s6)
    torch.testing.assert_close(bn(conv(x)), gated_bn, atol=1e-5, rtol=1e-5)


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


def test_zero_channels():
    w = torch.randn(4, 3, 3, 3)
    w[1] = 0
    w[3] = 0
    b = torch.tensor([0.0, 0.0, 1.0, 0.5])
    assert zero_channels(w).tolist() == [False, True, False, True]
    assert zero_channels(w, b).tolist() == [False, True, False, False]


# ------------------------------------------------------------------ groups
def test_groups_resnet_skip_coupled_and_gate_after_bn():
    model = _model("test_resnet")
    groups, skipped = find_channel_groups(model, _x("test_resnet"))
    by_name = {g.name: g for g in groups}
    assert by_name["layer1.0.conv1"].sites == ("layer1.0.bn1",)  # after the BatchNorm following the conv
    assert not any(g.coupled for g in groups)
    assert "conv1.0" not in by_name and "fc" not in by_name  # timm first_conv / classifier
    assert "coupled" in skipped["layer2.0.downsample.1"]  # residual sum: left alone by default
    coupled, _ = find_channel_groups(model, _x("test_resnet"), prune_coupled=True)
    residual = {g.name: g for g in coupled if g.coupled}["layer2.0.downsample.1"]
    assert set(residual.sites) == {"layer2.0.downsample.2", "layer2.0.bn2"}  # one shared gate per branch


def test_groups_efficientnet_depthwise_chain_gated_after_last_bn():
    groups, _ = find_channel_groups(_model("test_efficientnet"), _x("test_efficientnet"))
    by_name = {g.name: g for g in groups}
    chain = by_name["blocks.4.0.se.conv_expand"]  # conv_pw -> bn1 -> depthwise -> bn2 -> SE -> conv_pwl
    assert chain.sites == ("blocks.4.0.bn2",)
    assert {"blocks.4.0.conv_pw", "blocks.4.0.conv_dw", "blocks.4.0.se.conv_expand"} <= set(chain.producers)


@pytest.mark.parametrize("name", ["test_convnext", "test_vit"])
def test_groups_transformer_like_only_mlp_hidden_units(name):
    groups, skipped = find_channel_groups(_model(name), example_inputs_for(_model(name), (3, 32, 32)))
    assert groups and all(g.name.endswith("mlp.fc1") and g.sites == (g.name,) for g in groups)
    if name == "test_vit":
        assert any("UNBIND" in r for r in skipped.values())  # attention heads are left alone


def test_groups_include_exclude():
    model, x = _model("test_resnet"), _x("test_resnet")
    only, _ = find_channel_groups(model, x, include=["layer4.*"])
    assert [g.name for g in only] == ["layer4.0.conv1"]
    rest, _ = find_channel_groups(model, x, exclude=["layer4.*"])
    assert rest and "layer4.0.conv1" not in {g.name for g in rest}


def test_example_inputs_and_traced_root():
    classifier = tiny_classifier("test_vit")
    prefix, root = traced_root(classifier)
    assert prefix == "model" and root is classifier.model
    assert example_inputs_for(root).shape == (2, 3, 32, 32)  # the ViT's fixed img_size
    with pytest.raises(InvalidArgumentError, match="pass `input_size"):
        example_inputs_for(nn.Sequential(nn.Linear(3, 3)))


# ------------------------------------------------------------------ gates
@pytest.mark.parametrize(("name", "coupled"), [(n, False) for n in FAMILIES] + [("test_resnet", True)])
def test_gates_fold_keeps_outputs(name, coupled):
    """With random gates attached, folding them into the weights and removing the hooks keeps eval outputs."""
    model, x = _model(name), _x(name)
    plain = model(x)
    groups, _ = find_channel_groups(model, x, prune_coupled=coupled)
    gates = GateSet(groups, [ScaleGate(g.size) for g in groups])
    keys = set(model.state_dict())
    gates.attach(model)
    torch.testing.assert_close(model(x), plain)  # gates start at 1
    with torch.no_grad():
        for gate in gates.gates:
            gate.weight.uniform_(-1.5, 1.5)
    gated = model(x)
    assert not torch.allclose(gated, plain)
    assert set(model.state_dict()) == keys  # gates are not submodules of the model
    gates.fold_(model)
    gates.detach()
    torch.testing.assert_close(model(x), gated, atol=1e-5, rtol=1e-4)


def test_zero_gate_zeroes_the_readers_in_training_mode_too():
    model, x = _model("test_efficientnet").train(), _x("test_efficientnet")
    groups, _ = find_channel_groups(model, x)
    group = next(g for g in groups if g.name == "blocks.4.0.se.conv_expand")
    gates = GateSet([group], [ScaleGate(group.size)])
    gates.attach(model)
    with torch.no_grad():
        gates.gates[0].weight[::2] = 0
    seen = {}
    model.blocks[4][0].conv_pwl.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    model(x)
    assert (seen["x"][:, ::2] == 0).all() and (seen["x"][:, 1::2] != 0).any()


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
    groups, _ = find_channel_groups(model, x, prune_coupled=True)
    gates = GateSet(groups, [CountingGate(g.size) for g in groups])
    gates.attach(model)
    model(x)
    model(x)
    assert all(gate.calls == 2 for gate in gates.gates)  # two sites of a coupled group share one sample
    gates.detach()
    model(x)
    assert all(gate.calls == 2 for gate in gates.gates)
    pickle.loads(pickle.dumps(gates))  # hook handles are process-local


def test_gateset_validation_and_state():
    model, x = _model("test_resnet"), _x("test_resnet")
    groups, _ = find_channel_groups(model, x)
    with pytest.raises(ValueError, match="gate of size"):
        GateSet(groups[:1], [ScaleGate(groups[0].size + 1)])
    with pytest.raises(ValueError, match="groups but"):
        GateSet(groups, [])
    gates = GateSet(groups, [ScaleGate(g.size, init=0.5) for g in groups])
    other = GateSet(groups, [ScaleGate(g.size) for g in groups])
    other.load_state_dict(gates.state_dict())
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(gates.gates, other.gates))
    with pytest.raises(KeyError, match="same model"):
        GateSet(groups[:1], [ScaleGate(groups[0].size)]).load_state_dict(gates.state_dict())
