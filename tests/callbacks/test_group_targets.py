"""``group_targets`` of the gate callbacks: per-channel-group fractions (e.g. from a ``method="channels"``
sensitivity scan) decide the named groups' widths at finalisation; real Lightning fits on tiny timm models."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_prune as lp
from lightning_prune.callbacks.group_lasso import GroupLassoPruning
from lightning_prune.callbacks.l0 import L0Pruning
from lightning_prune.functional import kept_count
from lightning_prune.testing import fit_tiny, tiny_classifier, tiny_datamodule
from tests.helpers import Spy, eval_logits

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
FAST = {"max_epochs": 2, "limit_train_batches": 4, "limit_val_batches": 0}
# a strong penalty: gates outside the named groups are captured and pruned by the usual rule too
STRONG = {"lam": 0.3, "gate_lr": 0.2, "gate_optimizer": "sgd", "capture_threshold": 0.02,
          "prune_threshold": 0.8, "verbose": False}
RESNET = {"model.layer2.0.conv1": 0.5, "layer4.0.conv2": 0.3, "model.conv1.0": 0.95,
          "model.layer1.0.conv1": 0.0}
VIT = {"model.blocks.0.attn.qkv": 0.5, "blocks.1.mlp.fc1": 0.25,  # heads, channels
       "model.patch_embed.proj": 0.25}  # the embedding stream


def _fit(cb, tmp_path, model_name):
    """Fit with finalisation halfway and compression at the end: the logits of the masked model (just before
    compression) and of the compressed one."""
    seen = {}

    def before(trainer, module, hook):
        seen["masked"] = eval_logits(module, X)

    def after(trainer, module, hook):
        seen["compressed"] = eval_logits(module, X)

    model = tiny_classifier(model_name)
    fit_tiny([Spy(before, ("on_train_end",)), cb, Spy(after, ("on_train_end",))], tmp_path, model=model,
             **FAST)
    return model, seen


def _full(name, groups):
    return name if name in groups else f"model.{name}"


@pytest.mark.parametrize(("make", "model_name", "targets"), [
    (lambda t: GroupLassoPruning(group_targets=t, round_to=1, finalize_step=0.5, compress=True,
                                 compress_step=1.0, **STRONG), "test_resnet", RESNET),
    (lambda t: L0Pruning(group_targets=t, round_to=1, finalize_step=0.5, compress=True, compress_step=1.0,
                         verbose=False), "test_vit", VIT),
], ids=["group_lasso-resnet", "l0-vit"])
def test_named_groups_lose_exactly_their_fraction_and_the_model_compresses_exactly(make, model_name, targets,
                                                                                   tmp_path):
    cb = make(targets)
    model, seen = _fit(cb, tmp_path, model_name)
    assert cb.finalized and cb.shrink.removed is not None
    groups = {g.name: g for g in cb.groups}
    wanted = {_full(k, groups): v for k, v in targets.items()}
    assert cb._group_targets == wanted and set(wanted) <= set(groups)
    scores = dict(zip(groups, cb.gate_scores()))  # the gates do not move after finalisation
    usual = dict(zip(groups, cb.final_keep()))
    for name, group in groups.items():
        removed = cb.shrink.removed[name]
        if name in wanted:  # exactly size - max(round(size * (1 - f)), 1) units: those of the smallest gates
            assert len(removed) == group.size - kept_count(group.size, wanted[name]), name
            kept = [u for u in range(group.size) if u not in set(removed)]
            if removed:
                assert float(scores[name][removed].max()) <= float(scores[name][kept].min()), name
        elif int(usual[name].sum()) > 0:  # the usual rule (round_to=1: no rounding)
            assert removed == (~usual[name]).nonzero().flatten().tolist(), name
    if model_name == "test_resnet":  # the strong penalty pruned other groups too
        assert any(cb.shrink.removed[n] for n in groups if n not in wanted)
    # the compressed model is the masked one, physically smaller
    torch.testing.assert_close(seen["compressed"], seen["masked"], atol=1e-4, rtol=1e-4)
    dense = sum(p.numel() for p in tiny_classifier(model_name).parameters())
    assert sum(p.numel() for p in model.parameters()) < dense
    if model_name == "test_resnet":  # a channel, a residual stream, a stem conv
        assert model.model.layer2[0].conv1.out_channels == 48 - 24
        assert model.model.layer4[0].conv2.out_channels == kept_count(96, 0.3)
        assert model.model.conv1[0].out_channels == 1  # 16 units at 0.95: one stays
    else:  # a head of two, 48 of 192 fc1 units, 16 of the 64-wide embedding stream
        assert model.model.blocks[0].attn.num_heads == 1 and model.model.blocks[1].mlp.fc1.out_features == 144
        assert model.model.patch_embed.proj.out_channels == 48


def test_widths_of_named_groups_are_rounded_to_round_to(tmp_path):
    cb = GroupLassoPruning(group_targets={"model.layer2.0.conv1": 0.3, "model.layer4.0.conv1": 0.97},
                           round_to=8, finalize_step=0.5, compress=True, verbose=False)
    model, _ = _fit(cb, tmp_path, "test_resnet")
    assert model.model.layer2[0].conv1.out_channels == 40  # 34 of 48 kept, rounded up to 40
    assert model.model.layer4[0].conv1.out_channels == 8  # 3 of 96 kept, rounded up to 8


def test_from_a_channel_sensitivity_scan_into_group_lasso(tmp_path):
    """End to end: lp.sensitivity(method="channels") -> layer_targets_from_sensitivity -> group_targets."""
    data = tiny_datamodule()
    data.setup("fit")
    _, model = fit_tiny([], tmp_path / "dense", datamodule=data, max_epochs=4, limit_val_batches=0)
    table = lp.sensitivity(model, data.val_dataloader(), sparsities=(0.25, 0.5, 0.75),
                           method="channels", progress=False)
    ratios = lp.layer_targets_from_sensitivity(table, 0.5)
    assert set(ratios) == set(table.layers) and any(0 < v < 0.75 for v in ratios.values())
    dense = sum(p.numel() for p in model.parameters())
    cb = GroupLassoPruning(group_targets=ratios, round_to=1, finalize_step=0.5, compress=True, verbose=False)
    fit_tiny([cb], tmp_path / "pruned", model=model, datamodule=data, **FAST)
    sizes = {g.name: g.size for g in cb.groups}
    assert set(ratios) <= set(sizes)
    for name, ratio in ratios.items():
        assert len(cb.shrink.removed[name]) == sizes[name] - kept_count(sizes[name], ratio), name
    assert sum(p.numel() for p in model.parameters()) < 0.8 * dense


def test_a_changed_group_targets_is_refused_on_resume(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=2,
                            filename="{step}")
    first = GroupLassoPruning(group_targets={"model.layer2.0.conv1": 0.5}, finalize_step=0.9, verbose=False)
    fit_tiny([first, saver], tmp_path / "full", max_epochs=2, limit_train_batches=3, limit_val_batches=0)
    assert first.state_dict()["config"]["group_targets"] == {"model.layer2.0.conv1": 0.5}
    ckpt = tmp_path / "ckpt" / "step=2.ckpt"
    again = GroupLassoPruning(group_targets={"model.layer2.0.conv1": 0.5}, finalize_step=0.9, verbose=False)
    fit_tiny([again], tmp_path / "same", ckpt_path=ckpt, max_epochs=2, limit_train_batches=3,
             limit_val_batches=0)
    assert again.finalized
    other = GroupLassoPruning(group_targets={"model.layer2.0.conv1": 0.25}, finalize_step=0.9, verbose=False)
    with pytest.raises(MisconfigurationException, match=r"GroupLassoPruning: .*`group_targets` \(checkpoint"
                       r" \{'model.layer2.0.conv1': 0.5\}, now \{'model.layer2.0.conv1': 0.25\}\)"):
        fit_tiny([other], tmp_path / "other", ckpt_path=ckpt, max_epochs=2, limit_train_batches=3,
                 limit_val_batches=0)


# ------------------------------------------------------------------ bad values and names
@pytest.mark.parametrize("cls", [GroupLassoPruning, L0Pruning])
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"group_targets": {"model.fc": 1.0}},
     r"`group_targets\['model.fc'\]` must be a number in \[0, 1\), got 1.0. HINT: the fraction of each"),
    ({"group_targets": {"a": -0.1}}, r"`group_targets\['a'\]` must be a number in \[0, 1\), got -0.1"),
    ({"group_targets": {"a": "0.5"}}, r"`group_targets\['a'\]` must be a number in \[0, 1\), got '0.5'"),
    ({"group_targets": {"a": True}}, r"`group_targets\['a'\]` must be a number in \[0, 1\), got True"),
    ({"group_targets": {"a": float("nan")}}, r"`group_targets\['a'\]` must be a number in \[0, 1\), got nan"),
    ({"group_targets": [0.5]}, r"`group_targets` must be None or a mapping \{group name: fraction in"),
    ({"group_targets": {1: 0.5}}, r"`group_targets` must be None or a mapping"),
    ({"group_targets": {"a": 0.5}, "target_flops": 0.5},
     r"Pass only one of `group_targets`, `target_flops`, `target_params`; got `group_targets`=\{'a': 0.5\},"
     r" `target_flops`=0.5. HINT: group_targets sets"),
    ({"group_targets": {"a": 0.5}, "target_params": 0.5}, r"Pass only one of `group_targets`"),
])
def test_bad_values_name_the_argument(cls, kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        cls(**kwargs)


def test_an_empty_mapping_is_no_target():
    cb = GroupLassoPruning(group_targets={}, target_flops=0.5)
    assert cb.group_targets == {} and cb.target_flops == 0.5


@pytest.mark.parametrize("cls", [GroupLassoPruning, L0Pruning])
def test_unknown_group_names_are_refused_at_setup(cls, tmp_path):
    cb = cls(group_targets={"model.layer2.0.conv1": 0.5, "model.nope": 0.5, "fc": 0.2}, verbose=False)
    with pytest.raises(MisconfigurationException, match=(
            rf"^`group_targets` names groups \['fc', 'model.nope'\] that {cls.__name__}"
            r" \(on ImageClassifier\) does not have; it has \['model.conv1.0', .*\]\.\.\. HINT: scan the same"
            r" model with method='channels'. The callback has only the groups its"
            r" include/exclude/prune_coupled")):
        fit_tiny([cb], tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)


def test_a_group_the_callback_does_not_gate_is_unknown(tmp_path):
    """prune_coupled=False: the residual streams of a scan are not the callback's groups."""
    model = tiny_classifier("test_convnext")
    everything = GroupLassoPruning(verbose=False)
    everything.setup(None, copy.deepcopy(model), "fit")
    coupled = [g.name for g in everything.groups if g.coupled]
    assert coupled
    cb = GroupLassoPruning(group_targets={coupled[0]: 0.5}, prune_coupled=False, verbose=False)
    with pytest.raises(MisconfigurationException, match=r"`group_targets` names groups"):
        fit_tiny([cb], tmp_path, model=model, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
