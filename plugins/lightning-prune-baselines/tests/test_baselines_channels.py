"""The pure functions and one-shot helpers the callbacks and the channel-pruning benchmarks share."""

import pytest
import timm
import torch
from torch import nn
from unit_checks import (
    check_masked_equals_sliced,
    check_pruned_outputs_zero,
    check_unit_masks,
    removed_units,
)

from lightning_prune.functional import kept_count
from lightning_prune.graph import ChannelGroup, restricted_norm_hooks
from lightning_prune.testing import tiny_classifier
from lightning_prune_baselines import (
    apply_channel_masks,
    channel_groups,
    first_k_channel_masks,
    first_k_keep,
    first_k_pruned,
    nested_random_keep,
    random_channel_masks,
)

MODELS = ["test_resnet", "test_efficientnet", "test_convnext", "test_vit"]


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


def test_first_k_keep_drops_the_leading_units():
    assert first_k_keep(5, 0.4).tolist() == [False, False, True, True, True]
    assert first_k_keep(2, 0.4).tolist() == [False, True]  # two attention heads: one goes
    assert first_k_keep(size=3, sparsity=0.0).tolist() == [True, True, True]
    for size in (1, 2, 5, 16, 192):
        for sparsity in (0.0, 0.25, 0.5, 0.999):
            keep = first_k_keep(size, sparsity)
            k = first_k_pruned(size, sparsity)
            assert keep.dtype == torch.bool and keep.shape == (size,)
            assert not keep[:k].any() and keep[k:].all() and int(keep.sum()) == kept_count(size, sparsity)


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


def _slices(group):
    """The (module, role) pairs a group slices, in a fixed order (the analysis' order is not a contract)."""
    return sorted((s.module, s.role) for s in group.slices)


def test_channel_groups_of_a_resnet_couple_filters_batchnorms_readers_and_residual_streams():
    model = _model("test_resnet")
    groups = {g.name: g for g in channel_groups(model, torch.randn(2, 3, 32, 32))}
    assert all(isinstance(g, ChannelGroup) for g in groups.values())
    # a plain channel: the filter, the BatchNorm after it, the next conv's input columns
    plain = groups["conv1.3"]
    assert (plain.size, plain.unit, plain.width, plain.coupled) == (16, "channel", 1, False)
    assert _slices(plain) == sorted([("conv1.3", "out"), ("conv1.4", "channel"), ("conv1.6", "in")])
    assert [(s.module, s.kind) for s in plain.sites] == [("conv1.6", "input")]
    assert _slices(groups["layer3.0.conv1"]) == sorted([
        ("layer3.0.conv1", "out"), ("layer3.0.bn1", "channel"), ("layer3.0.conv2", "in")])
    # the stem's last conv and the residual branch that adds to it are one stream, with every BatchNorm on it
    stem = groups["conv1.6"]
    assert stem.coupled and set(stem.producers) == {"conv1.6", "layer1.0.conv2"}
    assert {("bn1", "channel"), ("layer1.0.bn2", "channel"), ("layer1.0.conv1", "in"),
            ("layer2.0.conv1", "in"), ("layer2.0.downsample.1", "in")} <= set(_slices(stem))
    down = groups["layer2.0.conv2"]
    assert set(down.producers) == {"layer2.0.conv2", "layer2.0.downsample.1"}
    assert {("layer2.0.bn2", "channel"), ("layer2.0.downsample.2", "channel")} <= set(_slices(down))
    # timm's classifier produces no group, but its columns go with the last stream's channels
    assert not any("fc" in g.producers for g in groups.values())
    assert ("fc", "in") in _slices(groups["layer4.0.conv2"])
    # every conv's output rows belong to exactly one group
    owners = {}
    for group in groups.values():
        for sl in group.slices:
            if sl.role == "out":
                assert sl.module not in owners, sl.module
                owners[sl.module] = group.name
    assert set(owners) == {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    # on a LightningModule the names are its own ("model." + the timm names), the groups otherwise the same
    wrapped = channel_groups(tiny_classifier("test_resnet"), torch.randn(2, 3, 32, 32))
    assert [g.name for g in wrapped] == [f"model.{n}" for n in groups]
    assert all(_slices(g) == sorted((f"model.{m}", r) for m, r in _slices(groups[g.name[6:]]))
               for g in wrapped)


def test_channel_groups_of_efficientnet_vit_and_convnext():
    eff = {g.name: g for g in channel_groups(_model("test_efficientnet"))}
    expand = eff["blocks.3.0.conv_pw"]  # the depthwise conv and the squeeze-excite gate are sliced along
    assert _slices(expand) == sorted([
        ("blocks.3.0.conv_pw", "out"), ("blocks.3.0.bn1", "channel"), ("blocks.3.0.conv_dw", "channel"),
        ("blocks.3.0.bn2", "channel"), ("blocks.3.0.se.conv_reduce", "in"), ("blocks.3.0.conv_pwl", "in"),
        ("blocks.3.0.se.conv_expand", "out")])
    assert _slices(eff["blocks.3.0.se.conv_reduce"]) == sorted([
        ("blocks.3.0.se.conv_reduce", "out"), ("blocks.3.0.se.conv_expand", "in")])  # feeds a gate, no BN
    assert not any("conv_dw" in p for g in eff.values() for p in g.producers)

    vit = {g.name: g for g in channel_groups(_model("test_vit"))}
    heads = vit["blocks.0.attn.qkv"]  # whole heads: q, k and v rows and the projection's columns
    assert (heads.unit, heads.size, heads.width) == ("head", 2, 32)
    assert _slices(heads) == sorted([("blocks.0.attn.qkv", "out"), ("blocks.0.attn.proj", "in")])
    qkv = next(sl for sl in heads.slices if sl.module == "blocks.0.attn.qkv")
    assert len(qkv.channels) == 3 * 64 and set(qkv.units) == {0, 1}
    assert ("blocks.0.attn", "num_heads", 1) in heads.attrs
    stream = vit["patch_embed.proj"]  # the residual stream: patch embedding, pos_embed, cls_token, every norm
    assert stream.coupled and stream.size == 64
    assert {("pos_embed", "param"), ("cls_token", "param"), ("blocks.5.norm2", "channel"),
            ("norm", "channel"), ("head", "in")} <= set(_slices(stream))
    assert {s.module for s in stream.norm_sites()} == {
        *(f"blocks.{i}.norm{j}" for i in range(6) for j in (1, 2)), "norm"}
    assert sum(g.unit == "head" for g in vit.values()) == 6

    convnext = _model("test_convnext")
    names = [g.name for g in channel_groups(convnext)]
    assert [g.name for g in channel_groups(convnext, include="stages.2*")] == [
        n for n in names if n.startswith("stages.2.")]
    assert [g.name for g in channel_groups(convnext, exclude="*mlp.fc1")] == [
        n for n in names if not n.endswith("mlp.fc1")]  # the streams stay


@pytest.mark.parametrize("model_name", MODELS)
def test_first_k_masks_cut_every_tensor_of_the_first_k_units(model_name):
    model = _model(model_name)
    x = torch.randn(4, 3, 32, 32)
    masks = first_k_channel_masks(model, sparsity=0.5, example_input=x)
    groups = channel_groups(model, x)
    keep = [first_k_keep(g.size, 0.5) for g in groups]
    assert all(not k[: first_k_pruned(k.numel(), 0.5)].any() for k in keep)
    check_unit_masks(model, groups, keep, masks)  # producers, norms, readers' columns; nothing else
    for group in groups:  # explicitly: nothing reads a pruned unit
        k = first_k_pruned(group.size, 0.5)
        for sl in group.slices:
            if sl.role == "in":
                columns = [c for c, u in zip(sl.channels, sl.units) if u < k]
                assert not masks[f"{sl.module}.weight"][:, columns].any(), sl.module
    kept = apply_channel_masks(model, masks)
    assert all(torch.all(model.get_parameter(n)[~m] == 0) for n, m in masks.items())
    handles = restricted_norm_hooks(model, groups, removed_units(groups, keep))
    assert bool(handles) == (model_name in ("test_convnext", "test_vit"))  # LayerNorm-normalised streams
    check_pruned_outputs_zero(model, groups, keep, x)
    for handle in handles:
        handle.remove()
    small = check_masked_equals_sliced(model, groups, keep, x)
    for group in groups:  # every producer is narrower by exactly the rows of the pruned units
        k = first_k_pruned(group.size, 0.5)
        for sl in group.slices:
            if sl.role == "out":
                rows = model.get_submodule(sl.module).weight.shape[0]
                assert small.get_submodule(sl.module).weight.shape[0] == rows - sum(u < k for u in sl.units)
    with torch.no_grad():  # the MaskSet re-zeroes what an update revived
        for name in masks:
            model.get_parameter(name).add_(1.0)
    kept.apply_()
    assert all(torch.all(model.get_parameter(n)[~m] == 0) for n, m in masks.items())


@pytest.mark.parametrize("model_name", ["test_convnext", "test_vit"])
def test_random_channel_masks_are_seeded_and_exact(model_name):
    model = _model(model_name)
    a, b = random_channel_masks(model, sparsity=0.5, seed=3), random_channel_masks(model, 0.5, seed=3)
    c = random_channel_masks(model, 0.5, seed=4)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    groups = channel_groups(model)
    generator = torch.Generator().manual_seed(3)  # the groups draw in order from one generator
    keep = [nested_random_keep(torch.ones(g.size, dtype=torch.bool), 0.5, generator) for g in groups]
    assert all(int(k.sum()) == kept_count(k.numel(), 0.5) for k in keep)
    assert any(not torch.equal(k, first_k_keep(k.numel(), 0.5)) for k in keep)  # not the first k
    check_unit_masks(model, groups, keep, a)
    apply_channel_masks(model, a)
    x = torch.randn(4, 3, 32, 32)
    # the LayerNorms must take their statistics over the kept channels: without the restriction the masked
    # model is not the sliced one
    small = check_masked_equals_sliced(model, groups, keep, x)
    with torch.no_grad():
        assert not torch.allclose(model(x), small(x), atol=1e-3)
