"""The pure functions and one-shot helpers the callbacks and the channel-pruning benchmarks share."""

import pytest
import timm
import torch
from torch import nn

from lightning_prune.functional import kept_count
from lightning_prune_baselines import (
    ChannelTracer,
    apply_channel_masks,
    channel_groups,
    first_k_channel_masks,
    first_k_pruned,
    nested_random_keep,
    random_channel_masks,
)


def test_first_k_pruned_keeps_at_least_one_channel():
    assert [
        first_k_pruned(48, 0.5),
        first_k_pruned(10, 0.25),
        first_k_pruned(3, 0.99),
        first_k_pruned(7, 0.0),
    ] == [24, 2, 2, 0]
    for channels in (1, 2, 5, 16, 48, 192):
        for sparsity in (0.0, 0.1, 0.33, 0.5, 0.9, 0.999):
            assert channels - first_k_pruned(channels, sparsity) == kept_count(channels, sparsity) >= 1
    assert first_k_pruned(channels=10, sparsity=0.25) == 2  # the keyword is `sparsity` (was `amount`)


def test_nested_random_keep_is_exact_nested_and_seeded():
    g = torch.Generator().manual_seed(0)
    keep = torch.ones(1000, dtype=torch.bool)
    history = []
    for s in (0.2, 0.5, 0.5, 0.9):
        new = nested_random_keep(keep, s, g)
        assert int(new.sum()) == kept_count(1000, s)
        assert not torch.any(new & ~keep)  # nested: nothing pruned comes back
        keep = new
        history.append(new)
    again = torch.Generator().manual_seed(0)
    keep2 = torch.ones(1000, dtype=torch.bool)
    for s, expected in zip((0.2, 0.5, 0.5, 0.9), history):
        keep2 = nested_random_keep(keep2, s, again)
        assert torch.equal(keep2, expected)
    other = nested_random_keep(torch.ones(1000, dtype=torch.bool), 0.2, torch.Generator().manual_seed(1))
    assert not torch.equal(other, history[0])
    # a 2-D mask keeps its shape; the draw count does not depend on the sparsity (ranks stay in step)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert nested_random_keep(torch.ones(4, 6, dtype=torch.bool), 0.5, g1).shape == (4, 6)
    nested_random_keep(torch.ones(4, 6, dtype=torch.bool), 0.9, g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def _model(name):
    return timm.create_model(name, num_classes=10, **({"img_size": 32} if name == "test_vit" else {})).eval()


def test_tracer_finds_the_batchnorm_after_each_conv():
    model = _model("test_resnet")
    groups = {g.weight: g.members for g in channel_groups(model, torch.randn(2, 3, 32, 32))}
    assert "fc.weight" not in groups and "conv1.0.weight" not in groups  # timm's classifier and first conv
    assert groups["conv1.3.weight"] == ("conv1.4.weight", "conv1.4.bias")
    assert groups["conv1.6.weight"] == ("bn1.weight", "bn1.bias")
    assert groups["layer3.0.conv3.weight"] == ("layer3.0.bn3.weight", "layer3.0.bn3.bias")
    assert groups["layer2.0.downsample.1.weight"] == (
        "layer2.0.downsample.2.weight",
        "layer2.0.downsample.2.bias",
    )
    assert all(len(members) == 2 for members in groups.values())
    # without an input, a group is the layer's own weight and bias
    assert all(g.members == () for g in channel_groups(model))

    eff = {
        g.weight: g.members for g in channel_groups(_model("test_efficientnet"), torch.randn(2, 3, 32, 32))
    }
    assert eff["blocks.3.0.conv_dw.weight"] == (
        "blocks.3.0.bn2.weight",
        "blocks.3.0.bn2.bias",
    )  # BatchNormAct2d
    assert eff["blocks.3.0.se.conv_expand.weight"] == (
        "blocks.3.0.se.conv_expand.bias",
    )  # feeds a gate, not a BN


def test_tracer_ignores_a_batchnorm_reached_through_another_op():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.conv2, self.bn2 = (
                nn.Conv2d(3, 4, 1),
                nn.BatchNorm2d(4),
                nn.Conv2d(4, 4, 1),
                nn.BatchNorm2d(4),
            )

        def forward(self, x):
            return self.bn2(self.conv2(self.bn(self.conv(x))) * 2)

    net = Net()
    with ChannelTracer(net, ["conv", "conv2"]) as tracer:
        net(torch.randn(1, 3, 2, 2))
    assert tracer.followers == {"conv": "bn"} and tracer.seen == {"conv", "conv2"}
    assert not net.conv._forward_hooks and not net.bn._forward_hooks  # hooks removed on exit


@pytest.mark.parametrize("model_name", ["test_resnet", "test_efficientnet"])
def test_first_k_masks_make_the_first_k_channel_outputs_exactly_zero(model_name):
    model = _model(model_name)
    x = torch.randn(4, 3, 32, 32)
    masks = first_k_channel_masks(model, sparsity=0.5, example_input=x)
    kept = apply_channel_masks(model, masks)
    groups = channel_groups(model, x)
    outputs = {}
    hooks = [
        model.get_submodule(g.members[0].rsplit(".", 1)[0]).register_forward_hook(
            lambda m, a, out, n=g.weight: outputs.__setitem__(n, out)
        )
        for g in groups
        if g.members
    ]
    for mode in (False, True):  # eval (running stats) and train (batch stats)
        model.train(mode)
        with torch.no_grad():
            model(x)
        for group in groups:
            weight = model.get_parameter(group.weight)
            k = first_k_pruned(weight.shape[0], 0.5)
            assert torch.equal(masks[group.weight][:k], torch.zeros_like(masks[group.weight][:k]))
            assert masks[group.weight][k:].all()
            for name in group.members:
                assert not masks[name][:k].any() and masks[name][k:].all()
            out = outputs[group.weight]
            assert torch.all(out[:, :k] == 0), group.weight
            assert out[:, k:].abs().sum() > 0, group.weight
    for h in hooks:
        h.remove()
    with torch.no_grad():  # the MaskSet re-zeroes what an update revived
        for name in masks:
            model.get_parameter(name).add_(1.0)
    kept.apply_()
    assert all(torch.all(model.get_parameter(n)[~m] == 0) for n, m in masks.items())


def test_random_channel_masks_are_seeded_and_exact():
    model = _model("test_convnext")
    a, b = random_channel_masks(model, sparsity=0.5, seed=3), random_channel_masks(model, 0.5, seed=3)
    c = random_channel_masks(model, 0.5, seed=4)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    for group in channel_groups(model):
        rows = a[group.weight].reshape(a[group.weight].shape[0], -1)
        assert torch.all(rows.all(1) | ~rows.any(1))  # whole rows
        assert int(rows.all(1).sum()) == kept_count(rows.shape[0], 0.5)
        assert torch.equal(a[group.members[0]], rows.all(1))  # convnext layers have biases
