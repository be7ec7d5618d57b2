"""GroupLassoPruning: real Lightning fits on timm's tiny models."""

from __future__ import annotations

import csv
import glob
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

import lightning_prune as lp
from lightning_prune.callbacks.group_lasso import GroupLassoPruning
from lightning_prune.graph import ChannelGroup
from lightning_prune.testing import TINY_MODELS, check_callback_conformance, fit_tiny, tiny_classifier
from tests.helpers import Spy, assert_amp_step_matches_fp32, eval_logits

FAMILIES = list(TINY_MODELS)
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
FAST = {"max_epochs": 3, "limit_train_batches": 4, "limit_val_batches": 1}
# a strong penalty that captures gates within a few steps, except in the shielded last stage of each family
SHIELD = {"*layer4*": 0.0, "*blocks.4*": 0.0, "*blocks.5*": 0.0, "*stages.3*": 0.0}
STRONG = {"lam": 0.3, "gate_lr": 0.2, "gate_optimizer": "sgd", "capture_threshold": 0.02,
          "prune_threshold": 0.3, "group_lam": SHIELD, "verbose": False}


# ------------------------------------------------------------------ conformance and resume
def test_conformance_defaults(tmp_path):
    state = check_callback_conformance(lambda: lp.create_callback("group_lasso"), tmp_path)
    assert state["finalized"] and state["gates"]["names"]


def test_resume_mid_training_with_gates_capture_and_phases(tmp_path):
    """Gates, capture state, gate-optimizer state and the alternating phase resume exactly."""
    make = lambda: GroupLassoPruning(alternate_every_n_steps=3, finalize_step=1.0, **STRONG)  # noqa: E731
    state = check_callback_conformance(make, tmp_path, model_name="test_efficientnet")
    assert any(bool(g["frozen"].any()) for g in state["gates"]["gates"])  # some gates were captured


# ------------------------------------------------------------------ oracles
@pytest.mark.parametrize(("name", "coupled"), [(n, False) for n in FAMILIES] + [("test_resnet", True)])
def test_fold_keeps_outputs_and_compress_equals_masked_model(name, coupled, tmp_path):
    """In a real run: finalising folds the gates without changing the eval logits; captured zeros
    stay zero through fine-tuning; the compressed model's logits equal the masked model's; it reloads."""
    seen = {}

    def before(trainer, module, hook):
        seen["gated" if not cb.finalized else "masked"] = eval_logits(module, X)

    def after(trainer, module, hook):
        seen["compressed"] = eval_logits(module, X)

    # the fold alone (recalibrating the BatchNorms after the decision changes the eval logits by design)
    cb = GroupLassoPruning(finalize_step=1.0, compress=True, prune_coupled=coupled, recalibrate_bn_batches=0,
                           **STRONG)
    model = tiny_classifier(name)
    dense_params = sum(p.numel() for p in model.parameters())
    fit_tiny([Spy(before, ("on_train_end",)), cb, Spy(after, ("on_train_end",))], tmp_path, model=model,
             **FAST)
    assert cb.finalized and sum(p.numel() for p in model.parameters()) < dense_params
    assert any(g.coupled for g in cb.groups) == coupled
    torch.testing.assert_close(seen["compressed"], seen["gated"], atol=1e-4, rtol=1e-4)
    lp.save_compressed(model.model, tmp_path / "small.pt")
    fresh = tiny_classifier(name).model
    lp.load_compressed(tmp_path / "small.pt", fresh)
    assert torch.equal(fresh.eval()(X), model.model.eval()(X))


def test_finalize_prunes_masks_and_captured_zeros_stay_zero(tmp_path):
    history = []

    def spy(trainer, module, hook):
        if not cb.finalized:
            history.append([(g.frozen.clone(), g.weight.detach().clone()) for g in cb.gateset.gates])

    cb = GroupLassoPruning(finalize_step=0.5, round_to=1, **STRONG)
    _, model = fit_tiny([cb, Spy(spy)], tmp_path, **FAST)
    assert cb.finalized and not cb.gateset.attached
    for prev, cur in zip(history, history[1:]):
        for (f0, _), (f1, w1) in zip(prev, cur):
            assert (f1 | ~f0).all()  # captured stays captured
            assert (w1[f1] == 0).all()  # and exactly zero
    keep = cb.keep
    assert 0 < sum(int(k.sum()) for k in keep) < sum(k.numel() for k in keep)
    for group, kept in zip(cb.groups, keep):  # after fine-tuning no reader reads a pruned unit
        for site in group.input_sites():
            weight = model.get_submodule(site.module).weight
            for channel, unit in zip(site.channels, site.units):
                column = weight[:, channel]
                assert (bool((column == 0).all()) != bool(kept[unit])
                        or bool(kept[unit])), (site.module, channel)
        for sl in group.slices:  # producers' rows of pruned units are zero too
            if sl.role == "out":
                weight = model.get_submodule(sl.module).weight
                for channel, unit in zip(sl.channels, sl.units):
                    if not kept[unit]:
                        assert (weight[channel] == 0).all()
    assert set(model.state_dict()) == set(tiny_classifier().state_dict())


def test_finalize_epoch_and_finalize_step(tmp_path):
    flags = []
    cb = GroupLassoPruning(finalize_epoch=1, verbose=False)
    spy = Spy(lambda t, m, h: flags.append((t.current_epoch, cb.finalized)), ("on_train_epoch_start",))
    fit_tiny([cb, spy], tmp_path, **FAST)
    assert flags == [(0, False), (1, True), (2, True)] and cb.finalize_at_step == 4  # 4 steps per epoch
    steps = []
    cb = GroupLassoPruning(finalize_step=6, verbose=False)
    fit_tiny([cb, Spy(lambda t, m, h: steps.append((t.global_step, cb.finalized)), ("on_train_batch_end",))],
             tmp_path, **FAST)
    assert [f for s, f in steps if s < 6] == [False] * 5 and all(f for s, f in steps if s >= 6)


def test_weight_regularisers_added_to_gradients(tmp_path):
    grads = {}
    name = "model.layer1.0.conv1.weight"

    def recorder(key):
        def record(trainer, module, hook):
            p = dict(module.named_parameters())[name]
            grads[key] = (p.grad.clone(), p.detach().clone())
        return record

    cb = GroupLassoPruning(weight_l1=1e-2, weight_l2=1e-1, verbose=False)
    fit_tiny([Spy(recorder("before"), ("on_before_optimizer_step",)), cb,
              Spy(recorder("after"), ("on_before_optimizer_step",))], tmp_path,
             max_steps=1, max_epochs=1, limit_val_batches=0)
    (g0, w), (g1, _) = grads["before"], grads["after"]
    torch.testing.assert_close(g1 - g0, 1e-2 * torch.sign(w) + 1e-1 * w)


def test_alternate_phases_freeze_gates_then_weights(tmp_path):
    snaps = []

    def spy(trainer, module, hook):
        snaps.append((torch.cat(cb.gate_values()), module.model.layer1[0].conv1.weight.detach().clone()))

    cb = GroupLassoPruning(alternate_every_n_steps=2, finalize_step=1.0, lam=0.01, gate_lr=0.05,
                           verbose=False)
    fit_tiny([cb, Spy(spy)], tmp_path, max_epochs=1, limit_train_batches=6, limit_val_batches=0)
    start = torch.ones_like(snaps[0][0])
    gates = [start] + [g for g, _ in snaps]
    moved_gates = [not torch.equal(a, b) for a, b in zip(gates, gates[1:])]
    moved_weights = [not torch.equal(a, b) for (_, a), (_, b) in zip(snaps, snaps[1:])]
    # steps 0-1 weights, 2-3 gates, 4-5 weights
    assert moved_gates == [False, False, True, True, False, False]
    assert moved_weights == [True, False, False, True, True]  # step 1 vs 0, 2 vs 1, ...


def test_group_lam_scales_the_penalty():
    cb = GroupLassoPruning(lam=0.1, group_lam={"layer4.*": 0.0, "conv1.3": 2.0})
    cb.groups = [ChannelGroup(n, 4, "channel", 1, (), (), (n, extra)) for n, extra in [
        ("model.conv1.3", "model.conv1.0"), ("model.layer4.0.conv1", "model.layer3.0.conv3"),
        ("model.layer1.0.conv1", "model.layer1.0.conv1")]]
    assert cb.group_lams() == [0.2, 0.0, 0.1]


def test_zero_group_lam_shields_a_group(tmp_path):
    cb = GroupLassoPruning(finalize_step=1.0, **{**STRONG, "group_lam": {"layer4.*": 0.0}})
    fit_tiny([cb], tmp_path, **FAST)
    frozen = {g.name: int(gate.frozen.sum()) for g, gate in zip(cb.groups, cb.gateset.gates)}
    assert frozen["model.layer4.0.conv1"] == 0 and sum(frozen.values()) > 0


class LoudClassifier(lp.ImageClassifier):
    """Gate gradients 300x the usual: what efficientnet_b0's SE/depthwise gates see relative to a ResNet's."""

    def training_step(self, batch, batch_idx):
        return 300.0 * super().training_step(batch, batch_idx)


@pytest.mark.parametrize("limit", ["auto", None])
def test_max_gate_step_keeps_a_large_data_gradient_from_capturing_gates(limit, tmp_path):
    """The EfficientNet collapse: at the defaults (gate_lr=5, SGD) large data gradients moved gates by O(1)
    per step, across zero, into capture (77% of efficientnet_b0's residual-stream gates at finalisation, the
    gated net at chance). ``max_gate_step="auto"`` bounds a step at twice the penalty's drift (0.02 here)."""
    model = LoudClassifier("test_resnet", num_classes=10, optimizer="sgd", lr=1e-6, scheduler="none",
                           weight_decay=0.0)
    cb = GroupLassoPruning(finalize_step=1.0, max_gate_step=limit, verbose=False)
    fit_tiny([cb], tmp_path, model=model, max_steps=3, max_epochs=1, limit_val_batches=0)
    moved = torch.cat([(v - 1.0).abs() for v in cb.gate_values()])
    frozen = sum(int(g.frozen.sum()) for g in cb.gateset.gates)
    if limit == "auto":
        assert cb.gate_step_limits()[0] == pytest.approx(0.02)
        assert float(moved.max()) <= 3 * 0.02 + 1e-6 and frozen == 0
    else:  # the mechanism: without the limit the same gradients capture gates
        assert frozen > 0


def test_penalty_rests_once_the_alive_units_fit_the_budget(tmp_path):
    """The other half of the EfficientNet collapse: while the network had not learned (efficientnet_b0 from
    scratch, loss at chance at finalisation) the penalty drove 68% of the residual-stream gates to zero,
    far more than target_flops=0.5 needs, and the budget kept them, folded in dead. With a size target the
    penalty stops once the units with live gates fit the budget."""
    cb = GroupLassoPruning(target_flops=0.5, finalize_step=1.0, verbose=False)
    fit_tiny([cb], tmp_path, max_steps=1, max_epochs=1, limit_val_batches=0)
    gates = cb.gateset.gates
    with torch.no_grad():
        for gate in gates:
            gate.weight.fill_(1.0)
            gate.weight.grad = torch.zeros_like(gate.weight)
    assert not cb.alive_units_fit_the_budget() and cb.gate_penalty_grad_(0) > 0
    assert all(bool((g.weight.grad > 0).all()) for g in gates)  # d(lam |g|)/dg = lam
    with torch.no_grad():
        for gate in gates:  # every unit but one per group dead: far below the budget
            gate.weight[1:] = 0.0
            gate.frozen[1:] = True
            gate.weight.grad = torch.zeros_like(gate.weight)
    assert cb.alive_units_fit_the_budget() and cb.gate_penalty_grad_(0) == 0.0
    assert all(not bool(g.weight.grad.any()) for g in gates)


def _amp_delta(tmp_path, **kwargs) -> torch.Tensor:
    cb = GroupLassoPruning(lam=0.0, gate_optimizer="sgd", gate_lr=0.1, finalize_step=1.0, verbose=False)
    fit_tiny([cb], tmp_path, max_steps=1, max_epochs=1, limit_val_batches=0, **kwargs)
    return torch.cat(cb.gate_values()) - 1.0


def test_amp_gate_gradients_are_unscaled(tmp_path):
    """A loss scale of 2**12 must not reach the gates: one SGD step matches full precision."""
    assert_amp_step_matches_fp32(_amp_delta, tmp_path, rel=0.1, min_cosine=0.95)


# ------------------------------------------------------------------ logging
def test_logs_channels_and_wandb_media(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    csv_logger = CSVLogger(tmp_path, name="csv")
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lp-test")
    cb = GroupLassoPruning(finalize_step=0.5, **STRONG)
    fit_tiny([cb], tmp_path, logger=[csv_logger, wandb_logger], log_every_n_steps=1, **FAST)
    wandb_logger.experiment.finish()
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        columns = next(csv.reader(f))
    assert "prune/channels_remaining" in columns and "prune/gate_penalty" in columns
    assert any(c.startswith("prune/channels_alive/model.layer1.0.conv1") for c in columns)
    images = glob.glob(os.path.join(str(tmp_path), "wandb", "*run-*", "files", "media", "images", "**",
                                    "*.png"), recursive=True)
    assert any("gate_image" in p for p in images)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lam": -1.0}, r"`lam` must be a number >= 0, got -1.0. HINT"),
    ({"gate_lr": 0}, r"`gate_lr` must be a number > 0, got 0"),
    ({"gate_lr": True}, r"`gate_lr` must be a number > 0, got True"),
    ({"lam": float("inf")}, r"`lam` must be a number >= 0, got inf"),
    ({"gate_optimizer": "rmsprop"}, r"`gate_optimizer` must be one of \['adam', 'sgd'\]"),
    ({"weight_l1": -1e-5}, r"`weight_l1` must be a number >= 0"),
    ({"weight_l2": float("nan")}, r"`weight_l2` must be a number >= 0"),
    ({"prune_threshold": 1.5}, r"`prune_threshold` must be a number in \[0, 1\), got 1.5. HINT"),
    ({"capture_threshold": -0.1}, r"`capture_threshold` must be a number in \[0, 1\)"),
    ({"capture_threshold": 0.2, "prune_threshold": 0.1}, r"`capture_threshold` \(0.2\) must not exceed"),
    ({"finalize_step": 1.5}, r"`finalize_step` must be optimizer steps .* fraction .* got 1.5. HINT"),
    ({"finalize_step": -1}, r"`finalize_step` must be optimizer steps"),
    ({"finalize_epoch": -1}, r"`finalize_epoch` must be epochs \(an int >= 0\)"),
    ({"finalize_step": 10, "finalize_epoch": 2}, r"Pass only one of `finalize_step`, `finalize_epoch`"),
    ({"alternate_every_n_steps": 0},
     r"`alternate_every_n_steps` must be a number of optimizer steps .* got 0"),
    ({"alternate_every_n_steps": 0.5}, r"`alternate_every_n_steps` must be None or an int >= 1, got 0.5"),
    ({"compress": "yes"}, r"`compress` must be True or False, got 'yes'"),
    ({"prune_coupled": 1}, r"`prune_coupled` must be True or False, got 1"),
    ({"input_size": (3, -1, 32)}, r"`input_size` must be None or a sequence of positive ints"),
    ({"group_lam": [1.0]}, r"`group_lam` must be a mapping"),
    ({"max_gate_step": 0}, r"`max_gate_step` must be a number > 0, got 0"),
    ({"group_lam": {"layer1.*": -2.0}}, r"`group_lam\['layer1.\*'\]` must be a number >= 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        GroupLassoPruning(**kwargs)


class LinearOnly(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)
        self.example_input_array = torch.zeros(2, 3, 32, 32)

    def forward(self, x):
        return self.fc(x.flatten(1))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_model_without_gateable_channels(tmp_path):
    with pytest.raises(MisconfigurationException,
                       match=r"found no removable channel group in LinearOnly.*What blocked them: no layer"
                             r" reads these channels \(model output\) \(1x\).*HINT"):
        fit_tiny([GroupLassoPruning()], tmp_path, model=LinearOnly(), max_steps=1)


def test_only_coupled_channels_hint(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"coupled channels \(set prune_coupled=True"):
        fit_tiny([GroupLassoPruning(include=["layer2.0.conv2", "layer2.0.downsample.1"],
                                    prune_coupled=False)],
                 tmp_path, max_steps=1)


# ------------------------------------------------------------------ DDP
def _ddp_record(trainer, module, hook):
    cb = next(c for c in trainer.callbacks if isinstance(c, GroupLassoPruning))
    out = Path(os.environ["LP_TEST_DDP_DIR"]) / f"rank{trainer.global_rank}.pt"
    torch.save({"gates": cb.gate_values(), "frozen": [g.frozen.cpu() for g in cb.gateset.gates]}, out)


@pytest.mark.slow
def test_ddp_gates_identical_across_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("LP_TEST_DDP_DIR", str(tmp_path))
    cb = GroupLassoPruning(finalize_step=1.0, **STRONG)
    fit_tiny([Spy(_ddp_record, ("on_train_end",)), cb], tmp_path, strategy="ddp_spawn", devices=2,
             max_epochs=2, limit_train_batches=3, limit_val_batches=0)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for a, b in zip(r0["gates"] + r0["frozen"], r1["gates"] + r1["frozen"]):
        assert torch.equal(a, b)
    assert any(not torch.equal(g, torch.ones_like(g)) for g in r0["gates"])  # they did train


# ------------------------------------------------------------------ size targets
@pytest.mark.parametrize(("name", "target"),
                         [("test_resnet", 0.5), ("test_vit", 0.25), ("test_convnext", 0.5)])
def test_target_flops_is_met_by_the_compressed_model(name, target, tmp_path):
    """The units with the largest gates that fit the budget: the compressed model counts at most `target` of
    the dense FLOPs (torch-pruning's count), within one `round_to` step of it, and every width is a
    multiple."""
    from torch_pruning.utils import count_ops_and_params

    from lightning_prune.graph import example_inputs_for, traced_root

    model = tiny_classifier(name)
    _, root = traced_root(model)
    x = example_inputs_for(root, (3, 32, 32))  # the digits' shape, which the callback traces at
    dense_flops, _ = count_ops_and_params(root, x)
    logger = CSVLogger(tmp_path, name="csv")
    cb = GroupLassoPruning(target_flops=target, finalize_step=0.5, compress=True, verbose=False)
    fit_tiny([cb], tmp_path, model=model, logger=logger, **FAST)
    flops, _ = count_ops_and_params(model.model, x)
    assert target - 0.1 < flops / dense_flops <= target
    for group, kept in zip(cb.groups, cb.keep):
        if group.unit == "channel" and int(kept.sum()) < group.size:
            assert int(kept.sum()) % 8 == 0 or int(kept.sum()) == group.size, group.name
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("prune/flops_remaining")]
    assert rows and float(rows[-1]["prune/flops_remaining"]) == pytest.approx(flops / dense_flops, rel=1e-6)


def test_target_params_on_l0(tmp_path):
    from lightning_prune.callbacks.l0 import L0Pruning

    model = tiny_classifier("test_efficientnet")
    dense = sum(p.numel() for p in model.parameters())
    cb = L0Pruning(target_params=0.4, finalize_step=0.5, compress=True, verbose=False)
    fit_tiny([cb], tmp_path, model=model, **FAST)
    assert sum(p.numel() for p in model.model.parameters()) <= 0.4 * sum(
        p.numel() for p in tiny_classifier("test_efficientnet").model.parameters())
    assert sum(p.numel() for p in model.parameters()) < dense


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"target_flops": 0.0}, r"`target_flops` must be a number in \(0, 1\], got 0.0"),
    ({"target_flops": 1.5}, r"`target_flops` must be a number in \[0, 1\], got 1.5. HINT: a fraction"),
    ({"target_params": -0.1}, r"`target_params` must be a number in \[0, 1\], got -0.1"),
    ({"target_flops": 0.5, "target_params": 0.5}, r"Pass only one of `target_flops`, `target_params`"),
    ({"round_to": 0}, r"`round_to` must be an integer >= 1, got 0"),
    ({"round_to": 2.0}, r"`round_to` must be an integer >= 1, got 2.0"),
])
def test_size_target_bad_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        GroupLassoPruning(**kwargs)
