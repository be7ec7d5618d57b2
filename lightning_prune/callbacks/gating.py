"""The base of the channel-gate callbacks: groups, gates, their optimizer, finalisation and state.

:class:`GatePruningCallback` is what group-LASSO
(:class:`~lightning_prune.callbacks.group_lasso.GroupLassoPruning`) and hard-concrete L0 gates share. At
``setup`` it finds the exactly removable channel groups of the model -- channels, residual streams, attention
heads, conv groups (:func:`lightning_prune.graph.analyse_channels`) --, builds one
:class:`~lightning_prune.gates.Gate` per group with :meth:`~GatePruningCallback.make_gate` and hooks it into
every layer that reads the group's units (the model's ``state_dict`` keeps its keys). In
``on_before_optimizer_step`` -- after AMP has unscaled the weights' gradients -- it unscales and all-reduces
the gates' gradients, adds the regulariser's gradient (:meth:`~GatePruningCallback.gate_penalty_grad_`), and
steps the gates' own optimizer (optionally in alternation with the weights). At ``finalize_step`` (or
``finalize_epoch``) the surviving units -- those of :meth:`~GatePruningCallback.final_keep`, or, with
``target_flops``/``target_params``, the largest gates that fit the budget, or, in the groups of
``group_targets``, the largest gates of each, widths rounded to ``round_to`` --
are folded into the weights, the others become masks of the base
:class:`~lightning_prune.callbacks.base.PruningCallback` (and LayerNorm statistics skip them), the hooks go,
and fine-tuning continues; with ``compress=True`` they are removed physically inside the fit -- right after
finalisation, or at ``compress_step``/``compress_epoch`` -- and the optimizers carry on with the smaller
parameters (:mod:`lightning_prune.shrink`).

A subclass implements ``make_gate``, ``gate_penalty_grad_`` and ``final_keep``, and may override
``after_gate_step`` (capture, clamping) and ``weight_regularizer_grad_``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.compression import round_kept
from lightning_prune.functional.magnitude import kept_count
from lightning_prune.gates import Gate, GateSet, unit_masks
from lightning_prune.graph import (
    DEFAULT_ANALYSIS_TIME_LIMIT_S,
    ChannelGroup,
    CostModel,
    analyse_channels,
    example_inputs_for,
    failure_reason,
    traced_root,
)
from lightning_prune.logging import PREFIX, log_histograms, log_images, log_scalars
from lightning_prune.schedules import resolve_step, until_the_end, warn_if_after_training
from lightning_prune.shrink import (
    ShrinkSchedule,
    check_strategy,
    compress_in_fit,
    log_model_size,
    recorded_removal,
)
from lightning_prune.targets import Target
from lightning_prune.validation import (
    as_misconfiguration,
    check_bool,
    check_cadence,
    check_choice,
    check_exclusive,
    check_fraction,
    check_fraction_map,
    check_group_names,
    check_input_size,
    check_int,
    check_optional,
    check_position,
    check_positive,
    input_size_errors,
)

__all__ = ["GatePruningCallback"]

#: where the gates are finalised when neither ``finalize_step`` nor ``finalize_epoch`` is given
DEFAULT_FINALIZE_FRACTION = 0.75


class GatePruningCallback(PruningCallback):
    """Base class of the channel-gate callbacks (group-LASSO, hard-concrete L0).

    Finds the channel groups at ``setup``, builds one :class:`~lightning_prune.gates.Gate` per group with
    :meth:`make_gate`, hooks them into the model, steps them with their own optimizer in
    ``on_before_optimizer_step`` (AMP-unscaled, all-reduced under DDP), finalises them (fold + channel
    masks) and keeps all of it in the callback state. A subclass provides :meth:`make_gate`,
    :meth:`gate_penalty_grad_` (the regulariser's gradient on the gates), :meth:`final_keep` (which channels
    survive) and optionally :meth:`after_gate_step`.

    Args:
        gate_lr: learning rate of the gates' optimizer.
        gate_optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``.
        prune_coupled: also gate coupled channels (residual streams, including the stem's output and the
            downsample branches; LayerNorm-normalised embedding dimensions): one gate per channel shared by
            every reader. ``False`` leaves them alone.
        target_flops: ask for the size: at finalisation keep the units with the largest gates such that the
            compressed model has at most this fraction of the dense FLOPs (counted by torch-pruning's
            ``count_ops_and_params`` on the traced example input), in (0, 1].
        target_params: the same for the number of parameters (exclusive with ``target_flops``).
        round_to: kept channel widths are multiples of it (heads and conv groups stay whole); 1 = no rounding.
        group_targets: ``{group name: fraction}``: at finalisation each named channel group loses that
            fraction of its units (``size - max(round(size * (1 - fraction)), 1)``), those with the smallest
            :meth:`gate_scores`, its kept width then rounded up to ``round_to``; the other groups follow the
            usual rule. What :func:`lightning_prune.layer_targets_from_sensitivity` returns for a
            ``method="channels"`` table (of the same model; names may leave out the LightningModule's
            attribute, e.g. ``layer1.0.conv1`` for ``model.layer1.0.conv1``). Exclusive with
            ``target_flops``/``target_params``.
        finalize_step: when the gates are finalised: an optimizer step, or a fraction of training (float in
            [0, 1]; ``1.0`` = at the end). Default (neither this nor ``finalize_epoch``): 0.75.
        finalize_epoch: the same as an epoch (finalised at that epoch's start) or a fraction of training.
        alternate_every_n_steps: two-phase training: that many optimizer steps of the weights with the gates
            frozen, then as many of the gates with the weights frozen, and so on (``None`` = joint training).
        compress: physically remove the pruned units inside the fit
            (:func:`lightning_prune.shrink.compress_in_fit`): the model shrinks and training continues on it,
            every optimizer carrying its state over; by default right after finalisation.
        compress_step: when to remove them instead: an optimizer step or a fraction of training (``1.0`` = at
            the end of training); not before finalisation.
        compress_epoch: the same as an epoch (at its start) or a fraction of training.
        input_size: ``(C, H, W)`` used to trace the model (default: the LightningModule's
            ``example_input_array``, else timm's ``pretrained_cfg["input_size"]``).
        analysis_time_limit_s: CPU seconds (``time.process_time``) the channel analysis at ``setup`` may use;
            past it the fit stops with a clear error naming this argument (``None``: no limit). Checked
            cooperatively: no signal handler, no timer.
        include, exclude, types, log_media_every_n_epochs, verbose: see :class:`PruningCallback`.
    """

    def __init__(
        self,
        gate_lr: float = 0.1,
        gate_optimizer: str = "sgd",
        prune_coupled: bool = True,
        target_flops: float | None = None,
        target_params: float | None = None,
        round_to: int = 8,
        finalize_step: int | float | None = None,
        finalize_epoch: int | float | None = None,
        alternate_every_n_steps: int | None = None,
        compress: bool = False,
        compress_step: int | float | None = None,
        compress_epoch: int | float | None = None,
        input_size: Sequence[int] | None = None,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        types: list[str | type] | None = None,
        log_media_every_n_epochs: int = 1,
        verbose: bool = True,
        group_targets: dict[str, float] | None = None,
        analysis_time_limit_s: float | None = DEFAULT_ANALYSIS_TIME_LIMIT_S,
    ) -> None:
        super().__init__(include, exclude, types, log_media_every_n_epochs, verbose)
        self.analysis_time_limit_s = check_optional(
            check_positive, "analysis_time_limit_s", analysis_time_limit_s,
            hint="CPU seconds the channel analysis at setup may use, e.g. 300; None for no limit.")
        self.gate_lr = check_positive("gate_lr", gate_lr)
        self.gate_optimizer = check_choice("gate_optimizer", gate_optimizer, ("adam", "sgd"))
        self.prune_coupled = check_bool("prune_coupled", prune_coupled)
        check_exclusive(target_flops=target_flops, target_params=target_params,
                        hint="ask for one size: a fraction of the dense FLOPs or of the parameters.")
        budget_hint = "a fraction of the dense model in (0, 1], e.g. 0.5 keeps half."
        self.target_flops = check_optional(check_fraction, "target_flops", target_flops, 0.0, 1.0, True,
                                           hint=budget_hint)
        self.target_params = check_optional(check_fraction, "target_params", target_params, 0.0, 1.0, True,
                                            hint=budget_hint)
        for name, value in (("target_flops", self.target_flops), ("target_params", self.target_params)):
            if value == 0.0:
                raise MisconfigurationException(f"`{name}` must be a number in (0, 1], got 0.0."
                                                f" HINT: {budget_hint}")
        self.group_targets = check_fraction_map(
            "group_targets", group_targets,
            hint="the fraction of each named group's units to prune, e.g. lp.layer_targets_from_sensitivity("
                 "table, 0.5) of a method='channels' scan.")
        check_exclusive(group_targets=self.group_targets or None, target_flops=target_flops,
                        target_params=target_params,
                        hint="group_targets sets the width of the named groups; target_flops/target_params"
                             " choose the widths that meet a budget: pass one.")
        self.round_to = check_int("round_to", round_to, 1,
                                  hint="8 keeps widths multiples of 8; 1 does not round.")
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
        self.shrink = ShrinkSchedule(compress, compress_step, compress_epoch, type(self).__name__)
        self.compress = self.shrink.enabled
        self.input_size = check_input_size("input_size", input_size)
        # state
        self.groups: list[ChannelGroup] | None = None
        self.skipped: dict[str, str] = {}
        self.gate_opt: torch.optim.Optimizer | None = None
        self.gateset: GateSet | None = None
        self.finalized = False
        self.finalize_at_step: int | None = None  # finalize_step/finalize_epoch resolved to a step
        self.keep: list[Tensor] | None = None  # per group, the kept units (after finalisation)
        self._group_targets: dict[str, float] = {}  # group_targets by the groups' full names (at setup)
        self.weight_targets: list[Target] = []
        self._param_count: int | None = None
        self._cost: CostModel | None = None
        self._measured: tuple[dict[str, list[int]], tuple[float, float]] | None = None
        self._model: pl.LightningModule | None = None
        self.coverage = 0.0
        self._analysis_weights: dict[str, int] = {}  # Conv/Linear weight elements per module
        self._traced_prefix = ""
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
        """Per group, the channels that survive finalisation."""
        raise NotImplementedError

    def after_gate_step(self, step: int) -> None:
        """Called right after the gate optimizer stepped (capture masks, clamping)."""

    # ------------------------------------------------------------------ groups and gates
    def find_groups(self, pl_module: pl.LightningModule) -> list[ChannelGroup]:
        prefix, root = traced_root(pl_module)
        with as_misconfiguration(), input_size_errors(self.input_size):
            example = example_inputs_for(root, self.input_size)
            analysis = analyse_channels(root, example, self.include, self.exclude, self.prune_coupled,
                                        prefix=prefix, analysis_time_limit_s=self.analysis_time_limit_s)
        self._traced_prefix, self.skipped, self.coverage = prefix, analysis.skipped, analysis.coverage
        self._analysis_weights = dict(analysis.weights)
        if not analysis.groups:
            reasons: dict[str, int] = {}
            for why in analysis.skipped.values():
                reasons[why] = reasons.get(why, 0) + 1
            shown = "; ".join(f"{why} ({n}x)"
                              for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:4])
            raise MisconfigurationException(
                f"{type(self).__name__} found no removable channel group in {type(pl_module).__name__}"
                f" (include={self.include or 'default'}, exclude={self.exclude}). What blocked them:"
                f" {shown or 'no Conv/Linear output channels'}."
                " HINT: `include=[...]` selects other layers; `prune_coupled=True` gates residual streams."
            )
        try:
            self._cost = CostModel(root, example, analysis.groups, prefix=prefix)
        except Exception as error:  # noqa: BLE001 - torch-pruning's counter on a model it cannot count
            if self.target_flops is not None or self.target_params is not None:
                raise MisconfigurationException(
                    f"{type(self).__name__} cannot count the FLOPs and parameters of"
                    f" {type(pl_module).__name__}"
                    f" to meet `target_flops`/`target_params`: {failure_reason('counting them', error)}."
                    " HINT: use `group_targets` or the gates' own threshold (no size target) on this model."
                ) from error
            self._cost = None  # no size target: only the logged sizes go
        return analysis.groups

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
            if self.keep is not None and self.shrink.removed is None:
                self.gateset.restrict_norms(pl_module, self.keep)
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
    def gate_scores(self) -> list[Tensor]:
        """Per group, how much each unit matters when units are chosen to meet a size target (higher =
        kept)."""
        assert self.gateset is not None
        return [g.score().detach().cpu() for g in self.gateset.gates]

    def budget_keep(self) -> list[Tensor]:
        """The kept units that meet ``target_flops``/``target_params``: the largest :meth:`gate_scores` across
        all groups, as many as the budget allows, with channel widths rounded up to ``round_to``."""
        assert self.groups is not None and self._cost is not None
        target = self.target_flops if self.target_flops is not None else self.target_params
        which = 0 if self.target_flops is not None else 1
        scores = self.gate_scores()
        order = sorted(((float(s), gi, u) for gi, sc in enumerate(scores) for u, s in enumerate(sc.tolist())),
                       key=lambda t: (t[0], t[1], t[2]))

        def removed_for(n: int) -> dict[str, list[int]]:
            chosen: dict[int, list[int]] = {}
            for _, gi, u in order:
                if n <= 0:
                    break
                if len(chosen.get(gi, [])) < self.groups[gi].size - 1:
                    chosen.setdefault(gi, []).append(u)
                    n -= 1
            out = {}
            for gi, units in chosen.items():
                group = self.groups[gi]
                # the largest gates come back first
                ranked = sorted(units, key=lambda u: -float(scores[gi][u]))
                out[group.name] = round_kept(group, units, self.round_to, ranked)
            return out

        total = sum(g.size - 1 for g in self.groups)
        goal = target
        for _ in range(4):  # the prediction is within ~1% of the count: correct it with a measured count
            lo, hi = 0, total
            while lo < hi:  # the fewest removals that meet the budget
                mid = (lo + hi) // 2
                if self._cost.ratios(removed_for(mid))[which] <= goal:
                    hi = mid
                else:
                    lo = mid + 1
            removed = removed_for(lo)
            measured = self._cost.measured_ratios(removed)[which]
            if measured <= target or lo == total:
                break
            goal *= target / measured
        if measured > target:
            floor = measured if lo == total else self._cost.measured_ratios(removed_for(total))[which]
            name = "target_flops" if which == 0 else "target_params"
            self._warn_target_unmet(name, target, measured, floor)
        return [torch.tensor([u not in set(removed.get(g.name, ())) for u in range(g.size)])
                for g in self.groups]

    def _warn_target_unmet(self, name: str, target: float, reached: float, floor: float) -> None:
        """Say that ``name`` is not met: what was reached, the most the removable groups allow, and the
        largest layers no removable group covers, with the reasons."""
        weights = self._analysis_weights
        total = sum(weights.values()) or 1
        blockers = sorted(((weights[n], n, why) for n, why in self.skipped.items() if n in weights),
                          reverse=True)
        shown = "; ".join(f"`{n}` ({w / total:.0%} of the weights: {why})" for w, n, why in blockers[:3])
        what = "FLOPs" if name == "target_flops" else "parameters"
        rank_zero_warn(
            f"{type(self).__name__}: `{name}={target:g}` is not reached: the compressed model keeps"
            f" {reached:.3f} of the dense {what} (removing every removable unit but one per group would keep"
            f" {floor:.3f})."
            f" {1 - self.coverage:.0%} of the Conv/Linear weights are in no removable channel group"
            + (f"; the largest blockers: {shown}." if shown else ".")
            + " HINT: `pruning.skipped` lists every group left alone with its reason; `include`/`exclude` and"
              " `prune_coupled=True` widen the selection.", category=UserWarning)

    def targeted_keep(self, keep: list[Tensor]) -> list[Tensor]:
        """``keep`` with each group of ``group_targets`` keeping ``max(round(size * (1 - fraction)), 1)``
        units: those with the largest :meth:`gate_scores` (ties: the first units)."""
        if not self._group_targets:
            return keep
        assert self.groups is not None
        scores = self.gate_scores()
        out = []
        for group, kept, score in zip(self.groups, keep, scores):
            fraction = self._group_targets.get(group.name)
            if fraction is None:
                out.append(kept)
                continue
            order = sorted(range(group.size), key=lambda u: (-float(score[u]), u))
            chosen = torch.zeros(group.size, dtype=torch.bool)
            chosen[order[:kept_count(group.size, fraction)]] = True
            out.append(chosen)
        return out

    def _rounded(self, keep: list[Tensor]) -> list[Tensor]:
        """``keep`` with each channel group's kept width rounded up to ``round_to`` (largest gates first)."""
        assert self.groups is not None
        scores = self.gate_scores()
        out = []
        for group, kept, score in zip(self.groups, keep, scores):
            removed = (~kept.cpu()).nonzero().flatten().tolist()
            if len(removed) >= group.size:
                removed = sorted(removed, key=lambda u: -float(score[u]))[1:]  # a layer keeps one unit
            ranked = sorted(removed, key=lambda u: -float(score[u]))
            back = set(removed) - set(round_kept(group, removed, self.round_to, ranked))
            out.append(torch.tensor([u not in removed or u in back for u in range(group.size)]))
        return out

    @torch.no_grad()
    def finalize(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> None:
        """Choose the kept units, fold the gates into the readers, mask the rest, remove the gate hooks."""
        if self.finalized or self.gateset is None:
            return
        if self.target_flops is not None or self.target_params is not None:
            keep = self.budget_keep()
        else:
            keep = self._rounded(self.targeted_keep([k.cpu() for k in self.final_keep()]))
        scales = [g.deterministic() * k.to(g.frozen.device) for g, k in zip(self.gateset.gates, keep)]
        self.gateset.detach()
        self.gateset.fold_(pl_module, scales)
        self.finalized = True
        self.keep = [k.clone() for k in keep]
        self.gateset.restrict_norms(pl_module, self.keep)
        assert self.masks is not None
        masks = {n: m & self.masks[n].to(m.device)
                 for n, m in unit_masks(pl_module, self.gateset.groups, keep).items() if n in self.masks}
        kept, total = sum(int(k.sum()) for k in keep), sum(k.numel() for k in keep)
        metrics = {f"{PREFIX}/channels_remaining": kept / max(total, 1), **self.size_metrics()}
        if self.verbose:
            size = "".join(f", {k.split('/')[-1].replace('_', ' ')} {v:.1%}"
                           for k, v in metrics.items() if k != f"{PREFIX}/channels_remaining")
            rank_zero_info(f"[{type(self).__name__}] finalised: {kept}/{total} units kept"
                           f" ({1 - kept / max(total, 1):.1%} pruned) in {len(keep)} groups{size};"
                           " fine-tuning continues")
        if trainer is not None:
            self.update_masks(masks, trainer)
            log_scalars(trainer, metrics)
            if self.shrink.due(trainer.global_step, True) and trainer.training:
                self.shrink_now(trainer, pl_module)
        else:
            self.masks.update(masks)

    def size_metrics(self) -> dict[str, float]:
        """``prune/flops_remaining`` and ``prune/params_remaining`` of the compressed model after
        finalisation, as fractions of the dense model (counted by torch-pruning on a sliced copy)."""
        if self._cost is None or self.keep is None or self.groups is None:
            return {}
        removed = {g.name: (~k).nonzero().flatten().tolist() for g, k in zip(self.groups, self.keep)}
        if self._measured is None or self._measured[0] != removed:
            self._measured = (removed, self._cost.measured_ratios(removed))
        flops, params = self._measured[1]
        return {f"{PREFIX}/flops_remaining": flops, f"{PREFIX}/params_remaining": params}

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

    # ------------------------------------------------------------------ state
    def gate_state_dict(self) -> dict[str, Any]:
        pending = self._pending_gates or {}
        gates = self.gateset.state_dict() if self.gateset is not None else pending.get("gates")
        opt = self.gate_opt.state_dict() if self.gate_opt is not None else pending.get("opt")
        keep = [k.clone() for k in self.keep] if self.keep is not None else None
        return {"finalized": self.finalized, "finalize_at_step": self.finalize_at_step, "gates": gates,
                "gate_optimizer": opt, "keep": keep, "shrink": self.shrink.state_dict()}

    def load_gate_state_dict(self, state: dict[str, Any]) -> None:
        self.finalized = bool(state.get("finalized", False))
        self.finalize_at_step = state.get("finalize_at_step")
        keep = state.get("keep")
        self.keep = [k.to(torch.bool).cpu() for k in keep] if keep is not None else None
        self.shrink.load_state_dict(state.get("shrink"))
        pending = {"gates": state.get("gates"), "opt": state.get("gate_optimizer")}
        if self.gateset is not None:
            self._load_pending(pending)
            if self.finalized:
                self.gateset.detach()
                if self.keep is not None and self._model is not None and self.shrink.removed is None:
                    self.gateset.restrict_norms(self._model, self.keep)
        else:
            self._pending_gates = pending

    def _load_pending(self, pending: dict[str, Any]) -> None:
        assert self.gateset is not None and self.gate_opt is not None
        if pending.get("gates"):
            self.gateset.load_state_dict(pending["gates"])
        if pending.get("opt"):
            self.gate_opt.load_state_dict(pending["opt"])

    # ------------------------------------------------------------------ targets and setup
    @override
    def select_targets(self, pl_module: pl.LightningModule) -> list[Target]:
        targets = super().select_targets(pl_module)
        self.weight_targets = list(targets)
        self.groups = self.find_groups(pl_module)
        self._group_targets = check_group_names(
            "group_targets", self.group_targets or {}, [g.name for g in self.groups],
            f"{type(self).__name__} (on {type(pl_module).__name__})", prefix=self._traced_prefix,
            hint="The callback has only the groups its include/exclude/prune_coupled select.")
        names = {t.name for t in targets}
        params = dict(pl_module.named_parameters())
        everything = [torch.zeros(g.size, dtype=torch.bool) for g in self.groups]  # what every unit touches
        for name in unit_masks(pl_module, self.groups, everything):
            if name in names or name not in params:
                continue
            module_name, _, pname = name.rpartition(".")
            targets.append(Target(module_name, pl_module.get_submodule(module_name), pname))
            names.add(name)
        return targets

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        rebuilt = not (self.masks is not None and self.targets and self._targets_belong_to(pl_module))
        if rebuilt and self.gateset is not None:  # a new model: the old gates belong to the old one
            self.gateset.detach()
            self.gateset = None
        self._model = pl_module
        if self.shrink.enabled and trainer is not None and stage == "fit":
            check_strategy(trainer, type(self).__name__)
            self.shrink.install_resume(trainer, self.state_key,
                                       lambda state: self._apply_removed(pl_module, state))
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
        self._resolve_finalize_step(trainer)
        self.shrink.resolve(trainer)
        if (self.shrink.at_step is not None and self.finalize_at_step is not None
                and self.shrink.at_step < self.finalize_at_step):
            raise MisconfigurationException(
                f"`compress_step`/`compress_epoch` resolves to step {self.shrink.at_step}, before"
                f" finalisation at step {self.finalize_at_step}. HINT: the units are removed once they are"
                " decided: compress later, or leave the position unset to compress right after finalisation.")
        self._sync_hooks(pl_module)
        if self.verbose:
            total = sum(g.size for g in self.groups or [])
            rank_zero_info(
                f"[{type(self).__name__}] {total} channels in {len(self.groups or [])} gated groups"
                f" ({len(self.skipped)} groups left alone); finalize at "
                + ("the end of training" if self.finalize_at_step is None
                   else f"step {self.finalize_at_step}")
            )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (not self.finalized and self.finalize_at_step is not None
                and trainer.global_step >= self.finalize_at_step):
            self.finalize(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.finalized:
            if self.shrink.due(step, True):
                self.shrink_now(trainer, pl_module)
            return
        if self.finalize_at_step is not None and step >= self.finalize_at_step:
            self.finalize(trainer, pl_module)
        elif trainer.log_every_n_steps and step % trainer.log_every_n_steps == 0:
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
        super().on_train_end(trainer, pl_module)
        if self.shrink.enabled and self.shrink.removed is None:  # at the end of training (or finalised there)
            self.compress_model(pl_module)

    def _removed(self) -> dict[str, list[int]]:
        assert self.groups is not None and self.keep is not None
        return {g.name: (~k).nonzero().flatten().tolist() for g, k in zip(self.groups, self.keep)}

    def shrink_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove the pruned units inside the fit; the optimizers carry on with the smaller parameters."""
        if self.groups is None or self.keep is None:
            return
        _, root = traced_root(pl_module)
        removed = self._removed()
        compress_in_fit(trainer, pl_module, self.groups, removed, example_inputs_for(root, self.input_size))
        if self.gateset is not None:  # (the restricted norms checked the compression; they are idle now)
            self.gateset.release_norms()
        self.shrink.removed = removed
        self._after_compression(pl_module)
        log_model_size(trainer, pl_module, self.input_size, type(self).__name__, self.verbose)

    def compress_model(self, pl_module: pl.LightningModule) -> None:
        """Remove the pruned units physically at the end of training (:func:`lightning_prune.compress` with
        this callback's plan)."""
        from lightning_prune.compression import compress

        if self.groups is None or self.keep is None:
            return
        _, root = traced_root(pl_module)
        removed = self._removed()
        compress(pl_module, example_inputs_for(root, self.input_size), groups=self.groups, removed=removed,
                 round_to=1)  # (the plan is rounded already)
        if self.gateset is not None:
            self.gateset.release_norms()
        self.shrink.removed = removed
        self._after_compression(pl_module)

    def _apply_removed(self, pl_module: pl.LightningModule, state: dict[str, Any]) -> None:
        """Resume: the checkpoint holds the smaller model; take its shapes before Lightning loads its
        weights."""
        from lightning_prune.graph import slice_units

        if self.shrink.removed is not None or self.groups is None:
            return
        removed = recorded_removal(state, self.groups)
        slice_units(pl_module, self.groups, removed)
        self.shrink.removed = removed
        self._after_compression(pl_module)

    def _after_compression(self, pl_module: pl.LightningModule) -> None:
        """The units are gone: the masks cover the smaller weights (all kept), the norm hooks are off."""
        self.retarget(pl_module)
        self._param_count = sum(p.numel() for p in pl_module.parameters())

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._param_count is None:
            self._param_count = sum(p.numel() for p in pl_module.parameters())
        pl_module.log(f"{PREFIX}/params", float(self._param_count), prog_bar=True, logger=False, on_step=True,
                      on_epoch=False)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self.gateset is not None:
            self.gateset.detach()
            self.gateset.release_norms()  # the model stays a plain model; setup restricts the norms again

    # ------------------------------------------------------------------ state
    @override
    def extra_state_dict(self) -> dict[str, Any]:
        return self.gate_state_dict()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # process-local; ddp_spawn workers run setup again (and rebuild the cost model)
        state["_model"] = None
        state["_cost"] = None
        return state

    @override
    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        self.load_gate_state_dict(state)
