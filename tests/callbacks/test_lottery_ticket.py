"""LotteryTicket on real timm models running real Lightning training steps."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import timm
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_prune import create_callback
from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.callbacks.lottery_ticket import LotteryTicket, per_round_rate
from lightning_prune.functional.lottery import prune_count
from lightning_prune.testing import (
    TINY_MODELS,
    assert_state_equal,
    check_callback_conformance,
    fit_tiny,
    tiny_classifier,
    tiny_datamodule,
)
from lightning_prune.training.data import DigitsDataModule

FAST = {"limit_train_batches": 4, "limit_val_batches": 2}


class OrderedDigits(DigitsDataModule):
    """Digits without shuffling, so a round sees exactly the batches a fresh run would."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)


class FixedMasks(PruningCallback):
    """Trains with given masks from the first step (the reference for a faithful round)."""

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.fixed = masks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.update_masks(self.fixed)


class RoundProbe(Callback):
    """Placed after the LotteryTicket: records the model/optimizer/scheduler at the first batch of each round,
    the masks of every round, and a snapshot after optimizer step ``snapshot_step``."""

    def __init__(self, snapshot_step: int | None = None) -> None:
        self.snapshot_step = snapshot_step
        self.snapshot: dict[str, Any] | None = None
        self.round_starts: dict[int, dict[str, Any]] = {}

    def _lt(self, trainer: pl.Trainer) -> LotteryTicket:
        return next(cb for cb in trainer.callbacks if isinstance(cb, LotteryTicket))

    def _grab(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return {
            "module": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "optimizer": trainer.optimizers[0].state_dict(),
            "schedulers": [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs],
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        lt = self._lt(trainer)
        if lt.round not in self.round_starts:
            grab = self._grab(trainer, pl_module)
            grab["optimizer"] = _deepclone(grab["optimizer"])
            grab["masks"] = lt.masks.state_dict()
            self.round_starts[lt.round] = grab
            self.round_starts[lt.round]["global_step"] = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.snapshot is None and trainer.global_step == self.snapshot_step:
            self.snapshot = _deepclone(self._grab(trainer, pl_module))


def _deepclone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _deepclone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_deepclone(v) for v in value)
    return value


def _assert_rewound(start: dict[str, Any], reference: dict[str, torch.Tensor],
                    masks: dict[str, torch.Tensor]) -> None:
    """Every parameter and buffer equals the rewind point, times the mask for pruned tensors."""
    for name, value in start["module"].items():
        expected = reference[name] * masks[name] if name in masks else reference[name]
        assert torch.equal(value, expected), f"{name} was not rewound"


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_sparsity": 0.0}, r"`target_sparsity` must be in \(0, 1\), got 0.0. HINT"),
        ({"target_sparsity": 1.0}, r"`target_sparsity` must be a number in \[0, 1\), got 1.0. HINT: it is the"
                                   r" fraction pruned after the last round"),
        ({"target_sparsity": -0.2}, r"`target_sparsity` must be a number in \[0, 1\), got -0.2"),
        ({"target_sparsity": "20%"}, r"`target_sparsity` must be a number in \[0, 1\), got '20%'"),
        ({"target_sparsity": True}, r"`target_sparsity` must be a number in \[0, 1\), got True"),
        ({"rounds": 0}, r"`rounds` must be an integer >= 1, got 0. HINT: rounds=1 is one-shot"),
        ({"rounds": 2.5}, r"`rounds` must be an integer >= 1, got 2.5"),
        ({"epochs_per_round": 0}, r"`epochs_per_round` must be an integer >= 1, got 0"),
        ({"scope": "channel"}, r"`scope` must be one of \['global', 'layer'\], got 'channel'"),
        ({"reinit": "shuffle"}, r"`reinit` must be one of \['rewind', 'random'\], got 'shuffle'"),
        ({"rewind_step": "init"},
         r"`rewind_step` must be optimizer steps \(an int >= 0\) or a fraction .* got 'init'."
         r" HINT: 0 rewinds to the initial weights"),
        ({"rewind_step": -1}, r"`rewind_step` must be optimizer steps .* got -1"),
        ({"rewind_step": 1.5}, r"`rewind_step` must be optimizer steps .* fraction .* got 1.5"),
        ({"rewind_step": 1.0}, r"`rewind_step` as a fraction must be < 1, got 1.0"),
        ({"rewind_step": True}, r"`rewind_step` must be .* got True"),
        ({"output_sparsity": 1.0}, r"`output_sparsity` must be a number in \[0, 1\), got 1.0. HINT: 0 never"),
        ({"seed": -1}, r"`seed` must be an integer >= 0, got -1"),
        ({"output_layer": 3}, r"`output_layer` must be a glob pattern"),
        ({"mode": "best"}, r"`mode` must be one of \['max', 'min'\], got 'best'"),
        ({"monitor": ""}, r"`monitor` must be a metric name"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        LotteryTicket(**kwargs)


def test_too_few_epochs_fail_at_setup(tmp_path):
    with pytest.raises(MisconfigurationException,
                       match=r"needs `trainer.max_epochs` >= 6 \(3 segments of `epochs_per_round`=2 epochs"
                             r" for `rounds`=2\), got 5. HINT: set Trainer\(max_epochs=6\)"):
        fit_tiny([LotteryTicket(rounds=2, epochs_per_round=2)], tmp_path, max_epochs=5, **FAST)
    with pytest.raises(MisconfigurationException,
                       match=r"`rounds=3` trains 4 segments .* needs `trainer.max_epochs` >= 4, got 1"):
        fit_tiny([LotteryTicket(rounds=3)], tmp_path, max_epochs=1, **FAST)


def test_a_shortened_fit_runs_fewer_rounds_to_the_same_sparsity_and_says_so(tmp_path):
    ticket = LotteryTicket(rounds=3, target_sparsity=0.488, verbose=False)
    with pytest.warns(UserWarning, match=r"LotteryTicket: `rounds=3` needs 4 segments of at least one epoch,"
                                         r" but trainer.max_epochs=3: running 2 round\(s\) .* HINT: lower"):
        fit_tiny([ticket], tmp_path, max_epochs=3, **FAST)
    assert ticket.round == 2 and len(ticket.round_table) == 3
    masks = [m for _, m in ticket.masks.items()]
    pruned = sum(int((~m).sum()) for m in masks) / sum(m.numel() for m in masks)
    assert pruned == pytest.approx(0.488, abs=0.02)


def test_rewind_step_beyond_the_first_round_fails_before_training(tmp_path):
    with pytest.raises(MisconfigurationException,
                       match=r"`rewind_step`=8 is optimizer step 8, beyond the first round, which has 8 steps"
                             r" \(2 epochs of 4\). HINT: use a step < 8"):
        fit_tiny([LotteryTicket(rounds=1, epochs_per_round=2, rewind_step=8)], tmp_path, max_epochs=4, **FAST)


# ---------------------------------------------------------------------------------------------- the procedure
@pytest.mark.parametrize("model_name", list(TINY_MODELS))
def test_iterative_rounds_on_timm_families(tmp_path, model_name):
    """Two rounds of 20% (global): exactly round(0.2 * alive) pruned per round, survivors rewound to θ0."""
    lt, probe = LotteryTicket(rounds=2, epochs_per_round=1), RoundProbe()
    _, model = fit_tiny([lt, probe], tmp_path, model=tiny_classifier(model_name), max_epochs=3, **FAST)
    total = sum(m.numel() for _, m in lt.masks.items())
    kept = total - prune_count(total, 0.2)
    kept -= prune_count(kept, 0.2)
    assert sum(int(m.sum()) for _, m in lt.masks.items()) == kept
    assert lt.weights_remaining == pytest.approx(0.64, abs=1e-4)
    assert lt.round == 2 and [r["round"] for r in lt.history] == [0, 1]
    assert [r["weights_remaining"] for r in lt.history] == [1.0, pytest.approx(0.8, abs=1e-4)]
    state = model.state_dict()
    for name, mask in lt.masks.items():
        assert (state[name][~mask] == 0).all(), f"{name}: pruned weights are not zeros"
    # nested masks, rewound survivors
    theta0 = lt.rewind_state["module"]
    for r in (1, 2):
        masks = probe.round_starts[r]["masks"]
        for name, mask in masks.items():
            assert not (mask & ~probe.round_starts[r - 1]["masks"][name]).any()
        _assert_rewound(probe.round_starts[r], theta0, masks)
    # the model stays a plain model
    inner = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    fresh = timm.create_model(model_name, num_classes=10, **TINY_MODELS[model_name])
    fresh.load_state_dict(inner, strict=True)


def test_a_round_is_a_faithful_fresh_run(tmp_path):
    """Round 1 of the ticket == a fresh run of the masked θ0: weights, BN buffers, momentum and LR reset."""
    config = {"optimizer": "sgd", "momentum": 0.9, "scheduler": "multistep", "milestones": [1]}
    lt = LotteryTicket(rounds=1, epochs_per_round=1)
    pl.seed_everything(0, verbose=False)
    _, ticket = fit_tiny([lt], tmp_path / "a", model=tiny_classifier(**config),
                         datamodule=OrderedDigits(limit=320), max_epochs=2, **FAST)
    # the same init (fit_tiny seeds before building), the same masks from the first step, one epoch
    pl.seed_everything(0, verbose=False)
    fresh_model = tiny_classifier(**config)
    _, fresh = fit_tiny([FixedMasks(lt.masks.state_dict())], tmp_path / "b", model=fresh_model,
                        datamodule=OrderedDigits(limit=320), max_epochs=1, **FAST)
    for (name, a), b in zip(ticket.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), f"{name}: round 1 differs from a fresh run of the ticket"


@pytest.mark.parametrize("rewind", [5 / 24, 5])  # a fraction of the 24-step fit resolves to step 5
def test_late_rewinding_restores_weights_optimizer_and_scheduler(tmp_path, rewind):
    """Rewind to step 5 (of 8 in the first round): weights, momentum (masked) and the cosine scheduler, at
    every round (the saved point must not drift)."""
    lt, probe = LotteryTicket(rounds=2, epochs_per_round=2, rewind_step=rewind), RoundProbe(snapshot_step=5)
    model = tiny_classifier(momentum=0.9, scheduler="cosine")
    fit_tiny([lt, probe], tmp_path, model=model, max_epochs=6, **FAST)
    assert lt.rewind_at_step == 5 and lt.rewind_state["step"] == 5
    snap = probe.snapshot
    assert_state_equal(lt.rewind_state["module"], snap["module"])
    index = {id(p): i for i, p in enumerate(model.parameters())}
    for r in (1, 2):
        start = probe.round_starts[r]
        masks = start["masks"]
        _assert_rewound(start, snap["module"], masks)
        assert start["lr"] == snap["lr"] != probe.round_starts[0]["lr"]  # cosine stepped once before step 5
        assert start["schedulers"] == snap["schedulers"]
        for name, param in model.named_parameters():
            buf = start["optimizer"]["state"][index[id(param)]]["momentum_buffer"]
            expected = snap["optimizer"]["state"][index[id(param)]]["momentum_buffer"]
            expected = expected * masks[name] if name in masks else expected
            assert torch.equal(buf, expected), f"round {r}: momentum of {name} not rewound"


def test_random_reinit_control_is_seeded_and_keeps_the_masks(tmp_path):
    def run(seed: int, root: Path) -> tuple[LotteryTicket, RoundProbe]:
        lt, probe = LotteryTicket(rounds=1, epochs_per_round=1, reinit="random", seed=seed), RoundProbe()
        fit_tiny([lt, probe], root, max_epochs=2, **FAST)
        return lt, probe

    lt, probe = run(0, tmp_path / "a")
    _, again = run(0, tmp_path / "b")
    _, other = run(1, tmp_path / "c")
    start, theta0, masks = probe.round_starts[1], lt.rewind_state["module"], probe.round_starts[1]["masks"]
    params = dict(tiny_classifier().named_parameters())
    changed = 0
    for name, value in start["module"].items():
        assert torch.equal(value, again.round_starts[1]["module"][name]), f"{name}: not reproducible"
        ref = theta0[name]
        if name in params and ref.numel() > 1:  # a permutation of θ0's values, then masked
            if name in masks:
                assert (value[~masks[name]] == 0).all()
            else:
                assert torch.equal(value.reshape(-1).sort().values, ref.reshape(-1).sort().values)
            changed += int(not torch.equal(value, ref * masks[name] if name in masks else ref))
        else:  # buffers are rewound
            assert torch.equal(value, ref), name
    assert changed > 10
    assert any(not torch.equal(start["module"][n], other.round_starts[1]["module"][n]) for n in masks)


def test_layer_scope_prunes_every_layer_at_the_rate_and_never_the_timm_classifier(tmp_path):
    """`include` narrows the default set: naming the timm classifier does not make it a target."""
    lt = LotteryTicket(rounds=1, target_sparsity=0.2, epochs_per_round=1, scope="layer",
                       include=["layer*.conv*", "fc"])
    fit_tiny([lt], tmp_path, max_epochs=2, **FAST)
    assert "model.fc.weight" not in lt.masks and len(lt.masks) > 3
    for name, (pruned, total) in lt.masks.pruned_counts().items():
        assert name.startswith("model.layer") and pruned == prune_count(total, 0.2), name


def test_target_sparsity_is_reached_after_the_last_round():
    assert per_round_rate(0.36, 2) == 0.2 and per_round_rate(1 - 0.8**10, 10) == 0.2
    lt = LotteryTicket(rounds=3, target_sparsity=0.488)
    assert lt.per_round_rate == 0.2 and lt.output_per_round_rate == 0.1
    assert LotteryTicket(rounds=2, output_sparsity=0.19).output_per_round_rate == pytest.approx(1 - 0.81**0.5)


class _PlainMLP(pl.LightningModule):
    """No timm inside: the output layer is named with `output_layer`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.out = torch.nn.Linear(64, 32), torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.out(torch.relu(self.fc1(x[:, 0].flatten(1))))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_plain_lightning_module_with_named_output_layer(tmp_path):
    lt = LotteryTicket(rounds=2, epochs_per_round=1, scope="layer", output_layer="out")
    fit_tiny([lt], tmp_path, model=_PlainMLP(), datamodule=tiny_datamodule(image_size=8), max_epochs=3,
             **FAST)
    counts = lt.masks.pruned_counts()
    assert set(counts) == {"fc1.weight", "out.weight"}
    for name, rate in (("fc1.weight", 0.2), ("out.weight", 0.1)):
        kept = counts[name][1]
        for _ in range(2):
            kept -= prune_count(kept, rate)
        assert counts[name][1] - counts[name][0] == kept, name


def test_one_shot(tmp_path):
    lt = LotteryTicket(rounds=1, target_sparsity=0.9, epochs_per_round=1)
    _, model = fit_tiny([lt], tmp_path, max_epochs=3, **FAST)
    assert lt.round == 1 and lt.weights_remaining == pytest.approx(0.1, abs=1e-4)
    # the extra epoch keeps training the ticket
    assert [(r["round"], r["first_epoch"], r["last_epoch"]) for r in lt.round_table] == [(0, 0, 0), (1, 1, 2)]


def test_a_round_under_bf16_mixed_precision(tmp_path):
    """The CIFAR-10 recipe's precision (16-mixed on a GPU, bf16-mixed on a CPU): the masks are cut and the
    rewound weights stay in float32 under autocast."""
    lt = LotteryTicket(rounds=1, target_sparsity=0.9, epochs_per_round=1)
    _, model = fit_tiny([lt], tmp_path, max_epochs=2, precision="bf16-mixed",
                        limit_train_batches=2, limit_val_batches=1)
    assert lt.round == 1 and lt.weights_remaining == pytest.approx(0.1, abs=1e-4)
    weights = [p for n, p in model.named_parameters() if p.ndim > 1]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in weights)
    zeros = sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights)
    assert zeros >= 0.5, zeros


# ---------------------------------------------------------------------------------------------- resume, DDP
def test_conformance_with_defaults(tmp_path):
    check_callback_conformance(lambda: create_callback("lottery_ticket"), tmp_path)


@pytest.mark.parametrize("kwargs", [{}, {"reinit": "random", "scope": "layer"}])
def test_conformance_resume_inside_a_round_after_a_prune(tmp_path, kwargs):
    state = check_callback_conformance(lambda: LotteryTicket(rounds=1, epochs_per_round=2, **kwargs),
                                       tmp_path, max_epochs=4, resume_epoch=3)
    assert state["round"] == 1


def test_resume_mid_round_ends_with_the_same_ticket(tmp_path):
    """Late rewinding, momentum and a cosine schedule; resumed before the rewind point and inside round 1."""
    def make() -> tuple[LotteryTicket, pl.LightningModule]:
        return (LotteryTicket(rounds=2, epochs_per_round=2, rewind_step=0.25),  # step 6 of the 24-step fit
                tiny_classifier(momentum=0.9, scheduler="cosine"))

    lt, model = make()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    _, full = fit_tiny([lt, saver], tmp_path / "full", model=model, max_epochs=6, **FAST)
    assert lt.rewind_state["step"] == 6
    for epoch in (0, 2):  # before the rewind point; inside round 1 after one prune
        resumed_lt, resumed_model = make()
        _, resumed = fit_tiny([resumed_lt], tmp_path / f"resumed{epoch}", model=resumed_model,
                              ckpt_path=tmp_path / "ckpt" / f"epoch={epoch}.ckpt", max_epochs=6, **FAST)
        for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), f"resumed at epoch {epoch}: {name} differs"
        assert_state_equal(lt.state_dict(), resumed_lt.state_dict())


class _DumpState(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        lt = next(cb for cb in trainer.callbacks if isinstance(cb, LotteryTicket))
        torch.save({"state": lt.state_dict(), "weights": pl_module.state_dict()},
                   self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_agree_on_masks_and_rewind_point(tmp_path):
    lt = LotteryTicket(rounds=2, epochs_per_round=1, rewind_step=2, reinit="random")
    fit_tiny([lt, _DumpState(tmp_path)], tmp_path, max_epochs=3, strategy="ddp_spawn", devices=2,
             accelerator="cpu", **FAST)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert rank0["state"]["round"] == 2
    assert rank0["state"]["rewind_state"]["step"] == 2
    assert_state_equal(rank0["state"]["masks"], rank1["state"]["masks"], "masks")
    assert_state_equal(rank0["state"]["rewind_state"], rank1["state"]["rewind_state"], "rewind_state")
    assert_state_equal(rank0["weights"], rank1["weights"], "weights")


# ---------------------------------------------------------------------------------------------- logging
def test_rounds_are_logged_and_shown(tmp_path):
    lt = LotteryTicket(rounds=2, epochs_per_round=1)
    logger = CSVLogger(tmp_path, name="lt")
    trainer, _ = fit_tiny([lt], tmp_path, max_epochs=3, logger=logger, log_every_n_steps=1, **FAST)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    rounds = [(float(r["prune/round"]), float(r["prune/weights_remaining"]))
              for r in rows if r.get("prune/round")]
    assert rounds[0] == (0.0, 1.0) and rounds[-1][0] == 2.0 and rounds[-1][1] == pytest.approx(0.64, abs=1e-4)
    bests = [float(r["prune/best/val/acc"]) for r in rows if r.get("prune/best/val/acc")]
    assert bests == [pytest.approx(lt.history[0]["best"]), pytest.approx(lt.history[1]["best"])]
    assert trainer.progress_bar_metrics["prune/round"] == 2.0
    table = lt.summary(lt.round_table)
    assert table.splitlines()[1].split() == ["round", "remaining", "best", "val/acc", "epochs"]
    assert [line.split()[:2] for line in table.splitlines()[2:]] == [["0", "100.00%"], ["1", "80.00%"],
                                                                    ["2", "64.00%"]]


def test_missing_monitor_warns_and_keeps_going(tmp_path):
    lt = LotteryTicket(rounds=1, epochs_per_round=1, monitor="val/top5")
    with pytest.warns(UserWarning, match=r"`monitor='val/top5'` was not logged; available: .*val/acc"):
        fit_tiny([lt], tmp_path, max_epochs=2, **FAST)
    assert lt.history[0]["best"] is None and lt.round == 1


def test_wandb_table_and_per_round_mask_images(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), project="lp-test", offline=True)
    lt = LotteryTicket(rounds=2, epochs_per_round=1)
    fit_tiny([lt], tmp_path, max_epochs=3, logger=logger, **FAST)
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    media = run_dir / "files" / "media"
    tables = list((media / "table").rglob("rounds*.table.json"))
    assert tables, f"no rounds table under {media}"
    data = json.loads(tables[0].read_text())
    assert [row[0] for row in data["data"]] == [0, 1, 2]
    images = list((media / "images").rglob("*.png"))
    n_masks = len(lt.masks)
    assert len(images) >= 3 * n_masks  # two rounds + the final masks
