"""Channel-group analysis (lightning_prune.graph): coverage of each structure, exactness, reloading,
tracing."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import lightning_prune as lp
from lightning_prune.graph import (
    CostModel,
    GraphTimeoutError,
    analyse_channels,
    masked_and_sliced,
    slice_units,
)

# one model per structure of the coverage issue:
# (name, create kwargs, input side, the unit kinds it must show)
STRUCTURES = {
    "test_resnet": ({}, 32, {"channel"}),                      # residual stream incl. stem and downsample
    "test_efficientnet": ({}, 32, {"channel"}),                # depthwise convs, squeeze-excite
    "test_convnext": ({}, 32, {"channel"}),                    # LayerNorm stream, depthwise, MLP hidden
    "test_vit": ({"img_size": 32}, 32, {"channel", "head"}),   # pos_embed/cls_token stream, heads, MLP
    "resnext26ts": ({}, 32, {"channel", "conv group"}),        # grouped convolutions
    # grouped convs + squeeze-excite; depth 7: stages of 1-1-4-1 blocks instead of 1-1-4-7 (the same blocks)
    "regnety_002": ({"depth": 7}, 32, {"channel", "conv group"}),
    "mobilenetv3_small_050": ({}, 32, {"channel"}),            # hard-swish/SE, depthwise
    # concatenations read by pre-activation BNs; two layers a dense block instead of 6-12-24-16 (~20 s on 2
    # busy cores; the whole densenet121: tests/test_compress.py::test_compress_real_timm_families, slow)
    "densenet121": ({"block_config": (2, 2, 2, 2)}, 32, {"channel"}),
    "dla34": ({}, 32, {"channel"}),                            # tree aggregation (concatenations)
    # GRN statistics over channels; one block a stage instead of 2-2-6-2 (the same blocks and downsamples)
    "convnextv2_atto": ({"depths": (1, 1, 1, 1)}, 32, {"channel"}),
}


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    kwargs, side, _ = STRUCTURES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    return model, torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))


def _removed(groups, seed: int = 0, share: float = 0.4) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for g in groups:
        n = max(1, min(g.size - 1, int(g.size * share)))
        out[g.name] = sorted(torch.randperm(g.size, generator=gen)[:n].tolist())
    return out


@pytest.fixture(scope="module")
def analysed():
    cache = {}

    def get(name):
        if name not in cache:
            model, x = _model(name)
            cache[name] = (model, x, analyse_channels(model, x))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_every_structure_is_covered_and_removal_is_exact(name, analysed, tmp_path):
    """Coverage near 1; a random share of every group's units masked (zeros at the readers, restricted norms)
    equals the sliced model (float32, 1e-4 relative); the result reloads onto a fresh timm model and
    traces."""
    model, x, analysis = analysed(name)
    assert analysis.coverage >= 0.95, (analysis.coverage, analysis.skipped)
    assert {g.unit for g in analysis.groups} >= STRUCTURES[name][2]
    assert list(analysis.skipped.values()) == ["no layer reads these channels (model output)"]
    removed = _removed(analysis.groups)
    masked, small, sliced = masked_and_sliced(model, x, analysis.groups, removed, seed=3, dtype=torch.float32)
    scale = masked.abs().max()
    assert float((masked - sliced).abs().max() / scale) < 1e-4
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert not small._forward_hooks and not any(m._forward_pre_hooks or m._forward_hooks
                                                for m in small.modules())
    lp.save_compressed(small, tmp_path / "small.pt")
    fresh = lp.load_compressed(tmp_path / "small.pt", timm.create_model(name, num_classes=10,
                                                                        **STRUCTURES[name][0]).eval())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), sliced)
        traced = torch.jit.trace(fresh, x)
        torch.testing.assert_close(traced(x), sliced, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["test_vit", "regnety_002"])
def test_compressed_model_is_accepted_by_torch_export(name, analysed):
    model, x, analysis = analysed(name)
    small = copy.deepcopy(model)
    slice_units(small, analysis.groups, _removed(analysis.groups, seed=1))
    exported = torch.export.export(small, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), small(x))


def test_heads_update_num_heads_and_the_attention_still_runs(analysed):
    model, x, analysis = analysed("test_vit")
    heads = [g for g in analysis.groups if g.unit == "head"]
    assert heads and all(g.size == model.blocks[0].attn.num_heads and g.width == model.blocks[0].attn.head_dim
                         for g in heads)
    small = copy.deepcopy(model)
    slice_units(small, heads, {g.name: [0] for g in heads})
    attn = small.blocks[0].attn
    assert attn.num_heads == model.blocks[0].attn.num_heads - 1
    assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim == 3 * attn.attn_dim
    assert attn.proj.in_features == attn.attn_dim
    small(x)


def test_grouped_convolutions_lose_whole_groups(analysed):
    model, x, analysis = analysed("resnext26ts")
    group = next(g for g in analysis.groups if g.unit == "conv group" and g.size > 2)
    conv = model.get_submodule(group.name)
    assert group.size == conv.groups
    small = copy.deepcopy(model)
    slice_units(small, [group], {group.name: [0, 1]})
    new = small.get_submodule(group.name)
    assert new.groups == conv.groups - 2
    assert new.in_channels == conv.in_channels - 2 * conv.in_channels // conv.groups
    small(x)


def test_include_exclude_and_prune_coupled_narrow_the_groups():
    model, x = _model("test_resnet")
    everything = analyse_channels(model, x)
    assert any(g.coupled for g in everything.groups)
    uncoupled = analyse_channels(model, x, prune_coupled=False)
    assert not any(g.coupled for g in uncoupled.groups) and uncoupled.coverage < everything.coverage
    assert "coupled channels (set prune_coupled=True to gate them together)" in uncoupled.skipped.values()
    only = analyse_channels(model, x, include=["layer4.*"])
    assert only.groups and all(any(p.startswith("layer4.") for p in g.producers) for g in only.groups)
    without = analyse_channels(model, x, exclude=["layer4.*"])
    assert not any(any(p.startswith("layer4.") for p in g.producers) for g in without.groups)


def test_weight_standardised_readers_are_frozen():
    """nf_resnet26's ScaledStdConv2d readers (no group before): frozen into plain convs before their input
    channels go (lightning_prune.graph.frozen), every group exact."""
    model = timm.create_model("nf_resnet26", num_classes=10).eval()
    analysis = analyse_channels(model, torch.randn(2, 3, 32, 32))
    assert analysis.coverage > 0.99, analysis.skipped
    assert any(g.frozen for g in analysis.groups)


@pytest.mark.slow  # two analyses of res2net50 (47 s on a quiet machine)
def test_res2net_split_widths_skipped_by_torch_pruning_and_updated_on_the_operator_graph():
    model = timm.create_model("res2net50_14w_8s", num_classes=10).eval()
    analysis = analyse_channels(model, torch.randn(2, 3, 32, 32), engine="torch-pruning")
    assert analysis.groups and 0.5 < analysis.coverage < 0.95
    assert "a split/chunk with sizes fixed in the model's code" in analysis.skipped.values()
    # on the operator graph the split's width is found in the block's `width` attribute and updated by the
    # removed units (proven at two removal sizes): every group is kept
    analysis = analyse_channels(model, torch.randn(2, 3, 32, 32))
    assert analysis.coverage >= 0.99, analysis.skipped
    assert any(attr == "width" for g in analysis.groups for _, attr, _ in g.attrs)


def test_analysis_stops_with_a_clear_message_past_its_time_limit():
    model, x = _model("densenet121")
    with pytest.raises(GraphTimeoutError, match=r"more than 0.001 s of CPU time .*HINT"):
        analyse_channels(model, x, analysis_time_limit_s=0.001)


def test_cost_model_predicts_torch_pruning_counts(analysed):
    from torch_pruning.utils import count_ops_and_params

    for name in ("test_resnet", "test_vit", "regnety_002"):
        model, x, analysis = analysed(name)
        cost = CostModel(model, x, analysis.groups)
        removed = _removed(analysis.groups, seed=2)
        flops, params = cost.cost(removed)
        small = copy.deepcopy(model)
        slice_units(small, analysis.groups, removed)
        true_flops, true_params = count_ops_and_params(small, x)
        assert params == pytest.approx(true_params, rel=1e-9), name
        assert flops == pytest.approx(true_flops, rel=0.02), name


@pytest.mark.slow  # six real timm families of benchmarks/timm_coverage.py's THIRD list, ~5-10 s CPU each
@pytest.mark.parametrize("name, kwargs, side, least", [
    ("eva02_tiny_patch14_224", {"img_size": 56}, 56, 0.99),  # rotary pairs within the heads (was 0.44)
    ("pvt_v2_b0", {}, 64, 0.95),  # one head, N == C == 64 (was 0.88)
    ("fasternet_t0", {}, 64, 0.99),  # split sizes in one attribute per piece (was 0.57)
    ("shvit_s1", {}, 64, 0.99),  # [pdim, dim - pdim] and one attribute for several sizes (was 0.49)
    ("efficientvit_m0", {"img_size": 64}, 64, 0.95),  # val_dim shared by the cascaded heads (was 0.47)
    ("xcit_nano_12_p16_224", {"img_size": 64}, 64, 0.99),  # a parameter viewed with literal sizes
])
def test_third_list_families_keep_their_operator_graph_groups(name, kwargs, side, least, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    x = torch.randn(2, 3, side, side)
    analysis = analyse_channels(model, x)
    assert analysis.coverage >= least, analysis.skipped
    assert not any("operator graph" in key for key in analysis.skipped), analysis.skipped
    small = copy.deepcopy(model)
    slice_units(small, analysis.groups, {g.name: [0] for g in analysis.groups})
    lp.save_compressed(small, tmp_path / "small.pt")
    fresh = timm.create_model(name, num_classes=10, **kwargs).eval()
    fresh = lp.load_compressed(tmp_path / "small.pt", fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), small(x))


@pytest.mark.slow  # beit_base (86M parameters)
def test_beit_reloads_with_its_sliced_non_persistent_k_bias(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", img_size=32, depth=2, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    analysis = analyse_channels(model, x)
    heads = [g for g in analysis.groups if g.unit == "head"]
    assert heads, analysis.skipped
    small = copy.deepcopy(model)
    slice_units(small, heads, {g.name: [0] for g in heads})
    lp.save_compressed(small, tmp_path / "small.pt")
    fresh = timm.create_model("beit_base_patch16_224", img_size=32, depth=2, num_classes=10).eval()
    fresh = lp.load_compressed(tmp_path / "small.pt", fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), small(x))


def test_every_module_keeps_its_mode_through_analysis_cost_and_compression():
    """A model in train mode with submodules the user keeps in eval mode (a frozen BatchNorm; a
    weight-standardised conv that the compression freezes): the analysis (both engines), the FLOPs count, the
    cost model and lp.compress leave every module's ``training`` flag as it was (they used to push the
    model's own flag down to every submodule); a frozen layer keeps the flag of the layer it replaced."""
    from timm.layers import StdConv2d

    from lightning_prune.graph import CostModel, count_ops_and_params, frozen_names

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Sequential(StdConv2d(8, 8, 3, padding=1), nn.ReLU()), nn.Conv2d(8, 6, 1),
                          nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 3))
    model.train()
    model[1].eval()
    model[3].eval()
    modes = {n: m.training for n, m in model.named_modules()}
    x = torch.randn(2, 3, 8, 8)

    def same():
        return {n: m.training for n, m in model.named_modules()} == modes

    groups = analyse_channels(model, x).groups
    assert same() and groups
    analyse_channels(model, x, engine="torch-pruning")
    assert same()
    count_ops_and_params(model, x)
    assert same()
    CostModel(model, x, groups)
    assert same()
    lp.compress(model, x, groups=groups, removed={g.name: [0, 1] for g in groups}, round_to=1, verify=False)
    assert frozen_names(model) == ["3.0"] and same()
