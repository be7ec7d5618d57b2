"""Readers that compute their weight from their parameters (weight-standardised convs, ``weight_norm``):
frozen into plain layers before their input channels go (lightning_prune.graph.frozen), so that their groups
are exact -- in the analysis, the one-shot removal, the gate fits' in-fit compression and the reload."""

import pytest
import torch
from timm.layers import ScaledStdConv2d, StdConv2d, StdConv2dSame
from torch import nn

from lightning_prune.graph import (
    FrozenConv2d,
    FrozenLinear,
    analyse_channels,
    freeze,
    frozen_names,
    masked_and_sliced,
)
from lightning_prune.graph.frozen import computed_weight, freeze_reason

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class _WSNet(nn.Module):
    """Weight-standardised convs (a StdConv2d under a GroupNorm of 2 groups, a ScaledStdConv2d, a
    StdConv2dSame padding dynamically at stride 2) and a ``weight_norm`` Linear reading each other."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.c1, self.n1 = StdConv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.c2 = ScaledStdConv2d(8, 8, 3, padding=1)
        self.c3 = StdConv2dSame(8, 12, 3, stride=2)
        self.l1 = nn.utils.parametrizations.weight_norm(nn.Linear(12, 16))
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.n1(self.c1(x)))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x)).mean((2, 3))
        return self.head(torch.relu(self.l1(x)))


def test_computed_weight_is_found_by_running_the_layer():
    """The weight a layer's forward computes is recorded (no list of classes); a plain layer has none; the
    frozen layer computes what the layer computed (timm's dynamic SAME padding too, at an odd size)."""
    assert computed_weight(nn.Conv2d(3, 4, 3)) is None and computed_weight(nn.Linear(3, 4)) is None
    x = torch.randn(2, 4, 9, 11)
    for layer in (StdConv2d(4, 6, 3), ScaledStdConv2d(4, 6, 3, stride=2), StdConv2dSame(4, 6, 3, stride=2),
                  nn.utils.parametrizations.weight_norm(nn.Linear(11, 3))):
        holder = nn.Sequential(layer)
        before = holder(x)
        assert freeze_reason(layer) is None and freeze(holder, "0")
        assert type(holder[0]) in (FrozenConv2d, FrozenLinear)
        torch.testing.assert_close(holder(x), before, atol=1e-6, rtol=1e-6)
    assert StdConv2dSame(4, 6, 3, stride=2).same_pad and freeze(holder := nn.Sequential(
        StdConv2dSame(4, 6, 3, stride=2)), "0") and holder[0].same_pad


def test_a_weight_computation_with_state_is_left_alone():
    """A spectral-norm Linear in train mode advances its ``_u`` at every forward: the probe leaves its buffers
    as they were and the layer is not frozen (its computed weight is not a function of its parameters)."""
    torch.manual_seed(0)
    for norm in (nn.utils.spectral_norm, nn.utils.parametrizations.spectral_norm):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), norm(nn.Linear(8, 6)), nn.ReLU(),
                              nn.Linear(6, 3)).train()
        before = {k: v.clone() for k, v in model.named_buffers()}
        assert "has state" in freeze_reason(model[2])
        assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())
        if norm is nn.utils.spectral_norm:  # (the parametrised one's trace in train mode advances it)
            groups = analyse_channels(model, torch.randn(2, 4)).groups
            assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())
            assert not any(g.frozen for g in groups)


def test_a_frozen_weight_joins_the_param_group_of_the_weight_it_replaces():
    """timm's decay/no-decay groups (no-decay first, holding the weight_norm Linear's bias): the frozen
    Linear's new ``weight`` joins the decay group of its ``parametrizations.weight.original*``, as an
    optimizer made afresh puts it, so that a resume's ``load_state_dict`` loads."""
    from timm.optim import param_groups_weight_decay

    from lightning_prune.callbacks.shrink import carry_optimizer_state

    model = _WSNet()
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, 0.05))
    assert optimizer.param_groups[0]["weight_decay"] == 0.0
    model(X).sum().backward()
    optimizer.step()
    old = {id(p): n for n, p in model.named_parameters()}
    assert freeze(model, "l1") and freeze(model, "c2")
    carry_optimizer_state([optimizer], old, dict(model.named_parameters()), {}, {"l1.weight", "c2.weight"})
    names = {id(p): n for n, p in model.named_parameters()}
    fresh = torch.optim.AdamW(param_groups_weight_decay(model, 0.05))
    assert ([[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
            == [[names[id(p)] for p in g["params"]] for g in fresh.param_groups])
    fresh.load_state_dict(optimizer.state_dict())


def test_ws_readers_are_frozen_and_the_groups_proven_exact():
    """Every group read by a weight-standardised conv or a weight_norm Linear is found, names those readers
    as frozen, and the masked model equals the sliced one, whose readers became plain layers."""
    model = _WSNet().eval()
    analysis = analyse_channels(model, X)
    groups = {g.name: g for g in analysis.groups}
    assert set(groups) == {"c1", "c2", "c3", "l1"}, analysis.skipped
    assert groups["c2"].frozen == ("c3",) and groups["c3"].frozen == ("l1",)
    assert groups["c1"].unit == "norm group" and groups["c1"].width == 4  # whole GroupNorm groups
    assert analysis.coverage > 0.9
    removed = {name: [0] for name in groups}
    masked, sliced, out = masked_and_sliced(model, X, analysis.groups, removed)
    torch.testing.assert_close(out, masked, atol=1e-10, rtol=1e-10)
    assert set(frozen_names(sliced)) == {"c2", "c3", "l1"}
    assert isinstance(model.c3, StdConv2dSame)  # the model itself is untouched
    assert sliced.c3.same_pad and sliced.n1.num_groups == 1 and sliced.c3.in_channels == 7


def test_weight_norm_convs_are_frozen_on_both_sides():
    """A weight_norm conv has no weight parameter to slice: it is frozen whichever side loses units, and its
    groups are exact."""
    norm = nn.utils.parametrizations.weight_norm

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = norm(nn.Conv2d(3, 8, 3, padding=1)), norm(nn.Conv2d(8, 8, 3, padding=1))
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))

    analysis = analyse_channels(Net().eval(), X)
    assert {g.name: g.frozen for g in analysis.groups} == {"a": ("a", "b"), "b": ("b",)}, analysis.skipped


def test_one_shot_channels_on_a_ws_net():
    """prune_one_shot(method="channels") refits the frozen readers' computed weights: the masked model (not
    compressed) and the compressed one agree, and the readers that lost inputs are plain convs."""
    import copy

    from lightning_prune.core.one_shot import prune_one_shot

    torch.manual_seed(0)
    model = _WSNet().double().eval()
    batches = [torch.randn(4, 3, 16, 16, dtype=torch.float64) for _ in range(2)]
    masked = copy.deepcopy(model)
    result = prune_one_shot(masked, batches, method="channels", target_flops=0.6, calibration_batches=2,
                            compress=False)
    small = copy.deepcopy(model)
    again = prune_one_shot(small, batches, method="channels", target_flops=0.6, calibration_batches=2)
    assert result.removed == again.removed and any(result.removed.values())
    assert frozen_names(small) and all(isinstance(small.get_submodule(n), (FrozenConv2d, FrozenLinear))
                                       for n in frozen_names(small))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(small(batches[0]), masked(batches[0]), atol=1e-9, rtol=1e-9)


def test_compressed_ws_model_saves_and_reloads(tmp_path):
    """lp.compress of units read by weight-standardised convs and a weight_norm Linear, save_compressed,
    load_compressed onto a fresh model: the frozen plain layers are rebuilt, the outputs are the same."""
    import lightning_prune as lp

    torch.manual_seed(0)
    model = _WSNet().double().eval()
    groups = analyse_channels(model, X.double()).groups
    with torch.no_grad():
        reference = model(X.double())
    lp.compress(model, X.double(), groups=groups, removed={"c2": [1, 4], "c3": [0]}, round_to=1, verify=False)
    assert {"c3", "l1"} <= set(frozen_names(model))
    path = tmp_path / "small.pt"
    lp.save_compressed(model, path)
    torch.manual_seed(1)
    fresh = lp.load_compressed(path, _WSNet().double().eval())
    assert isinstance(fresh.c3, FrozenConv2d) and fresh.c3.same_pad and fresh.c3.in_channels == 6
    with torch.no_grad():
        torch.testing.assert_close(fresh(X.double()), model(X.double()), atol=0, rtol=0)
        assert not torch.allclose(fresh(X.double()), reference)  # units of a live model went: not a no-op
    lp.save_sparse(model, tmp_path / "small.sparse.pt")  # the sparse file rebuilds the same structure
    sparse = lp.load_sparse(tmp_path / "small.sparse.pt", _WSNet().double().eval())
    assert isinstance(sparse.c3, FrozenConv2d) and isinstance(sparse.l1, FrozenLinear)
    with torch.no_grad():
        torch.testing.assert_close(sparse(X.double()), model(X.double()), atol=0, rtol=0)


def test_dead_units_of_a_ws_reader_are_read_from_its_computed_weight():
    """A zero column of a weight-standardised conv's parameter is no zero column of the weight it computes:
    not dead. Zero columns of the computed weight (a frozen conv) are."""
    from lightning_prune.core.compression import dead_units

    model = _WSNet().eval()
    groups = [g for g in analyse_channels(model, X).groups if g.name == "c2"]
    with torch.no_grad():
        model.c3.weight[:, 2] = 0
    assert dead_units(model, groups) == {}
    freeze(model, "c3")
    with torch.no_grad():
        model.c3.weight[:, 2] = 0
    assert dead_units(model, groups) == {"c2": [2]}


def test_flops_count_ws_and_frozen_convs_as_convs():
    """torch-pruning's counter looks layers up by exact type: a StdConv2d (and a frozen conv) counted nothing.
    count_ops_and_params counts them as the convs they are."""
    from lightning_prune.graph import count_ops_and_params

    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False))
    ws = nn.Sequential(StdConv2d(3, 8, 3, padding=1))
    flops = count_ops_and_params(plain, X)[0]
    assert flops > 0 and count_ops_and_params(ws, X)[0] == flops
    freeze(ws, "0")
    assert count_ops_and_params(ws, X)[0] == flops
    from torch_pruning.utils import op_counter  # torch-pruning's global mapping: the user's kept, restored

    mine = {nn.Identity: lambda module, inputs, output: None}
    op_counter.CUSTOM_MODULES_MAPPING = mine
    try:
        assert count_ops_and_params(ws, X)[0] == flops
        assert op_counter.CUSTOM_MODULES_MAPPING is mine
    finally:
        op_counter.CUSTOM_MODULES_MAPPING = {}


def test_timm_test_nfnet_is_covered():
    """timm's test_nfnet (ScaledStdConv2d readers everywhere; nothing was gateable before): every
    conv's output channels sit in an exact group."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_nfnet", num_classes=10).eval()
    analysis = analyse_channels(model, torch.randn(2, 3, 32, 32))
    assert analysis.coverage > 0.99 and sum(bool(g.frozen) for g in analysis.groups) >= 10, analysis.skipped


def _ws_classifier():
    from lightning_prune.testing import tiny_classifier

    return tiny_classifier("test_nfnet")


@pytest.mark.parametrize("make", [pytest.param("ws_net", id="ws_net"),
                                  pytest.param("test_nfnet", id="test_nfnet", marks=pytest.mark.slow)])
def test_group_lasso_compress_on_a_ws_net(tmp_path, make):
    """GroupLassoPruning(compress=True) on the WS net and on timm's test_nfnet (ScaledStdConv2d everywhere):
    its groups are found through the weight-standardised readers, a few steps remove units, and the
    compressed logits equal the gated ones; the Lightning checkpoint of the compressed fit reloads onto a
    fresh module."""
    import lightning_prune as lp
    from lightning_prune.callbacks.group_lasso import GroupLassoPruning
    from lightning_prune.testing import fit_tiny
    from tests.helpers import logits_around_train_end

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cb = GroupLassoPruning(finalize_step=1.0, compress=True, recalibrate_bn_batches=0, round_to=1, lam=0.3,
                           gate_lr=0.2, gate_optimizer="sgd", capture_threshold=0.02, prune_threshold=0.3,
                           verbose=False)
    create = _ws_net_classifier if make == "ws_net" else _ws_classifier
    module = create()
    dense = sum(p.numel() for p in module.parameters())
    callbacks, seen = logits_around_train_end(cb, x)
    trainer, _ = fit_tiny(callbacks, tmp_path, model=module, max_epochs=1, limit_train_batches=2,
                          limit_val_batches=0)
    assert cb.finalized and any(g.frozen for g in cb.groups)
    assert sum(p.numel() for p in module.parameters()) < dense
    assert cb.shrink.frozen and set(cb.shrink.frozen) <= set(frozen_names(module))
    torch.testing.assert_close(seen["compressed"], seen["gated"], atol=1e-4, rtol=1e-4)
    optimizer = trainer.optimizers[0]
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held for p in module.parameters())  # the frozen layers train on
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    fresh = lp.load_compressed(path, create())
    assert set(frozen_names(fresh)) == set(frozen_names(module))
    fresh.eval(), module.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), module(x), atol=1e-6, rtol=1e-6)
    if make != "ws_net":
        return
    # a recorded frozen layer the fresh model cannot freeze (a plain layer, a missing one): the clear error
    from lightning_prune.errors import InvalidArgumentError

    payload = torch.load(path, weights_only=False)
    for bad, match in (("model.head", "does not compute its weight"), ("model.nope", "has no layer")):
        for state in payload["callbacks"].values():
            if isinstance(state, dict) and isinstance(state.get("shrink"), dict):
                state["shrink"]["frozen"] = [*cb.shrink.frozen, bad]
        torch.save(payload, tmp_path / "bad.ckpt")
        with pytest.raises(InvalidArgumentError, match=f"`{bad}`.*{match}"):
            lp.load_compressed(tmp_path / "bad.ckpt", create())


def _ws_net_classifier():
    from lightning_prune.testing import classifier_around

    torch.manual_seed(0)
    return classifier_around(_WSNet(10))


@pytest.mark.parametrize("owner", ["group_lasso", "one_shot"])
def test_a_mask_callback_on_a_frozen_reader_is_refused(tmp_path, owner):
    """Freezing replaces a WS reader by a plain layer: another pruning callback targeting it (its masks of
    the raw weight) is refused at fit start, by name."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    import lightning_prune as lp
    from lightning_prune.callbacks.group_lasso import GroupLassoPruning
    from lightning_prune.testing import fit_tiny

    if owner == "group_lasso":
        cb = GroupLassoPruning(finalize_step=1, compress=False, recalibrate_bn_batches=0, round_to=1, lam=0.3,
                               gate_lr=0.2, gate_optimizer="sgd", verbose=False)
    else:
        cb = lp.OneShotPruning(method="channels", target_sparsity=0.25, prune_step=1, verbose=False)
    gmp = lp.GradualMagnitudePruning(target_sparsity=0.5, every_n_steps=1, sparsity_end_step=3, verbose=False)
    with pytest.raises(MisconfigurationException, match="GradualMagnitudePruning.*HINT"):
        fit_tiny([cb, gmp], tmp_path, model=_ws_net_classifier(), max_epochs=1, limit_train_batches=2,
                 limit_val_batches=0)


def test_resume_after_the_readers_were_frozen(tmp_path):
    """GroupLassoPruning(compress=False) finalises (its readers frozen, the units masked): a checkpoint of
    that fit resumes onto a fresh module, whose readers are frozen again before the weights load."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_prune.callbacks.group_lasso import GroupLassoPruning
    from lightning_prune.testing import fit_tiny

    def callback():
        return GroupLassoPruning(finalize_step=1, compress=False, recalibrate_bn_batches=0, round_to=1,
                                 lam=0.3, gate_lr=0.2, gate_optimizer="sgd", verbose=False)

    first = callback()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    module = _ws_net_classifier()
    fit_tiny([first, ckpt], tmp_path, model=module, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    assert first.finalized and first.shrink.frozen
    second = callback()
    fresh = _ws_net_classifier()
    fit_tiny([second], tmp_path, model=fresh, ckpt_path=tmp_path / "last.ckpt", max_epochs=2,
             limit_train_batches=1, limit_val_batches=0)
    assert set(frozen_names(fresh)) == set(frozen_names(module)) and second.shrink.frozen
    # restored for deployment, with the run's callback (compressed) and without it: the readers frozen again
    import lightning_prune as lp

    run = lp.restore_run(tmp_path / "last.ckpt", _ws_net_classifier(), [callback()], compress=True)
    try:
        assert set(frozen_names(run.module)) >= set(frozen_names(module))
    finally:
        run.close()
    bare = lp.restore_run(tmp_path / "last.ckpt", _ws_net_classifier(), compress=False)
    assert set(frozen_names(bare.module)) == set(frozen_names(module))


@pytest.mark.slow
def test_nf_regnet_b0_coverage():
    """nf_regnet_b0 (ScaledStdConv2d readers everywhere): nearly all of it is prunable, every group exact
    (0.27 before the readers were frozen)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("nf_regnet_b0", num_classes=10).eval()
    analysis = analyse_channels(model, torch.randn(2, 3, 64, 64))
    assert analysis.coverage >= 0.7, analysis.skipped


def test_a_frozen_state_does_not_load_silently_into_the_unfrozen_model():
    """A frozen layer's computed weight loaded as the raw weight of the layer that computes it would be
    standardised once more (other outputs, no error): the frozen layer's marker buffer makes a strict plain
    load of such a state fail by name; refreezing first (what lightning-prune's loaders do) loads it."""
    from lightning_prune.graph import FROZEN_MARKER, frozen_in_state, refreeze

    torch.manual_seed(0)
    model = _WSNet().eval()
    assert freeze(model, "c1") and freeze(model, "l1")  # (frozen as compress=False leaves them: same shapes)
    model.double()
    assert model.c1.get_buffer(FROZEN_MARKER).dtype == torch.long  # (a dtype cast leaves the marker alone)
    state = model.state_dict()
    assert frozen_in_state(state) == ["c1", "l1"]
    with pytest.raises(RuntimeError, match=f"Unexpected key.*c1.{FROZEN_MARKER}"):
        _WSNet().double().load_state_dict(state)
    fresh = _WSNet().double().eval()
    assert refreeze(fresh, frozen_in_state(state), "the state") == ["c1", "l1"]
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(X.double()), model(X.double()), atol=0, rtol=0)


def test_a_state_written_before_the_marker_existed_still_loads(tmp_path):
    """Files and checkpoints written before the frozen layers held FROZEN_MARKER lack its key: a frozen layer
    takes such a state strictly (lp.load_compressed, lp.load_sparse, a plain load into the refrozen model); a
    state holding the marker still fails on a model whose layer computes its weight."""
    import lightning_prune as lp
    from lightning_prune.graph import FROZEN_MARKER, refreeze

    torch.manual_seed(0)
    model = _WSNet().double().eval()
    groups = analyse_channels(model, X.double()).groups
    lp.compress(model, X.double(), groups=groups, removed={"c2": [1, 4]}, round_to=1, verify=False)
    assert "c3" in frozen_names(model)
    path = tmp_path / "old.pt"
    lp.save_compressed(model, path)
    saved = torch.load(path, weights_only=False)
    state = saved["state_dict"]
    for key in [k for k in state if k.endswith(FROZEN_MARKER)]:
        del state[key]
    torch.save(saved, path)
    fresh = lp.load_compressed(path, _WSNet().double().eval())
    assert isinstance(fresh.c3, FrozenConv2d)
    lp.save_sparse(model, tmp_path / "old.sparse.pt")  # (its own key list names the marker too)
    sparse = torch.load(tmp_path / "old.sparse.pt", weights_only=False)
    sparse["keys"] = [k for k in sparse["keys"] if not k.endswith(FROZEN_MARKER)]
    sparse["dense"] = {k: v for k, v in sparse["dense"].items() if not k.endswith(FROZEN_MARKER)}
    torch.save(sparse, tmp_path / "old.sparse.pt")
    loaded = lp.load_sparse(tmp_path / "old.sparse.pt", _WSNet().double().eval())
    plain = _WSNet().double().eval()
    refreeze(plain, ["c1", "l1"], "the state")
    old = {k: v for k, v in plain.state_dict().items() if not k.endswith(FROZEN_MARKER)}
    plain.load_state_dict(old)  # (strict: no missing marker)
    with torch.no_grad():
        torch.testing.assert_close(fresh(X.double()), model(X.double()), atol=0, rtol=0)
        torch.testing.assert_close(loaded(X.double()), model(X.double()), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match=f"Unexpected key.*c1.{FROZEN_MARKER}"):
        _WSNet().double().load_state_dict(plain.state_dict())


def test_frozen_layers_script_and_keep_dynamic_same_padding():
    """The frozen layers are TorchScript-able; a frozen SAME conv scripted pads from the input's size at every
    call (traced, it keeps the traced size's padding, as timm's own Conv2dSame does)."""
    import warnings

    holder = nn.Sequential(StdConv2dSame(4, 6, 3, stride=2), nn.ReLU(), StdConv2d(6, 6, 1),
                           nn.Flatten(), nn.LazyLinear(3))
    holder(torch.randn(1, 4, 9, 9))
    holder[4] = nn.utils.parametrizations.weight_norm(nn.Linear(holder[4].in_features, 3))
    assert freeze(holder, "0") and freeze(holder, "2") and freeze(holder, "4") and holder[0].same_pad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.jit.script is deprecated, still used)
        scripted, conv = torch.jit.script(holder), torch.jit.script(holder[0])
    for x in (torch.randn(2, 4, 9, 9), torch.randn(2, 4, 10, 10)):
        torch.testing.assert_close(scripted(x), holder(x), atol=0, rtol=0)
    for size in ((9, 11), (10, 7)):
        x = torch.randn(1, 4, *size)
        torch.testing.assert_close(conv(x), holder[0](x), atol=0, rtol=0)


def test_a_frozen_layer_takes_over_the_hooks_on_the_layer():
    """Freezing replaces the layer: the forward (pre-)hooks and backward hooks others put on it act on the
    frozen layer, and their handles still remove them; the old weight_norm's own pre-hook stays behind."""
    torch.manual_seed(0)
    holder = nn.Sequential(StdConv2d(3, 4, 3), nn.ReLU(), nn.utils.weight_norm(nn.Linear(4, 2)))
    seen, grads = [], []
    handles = [holder[0].register_forward_hook(lambda m, a, o: seen.append(o.shape)),
               holder[0].register_forward_pre_hook(lambda m, a: (a[0] * 2,)),
               holder[0].register_full_backward_hook(lambda m, gi, go: grads.append(go[0].shape)),
               holder[2].register_forward_hook(lambda m, a, o: o + 1)]
    x = torch.randn(2, 3, 6, 6, requires_grad=True)

    def run():
        return holder[2](holder[1](holder[0](x)).mean((2, 3)))

    before = run()
    assert freeze(holder, "0") and freeze(holder, "2") and isinstance(holder[2], FrozenLinear)
    after = run()
    after.sum().backward()
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    assert len(seen) == 2 and len(grads) == 1
    for handle in handles:
        handle.remove()
    assert not any(getattr(m, d) for m in holder for d in ("_forward_hooks", "_backward_hooks"))
    assert not holder[0]._forward_pre_hooks


def test_a_torch_prune_hook_stays_behind_and_its_mask_is_frozen_in():
    """torch.nn.utils.prune's pre-hook (weight = weight_orig * weight_mask) is part of the weight computation:
    the probe runs it (the frozen weight is the masked one, even when weight_orig changed since the last
    forward) and the frozen layer leaves it behind (carried, it failed on the missing weight_mask)."""
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), StdConv2d(4, 6, 3))
    nn.utils.prune.l1_unstructured(holder[2], "weight", 0.5)
    with torch.no_grad():
        holder[2].weight_orig.mul_(2).add_(0.1)  # (the weight attribute is stale until the next forward)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        before = holder(x)
    assert freeze(holder, "2") and isinstance(holder[2], FrozenConv2d) and not holder[2]._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(holder(x), before, atol=1e-6, rtol=1e-6)


def test_distillation_feature_hints_follow_a_frozen_layer(tmp_path):
    """KnowledgeDistillation's feature hint on a weight-standardised conv that GroupLassoPruning freezes at
    finalisation (its readers frozen before the gates fold): the hint goes on acting on the frozen layer."""
    from lightning.pytorch.callbacks import Callback

    from lightning_prune.callbacks.distill import KnowledgeDistillation
    from lightning_prune.callbacks.group_lasso import GroupLassoPruning
    from lightning_prune.testing import fit_tiny

    kd = KnowledgeDistillation(student="model", features="c2", alpha=0.0, verbose=False)
    seen = []

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((type(pl_module.model.c2).__name__, bool(kd._batch.get("feature_loss"))))

    gl = GroupLassoPruning(finalize_step=1, compress=False, recalibrate_bn_batches=0, round_to=1, lam=0.3,
                           gate_lr=0.2, gate_optimizer="sgd", verbose=False)
    fit_tiny([gl, Probe(), kd], tmp_path, model=_ws_net_classifier(), max_epochs=1, limit_train_batches=3,
             limit_val_batches=0)
    assert "c2" in gl.shrink.frozen or "model.c2" in gl.shrink.frozen
    assert seen[-1] == ("FrozenConv2d", True), seen


def test_the_fsdp2_resize_freezes_the_readers_the_checkpoint_holds_frozen(monkeypatch):
    """resize_sharded (the FSDP2 resume after an in-fit removal) freezes the readers the checkpoint recorded
    frozen (a gate fold froze them under DDP, though their group lost no unit) on the gathered network, as the
    single-process resume does, so the checkpoint loads strictly; run here on an unsharded network (no FSDP
    unit: the same code without the collectives). And under FSDP2 the groups read by such layers are refused
    by name before anything is masked, gated or removed on shards (the 2-process fit: test_sharded)."""
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    import lightning_prune.core.sharding as sharding
    from lightning_prune.callbacks.shrink import refuse_sharded_freezing, resize_sharded
    from lightning_prune.graph import meta_copy, slice_units

    def net():
        module = _ws_net_classifier()
        module.example_input_array = None
        return module

    module = net()
    groups = analyse_channels(module.model, X, prefix="model").groups
    removed = {"model.c3": [0, 5]}  # (only the readers of c3's group, l1, are frozen by the slicing)
    recorded = ["model.c2", "model.c3", "model.l1"]
    written = net()
    for name in recorded:
        freeze(written, name)
    slice_units(written, groups, removed)
    trainer = SimpleNamespace(optimizers=[torch.optim.SGD(module.parameters(), lr=0.1)])
    resize_sharded(trainer, module, "model", meta_copy(module.model), groups, removed, recorded)
    assert frozen_names(module) == recorded
    module.load_state_dict(written.state_dict())  # (strict)
    held = {id(p) for p in trainer.optimizers[0].param_groups[0]["params"]}
    assert all(id(p) in held for p in module.parameters())
    monkeypatch.setattr(sharding, "is_sharded", lambda p: True)
    with pytest.raises(MisconfigurationException, match=r"GroupLassoPruning cannot act under"
                       r" ModelParallelStrategy \(FSDP2\) on the groups read by \['model.c2', 'model.c3',"
                       r" 'model.l1'\].*HINT: strategy='ddp', or `exclude`"):
        refuse_sharded_freezing(net(), groups, "GroupLassoPruning")
    refuse_sharded_freezing(net(), [g for g in groups if not g.frozen], "GroupLassoPruning")


def test_an_fsdp2_resume_of_frozen_readers_without_a_removal_is_refused_by_name(monkeypatch):
    """A checkpoint whose readers were frozen but lost no unit (compress=False under DDP) resumed under FSDP2:
    refused by name when the callback state is restored (it failed later, on the frozen layers' unexpected
    marker keys, as nothing is frozen on shards); run on an unsharded network, is_sharded patched."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    import lightning_prune.callbacks.channels as channels
    import lightning_prune.core.sharding as sharding
    from lightning_prune.callbacks.group_lasso import GroupLassoPruning

    module = _ws_net_classifier()
    callback = GroupLassoPruning(compress=False, verbose=False)
    callback.groups = analyse_channels(module.model, X, prefix="model").groups
    state = {"shrink": {"frozen": ["model.c3", "model.l1"], "removed": None}}
    monkeypatch.setattr(sharding, "is_sharded", lambda p: True)
    monkeypatch.setattr(channels, "is_sharded", lambda p: True)
    with pytest.raises(MisconfigurationException, match=r"GroupLassoPruning cannot act under"
                       r" ModelParallelStrategy \(FSDP2\) on the groups read by \['model.c3', 'model.l1'\]"):
        callback._apply_recorded_removal(None, module, state)
    assert not frozen_names(module)
    assert callback._apply_recorded_removal(None, module, {"shrink": {"frozen": [], "removed": None}}) is None


def test_a_spawning_strategy_is_refused_for_groups_read_by_frozen_layers():
    """Under ``ddp_spawn`` the main process takes the workers' weights into its own, unfrozen layers at the
    end of the fit (no callback hook runs there): groups whose readers compute their weight are refused at
    the start, by name, with the way out; other groups and other strategies go on."""
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_prune.callbacks.shrink import refuse_spawn_freezing

    groups = analyse_channels(_WSNet(10), X).groups
    spawn = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, logger=False)
    with pytest.raises(MisconfigurationException, match=r"GroupLassoPruning cannot act under a spawning"
                       r" strategy \(DDPStrategy, start method 'spawn'\) on the groups read by \['c2', 'c3',"
                       r" 'l1'\].*HINT: strategy='ddp'.*or `exclude`"):
        refuse_spawn_freezing(spawn, groups, "GroupLassoPruning")
    refuse_spawn_freezing(spawn, [g for g in groups if not g.frozen], "GroupLassoPruning")
    refuse_spawn_freezing(pl.Trainer(accelerator="cpu", devices=1, logger=False), groups, "GroupLassoPruning")


@pytest.mark.slow
@pytest.mark.parametrize("owner", ["group_lasso", "one_shot"])
def test_a_ddp_spawn_fit_on_a_ws_net_is_refused_at_its_start(tmp_path, owner):
    from torch.multiprocessing.spawn import ProcessRaisedException

    import lightning_prune as lp
    from lightning_prune.testing import fit_tiny

    cb = (lp.GroupLassoPruning(target_flops=0.5, compress=True, verbose=False) if owner == "group_lasso"
          else lp.OneShotPruning("channels", target_flops=0.5, verbose=False))
    # (the worker's MisconfigurationException reaches the main process as torch's ProcessRaisedException)
    with pytest.raises(ProcessRaisedException, match="MisconfigurationException: .*cannot act under a"
                       " spawning strategy.*HINT: strategy='ddp'"):
        fit_tiny([cb], tmp_path, model=_ws_classifier(), strategy="ddp_spawn", devices=2, max_steps=2,
                 deterministic=False)
