"""The gate layer of the channel callbacks: learnable gates, their optimizer, finalisation.

:class:`GatePruningCallback` is what group-LASSO
(:class:`~lightning_prune.callbacks.group_lasso.GroupLassoPruning`) and hard-concrete L0 gates
(:class:`~lightning_prune.callbacks.l0.L0Pruning`) add to
:class:`~lightning_prune.callbacks.channels.ChannelPruningCallback` (which owns the channel groups, the kept
units, the restricted norms, compression inside the fit, resume, size targets and logging of the model's
size). At ``setup`` it builds one :class:`~lightning_prune.core.gates.Gate` per channel group with
:meth:`~GatePruningCallback.make_gate` and hooks it into every layer that reads the group's units (the model's
``state_dict`` keeps its keys). In ``on_before_optimizer_step`` -- after AMP has unscaled the weights'
gradients -- it unscales and all-reduces the gates' gradients, adds the regulariser's gradient
(:meth:`~GatePruningCallback.gate_penalty_grad_`), and steps the gates' own optimizer (optionally in
alternation with the weights). At ``finalize_step`` (or ``finalize_epoch``) the units are decided: the gates'
scores (:meth:`~GatePruningCallback.unit_scores`) go through the base's allocation -- the survivors of
:meth:`~GatePruningCallback.final_keep`, or the largest gates that meet ``target_flops``/``target_params``,
or, in the groups of ``group_targets``, the largest gates of each, widths rounded to ``round_to`` --; the
gates are folded into the weights, the other units masked, the hooks removed, and fine-tuning continues (with
``compress=True`` on the compressed model).

A subclass implements ``make_gate``, ``gate_penalty_grad_`` and ``final_keep``, and may override
``after_gate_step`` (capture, clamping) and ``weight_regularizer_grad_``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_prune.callbacks.channels import ChannelPruningCallback, top_units
from lightning_prune.callbacks.logging import PREFIX, counted, log_histograms, log_images, log_scalars
from lightning_prune.callbacks.schedules import resolve_step, until_the_end, warn_if_after_training
from lightning_prune.core.gates import Gate, GateSet
from lightning_prune.functional.magnitude import kept_count
from lightning_prune.graph import ChannelGroup
from lightning_prune.validation import (
    check_cadence,
    check_choice,
    check_exclusive,
    check_position,
    check_positive,
)

__all__ = ["GatePruningCallback"]

#: where the gates are finalised when neither ``finalize_step`` nor ``finalize_epoch`` is given
DEFAULT_FINALIZE_FRACTION = 0.75


class GatePruningCallback(ChannelPruningCallback):
    """Base class of the channel-gate callbacks (group-LASSO, hard-concrete L0).

    Builds one :class:`~lightning_prune.core.gates.Gate` per channel group with :meth:`make_gate`, hooks them
    into the model, steps them with their own optimizer in ``on_before_optimizer_step`` (AMP-unscaled,
    all-reduced under DDP), finalises them (fold + the base's unit masks) and keeps all of it in the callback
    state. A subclass provides :meth:`make_gate`, :meth:`gate_penalty_grad_` (the regulariser's gradient on
    the gates), :meth:`final_keep` (which channels survive without a size target) and optionally
    :meth:`after_gate_step`. Every argument is keyword-only.

    Args:
        gate_lr: learning rate of the gates' optimizer.
        gate_optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``.
        finalize_step: when the gates are finalised: an optimizer step, or a fraction of training (float in
            [0, 1]; ``1.0`` = at the end). Default (neither this nor ``finalize_epoch``): 0.75.
        finalize_epoch: the same as an epoch (finalised at that epoch's start) or a fraction of training.
        alternate_every_n_steps: two-phase training: that many optimizer steps of the weights with the gates
            frozen, then as many of the gates with the weights frozen, and so on (``None`` = joint training).
        round_to: kept channel widths are multiples of it (default 8; heads and conv groups stay whole).
        channel_args: the keyword arguments of
            :class:`~lightning_prune.callbacks.channels.ChannelPruningCallback` (``prune_coupled``,
            ``target_flops``, ``target_params``, ``target_latency`` (and its ``latency_*``),
            ``group_targets``, ``compress``, ``compress_step``, ``compress_epoch``, ``input_size``,
            ``analysis_time_limit_s``, ``importance``, ``min_group_keep``, ``max_group_sparsity``,
            ``recalibrate_bn_batches``, ``include``, ``exclude``, ``types``, ``log_media_every_n_epochs``,
            ``verbose``); the scores are the gates' :meth:`unit_scores` unless ``importance`` names another
            criterion (which then ranks the units where a size target or ``group_targets`` decides; without
            one the gates' own rule decides how many units go).
    """

    measures_size = True
    decision_phrase = "finalisation at step {step}"
    native_importance = "gate"
    #: under ModelParallelStrategy (FSDP2) the gates are replicated (every rank holds all of them, their
    #: gradients averaged as under DDP), the unit masks cut to each rank's shards and the gates folded into
    #: the readers' shards
    supports_sharding = True

    def __init__(
        self,
        *,
        gate_lr: float = 0.1,
        gate_optimizer: str = "sgd",
        finalize_step: int | float | None = None,
        finalize_epoch: int | float | None = None,
        alternate_every_n_steps: int | None = None,
        round_to: int = 8,
        **channel_args: Any,
    ) -> None:
        super().__init__(round_to=round_to, **channel_args)
        self.gate_lr = check_positive("gate_lr", gate_lr)
        self.gate_optimizer = check_choice("gate_optimizer", gate_optimizer, ("adam", "sgd"))
        hint = "finalize_step=0.75 prunes after 75% of the training steps and fine-tunes the rest."
        check_exclusive(finalize_step=finalize_step, finalize_epoch=finalize_epoch, hint=hint)
        self.finalize_step = check_position("finalize_step", finalize_step, allow_none=True, hint=hint)
        self.finalize_epoch = check_position("finalize_epoch", finalize_epoch, allow_none=True, hint=hint)
        if self.finalize_step is None and self.finalize_epoch is None:
            self.finalize_step = DEFAULT_FINALIZE_FRACTION
        self.alternate_every_n_steps = check_cadence(
            "alternate_every_n_steps", alternate_every_n_steps, allow_none=True,
            hint="None trains weights and gates together; 20 alternates every 20 optimizer steps.")
        if isinstance(self.alternate_every_n_steps, float):
            raise MisconfigurationException(
                f"`alternate_every_n_steps` must be None or an int >= 1, got {alternate_every_n_steps!r}.")
        # state
        self.gate_opt: torch.optim.Optimizer | None = None
        self.gateset: GateSet | None = None
        self.finalized = False
        self.finalize_at_step: int | None = None  # finalize_step/finalize_epoch resolved to a step
        self._pending_gates: dict[str, Any] | None = None
        self._last_penalty = 0.0
        self._before_step: list[Tensor] | None = None

    # ------------------------------------------------------------------ to implement
    def make_gate(self, group: ChannelGroup) -> Gate:  # pragma: no cover - abstract
        raise NotImplementedError

    def gate_penalty_grad_(self, step: int) -> float:  # pragma: no cover - abstract
        """Add the regulariser's gradient to the gates' ``.grad``; return the penalty's value (to log)."""
        raise NotImplementedError

    def final_keep(self) -> list[Tensor]:  # pragma: no cover - abstract
        """Per group, the channels that survive finalisation (without a size target)."""
        raise NotImplementedError

    def after_gate_step(self, step: int) -> None:
        """Called right after the gate optimizer stepped (capture masks, clamping)."""

    # ------------------------------------------------------------------ the channel protocol
    @override
    def unit_scores(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """Each group's gate scores (:meth:`lightning_prune.core.gates.Gate.score`)."""
        assert self.gateset is not None
        return {g.name: gate.score().detach().cpu() for g, gate in self.gateset}

    def gate_scores(self) -> list[Tensor]:
        """Per group (in the order of :attr:`groups`), the gates' scores (higher = kept)."""
        assert self.groups is not None
        scores = self.unit_scores(None, self.bound_module)  # type: ignore[arg-type]
        return [scores[g.name].detach().float().cpu().reshape(-1) for g in self.groups]

    @override
    def choose_keep(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule,
                    sparsity: float | None) -> list[Tensor]:
        """The base's allocation of the ``importance`` scores (default: the gates'), the gates' own rule
        (:meth:`final_keep`) where no size target decides."""
        return self.allocate(self.scores_list(trainer, pl_module), keep=[k.cpu() for k in self.final_keep()])

    @override
    def due(self, trainer: pl.Trainer) -> float | None:
        at = self.finalize_at_step
        if not self.finalized and at is not None and trainer.global_step >= at:
            return 1.0  # (the gates decide how many units go)
        return None

    @override
    def decide(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule,
               sparsity: float | None) -> None:
        self.finalize(trainer, pl_module)

    @override
    def decided(self, trainer: pl.Trainer) -> bool:
        return self.finalized

    @override
    def decided_at_step(self, trainer: pl.Trainer) -> int:
        self._resolve_finalize_step(trainer)
        return self.finalize_at_step or 0

    # ------------------------------------------------------------------ gates
    def _build_gates(self) -> None:
        assert self.groups is not None
        self.gateset = GateSet(self.groups, [self.make_gate(g) for g in self.groups])
        params = self.gateset.parameters()
        if self.gate_optimizer == "adam":
            self.gate_opt = torch.optim.Adam(params, lr=self.gate_lr)
        else:
            self.gate_opt = torch.optim.SGD(params, lr=self.gate_lr, momentum=0.9)

    def _sync_hooks(self, pl_module: pl.LightningModule) -> None:
        if self.gateset is None:
            return
        if self.finalized:
            self.gateset.detach()
        elif not self.gateset.attached:
            self.gateset.to(pl_module.device)
            self.gateset.attach(pl_module, self._traced_prefix)

    def gate_values(self) -> list[Tensor]:
        """Each group's deterministic gate values (detached, on the CPU)."""
        assert self.gateset is not None
        return [g.deterministic().cpu() for g in self.gateset.gates]

    def channels_alive(self) -> dict[str, int]:
        """Per group, channels that would survive finalisation now."""
        if self.gateset is None:
            return {}
        keep = self.targeted_keep([k.cpu() for k in self.final_keep()])
        return {g.name: int(k.sum()) for g, k in zip(self.gateset.groups, keep)}

    def targeted_keep(self, keep: list[Tensor]) -> list[Tensor]:
        """``keep`` with each group of ``group_targets`` keeping ``max(round(size * (1 - fraction)), 1)``
        units: those with the largest :meth:`gate_scores` (ties: the first units)."""
        if not self._group_targets:
            return keep
        assert self.groups is not None
        return [top_units(s, kept_count(g.size, self._group_targets[g.name])) if g.name in self._group_targets
                else k for g, k, s in zip(self.groups, keep, self.gate_scores())]

    # ------------------------------------------------------------------ step
    def _gate_phase(self, step: int) -> str:
        n = self.alternate_every_n_steps
        if n is None:
            return "joint"
        return "weights" if (step // int(n)) % 2 == 0 else "gates"

    def _prepare_gate_grads(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale (AMP) and average (DDP) the gates' gradients; False when the step must be skipped."""
        assert self.gateset is not None
        params = self.gateset.parameters()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params])
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        skip = False
        if scaler is not None and scaler.is_enabled():
            flat = flat / float(scaler.get_scale())
            try:  # the scaler skips the weights' step when their unscaled gradients overflowed
                found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
                skip = any(bool(v.item()) for v in found.values())
            except (AttributeError, KeyError):
                skip = False
        if trainer.world_size > 1:
            flat = trainer.strategy.reduce(flat, reduce_op="mean")
            skip = bool(trainer.strategy.reduce(torch.tensor(float(skip), device=flat.device),
                                                reduce_op="sum") > 0)
        skip = skip or not bool(torch.isfinite(flat).all())
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n
        return not skip

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self.accumulate_importance(trainer, pl_module, optimizer)  # (before a gates phase drops the grads)
        if self.finalized or self.gateset is None or self.gate_opt is None:
            return
        if trainer.optimizers and optimizer is not trainer.optimizers[0]:
            return
        step = trainer.global_step
        phase = self._gate_phase(step)
        ok = self._prepare_gate_grads(trainer, optimizer)
        if ok and phase in ("joint", "gates"):
            self._last_penalty = self.gate_penalty_grad_(step)
            self._before_step = [p.detach().clone() for p in self.gateset.parameters()]
            for gate in self.gateset.gates:
                for p in gate.parameters():
                    if p.grad is not None and p.shape == gate.frozen.shape:
                        p.grad[gate.frozen] = 0.0
            self.gate_opt.step()
            self.after_gate_step(step)
        self.gate_opt.zero_grad(set_to_none=True)
        if phase in ("joint", "weights"):
            self.weight_regularizer_grad_()
        else:  # gates phase: the weights do not move (their gradients are dropped before the user's step)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def weight_regularizer_grad_(self) -> None:
        """Optional L1/L2 on the ordinary weights.

        As in the Habr article «Редукция нейронных сетей при помощи вариационной оптимизации» ("Reducing
        neural networks with variational optimisation", in Russian): ReLU nets otherwise compensate for the
        penalised gates by growing their weights.
        """

    # ------------------------------------------------------------------ finalisation
    @torch.no_grad()
    def finalize(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> None:
        """Decide the kept units (:meth:`choose_keep`), fold the gates into the readers, mask the rest, remove
        the gate hooks; with ``compress=True`` compress the model now if that is when."""
        if self.finalized or self.gateset is None:
            return
        keep = self.choose_keep(trainer, pl_module, None)
        scales = [g.deterministic() * k.to(g.frozen.device) for g, k in zip(self.gateset.gates, keep)]
        self.gateset.detach()
        # weight-standardised readers of the units whose scale is not 1 are frozen: the gates fold into the
        # weight they compute
        self.freeze_readers(trainer, pl_module, {g.name: s.detach().cpu().ne(1).nonzero().flatten().tolist()
                                                 for g, s in zip(self.gateset.groups, scales)})
        self.gateset.fold_(pl_module, scales)
        self.finalized = True
        self.apply_keep(keep, trainer, pl_module)
        kept, total = sum(int(k.sum()) for k in keep), sum(k.numel() for k in keep)
        metrics = {f"{PREFIX}/channels_remaining": kept / max(total, 1), **self.size_metrics()}
        if self.verbose:
            size = "".join(f", {k.split('/')[-1].replace('_', ' ')} {v:.1%}"
                           for k, v in metrics.items() if k != f"{PREFIX}/channels_remaining")
            rank_zero_info(f"[{type(self).__name__}] finalised: {kept}/{total} units kept"
                           f" ({1 - kept / max(total, 1):.1%} pruned) in {counted(len(keep), 'group')}{size};"
                           " fine-tuning continues")
        if trainer is not None:
            log_scalars(trainer, metrics)
            self.compress_if_due(trainer, pl_module)

    @override
    def finalize_for_deployment(self, module: pl.LightningModule) -> str | None:
        if self.finalized:
            return None
        self.finalize(None, module)
        assert self.keep is not None
        return (f"finalised {type(self).__name__}: {sum(int(k.sum()) for k in self.keep)} of"
                f" {sum(k.numel() for k in self.keep)} units kept")

    # ------------------------------------------------------------------ logging
    def gate_metrics(self) -> dict[str, float]:
        alive = self.channels_alive()
        total = sum(g.size for g in self.groups or [])
        metrics = {f"{PREFIX}/channels_remaining": sum(alive.values()) / max(total, 1),
                   f"{PREFIX}/gate_penalty": self._last_penalty}
        metrics.update({f"{PREFIX}/channels_alive/{n}": float(v) for n, v in alive.items()})
        return metrics

    def log_gate_media(self, trainer: pl.Trainer) -> None:
        if self.gateset is None or not trainer.loggers:
            return
        values = {g.name: v for g, v in zip(self.gateset.groups, self.gate_values())}
        log_histograms(trainer, {f"{PREFIX}/gates/{n}": v for n, v in values.items()})
        images = {}
        for name, v in values.items():
            row = (v.abs() / v.abs().max().clamp_min(1e-12)).reshape(1, -1)
            images[f"{PREFIX}/gate_image/{name}"] = (row.repeat(8, 1) * 255).to(torch.uint8)
        log_images(trainer, images, caption="|gate| per channel (white = 1)")

    # ------------------------------------------------------------------ setup
    @override
    def release_module(self, pl_module: pl.LightningModule) -> None:
        if self.gateset is not None:  # (its hooks on the module it leaves)
            self.gateset.detach()
        super().release_module(pl_module)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.bind_module(pl_module)
        rebuilt = not (self.masks is not None and self.targets and self._targets_belong_to(pl_module))
        if rebuilt and self.gateset is not None:  # a new model: the old gates belong to the old one
            self.gateset.detach()
            self.gateset = None
        super().setup(trainer, pl_module, stage)
        if self.gateset is None:
            self._build_gates()
            if self._pending_gates is not None:
                self._load_pending(self._pending_gates)
                self._pending_gates = None
        self._sync_hooks(pl_module)

    def _resolve_finalize_step(self, trainer: pl.Trainer) -> None:
        """``finalize_at_step``: the step at which the gates are finalised.

        ``None`` for the end of training (1.0), when ``on_train_end`` finalises them (validation during
        training still sees the gated model)."""
        if self.finalize_at_step is None and not until_the_end(self.finalize_step):
            name = "finalize_epoch" if self.finalize_epoch is not None else "finalize_step"
            self.finalize_at_step = resolve_step(name, getattr(self, name), trainer)
            warn_if_after_training(type(self).__name__, trainer, name, getattr(self, name),
                                   self.finalize_at_step,
                                   "the units are decided only when training ends, with no fine-tuning")

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve_finalize_step(trainer)
        super().on_fit_start(trainer, pl_module)
        assert self.gateset is not None and self.gate_opt is not None
        if trainer.world_size > 1 and not self.finalized:  # every rank starts from rank 0's gates
            state = trainer.strategy.broadcast(self.gateset.state_dict(), src=0)
            self.gateset.load_state_dict(state)
        self.gateset.to(pl_module.device)
        for state in self.gate_opt.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor) and key != "step":
                    state[key] = value.to(pl_module.device)
        self._sync_hooks(pl_module)
        if self.verbose:
            total = sum(g.size for g in self.groups or [])
            rank_zero_info(
                f"[{type(self).__name__}] {counted(total, 'unit')} in"
                f" {counted(len(self.groups or []), 'gated group')}"
                f" ({counted(len(self.skipped), 'group')} left alone); finalize at "
                + ("the end of training" if self.finalize_at_step is None
                   else f"step {self.finalize_at_step}")
            )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.due(trainer) is not None:
            self.finalize(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if not self.finalized and trainer.log_every_n_steps and step % trainer.log_every_n_steps == 0:
            log_scalars(trainer, self.gate_metrics())

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        n = self.log_media_every_n_epochs
        if not self.finalized and n and (trainer.current_epoch + 1) % n == 0:
            log_scalars(trainer, self.gate_metrics())
            self.log_gate_media(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.finalized:
            self.log_gate_media(trainer)
            self.finalize(trainer, pl_module)
        super().on_train_end(trainer, pl_module)  # (compresses here with compress_step=1.0)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self.gateset is not None:
            self.gateset.detach()

    # ------------------------------------------------------------------ state
    @override
    def extra_state_dict(self) -> dict[str, Any]:
        pending = self._pending_gates or {}
        gates = self.gateset.state_dict() if self.gateset is not None else pending.get("gates")
        opt = self.gate_opt.state_dict() if self.gate_opt is not None else pending.get("opt")
        return {**super().extra_state_dict(), "finalized": self.finalized,
                "finalize_at_step": self.finalize_at_step, "gates": gates, "gate_optimizer": opt}

    @override
    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        super().load_extra_state_dict(state)
        self.finalized = bool(state.get("finalized", False))
        self.finalize_at_step = state.get("finalize_at_step")
        pending = {"gates": state.get("gates"), "opt": state.get("gate_optimizer")}
        if self.gateset is not None:
            self._load_pending(pending)
            if self.finalized:
                self.gateset.detach()
        else:
            self._pending_gates = pending

    def _load_pending(self, pending: dict[str, Any]) -> None:
        assert self.gateset is not None and self.gate_opt is not None
        if pending.get("gates"):
            self.gateset.load_state_dict(pending["gates"])
        if pending.get("opt"):
            self.gate_opt.load_state_dict(pending["opt"])
