"""L0Pruning: hard-concrete channel gates in real Lightning fits on timm's tiny models."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_prune as lp
from lightning_prune.callbacks.l0 import HardConcreteGate, L0Pruning, NonFiniteGateError
from lightning_prune.functional import expected_l0, hard_concrete_gate
from lightning_prune.graph import ChannelGroup
from lightning_prune.testing import (
    TINY_MODELS,
    check_callback_conformance,
    fit_tiny,
    read_wandb_offline_history,
    tiny_classifier,
)
from tests.helpers import Spy, assert_amp_step_matches_fp32, eval_logits

FAMILIES = list(TINY_MODELS)
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
FAST = {"max_epochs": 3, "limit_train_batches": 4, "limit_val_batches": 1}
# gates that start near the test-time threshold (log_alpha = -log 11 = -2.398) under a strong penalty:
# within a few steps some channels close for good while the data keeps others open
STRONG = {"lam": 0.05, "gate_lr": 0.3, "log_alpha_init": -1.5, "init_std": 1.0, "verbose": False}


# ------------------------------------------------------------------ conformance and resume
def test_conformance_defaults(tmp_path):
    state = check_callback_conformance(lambda: lp.create_callback("l0"), tmp_path)
    assert state["finalized"] and state["gates"]["names"] and state["seed"] is not None
    assert lp.L0Pruning is L0Pruning


def test_resume_mid_training_with_noise_schedule_and_hard_penalty(tmp_path):
    """log_alpha, the gate optimizer, the noise generator and the scheduled temperature resume exactly."""
    make = lambda: L0Pruning(penalty="hard", temperature=0.05, temperature_final=0.01,  # noqa: E731
                             finalize_step=1.0, **STRONG)
    state = check_callback_conformance(make, tmp_path, model_name="test_efficientnet")
    assert state["generator"] is not None and state["temperature"] < 0.05
    # clipped to [-4, 4]
    assert all(float(g["log_alpha"].abs().max()) <= 4.0 for g in state["gates"]["gates"])


# ------------------------------------------------------- gates: stochastic in training, deterministic in eval
def test_gates_stochastic_in_training_deterministic_in_validation(tmp_path):
    calls = []

    def wrap(trainer, module, hook):
        gate = cb.gateset.gates[0]
        original = gate.compute

        def compute(training):
            value = original(training)
            if training or trainer.validating:  # (not the logging of the gate values at the epoch's end)
                calls.append((training, trainer.training, value.detach().clone(),
                              gate.log_alpha.detach().clone()))
            return value

        gate.compute = compute

    cb = L0Pruning(log_alpha_init=0.0, lam=0.0, finalize_step=1.0, verbose=False)
    fit_tiny([cb, Spy(wrap, ("on_fit_start",))], tmp_path, max_epochs=1, limit_train_batches=6,
             limit_val_batches=2)
    train = [v for t, tt, v, _ in calls if t]
    val = [(v, la) for t, tt, v, la in calls if not t]
    assert len(train) == 6 and len(val) == 2
    assert all(tt for t, tt, _, _ in calls if t) and not any(tt for t, tt, _, _ in calls if not t)
    z = torch.cat(train)
    assert 0 <= z.min() and z.max() <= 1 and (z == 0).any() and (z == 1).any()  # the stretch + clamp
    assert not torch.equal(train[0], train[1])  # fresh noise per batch
    for value, la in val:  # validation: the test-time gate, the same for every batch
        torch.testing.assert_close(value, hard_concrete_gate(la))
    torch.testing.assert_close(val[0][0], val[1][0])


def test_open_fraction_of_training_gates_matches_expected_l0(tmp_path):
    """Monte Carlo check in a real fit: the share of open gates over the batches is P(z > 0)."""
    opened = []

    def record(trainer, module, hook):
        for gate in cb.gateset.gates:
            def compute(training, original=gate.compute):
                value = original(training)
                if training:
                    opened.append((value > 0).float())
                return value

            gate.compute = compute

    cb = L0Pruning(log_alpha_init=0.0, init_std=0.0, lam=0.0, gate_lr=1e-12, finalize_step=1.0, verbose=False)
    fit_tiny([cb, Spy(record, ("on_fit_start",))], tmp_path, max_epochs=1, limit_train_batches=10,
             limit_val_batches=0)
    z = torch.cat(opened)
    assert z.numel() == 7 * sum(g.size for g in cb.groups)  # one draw per channel and batch: 7 x 288
    # P(z > 0) at log_alpha = 0 (Louizos et al.); sd of the mean 0.008
    assert z.mean().item() == pytest.approx(0.8318, abs=0.025)


def test_penalty_gradient_equals_autograd_of_expected_l0(tmp_path):
    cb = L0Pruning(lam=0.3, finalize_step=1.0, log_alpha_init=-2.0, init_std=1.0, verbose=False)
    fit_tiny([cb], tmp_path, max_steps=1, max_epochs=1, limit_val_batches=0)
    for gate in cb.gateset.gates:
        gate.log_alpha.grad = None
    value = cb.gate_penalty_grad_(step=1)
    expected_value = 0.0
    for gate in cb.gateset.gates:
        la = gate.log_alpha.detach().double()
        p = torch.sigmoid(la - (2 / 3) * math.log(0.1 / 1.1))  # P(z > 0), its derivative p (1 - p)
        torch.testing.assert_close(gate.log_alpha.grad.double(), 0.3 * p * (1 - p), rtol=1e-5, atol=1e-7)
        expected_value += 0.3 * float(expected_l0(gate.log_alpha.detach()).sum())
    assert value == pytest.approx(expected_value, rel=1e-5)
    assert cb.expected_active_channels() == pytest.approx(expected_value / 0.3, rel=1e-5)


def test_hard_penalty_gradient_is_the_hard_sigmoid_slope():
    cb = L0Pruning(penalty="hard", lam=2.0)
    cb.groups = [ChannelGroup("g", 3, "channel", 1, (), (), ("g",))]
    cb._build_gates()
    cb.gateset.gates[0].log_alpha.data = torch.tensor([-6.0, 0.0, 3.0])
    cb.gate_penalty_grad_(0)
    # d/dx clamp((x - beta log(1/11) + 4) / 8, 0, 1): 1/8 inside the linear zone, 0 where it saturates
    torch.testing.assert_close(cb.gateset.gates[0].log_alpha.grad, torch.tensor([0.0, 2 / 8, 0.0]))


def test_initialisation_from_droprate_or_constant():
    group = ChannelGroup("model.layer1.0.conv1", 2000, "channel", 1, (), (), ("p",))
    paper = L0Pruning(droprate_init=0.3, seed=1).make_gate(group).log_alpha.detach()
    assert (paper.mean().item() == pytest.approx(0.847, abs=2e-3)
            and paper.std().item() == pytest.approx(0.01, rel=0.1))
    seed = L0Pruning(init_std=0.0).make_gate(group).log_alpha.detach()
    assert torch.equal(seed, torch.full((2000,), 2.5))
    assert isinstance(L0Pruning().make_gate(group), HardConcreteGate)


# ------------------------------------------------------------------ temperature, clamping, numerical safety
def test_temperature_schedule_and_clamp(tmp_path):
    betas, ranges = [], []

    def spy(trainer, module, hook):
        if not cb.finalized:
            betas.append((trainer.global_step, cb.gateset.gates[0].beta))
            ranges.append(torch.cat([g.log_alpha.detach() for g in cb.gateset.gates]))

    cb = L0Pruning(temperature=0.05, temperature_final=0.01, finalize_step=0.5, lam=5.0, gate_lr=1.0,
                   log_alpha_init=-3.0, verbose=False)
    fit_tiny([cb, Spy(spy, ("on_train_batch_end",))], tmp_path, max_epochs=2, limit_train_batches=5,
             limit_val_batches=0)
    assert cb.finalize_at_step == 5 and cb._horizon == 5
    for step, beta in betas:  # set at the start of each batch: linear from 0.05 to 0.01 over the 5 gate steps
        assert beta == pytest.approx(0.05 - 0.04 * min(step - 1, 5) / 5)
    la = torch.cat(ranges)
    # the paper's clamp was reached, not exceeded
    assert la.min() >= math.log(1e-2) - 1e-6 and la.min() < -4.5


@pytest.mark.parametrize(("where", "match"), [
    ("log_alpha",
     r"non-finite log_alpha in layer 'model\.[\w.]+' \(channels \[3\]\) at step 2 \(before the forward"),
    ("gradient", r"non-finite gradient of log_alpha in layer 'model\.[\w.]+' at step 2. HINT"),
])
def test_injected_nan_stops_with_layer_and_step(tmp_path, where, match):
    def inject(trainer, module, hook):
        if trainer.global_step == 2:
            gate = cb.gateset.gates[1]
            if where == "log_alpha":
                with torch.no_grad():
                    gate.log_alpha[3] = float("nan")
            else:  # what a NaN loss does to the gates
                gate.log_alpha.register_hook(lambda g: torch.full_like(g, float("nan")))

    cb = L0Pruning(finalize_step=1.0, verbose=False)
    with pytest.raises(NonFiniteGateError, match=match) as info:
        fit_tiny([cb, Spy(inject)], tmp_path, max_epochs=1, limit_train_batches=5, limit_val_batches=0)
    assert repr(cb.groups[1].name) in str(info.value)


def test_non_finite_penalty_raises():
    cb = L0Pruning()
    cb.groups = [ChannelGroup("model.block.conv", 2, "channel", 1, (), (), ("p",))]
    cb._build_gates()
    cb.gateset.gates[0].log_alpha.data = torch.tensor([0.0, float("inf")])
    with pytest.raises(NonFiniteGateError,
                       match=r"non-finite log_alpha in layer 'model.block.conv' \(channels \[1\]\)"
                             r" at step 7 \(before the gate step\)"):
        cb.gate_penalty_grad_(7)


# ------------------------------------------------------- finalisation and compression on several families
#: L0 decides the units and GatePruningCallback.finalize folds and compresses them: the family-specific folds
#: run for every family in test_group_lasso.py::test_fold_keeps_outputs_and_compress_equals_masked_model;
#: here a convnet and the heads of a ViT, the other two families with -m slow
@pytest.mark.parametrize("name", [n if n in ("test_resnet", "test_vit") else
                                  pytest.param(n, marks=pytest.mark.slow) for n in FAMILIES])
def test_finalize_folds_prunes_and_compresses(name, tmp_path):
    """At finalisation the test-time gate is folded (eval logits unchanged), closed channels are masked and
    stay zero through fine-tuning, and the compressed model computes what the masked one did."""
    seen = {}

    def before(trainer, module, hook):
        if not cb.finalized:
            seen["gated"] = eval_logits(module, X)
            seen["keep"] = cb.final_keep()

    def after(trainer, module, hook):
        seen["compressed"] = eval_logits(module, X)

    cb = L0Pruning(finalize_step=1.0, compress=True, round_to=1, **STRONG)  # widths as the gates chose them
    model = tiny_classifier(name)
    dense = sum(p.numel() for p in model.parameters())
    fit_tiny([Spy(before, ("on_train_end",)), cb, Spy(after, ("on_train_end",))], tmp_path, model=model,
             **FAST)
    kept, total = sum(int(k.sum()) for k in seen["keep"]), sum(k.numel() for k in seen["keep"])
    assert cb.finalized and 0 < kept < total
    assert sum(p.numel() for p in model.parameters()) < dense
    torch.testing.assert_close(seen["compressed"], seen["gated"], atol=1e-4, rtol=1e-4)


def _reader_columns(module, group):
    """Per unit, the weight columns of the group's first reader (one row per unit: what gates scale)."""
    return _reader_columns_of(module.get_submodule(group.input_sites()[0].module).weight.detach(), group)


def _reader_columns_of(weight, group):
    site = group.input_sites()[0]
    first = {}
    for channel, unit in zip(site.channels, site.units):
        first.setdefault(unit, channel)
    return torch.stack([weight[:, first[u]].reshape(-1) for u in range(group.size)])


def test_finalize_step_fraction_then_fine_tune_with_fixed_masks(tmp_path):
    history = []

    def spy(trainer, module, hook):
        if cb.finalized:
            history.append({g.name: _reader_columns(module, g) for g in cb.groups})

    cb = L0Pruning(finalize_step=0.5, **STRONG)
    _, model = fit_tiny([cb, Spy(spy)], tmp_path, **FAST)
    assert cb.finalized and not cb.gateset.attached and len(history) == 7  # from the finalising batch on
    keep = cb.keep
    assert 0 < sum(int(k.sum()) for k in keep) < sum(k.numel() for k in keep)
    for snap in history:  # pruned units stay exactly unread while fine-tuning moves the rest
        for group, kept in zip(cb.groups, keep):
            assert (snap[group.name][~kept] == 0).all()
    assert any(not torch.equal(history[0][n], history[-1][n]) for n in history[0])
    assert set(model.state_dict()) == set(tiny_classifier().state_dict())


def test_seed_rule_binarises_log_alpha_without_folding(tmp_path):
    seen = {}

    def snapshot(key):
        def spy(trainer, module, hook):
            if trainer.global_step == 2 and key not in seen:
                seen[key] = ([g.log_alpha.detach().clone() for g in cb.gateset.gates],
                             [_reader_columns(module, g) for g in cb.groups])
        return spy

    cb = L0Pruning(final_rule="log_alpha", finalize_step=0.5, round_to=1, **{**STRONG, "log_alpha_init": 0.0})
    fit_tiny([Spy(snapshot("before")), cb, Spy(snapshot("after"))], tmp_path, max_epochs=1,
             limit_train_batches=4, limit_val_batches=0)
    assert cb.finalized and cb.finalize_at_step == 2
    keep = cb.final_keep()
    assert 0 < sum(int(k.sum()) for k in keep) < sum(k.numel() for k in keep)
    for group, la, k, w0, w1 in zip(cb.groups, seen["before"][0], keep, seen["before"][1], seen["after"][1]):
        assert torch.equal(k, la >= 0)  # the Habr channel-pruning article: mask = [log_alpha >= 0]
        # its rows may belong to another group's pruned units
        reader = f"{group.input_sites()[0].module}.weight"
        rows = _reader_columns_of(cb.masks[reader].float(), group)
        assert torch.equal(w1[k], (w0 * rows)[k])  # binary gate: kept channels are not rescaled
        assert (w1[~k] == 0).all()


# ------------------------------------------------------------------ AMP
def _amp_delta(tmp_path, **kwargs) -> torch.Tensor:
    cb = L0Pruning(lam=0.0, gate_optimizer="sgd", gate_lr=0.1, finalize_step=1.0, log_alpha_init=0.0,
                   init_std=0.0, seed=3, verbose=False)
    fit_tiny([cb], tmp_path, max_steps=1, max_epochs=1, limit_val_batches=0, **kwargs)
    return torch.cat([g.log_alpha.detach() for g in cb.gateset.gates])


def test_amp_gate_gradients_are_unscaled(tmp_path):
    """A loss scale of 2**12 must not reach log_alpha: one SGD step matches full precision (same noise)."""
    assert_amp_step_matches_fp32(_amp_delta, tmp_path, rel=0.15, min_cosine=0.9)


# ------------------------------------------------------------------ logging
def test_logs_expected_active_channels_and_wandb_histograms(tmp_path):
    import wandb

    csv_logger = CSVLogger(tmp_path, name="csv")
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lp-test")
    cb = L0Pruning(finalize_step=1.0, **STRONG)
    try:
        fit_tiny([cb], tmp_path, logger=[csv_logger, wandb_logger], log_every_n_steps=1, max_epochs=1,
                 limit_train_batches=3, limit_val_batches=0)
    finally:
        wandb.finish()
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    active = [float(r["prune/expected_active_channels"]) for r in rows
              if r.get("prune/expected_active_channels")]
    assert active and 0 < active[-1] < sum(g.size for g in cb.groups)
    assert any(r.get("prune/temperature") for r in rows)
    history = read_wandb_offline_history(next((tmp_path / "wandb").glob("offline-run-*")))
    key = f"prune/open_probability/{cb.groups[0].name}/_type"
    assert any(r.get(key) == "histogram" for r in history)
    assert any(r.get(f"prune/log_alpha/{cb.groups[0].name}/_type") == "histogram" for r in history)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lam": -1.0}, r"`lam` must be a number >= 0, got -1.0. HINT"),
    ({"penalty": "l1"}, r"`penalty` must be one of \['expected_l0', 'hard'\], got 'l1'. HINT"),
    ({"temperature": 0}, r"`temperature` must be a number > 0, got 0. HINT"),
    ({"temperature_final": -0.1}, r"`temperature_final` must be a number > 0, got -0.1. HINT"),
    ({"log_alpha_init": 2.5, "droprate_init": 0.5},
     r"`log_alpha_init` \(2.5\) and `droprate_init` \(0.5\) are exclusive. HINT"),
    ({"log_alpha_init": float("nan")}, r"`log_alpha_init` must be a finite number, got nan"),
    ({"droprate_init": 1.0}, r"`droprate_init` must be in \(0, 1\), got 1.0. HINT"),
    ({"init_std": -1}, r"`init_std` must be a number >= 0"),
    ({"log_alpha_range": (4, -4)}, r"`log_alpha_range` must be None or a pair \(low, high\).*HINT"),
    ({"log_alpha_range": [0.0]}, r"`log_alpha_range` must be None or a pair"),
    ({"final_rule": "threshold"},
     r"`final_rule` must be one of \['test_gate', 'log_alpha'\], got 'threshold'. HINT"),
    ({"seed": -3}, r"`seed` must be an integer >= 0, got -3"),
    ({"seed": 1.5}, r"`seed` must be an integer >= 0, got 1.5"),
    ({"gate_lr": 0}, r"`gate_lr` must be a number > 0, got 0"),
    ({"gate_optimizer": "rmsprop"}, r"`gate_optimizer` must be one of \['adam', 'sgd'\]"),
    ({"finalize_step": 1.5}, r"`finalize_step` must be optimizer steps .* got 1.5. HINT"),
    ({"clamp_log_alpha": "no"}, r"`clamp_log_alpha` must be True or False"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        L0Pruning(**kwargs)


def test_clamp_range_defaults():
    assert L0Pruning().clamp_range == pytest.approx((-4.60517, 4.60517), abs=1e-5)
    assert L0Pruning(penalty="hard").clamp_range == (-4.0, 4.0)
    assert L0Pruning(log_alpha_range=(-3, 3)).clamp_range == (-3.0, 3.0)
    assert L0Pruning(clamp_log_alpha=False).clamp_range is None


# ------------------------------------------------------------------ DDP
def _ddp_record(trainer, module, hook):
    cb = next(c for c in trainer.callbacks if isinstance(c, L0Pruning))
    out = Path(os.environ["LP_TEST_DDP_DIR"]) / f"{hook}{trainer.global_rank}.pt"
    torch.save({"log_alpha": [g.log_alpha.detach().cpu() for g in cb.gateset.gates], "seed": cb._seed_used,
                "keep": cb.final_keep()}, out)


@pytest.mark.slow
def test_ddp_gates_identical_across_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("LP_TEST_DDP_DIR", str(tmp_path))
    cb = L0Pruning(finalize_step=1.0, **STRONG)
    fit_tiny([Spy(_ddp_record, ("on_train_end", "on_train_batch_start")), cb], tmp_path, strategy="ddp_spawn",
             devices=2, max_epochs=2, limit_train_batches=3, limit_val_batches=0)
    r0, r1 = torch.load(tmp_path / "on_train_end0.pt"), torch.load(tmp_path / "on_train_end1.pt")
    assert r0["seed"] == r1["seed"]
    for a, b in zip(r0["log_alpha"] + r0["keep"], r1["log_alpha"] + r1["keep"]):
        assert torch.equal(a, b)
    first = torch.load(tmp_path / "on_train_batch_start0.pt")  # the last batch's start: gates had trained
    assert any(not torch.equal(a, b) for a, b in zip(r0["log_alpha"], first["log_alpha"]))
