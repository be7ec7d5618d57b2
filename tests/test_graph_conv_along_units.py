"""Convolutions along a unit dimension (lightning_prune.graph.along): ECA's conv1d sliding over the channel
vector is a slide site (zeros at the removed units, run at the dense width once they are sliced), a kernel of
1 along the units (timm's LambdaLayer) passes them through -- found, proven exact, saved, reloaded, traced,
exported, removed again, and removed inside a Lightning fit."""

import copy

import pytest
import torch
from torch import nn

import lightning_prune as lp
from lightning_prune.graph import (
    AlongUnitsConv1d,
    along_units_layers,
    analyse_channels,
    masked_and_sliced,
    slice_units,
)

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class _Eca(nn.Module):
    """timm's EcaModule: a conv1d sliding along the pooled channel vector, its sigmoid gating the channels."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x):
        y = x.mean((2, 3)).view(x.shape[0], 1, -1)
        y = self.conv(y).sigmoid().view(x.shape[0], -1, 1, 1)
        return x * y.expand_as(x)


class _EcaNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.c1, self.b1, self.eca = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), _Eca()
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.eca(torch.relu(self.b1(self.c1(x))))
        return self.head(torch.relu(self.b2(self.c2(x))).mean((2, 3)))


class _LambdaNet(nn.Module):
    """timm's LambdaLayer's position lambdas: ``nn.Conv3d(1, K, (r, r, 1))`` over ``v`` viewed as
    ``(B, 1, H, W, V)``: a kernel of 1 (no padding) along the value channels."""

    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Conv2d(3, 12, 1)
        self.conv_lambda = nn.Conv3d(1, 4, (3, 3, 1), padding=(1, 1, 0))
        self.out = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        v = self.v(x).permute(0, 2, 3, 1)  # B, H, W, V
        lam = self.conv_lambda(v.reshape(b, 1, h, w, -1)).mean(1)  # B, H, W, V
        return self.out(torch.relu(lam + v).permute(0, 3, 1, 2)).mean((2, 3))


def _group(groups, name):
    return next(g for g in groups if g.name == name)


def test_eca_channels_are_a_slide_site_proven_exact():
    """The channels ECA's conv1d slides along form a group (before: skipped, 'a convolution slides along
    these channels'), with the conv as a slide site; masked (zeros in its input) equals sliced (the conv at
    the dense width) in float64, and the conv's weight is untouched."""
    torch.manual_seed(0)
    model = _EcaNet().eval()
    analysis = analyse_channels(model, X)
    group = _group(analysis.groups, "c1")
    slide = group.slide_sites()
    assert [(s.module, s.dim, s.extent, len(s.channels)) for s in slide] == [("eca.conv", 2, 16, 16)]
    assert not any("slides along" in why for why in analysis.skipped.values())
    removed = {"c1": [1, 4, 5, 9]}
    masked, sliced, out = masked_and_sliced(model, X, [group], removed)
    torch.testing.assert_close(out, masked, atol=1e-12, rtol=0)
    conv = sliced.eca.conv
    assert isinstance(conv, AlongUnitsConv1d) and conv.dense_size == 16 and conv.unit_dim == 2
    assert conv.kept_index.tolist() == [i for i in range(16) if i not in removed["c1"]]
    assert conv.weight.shape == model.eca.conv.weight.shape and sliced.c2.in_channels == 12
    # the same removal with the conv sliding over the kept channels only (neighbours changed) is not exact
    naive = copy.deepcopy(sliced)
    naive.eca.conv.__class__ = nn.Conv1d
    assert not torch.allclose(naive(X.double()), masked, atol=1e-6)


def test_gates_closed_at_zero_are_zeros_at_the_slide_site():
    """A gate set on the ECA net: the ECA conv sees zeros at the units whose gate is exactly zero and the
    others ungated; folded (the other values into the weight columns) and sliced, the model computes what
    the gated one computed."""
    from lightning_prune.core.gates import GateSet, ScaleGate

    torch.manual_seed(0)
    model = _EcaNet().double().eval()
    x = X.double()
    groups = [_group(analyse_channels(model, x).groups, "c1")]
    gate = ScaleGate(16).double()
    with torch.no_grad():
        gate.weight.copy_(torch.rand(16, dtype=torch.float64) + 0.5)
        gate.weight[[2, 3, 11]] = 0.0
    gates = GateSet(groups, [gate])
    gates.attach(model)
    with torch.no_grad():
        gated = model(x)
        gates.fold_(model)
    gates.detach()
    slice_units(model, groups, {"c1": [2, 3, 11]})
    with torch.no_grad():
        torch.testing.assert_close(model(x), gated, atol=1e-12, rtol=0)


def test_a_kernel_of_one_along_the_units_passes_them_through():
    """LambdaLayer's conv3d with a kernel of 1 (no padding) along the value channels mixes nothing there: the
    channels of ``v`` form one group read by ``out``, no slide site, the conv3d untouched after slicing."""
    torch.manual_seed(0)
    model = _LambdaNet().eval()
    analysis = analyse_channels(model, X)
    group = _group(analysis.groups, "v")
    assert [s.module for s in group.input_sites()] == ["out"] and not group.slide_sites()
    masked, sliced, out = masked_and_sliced(model, X, [group], {"v": [0, 3, 7]})
    torch.testing.assert_close(out, masked, atol=1e-12, rtol=0)
    assert type(sliced.conv_lambda) is nn.Conv3d and sliced.v.out_channels == 9
    assert not along_units_layers(sliced)


def test_save_load_trace_export_and_a_second_removal(tmp_path):
    """A compressed ECA net saves and reloads onto a fresh model (save_compressed and save_sparse: the conv
    run at the dense width again, its kept positions from the state), traces and exports; analysed again, a
    second removal composes the kept positions and stays exact."""
    torch.manual_seed(0)
    model = _EcaNet().double().eval()
    x = X.double()
    groups = analyse_channels(model, x).groups
    lp.compress(model, x, groups=groups, removed={"c1": [1, 4, 5, 9]}, round_to=1, verify=False)
    assert along_units_layers(model) == {"eca.conv": [2, 16]}
    with torch.no_grad():
        reference = model(x)
    lp.save_compressed(model, tmp_path / "small.pt")
    fresh = lp.load_compressed(tmp_path / "small.pt", _EcaNet().double().eval())
    assert isinstance(fresh.eca.conv, AlongUnitsConv1d)
    assert torch.equal(fresh.eca.conv.kept_index, model.eca.conv.kept_index)
    lp.save_sparse(model, tmp_path / "small.sparse.pt")
    sparse = lp.load_sparse(tmp_path / "small.sparse.pt", _EcaNet().double().eval())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), reference, atol=0, rtol=0)
        torch.testing.assert_close(sparse(x), reference, atol=0, rtol=0)
        torch.testing.assert_close(torch.jit.trace(fresh, x)(x), reference, atol=1e-12, rtol=0)
        torch.testing.assert_close(torch.export.export(fresh, (x,)).module()(x), reference, atol=1e-12,
                                   rtol=0)
    # the second removal: analysed on the compressed model (positions of the wrapped conv's input)
    again = analyse_channels(fresh, x)
    group = _group(again.groups, "c1")
    assert group.size == 12 and [(s.module, s.extent) for s in group.slide_sites()] == [("eca.conv", 12)]
    masked, sliced, out = masked_and_sliced(fresh, x, [group], {"c1": [0, 2]})
    torch.testing.assert_close(out, masked, atol=1e-12, rtol=0)
    assert sliced.eca.conv.kept_index.tolist() == [2, 6, 7, 8, 10, 11, 12, 13, 14, 15]
    assert sliced.eca.conv.dense_size == 16
    twice = copy.deepcopy(fresh)
    slice_units(twice, [group], {"c1": [0, 2]})
    assert torch.equal(twice.eca.conv.kept_index, sliced.eca.conv.kept_index)


def test_a_compressed_eca_net_scripts():
    """torch.jit.script takes the conv run at the dense width (real annotations, the conv called directly)."""
    import warnings

    torch.manual_seed(0)
    model = _EcaNet().double().eval()
    x = X.double()
    lp.compress(model, x, groups=analyse_channels(model, x).groups, removed={"c1": [1, 4, 5, 9]}, round_to=1,
                verify=False)
    assert along_units_layers(model) == {"eca.conv": [2, 16]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.jit.script is deprecated, still used)
        scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), atol=0, rtol=0)


class _TwoDims(nn.Module):
    """A conv2d sliding along the units of two groups at once: ``a``'s in its dim 2, ``b``'s in its dim 3."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 5, 1)
        self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        self.lb, self.la = nn.Linear(5, 2), nn.Linear(4, 2)

    def forward(self, x):
        a, b = self.a(x).mean((2, 3)), self.b(x).mean((2, 3))
        y = self.lb(self.conv(a[:, None, :, None] * b[:, None, None, :]))
        return self.la(y.transpose(2, 3)).flatten(1)


def test_a_conv_sliding_along_two_unit_dims_is_refused():
    """A conv runs at the dense width along one dim: one sliding along units in two of its dims is refused
    (both groups, with the reason; before, each was a slide site on its own dim), and a layer run at the
    dense width along one dim is not silently taken for another."""
    from lightning_prune.graph.along import along_units, keep_positions

    analysis = analyse_channels(_TwoDims().eval(), X)
    assert not analysis.groups
    assert all("slides along units in 2 of its dims" in analysis.skipped[g] for g in ("a", "b"))
    conv = along_units(nn.Conv2d(1, 1, 3, padding=1), 2, 6)
    assert along_units(conv, -2, 6) is conv
    with pytest.raises(ValueError, match="along its dim 2 already, not along 3"):
        keep_positions(conv, 3, 6, [1])
    with pytest.raises(ValueError, match="along its dim 2 already, not along 3"):
        along_units(conv, 3, 6)
    keep_positions(conv, 2, 6, [1])
    assert conv.kept_index.tolist() == [0, 2, 3, 4, 5]


def test_compress_of_a_masked_model_leaves_the_eca_read_dead_units():
    """lp.compress on a model whose units are dead only at the weight columns (a masked model without the
    callback's hooks): the ECA conv still sees those channels, so their removal would change the outputs;
    the group is left as it is (as LayerNorm-read ones), the others go, the outputs are unchanged."""
    torch.manual_seed(0)
    model = _EcaNet().eval()
    with torch.no_grad():
        model.c2.weight[:, [1, 2]] = 0.0  # c1's units 1, 2: no weight column reads them
        model.head.weight[:, [3, 5]] = 0.0  # c2's units 3, 5: only the head reads them
        reference = model(X)
    lp.compress(model, X, round_to=1)
    assert model.c1.out_channels == 16 and not along_units_layers(model)
    assert model.c2.out_channels == 14
    with torch.no_grad():
        torch.testing.assert_close(model(X), reference, atol=1e-5, rtol=1e-5)


def _eca_classifier():
    from lightning_prune.testing import classifier_around

    torch.manual_seed(0)
    return classifier_around(_EcaNet(10))


def test_group_lasso_compress_through_eca(tmp_path):
    """GroupLassoPruning(target_flops=0.5, compress=True) on a tiny ECA net: units read by the ECA conv are
    removed inside the fit after the first step (the in-fit compression verifies that the outputs of the
    finalised masked model, whose ECA conv sees zeros at the dropped units, are unchanged), the next step
    trains through the conv at the dense width, and the Lightning checkpoint reloads onto a fresh module,
    restores for deployment and resumes (the recorded plan re-applied before the weights load)."""
    from lightning_prune.testing import fit_tiny

    def callback():
        return lp.GroupLassoPruning(target_flops=0.5, compress=True, finalize_step=1,
                                    recalibrate_bn_batches=0, round_to=1, verbose=False)

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cb = callback()
    module = _eca_classifier()
    trainer, _ = fit_tiny([cb], tmp_path, model=module, max_epochs=1, limit_train_batches=2,
                          limit_val_batches=0)
    assert cb.finalized and any(g.slide_sites() for g in cb.groups) and cb.shrink.removed["model.c1"]
    conv = module.model.eca.conv
    assert isinstance(conv, AlongUnitsConv1d)
    assert conv.kept_index.numel() == 16 - len(cb.shrink.removed["model.c1"])
    assert module.model.c2.in_channels == conv.kept_index.numel()
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(conv.weight) in held  # the same parameter: the optimizer still trains it
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    fresh = lp.load_compressed(path, _eca_classifier())
    assert torch.equal(fresh.model.eca.conv.kept_index, conv.kept_index)
    fresh.eval(), module.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), module(x), atol=1e-6, rtol=1e-6)
    bare = lp.restore_run(path, _eca_classifier(), compress=False)  # deployment, without the callback
    assert torch.equal(bare.module.model.eca.conv.kept_index, conv.kept_index)
    resumed = _eca_classifier()
    fit_tiny([callback()], tmp_path, model=resumed, ckpt_path=path, max_epochs=2, limit_train_batches=1,
             limit_val_batches=0)
    assert torch.equal(resumed.model.eca.conv.kept_index, conv.kept_index)


@pytest.mark.slow
def test_timm_eca_and_lambda_resnets_are_covered():
    """timm's ecaresnet26t and lambda_resnet26t: no group skipped for a convolution along the units."""
    import timm

    for name in ("ecaresnet26t", "lambda_resnet26t"):
        model = timm.create_model(name, num_classes=10).eval()
        analysis = analyse_channels(model, torch.randn(1, 3, 64, 64))
        assert not any("slides along" in why for why in analysis.skipped.values()), name
        assert analysis.coverage > 0.9, name
