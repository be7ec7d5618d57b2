"""Lottery tickets: iterative magnitude pruning with rewinding, inside one ``trainer.fit``.

Frankle & Carbin, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural Networks", ICLR 2019,
arXiv:1803.03635; late rewinding from Frankle, Dziugaite, Roy & Carbin, "Stabilizing the Lottery Ticket
Hypothesis", 2019, arXiv:1903.01611.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.callbacks.logging import PREFIX, log_images, log_scalars, log_table, mask_image
from lightning_prune.callbacks.schedules import resolve_step, steps_per_epoch
from lightning_prune.callbacks.state import resolve_seed, seeded_generator
from lightning_prune.core.sharding import (
    full_copy,
    is_sharded,
    local_slice,
    local_tensor,
    shard_like,
    shard_position,
    shard_reduce,
)
from lightning_prune.core.targets import matches, timm_module_names
from lightning_prune.functional.lottery import (
    prune_by_percent,
    prune_by_percent_across,
    remaining_fraction,
    shuffle_like,
)
from lightning_prune.validation import (
    check_choice,
    check_fraction,
    check_int,
    check_optional,
    check_patterns,
    check_position,
)

__all__ = ["LotteryTicket"]


def per_round_rate(target_sparsity: float, rounds: int) -> float:
    """The fraction of the surviving weights pruned each round so that ``rounds`` rounds reach
    ``target_sparsity``: ``1 - (1 - target) ** (1 / rounds)`` (rounded to 12 digits, so 0.36 over 2 rounds is
    exactly 0.2).

    Example::

        >>> per_round_rate(0.36, 2), per_round_rate(0.2, 1)
        (0.2, 0.2)
    """
    return round(1.0 - (1.0 - target_sparsity) ** (1.0 / rounds), 12)


def _cpu_clone(value: Any) -> Any:
    """Deep copy of a (nested) state with every tensor detached, cloned and moved to the CPU (a sharded tensor
    is cloned where it is: its shards, sharded like the weights)."""
    if is_sharded(value):
        return value.detach().clone()
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: _cpu_clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cpu_clone(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_cpu_clone(v) for v in value)
    return value


def _sharded_like(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer state read back whole (a checkpoint's rewind point) sharded like the optimizer's own
    parameters again; unchanged when nothing is sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state.get("state", {}).items():
        param = params[index] if isinstance(index, int) and index < len(params) else None
        if param is None or not is_sharded(param):
            continue
        for key, value in entry.items():
            if isinstance(value, Tensor) and not is_sharded(value) and value.shape == param.shape:
                entry[key] = shard_like(value, param)
    return state


class LotteryTicket(PruningCallback):
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019): the lottery-ticket procedure.

    One ``trainer.fit`` runs ``rounds + 1`` training segments of ``epochs_per_round`` epochs. At the end of
    each segment but the last (in practice at the start of the next epoch, before any step) the callback

    1. prunes the same fraction ``r = 1 - (1 - target_sparsity) ** (1 / rounds)`` of the *surviving* weights
       by magnitude (``round(r * alive)``, so ``(1 - r) ** k`` remain after ``k`` rounds and
       ``target_sparsity`` is pruned after the last), globally or layer by layer, the output layer on its own
       (``output_sparsity``) when it is a target;
    2. resets the whole module (every parameter *and buffer*, BatchNorm running statistics included) to
       the rewind point: the initial weights (``rewind_step=0``), or those after ``rewind_step`` optimizer
       steps (late rewinding); with ``reinit="random"`` the parameters are instead a fresh seeded draw of the
       rewind point's values (each tensor's values randomly permuted), the random re-initialisation control;
    3. restores the optimizer state (momentum, Adam moments, learning rates) and the LR scheduler state
       saved at the rewind point, so every round is a faithful fresh run of the masked network.

    The fit ends with the trained ticket. The rewind point (CPU copies of the module, optimizer and
    scheduler state), the masks, the round and the per-round history live in the callback's state, so a
    run resumed from any checkpoint ends with the same ticket; the model keeps its own ``state_dict`` keys.
    Under DDP the masks and the rewind point are broadcast from rank zero.

    Every round logs ``prune/round``, ``prune/weights_remaining`` and ``prune/best/<monitor>`` (best
    validation value of the round); the progress bar shows ``prune/round``; the end of training prints a
    per-round table (and logs it, with per-round mask images, to W&B when a ``WandbLogger`` is attached).

    Args:
        rounds: pruning rounds (``1`` = one-shot pruning).
        target_sparsity: fraction of the targeted weights pruned after the last round, in (0, 1); default
            0.36, two rounds of Frankle & Carbin's 20%. Ten rounds of 20%: ``1 - 0.8 ** 10 = 0.8926``.
        epochs_per_round: epochs of each training segment; default ``trainer.max_epochs // (rounds + 1)``.
            Epochs beyond ``(rounds + 1) * epochs_per_round`` keep training the final ticket.
        scope: ``"global"`` (one ranking over all targets, as for ResNet/VGG) or ``"layer"`` (each layer at
            the same rate, as for LeNet/Conv-*).
        output_sparsity: final sparsity of the output layer(s) when they are targets (a plain ``nn.Module``'s;
            a timm model's classifier is never a target), in [0, 1); default: half the per-round rate every
            round, as in Frankle & Carbin; ``0`` never prunes them. Output layers are always ranked on their
            own.
        output_layer: globs naming the output layer(s); default: the ``pretrained_cfg["classifier"]`` of every
            timm model (give it for a plain ``nn.Module``).
        rewind_step: the rewind point: ``0`` (the initial weights, Frankle & Carbin), an optimizer step of the
            first round, or a fraction of the whole training (float in [0, 1)) that falls in the first round
            (late rewinding).
        reinit: ``"rewind"`` (the ticket) or ``"random"`` (the control: same procedure, parameters re-drawn
            at every round from a generator seeded with ``seed`` and the round).
        seed: seed of the random re-initialisation; ``None`` = ``torch.initial_seed()`` (what
            ``seed_everything`` set), rank zero's under DDP.
        monitor: validation metric whose best value per round is logged and tabulated.
        mode: ``"max"`` or ``"min"``: what "best" means for ``monitor``.
        include, exclude, types, log_media_every_n_epochs, verbose: see :class:`PruningCallback` (mask images
            are also logged at every round).

    Raises:
        MisconfigurationException: on a bad argument, when ``trainer.max_epochs`` is too small for the rounds
            (at setup) or when the rewind step lies beyond the first round (at the start of training).

    Example::

        # 5 rounds of 20% (1 - 0.8**5 = 0.672 pruned), late rewinding to 1% of the fit
        ticket = LotteryTicket(rounds=5, target_sparsity=0.672, rewind_step=0.01)
        trainer = Trainer(max_epochs=60, callbacks=[ticket])
        trainer.fit(ImageClassifier("resnet18"), DigitsDataModule())
    """

    def __init__(
        self,
        rounds: int = 2,
        target_sparsity: float = 0.36,
        epochs_per_round: int | None = None,
        scope: str = "global",
        output_sparsity: float | None = None,
        output_layer: str | list[str] | None = None,
        rewind_step: int | float = 0,
        reinit: str = "rewind",
        seed: int | None = None,
        monitor: str = "val/acc",
        mode: str = "max",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        types: list[str | type] | None = None,
        log_media_every_n_epochs: int = 1,
        verbose: bool = True,
    ) -> None:
        super().__init__(include=include, exclude=exclude, types=types,
                         log_media_every_n_epochs=log_media_every_n_epochs, verbose=verbose)
        self.rounds = check_int("rounds", rounds, 1, hint="rounds=1 is one-shot pruning.")
        self._configured_rounds = self.rounds  # `rounds` as given (a shortened fit runs fewer)
        self.target_sparsity = check_fraction(
            "target_sparsity", target_sparsity,
            hint="it is the fraction pruned after the last round; k rounds of 20% prune 1 - 0.8**k (0.36 for"
            " 2, 0.8926 for 10).")
        if self.target_sparsity == 0.0:
            raise MisconfigurationException(
                "`target_sparsity` must be in (0, 1), got 0.0. HINT: a lottery ticket prunes something each"
                " round.")
        self.per_round_rate = per_round_rate(self.target_sparsity, self.rounds)
        self.epochs_per_round = check_optional(
            check_int, "epochs_per_round", epochs_per_round, 1,
            hint="leave it None to split trainer.max_epochs evenly over the rounds + 1 segments.")
        self.scope = check_choice("scope", scope, ("global", "layer"))
        self.output_sparsity = check_optional(
            check_fraction, "output_sparsity", output_sparsity,
            hint="0 never prunes the output layer (open_lth's default for ResNet/VGG); None prunes it at half"
            " the per-round rate.")
        self.output_per_round_rate = (self.per_round_rate / 2 if self.output_sparsity is None
                                      else per_round_rate(self.output_sparsity, self.rounds))
        self.output_layer = check_patterns("output_layer", output_layer)
        self.rewind_step = check_position(
            "rewind_step", rewind_step,
            hint="0 rewinds to the initial weights; late rewinding uses a few percent of the first round,"
            " e.g. rewind_step=100 or a small fraction of the fit such as 0.01.")
        if isinstance(self.rewind_step, float) and self.rewind_step >= 1.0:
            raise MisconfigurationException(
                f"`rewind_step` as a fraction must be < 1, got {rewind_step!r}. HINT: the rewind point lies"
                " in the first round.")
        self.reinit = check_choice("reinit", reinit, ("rewind", "random"))
        self.seed = check_optional(check_int, "seed", seed, 0)
        if not isinstance(monitor, str) or not monitor:
            raise MisconfigurationException(
                f"`monitor` must be a metric name such as 'val/acc', got {monitor!r}.")
        self.monitor = monitor
        self.mode = check_choice("mode", mode, ("max", "min"))
        # state (all of it in `extra_state_dict`)
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self.round_best: float | None = None
        self.rewind_at_step: int | None = self.rewind_step if isinstance(self.rewind_step, int) else None
        self.rewind_state: dict[str, Any] | None = None
        self._seed_used: int | None = self.seed
        self._epochs: int | None = self.epochs_per_round
        self._output_names: set[str] = set()
        self._warned_monitor = False
        #: every round of the finished fit (``history`` plus the last round), filled at the end of training
        self.round_table: list[dict[str, Any]] = []

    supports_sharding = True
    removal_refusal = ("its rewind snapshot and round masks hold the weights before the removal (rewinding"
                       " would load the old shapes)")

    @override
    def check_sharded_masks(self) -> None:
        assert self.masks is not None
        if self.reinit == "random":
            raise MisconfigurationException(
                "LotteryTicket(reinit='random') cannot shuffle sharded weights (a permutation of the whole"
                " tensor). HINT: reinit='rewind' under ModelParallelStrategy, or train with strategy='ddp'.")
        odd = [n for n in self.masks if shard_position(self.masks.param(n)) is None]
        if odd:
            raise MisconfigurationException(
                f"LotteryTicket needs weights sharded along dim 0 on a one-dimensional mesh (fully_shard's"
                f" default); {odd[:4]} are not. HINT:"
                " fully_shard(module, mesh=self.device_mesh['data_parallel']).")

    @override
    def state_key_args(self) -> dict[str, Any]:
        return {**super().state_key_args(), "rounds": self._configured_rounds,
                "target_sparsity": self.target_sparsity,
                "scope": self.scope, "rewind_step": self.rewind_step, "reinit": self.reinit}

    # ------------------------------------------------------------------ schedule
    def round_of_epoch(self, epoch: int) -> int:
        """Which round (0 = dense) the epoch belongs to."""
        assert self._epochs is not None
        return min(epoch // self._epochs, self.rounds)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        patterns = self.output_layer
        classifiers = set() if patterns else timm_module_names(pl_module, ("classifier",))
        self._output_names = {
            t.name for t in self.targets
            if (matches(t.module_name, patterns) if patterns else t.module_name in classifiers)
        }
        if stage != "fit":
            return
        segments = self.rounds + 1
        max_epochs = trainer.max_epochs
        unlimited = max_epochs is None or max_epochs < 0
        if self._epochs is None:
            if unlimited or max_epochs < 2:
                raise MisconfigurationException(
                    f"LotteryTicket with `rounds={self.rounds}` trains {segments} segments (the dense"
                    f" network, then one per pruning round) and needs `trainer.max_epochs` >= {segments}, got"
                    f" {max_epochs}."
                    f" HINT: set Trainer(max_epochs={segments * 2}) or more, or give `epochs_per_round`."
                )
            if max_epochs < segments:  # a shortened run: fewer rounds of one epoch, to the same sparsity
                fitted = max_epochs - 1
                rate = per_round_rate(self.target_sparsity, fitted)
                rank_zero_warn(
                    f"LotteryTicket: `rounds={self.rounds}` needs {segments} segments of at least one epoch,"
                    f" but trainer.max_epochs={max_epochs}: running {fitted} round(s) of one epoch to the"
                    f" same `target_sparsity`={self.target_sparsity} ({rate:.0%} pruned per round instead of"
                    f" {self.per_round_rate:.0%}). HINT: lower `rounds`, or train {segments} epochs or more.")
                self.rounds, self.per_round_rate = fitted, rate
                self.output_per_round_rate = (rate / 2 if self.output_sparsity is None
                                              else per_round_rate(self.output_sparsity, fitted))
                segments = fitted + 1
            self._epochs = max_epochs // segments
        needed = segments * self._epochs
        if not unlimited and max_epochs < needed:
            raise MisconfigurationException(
                f"LotteryTicket needs `trainer.max_epochs` >= {needed} ({segments} segments of"
                f" `epochs_per_round`={self._epochs} epochs for `rounds`={self.rounds}), got {max_epochs}."
                f" HINT: set Trainer(max_epochs={needed}) or lower `rounds`/`epochs_per_round`."
            )

    # ------------------------------------------------------------------ rewind point
    def _resolve_rewind_step(self, trainer: pl.Trainer) -> None:
        assert self._epochs is not None
        per_epoch = steps_per_epoch(trainer)
        if self.rewind_at_step is None:  # a fraction of the training
            self.rewind_at_step = resolve_step("rewind_step", self.rewind_step, trainer)
        if per_epoch is None:
            return
        steps = self._epochs * per_epoch
        if self.rewind_at_step >= steps:
            raise MisconfigurationException(
                f"`rewind_step`={self.rewind_step!r} is optimizer step {self.rewind_at_step}, beyond the"
                f" first round, which has {steps} steps ({self._epochs} epochs of {per_epoch})."
                f" HINT: use a step < {steps}, or a smaller fraction of the training."
            )

    def _capture_rewind_point(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {
            "step": int(trainer.global_step),
            "module": _cpu_clone(pl_module.state_dict()),
            "optimizers": [_cpu_clone(opt.state_dict()) for opt in trainer.optimizers],
            "schedulers": [_cpu_clone(cfg.scheduler.state_dict()) for cfg in trainer.lr_scheduler_configs],
        }
        # sharded: every rank keeps the snapshot of its own shards (as the weights: 1/world per rank)
        self.rewind_state = state if self.masks is not None and self.masks.sharded else (
            trainer.strategy.broadcast(state, src=0))
        if self.verbose:
            rank_zero_info(f"[LotteryTicket] rewind point saved at step {trainer.global_step}")

    @torch.no_grad()
    def _rewind(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.rewind_state is not None
        saved = self.rewind_state["module"]
        params = {name for name, _ in pl_module.named_parameters()}
        generator = seeded_generator(self._resolved_seed() * 1_000_003 + self.round)
        for name, tensor in pl_module.state_dict().items():
            if name not in saved:
                continue
            value = saved[name]
            if self.reinit == "random" and name in params and value.is_floating_point() and value.numel() > 1:
                value = shuffle_like(value, generator)
            if is_sharded(tensor) and not is_sharded(value):  # a snapshot read back whole from a checkpoint
                local_tensor(tensor).copy_(local_slice(value.to(local_tensor(tensor).device), tensor))
            else:
                tensor.copy_(value)
        # load copies: on the CPU `Optimizer.load_state_dict` adopts the given tensors, and the next steps
        # would update the saved rewind point in place
        for optimizer, state in zip(trainer.optimizers, self.rewind_state["optimizers"]):
            optimizer.load_state_dict(_sharded_like(_cpu_clone(state), optimizer))
        for cfg, state in zip(trainer.lr_scheduler_configs, self.rewind_state["schedulers"]):
            cfg.scheduler.load_state_dict(_cpu_clone(state))

    # ------------------------------------------------------------------ rounds
    def _finish_round_row(self, trainer: pl.Trainer) -> dict[str, Any]:
        assert self.masks is not None and self._epochs is not None
        first = self.round * self._epochs
        last = trainer.current_epoch - 1 if self.round == self.rounds else first + self._epochs - 1
        return {"round": self.round, "weights_remaining": 1.0 - self.masks.sparsity(),
                "best": self.round_best, "first_epoch": first, "last_epoch": max(last, first)}

    @torch.no_grad()
    def _advance_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.masks is not None
        if self.rewind_state is None:
            raise RuntimeError("LotteryTicket reached a round boundary without a rewind point.")
        self.check_finite_weights(int(trainer.global_step))
        row = self._finish_round_row(trainer)
        self.history.append(row)
        rates = {n: self.output_per_round_rate for n in self._output_names}
        if self.masks.sharded:  # the shards' masks, computed on every rank (exact over all shards)
            weights = {n: self.masks.local(n) for n in self.masks}
            position = shard_position(self.masks.param(next(iter(self.masks))))
            assert position is not None
            reduce = shard_reduce(self.masks.param(n) for n in self.masks)
            assert reduce is not None
            new_masks = prune_by_percent_across(weights, dict(self.masks.items()), self.per_round_rate,
                                                self.scope, rates, reduce, *position)
        else:
            weights = {n: self.masks.param(n) for n in self.masks}
            new_masks = prune_by_percent(weights, dict(self.masks.items()), self.per_round_rate, self.scope,
                                         rates)
            new_masks = trainer.strategy.broadcast({n: m.cpu() for n, m in new_masks.items()}, src=0)
        self._rewind(trainer, pl_module)
        self.round += 1
        self.round_best = None
        self.update_masks(new_masks, trainer)  # masks the rewound weights and the restored optimizer state
        best = row["best"]
        scalars = {f"{PREFIX}/best/{self.monitor}": best} if best is not None else {}
        log_scalars(trainer, scalars)
        log_images(trainer, {f"{PREFIX}/mask/{n}": mask_image(m) for n, m in self.masks.items()},
                   caption=f"round {self.round}: {1.0 - self.masks.sparsity():.1%} remaining")
        if self.verbose:
            shown = "n/a" if best is None else f"{best:.4f}"
            rank_zero_info(
                f"[LotteryTicket] round {row['round']} done (best {self.monitor} {shown}); pruned to"
                f" {1.0 - self.masks.sparsity():.2%} of the weights, rewound to step"
                f" {self.rewind_state['step']}"
                f"{' with random re-initialisation' if self.reinit == 'random' else ''}"
            )

    def _maybe_advance(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epochs is not None and self.round < self.round_of_epoch(trainer.current_epoch):
            self._advance_round(trainer, pl_module)

    # ------------------------------------------------------------------ hooks
    def _resolved_seed(self) -> int:
        if self._seed_used is None:
            self._seed_used = resolve_seed(None)
        return self._seed_used

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._seed_used = resolve_seed(self._seed_used, trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve_rewind_step(trainer)
        if self.rewind_state is None and self.rewind_at_step == 0:
            if trainer.global_step > 0:
                rank_zero_warn(f"LotteryTicket: no rewind point in the checkpoint; using the weights at step"
                               f" {trainer.global_step} instead of the initial ones.")
            self._capture_rewind_point(trainer, pl_module)
        if trainer.global_step == 0:
            self.log_sparsity(trainer)
        if self.verbose:
            rank_zero_info(
                f"[LotteryTicket] {len(self.masks or ())} tensors, {self.scope} scope: {self.rounds} round(s)"
                f" of {self.per_round_rate:.0%} every {self._epochs} epoch(s) ->"
                f" {(1 - self.per_round_rate) ** self.rounds:.1%}"
                f" remaining; rewind to step {self.rewind_at_step}, reinit={self.reinit!r}"
            )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_advance(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._maybe_advance(trainer, pl_module)  # also covers resumes that skip on_train_epoch_start
        pl_module.log(f"{PREFIX}/round", float(self.round), prog_bar=True, logger=False, on_step=True,
                      on_epoch=False)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = self.rewind_at_step
        if self.rewind_state is None and step is not None and trainer.global_step >= step:
            self._capture_rewind_point(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            if not self._warned_monitor:
                rank_zero_warn(f"LotteryTicket: `monitor={self.monitor!r}` was not logged; available:"
                               f" {sorted(trainer.callback_metrics)}. The per-round best stays empty.")
                self._warned_monitor = True
            return
        value = float(value)
        best = self.round_best
        if best is None or (value > best if self.mode == "max" else value < best):
            self.round_best = value

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = self.round_table = [*self.history, self._finish_round_row(trainer)]
        keys = ("round", "weights_remaining", "best", "first_epoch", "last_epoch")
        table = [[r[k] for k in keys] for r in rows]
        log_table(trainer, f"{PREFIX}/rounds", ["round", "weights_remaining", f"best {self.monitor}",
                                                "first_epoch", "last_epoch"], table)
        if self.verbose:
            rank_zero_info(self.summary(rows))
        super().on_train_end(trainer, pl_module)

    def summary(self, rows: list[dict[str, Any]] | None = None) -> str:
        """The per-round table printed at the end of training."""
        rows = rows if rows is not None else self.history
        lines = [f"LotteryTicket ({self.scope}, {self.per_round_rate:.0%}/round,"
                 f" rewind_step={self.rewind_step!r}, reinit={self.reinit!r})",
                 f"{'round':>5}  {'remaining':>9}  {'best ' + self.monitor:>14}  epochs"]
        for r in rows:
            best = "n/a" if r["best"] is None else f"{r['best']:.4f}"
            lines.append(f"{r['round']:>5}  {r['weights_remaining']:>9.2%}  {best:>14}"
                         f"  {r['first_epoch']}-{r['last_epoch']}")
        return "\n".join(lines)

    @override
    def log_sparsity(self, trainer: pl.Trainer, extra: dict[str, float] | None = None) -> None:
        remaining = 1.0 - self.masks.sparsity() if self.masks is not None else 1.0
        super().log_sparsity(trainer, {f"{PREFIX}/round": float(self.round),
                                       f"{PREFIX}/weights_remaining": remaining, **(extra or {})})

    # ------------------------------------------------------------------ state
    @override
    def extra_state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "history": [dict(r) for r in self.history],
                "round_best": self.round_best, "epochs_per_round": self._epochs,
                "rewind_at_step": self.rewind_at_step, "seed": self._seed_used,
                # sharded: the snapshot gathered whole (a collective), read back into the shards at the rewind
                "rewind_state": full_copy(self.rewind_state)}

    @override
    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state.get("round", 0))
        self.history = [dict(r) for r in state.get("history", [])]
        self.round_best = state.get("round_best")
        self._epochs = state.get("epochs_per_round", self._epochs)
        self.rewind_at_step = state.get("rewind_at_step", self.rewind_at_step)
        seed = state.get("seed")
        self._seed_used = int(seed) if seed is not None else self._seed_used
        self.rewind_state = state.get("rewind_state")

    @property
    def weights_remaining(self) -> float:
        """Fraction of the targeted weights still alive."""
        if self.masks is not None and self.masks.sharded:
            return 1.0 - self.masks.sparsity()  # (counted over all shards)
        return remaining_fraction(m for _, m in self.masks.items()) if self.masks is not None else 1.0
