"""The base of every channel callback: groups, kept units, restricted norms, compression, resume, size.

:class:`ChannelPruningCallback` does for a callback that removes whole units of channel groups (channels,
residual streams, attention heads, conv groups: :func:`lightning_prune.graph.analyse_channels`) everything but
the choice of the units. A subclass says *when* the units are (re)chosen (:meth:`~ChannelPruningCallback.due`)
and *which* units matter (:meth:`~ChannelPruningCallback.unit_scores`: one score per unit per group, higher =
kept); the base turns the scores into kept units with one shared allocation
(:meth:`~ChannelPruningCallback.allocate`: a uniform sparsity per group, ``group_targets`` per named group, or
the units with the largest scores across all groups that meet ``target_flops``/``target_params`` or the
measured ``target_latency`` (:mod:`lightning_prune.graph.latency`), widths
rounded to ``round_to``), masks every tensor a dropped unit touches, restricts the LayerNorm statistics to the
kept channels (so that the masked model computes what the compressed one does), and, with ``compress=True``,
compresses the model inside the fit once the units are decided (or at ``compress_step``/``compress_epoch``),
the optimizers carrying their state over (:mod:`lightning_prune.callbacks.shrink`). A checkpoint of the
compressed model resumes onto a fresh module (the smaller shapes are rebuilt before Lightning loads the
weights), and :func:`lightning_prune.restore_run` compresses a restored model through
:meth:`~ChannelPruningCallback.compress_for_deployment`.

``importance=`` replaces :meth:`~ChannelPruningCallback.unit_scores` by a criterion of
:mod:`lightning_prune.core.importance` (``"weight_norm"``, ``"taylor"``, ``"bn_scale"``, ``"random"``, or one
a plugin registered: a new criterion for every channel callback is an
:class:`~lightning_prune.core.importance.Importance` subclass and one
:func:`~lightning_prune.core.importance.register_importance` line);
``min_group_keep``/``max_group_sparsity`` bound what the allocation takes from each group, and after each
decision the BatchNorm statistics are recalibrated on ``recalibrate_bn_batches`` training batches.

A new callback (a new *when*, or a criterion of its own) is a subclass with
:meth:`~ChannelPruningCallback.due` and :meth:`~ChannelPruningCallback.unit_scores`::

    class SmallestBiasFirst(ChannelPruningCallback):
        def __init__(self, target_sparsity=0.5, **kwargs):
            super().__init__(**kwargs)
            self.target_sparsity = target_sparsity

        def due(self, trainer):                          # once, at the first training batch
            return None if self.keep is not None else self.target_sparsity

        def unit_scores(self, trainer, pl_module):       # group name -> one score per unit
            return {g.name: some_importance(pl_module, g) for g in self.groups}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.callbacks.input_shape import traced_input_size, train_batch_size
from lightning_prune.callbacks.logging import PREFIX, counted
from lightning_prune.callbacks.sharding import SHARDED_STRATEGY
from lightning_prune.callbacks.shrink import (
    ShrinkSchedule,
    check_strategy,
    compress_exactly,
    compress_in_fit,
    compress_sharded_in_fit,
    follow_replaced_parameters,
    log_model_size,
    others_follow_removal,
    recorded_removal,
    refuse_frozen_conflicts,
    refuse_removal_conflicts,
    refuse_sharded_freezing,
    refuse_spawn_freezing,
    resize_sharded,
    sharded_compression_problem,
)
from lightning_prune.callbacks.state import seeded_generator
from lightning_prune.core.allocation import RankedRemoval, budget_plan
from lightning_prune.core.batchnorm import batch_norms, recalibrate_batchnorm
from lightning_prune.core.compression import round_kept
from lightning_prune.core.gates import unit_masks
from lightning_prune.core.importance import Importance, ImportanceContext, get_importance
from lightning_prune.core.sharding import is_sharded, local_slice
from lightning_prune.core.targets import Target
from lightning_prune.functional.magnitude import kept_count
from lightning_prune.graph import (
    DEFAULT_ANALYSIS_TIME_LIMIT_S,
    ChannelGroup,
    CostModel,
    LatencyPredictor,
    analyse_channels,
    example_inputs_for,
    failure_reason,
    freeze_modules,
    meta_copy,
    parameter_cuts,
    refreeze,
    restricted_norm_hooks,
    slice_units,
    traced_root,
)
from lightning_prune.graph.latency import latency_plan, measure_latency_model
from lightning_prune.validation import (
    as_misconfiguration,
    check_bool,
    check_exclusive,
    check_fraction,
    check_fraction_map,
    check_group_names,
    check_input_size,
    check_int,
    check_latency_options,
    check_number,
    check_optional,
    check_positive,
    check_size_targets,
    input_size_errors,
)

__all__ = ["ChannelPruningCallback", "top_units"]

#: callbacks (by class name) that keep references into the network's module tree
_HOLD_MODULES = ("ActivationDecay",)


def top_units(scores: Tensor, count: int) -> Tensor:
    """The boolean keep-vector of the ``count`` units with the largest ``scores`` (ties: the first units)."""
    order = sorted(range(scores.numel()), key=lambda u: (-float(scores[u]), u))
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[order[:count]] = True
    return keep


class ChannelPruningCallback(PruningCallback):
    """Base class of the channel callbacks: a subclass says when (:meth:`due`) and which units matter
    (:meth:`unit_scores`); the base does the rest (see the module docstring).

    Every argument is keyword-only.

    Args:
        include, exclude, types, log_media_every_n_epochs, verbose: see :class:`PruningCallback`
            (``include``/``exclude`` select the groups by their producers).
        input_size: ``(C, H, W)`` used to trace the model and count its FLOPs (default: the LightningModule's
            ``example_input_array``, else the shape of the first training batch, logged once, else timm's
            ``pretrained_cfg["input_size"]``).
        compress: compress the model inside the fit once the units are decided
            (:func:`lightning_prune.callbacks.shrink.compress_in_fit`): training continues on the smaller
            model, every optimizer carrying its state over.
        compress_step: when to compress instead: an optimizer step or a fraction of training (``1.0`` = at the
            end of training); not before the units are decided.
        compress_epoch: the same as an epoch (at its start) or a fraction of training.
        analysis_time_limit_s: CPU seconds (``time.process_time``) the channel analysis at ``setup`` may use;
            past it the fit stops with an error naming this argument (``None``: no limit). No signal or timer.
        prune_coupled: also prune coupled channels (residual streams, LayerNorm-normalised embedding
            dimensions) as one unit shared by every reader; ``False`` leaves them alone.
        target_flops: keep the units with the largest scores such that the compressed model has at most this
            fraction of the dense FLOPs (torch-pruning's ``count_ops_and_params``), in (0, 1].
        target_params: the same for the number of parameters (exclusive with ``target_flops``).
        target_latency: the same for the inference latency measured on ``latency_device`` at
            ``latency_batch_size`` (exclusive with the two above): a per-layer latency table is measured
            when the fit starts (:func:`lightning_prune.graph.latency.measure_latency_model`, its size and
            seconds logged), the units chosen with its prediction, the compressed copy then timed and the
            choice corrected; ``prune/latency_remaining`` (measured, else predicted) and
            ``prune/latency_predicted`` are logged.
        latency_device: where to time for ``target_latency`` (default: the training device).
        latency_batch_size: the batch to time at (default: the training batch size).
        latency_model: a :class:`~lightning_prune.graph.latency.LatencyPredictor` to use instead of the
            measured table (``predict(removed)``, ``measure(removed)``: fractions of the dense latency).
        round_to: kept channel widths are multiples of it (heads and conv groups stay whole); 1 = no rounding.
        group_targets: ``{group name: fraction}``: each named group loses that fraction of its units, those
            with the smallest scores (exclusive with ``target_flops``/``target_params``).
        importance: what ranks the units (:mod:`lightning_prune.core.importance`): ``"gate"`` (the gate
            callbacks' gates), ``"weight_norm"`` (torch-pruning's group L2 norm), ``"taylor"`` (first-order
            Taylor accumulated over the training steps since the last decision), ``"bn_scale"`` (|gamma| of
            the BatchNorm after the units), ``"random"`` (the callback's seeded generator), a name a plugin
            registered, or an :class:`~lightning_prune.core.importance.Importance`; ``None``: the callback's
            own criterion (:attr:`native_importance`).
        min_group_keep: the floor of the allocation: every group keeps at least this fraction of its units
            (rounded up), and always at least one unit (``0``: one unit, the rule before this argument); in
            [0, 1).
        max_group_sparsity: the cap: no group loses more than this fraction of its units (``None``: no cap,
            only the floor); in (0, 1].
        recalibrate_bn_batches: after each decision, the running statistics of every BatchNorm are recomputed
            on that many training batches (an unshuffled loader over the training set, the model's weights
            and modes left as they were; averaged across ranks); ``0`` = off.
    """

    #: the name of what :meth:`unit_scores` computes (``"gate"`` for the gate callbacks); ``importance=None``
    #: or this name use :meth:`unit_scores`, any other name the registered criterion
    native_importance: str | None = None

    #: build the cost model even without a size target, to log ``prune/flops_remaining`` and
    #: ``prune/params_remaining`` when the units are decided
    measures_size: bool = False
    #: what :meth:`on_fit_start` calls the moment the units are decided, in its error
    decision_phrase: str = "the masks are final (step {step})"
    shared_on_rebind = ("latency_model",)
    #: the HINT of the error when the model has no removable channel group
    no_group_hint: str = "`include=[...]` selects other layers; `prune_coupled=True` prunes residual streams."
    #: (PruningCallback.removal_refusal: another channel callback beside compress=True)
    removal_refusal = ("its channel groups and kept units describe the network before the removal (one"
                       " channel callback removes units per fit)")

    def __init__(
        self,
        *,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        types: list[str | type] | None = None,
        log_media_every_n_epochs: int = 1,
        verbose: bool = True,
        input_size: Sequence[int] | None = None,
        compress: bool = False,
        compress_step: int | float | None = None,
        compress_epoch: int | float | None = None,
        analysis_time_limit_s: float | None = DEFAULT_ANALYSIS_TIME_LIMIT_S,
        prune_coupled: bool = True,
        target_flops: float | None = None,
        target_params: float | None = None,
        round_to: int = 1,
        group_targets: dict[str, float] | None = None,
        target_latency: float | None = None,
        latency_device: str | torch.device | None = None,
        latency_batch_size: int | None = None,
        latency_model: LatencyPredictor | None = None,
        importance: str | Importance | None = None,
        min_group_keep: float = 0.0,
        max_group_sparsity: float | None = None,
        recalibrate_bn_batches: int = 8,
    ) -> None:
        super().__init__(include=include, exclude=exclude, types=types,
                         log_media_every_n_epochs=log_media_every_n_epochs, verbose=verbose)
        self.criterion = self.make_criterion(importance)
        self.importance = importance.name if isinstance(importance, Importance) else importance
        self.min_group_keep = check_fraction(
            "min_group_keep", min_group_keep,
            hint="the fraction of its units every group keeps at least, e.g. 0.1; 0 keeps one unit.")
        self.max_group_sparsity = check_optional(
            check_number, "max_group_sparsity", max_group_sparsity, 0.0, 1.0, False, True,
            hint="the most of its units a group may lose, in (0, 1], e.g. 0.8; None for no cap.")
        self.recalibrate_bn_batches = check_int(
            "recalibrate_bn_batches", recalibrate_bn_batches, 0,
            hint="the training batches the BatchNorm statistics are recomputed on after each decision;"
                 " 0 = off.")
        self.analysis_time_limit_s = check_optional(
            check_positive, "analysis_time_limit_s", analysis_time_limit_s,
            hint="CPU seconds the channel analysis at setup may use, e.g. 300; None for no limit.")
        self.prune_coupled = check_bool("prune_coupled", prune_coupled)
        self.target_flops, self.target_params, self.target_latency = check_size_targets(
            target_flops, target_params, target_latency)
        self.latency_device, self.latency_batch_size, self.latency_model = check_latency_options(
            latency_device, latency_batch_size, latency_model)
        self.group_targets = check_fraction_map(
            "group_targets", group_targets,
            hint="the fraction of each named group's units to prune, e.g. lp.layer_targets_from_sensitivity("
                 "table, 0.5) of a method='channels' scan.")
        check_exclusive(group_targets=self.group_targets or None, target_flops=target_flops,
                        target_params=target_params, **({"target_latency": target_latency}
                                                        if target_latency is not None else {}),
                        hint="group_targets sets the width of the named groups; target_flops/target_params"
                             " choose the widths that meet a budget: pass one.")
        self.round_to = check_int("round_to", round_to, 1,
                                  hint="8 keeps widths multiples of 8; 1 does not round.")
        if self.supports_sharding and self.sharding_refusal is None:
            self.sharding_refusal = self.unsharded_choice()
            self.supports_sharding = self.sharding_refusal is None
        self.shrink = ShrinkSchedule(compress, compress_step, compress_epoch, type(self).__name__)
        self.compress = self.shrink.enabled
        self.input_size = check_input_size("input_size", input_size)
        self.traced_size: tuple[int, ...] | None = self.input_size  # set at setup: see input_shape.py
        # state
        self.groups: list[ChannelGroup] | None = None
        self.keep: list[Tensor] | None = None  # per group, the kept units (once chosen)
        self.skipped: dict[str, str] = {}  # producer -> why its channels are left alone
        self.coverage = 0.0
        self.weight_targets: list[Target] = []
        self._group_targets: dict[str, float] = {}  # group_targets by the groups' full names (at setup)
        self._traced_prefix = ""
        self._analysis_weights: dict[str, int] = {}  # Conv/Linear weight elements per module
        self._cost: CostModel | None = None
        self._measured: tuple[dict[str, list[int]], tuple[float, float]] | None = None
        self._latency: LatencyPredictor | None = latency_model  # the measured table, at the fit's start
        self._norm_handles: list[Any] = []
        self._param_count: int | None = None
        self._importance_rng: Tensor | None = None  # the seeded generator's state (importance="random")
        self._warned: set[str] = set()
        #: the traced network's structure on the meta device, taken at setup under ModelParallelStrategy with
        #: compress=True: what the compressed network is rebuilt from once fully_shard has sharded it
        self._skeleton: torch.nn.Module | None = None

    def unsharded_choice(self) -> str | None:
        """Why this callback's choice of units needs whole tensors (then it refuses FSDP2 at setup), or
        ``None``: a criterion that reads the weights sees only a rank's shards, and ``target_latency`` times
        whole-model copies."""
        if self.criterion is not None and self.criterion.reads_weights:
            return (f"importance={self.importance!r} ranks the units from the parameters, of which each rank"
                    " holds only its shards (use the callback's own criterion, importance=None, or 'random')")
        if self.target_latency is not None:
            return "target_latency times copies of the whole model (use target_flops or target_params)"
        return None

    def make_criterion(self, importance: str | Importance | None) -> Importance | None:
        """The criterion object of ``importance`` (``None``: :meth:`unit_scores`); a clear error for an
        unknown name."""
        if importance is None or (isinstance(importance, str) and importance == self.native_importance):
            return None
        with as_misconfiguration():
            return get_importance(importance, self.native_importance, type(self).__name__)

    # ------------------------------------------------------------------ the protocol
    def due(self, trainer: pl.Trainer) -> float | None:
        """At the end of a training batch: ``None`` to leave the units alone, else (re)choose them now; the
        value is the fraction of each group's units to drop when neither a size target nor ``group_targets``
        decides (see :meth:`allocate`)."""
        raise NotImplementedError

    def unit_scores(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """Group name -> one score per unit of that group (higher = kept). A group left out scores all its
        units alike (its first units are kept)."""
        raise NotImplementedError

    def decided(self, trainer: pl.Trainer) -> bool:
        """Whether the kept units are final (then ``compress=True`` may compress); default: once chosen."""
        return self.keep is not None

    def decided_at_step(self, trainer: pl.Trainer) -> int:
        """The earliest optimizer step at which the units can be final (``compress_step`` may not come
        sooner)."""
        return 0

    def group_sparsity(self, group: ChannelGroup, sparsity: float) -> float:
        """The fraction of ``group``'s units to drop when the others drop ``sparsity``: its
        ``group_targets`` entry, else ``sparsity``."""
        return self._group_targets.get(group.name, sparsity)

    # ------------------------------------------------------------------ allocation
    def scores_list(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> list[Tensor]:
        """:meth:`unit_scores` as one CPU tensor per group, in the order of :attr:`groups`."""
        assert self.groups is not None
        if self.criterion is None:
            scores = self.unit_scores(trainer, pl_module)
        else:
            context = self.importance_context(trainer, pl_module)
            scores = self.criterion.scores(self.groups, context)
            if context.generator is not None:
                self._importance_rng = context.generator.get_state()
        out = []
        for group in self.groups:
            score = scores.get(group.name)
            score = torch.zeros(group.size) if score is None else score.detach().float().cpu().reshape(-1)
            if score.numel() != group.size:
                raise ValueError(f"{type(self).__name__}.unit_scores gave {score.numel()} scores for group"
                                 f" {group.name!r} of {group.size} units")
            out.append(score)
        return out

    def importance_context(self, trainer: pl.Trainer | None,
                           pl_module: pl.LightningModule) -> ImportanceContext:
        """What the criterion reads: the module, the seeded generator, the callback's own scores, the
        reduction across ranks."""
        generator = None
        if self.criterion is not None and self.criterion.needs_generator:
            if self._importance_rng is None:
                self._importance_rng = seeded_generator(None, trainer).get_state()
            generator = torch.Generator()
            generator.set_state(self._importance_rng)

        def reduce(t: Tensor) -> Tensor:
            if trainer is None or trainer.world_size <= 1:
                return t
            return trainer.strategy.reduce(t.to(pl_module.device), reduce_op="mean").cpu()

        return ImportanceContext(model=pl_module, generator=generator,
                                 native=lambda: self.unit_scores(trainer, pl_module), reduce=reduce,
                                 warn=self.warn_once)

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            rank_zero_warn(f"{type(self).__name__}: {message}", category=UserWarning)

    def accumulate_importance(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                              optimizer: torch.optim.Optimizer) -> None:
        """A data-driven criterion (``"taylor"``) folds in this step's gradients (first optimizer only; not
        once the units are final)."""
        if self.criterion is None or not self.criterion.needs_gradients or self.groups is None:
            return
        if trainer.optimizers and optimizer is not trainer.optimizers[0]:
            return
        if self.shrink.removed is not None or self.decided(trainer):
            return
        self.criterion.accumulate(self.groups, self.importance_context(trainer, pl_module))

    def group_floor(self, group: ChannelGroup) -> int:
        """The fewest units ``group`` keeps: ``min_group_keep`` of them (rounded up), at most
        ``max_group_sparsity`` removed, and at least one."""
        floor = max(1, math.ceil(self.min_group_keep * group.size - 1e-9))
        if self.max_group_sparsity is not None:
            floor = max(floor, group.size - math.floor(self.max_group_sparsity * group.size + 1e-9))
        return min(floor, group.size)

    def allocate(self, scores: list[Tensor], sparsity: float | None = None,
                 keep: list[Tensor] | None = None) -> list[Tensor]:
        """The kept units: with ``target_flops``/``target_params`` those of :meth:`budget_keep`; otherwise
        ``keep`` (a subclass's own rule, e.g. a gate threshold) with the ``group_targets`` groups keeping
        their fraction, or, without ``keep``, the ``kept_count(size, group_sparsity(group, sparsity))`` units
        with the largest scores in every group; widths rounded up to ``round_to`` (largest scores first)."""
        assert self.groups is not None
        if self.target_flops is not None or self.target_params is not None or self.target_latency is not None:
            return self.budget_keep(scores)
        if keep is None:
            assert sparsity is not None
            keep = [top_units(s, kept_count(g.size, self.group_sparsity(g, sparsity)))
                    for g, s in zip(self.groups, scores)]
        else:
            keep = [top_units(s, kept_count(g.size, self._group_targets[g.name]))
                    if g.name in self._group_targets else k.cpu()
                    for g, k, s in zip(self.groups, keep, scores)]
        return self.rounded(keep, scores)

    def rounded(self, keep: list[Tensor], scores: list[Tensor]) -> list[Tensor]:
        """``keep`` with each channel group's kept width rounded up to ``round_to`` (largest scores first);
        a group keeps at least :meth:`group_floor` units (those with the largest scores come back)."""
        assert self.groups is not None
        out = []
        for group, kept, score in zip(self.groups, keep, scores):
            removed = (~kept.cpu()).nonzero().flatten().tolist()
            back_needed = self.group_floor(group) - (group.size - len(removed))
            if back_needed > 0:
                removed = sorted(removed, key=lambda u: -float(score[u]))[back_needed:]
            ranked = sorted(removed, key=lambda u: -float(score[u]))
            back = set(removed) - set(round_kept(group, removed, self.round_to, ranked))
            out.append(torch.tensor([u not in removed or u in back for u in range(group.size)]))
        return out

    def budget_keep(self, scores: list[Tensor]) -> list[Tensor]:
        """The kept units that meet ``target_flops``/``target_params``: the largest ``scores`` across all
        groups (each keeping :meth:`group_floor` units), as many as the budget allows, with channel widths
        rounded up to ``round_to`` (:func:`~lightning_prune.core.allocation.budget_plan`: where the last unit
        removed overshoots the target, the most important removed units come back while it holds); a target
        the removable groups cannot reach is said to be unmet (what was reached, the most removal allows, the
        largest layers no group covers)."""
        assert self.groups is not None and (self._cost is not None or self.target_latency is not None)
        floors = [self.group_floor(g) for g in self.groups]
        removal = RankedRemoval(self.groups, scores, floors, self.round_to)
        if self.target_latency is not None:
            latency = latency_plan(removal, removal.total, self.latency_predictor(None), self.target_latency)
            if latency.floor is not None and latency.measured is not None:
                self.warn_target_unmet("target_latency", self.target_latency, latency.measured, latency.floor)
            removed = latency.removed
        else:
            cost, which = self._cost, 0 if self.target_flops is not None else 1
            target = self.target_flops if self.target_flops is not None else self.target_params
            assert cost is not None and target is not None
            plan = budget_plan(removal, lambda p: cost.ratios(p)[which],
                               lambda p: cost.measured_ratios(p)[which], target)
            if not plan.met:
                assert plan.floor is not None
                name = "target_flops" if which == 0 else "target_params"
                self.warn_target_unmet(name, target, plan.measured, plan.floor)
            removed = plan.removed
        return [torch.tensor([u not in set(removed.get(g.name, ())) for u in range(g.size)])
                for g in self.groups]

    def warn_target_unmet(self, name: str, target: float, reached: float, floor: float) -> None:
        """Say that ``name`` is not met: what was reached, the most the removable groups allow, and the
        largest layers no removable group covers, with the reasons."""
        weights = self._analysis_weights
        total = sum(weights.values()) or 1
        blockers = sorted(((weights[n], n, why) for n, why in self.skipped.items() if n in weights),
                          reverse=True)
        shown = "; ".join(f"`{n}` ({w / total:.0%} of the weights: {why})" for w, n, why in blockers[:3])
        what = {"target_flops": "FLOPs", "target_latency": "measured latency"}.get(name, "parameters")
        rank_zero_warn(
            f"{type(self).__name__}: `{name}={target:g}` is not reached: the compressed model keeps"
            f" {reached:.3f} of the dense {what} (removing every removable unit but one per group would keep"
            f" {floor:.3f})."
            f" {1 - self.coverage:.0%} of the Conv/Linear weights are in no removable channel group"
            + (f"; the largest blockers: {shown}." if shown else ".")
            + " HINT: `pruning.skipped` lists every group left alone with its reason; `include`/`exclude` and"
              " `prune_coupled=True` widen the selection.", category=UserWarning)

    # ------------------------------------------------------------------ the units
    def choose_keep(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule,
                    sparsity: float | None) -> list[Tensor]:
        """The kept units now: :meth:`allocate` of :meth:`unit_scores` (override for another rule)."""
        return self.allocate(self.scores_list(trainer, pl_module), sparsity)

    @torch.no_grad()
    def apply_keep(self, keep: Sequence[Tensor], trainer: pl.Trainer | None,
                   pl_module: pl.LightningModule) -> None:
        """Install ``keep``: mask every tensor a dropped unit touches (on top of the current masks), restrict
        the norms to the kept channels, log (with a trainer)."""
        assert self.groups is not None and self.masks is not None
        self.keep = [k.to(torch.bool).cpu().clone() for k in keep]
        self.freeze_readers(trainer, pl_module, {g.name: (~k).nonzero().flatten().tolist()
                                                 for g, k in zip(self.groups, self.keep)})
        self.restrict_norms()
        # (sharded parameters: the full unit masks cut to this rank's shard, as the current masks are)
        masks = {n: local_slice(m, self.masks.param(n)) & self.masks[n].to(m.device)
                 for n, m in unit_masks(pl_module, self.groups, self.keep).items() if n in self.masks}
        if trainer is not None:
            self.update_masks(masks, trainer)
        else:
            self.masks.update(masks)
        if self.criterion is not None:
            self.criterion.reset()  # statistics since the last decision
        if trainer is not None:
            self.recalibrate(trainer, pl_module)

    @torch.no_grad()
    def freeze_readers(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule,
                       removed: dict[str, list[int]] | None) -> list[str]:
        """Freeze the layers that compute their weight from their parameters (weight-standardised convs, a
        ``weight_norm`` Linear: ``ChannelGroup.frozen``) of the groups losing units (``removed``; ``None``:
        of every group) into plain layers holding that weight, before masks, folded gates or the removal act
        on it (:mod:`lightning_prune.graph.frozen`). The targets and masks follow the new parameters, and
        every optimizer (a frozen weight's state starts afresh); from then on such a layer trains as a plain
        layer (no longer re-standardised). Returns the names frozen."""
        if not self.groups:
            return []
        if any(is_sharded(p) for p in pl_module.parameters()):  # (refused at train start: never silently)
            refuse_sharded_freezing(pl_module, [g for g in self.groups if removed is None
                                                or g.feasible(removed.get(g.name, ()))], type(self).__name__)
            return []
        old = {id(p): n for n, p in pl_module.named_parameters()}
        names = freeze_modules(pl_module, self.groups, removed or {}, everywhere=removed is None)
        if names:
            self._follow_frozen(pl_module, names)
            if trainer is not None:
                follow_replaced_parameters(trainer, pl_module, old, {f"{n}.weight" for n in names})
        return names

    def _follow_frozen(self, pl_module: pl.LightningModule, names: Sequence[str]) -> None:
        """Layers ``names`` of ``pl_module`` were frozen: record them, point the targets and masks at their
        parameters (a parameter gone with its layer, a ``gain``, leaves them)."""
        self.shrink.frozen = sorted(set(self.shrink.frozen) | set(names))
        self.rebind_targets(pl_module,
                            lambda target, mask: mask if mask.shape == target.param.shape else None)
        params = dict(pl_module.named_parameters())
        self.weight_targets = [Target(t.module_name, pl_module.get_submodule(t.module_name), t.param_name)
                               for t in self.weight_targets if t.name in params]
        self.weight_names = [n for n in self.weight_names if n in params]

    def recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Recompute every BatchNorm's running statistics on ``recalibrate_bn_batches`` training batches
        (:func:`lightning_prune.core.batchnorm.recalibrate_batchnorm`), averaged across ranks."""
        from lightning_prune.callbacks.one_shot import calibration_loader
        from lightning_prune.core.one_shot import default_forward, draw_batches

        norms = batch_norms(pl_module)
        if not self.recalibrate_bn_batches or not norms:
            return
        try:
            loader = calibration_loader(trainer)
            count = self.recalibrate_bn_batches
            if hasattr(loader, "__len__"):  # a small training set: all its batches
                count = max(min(count, len(loader)), 1)
            batches = draw_batches(loader, count, who=type(self).__name__)
        except Exception as error:  # noqa: BLE001 - no training loader to draw from: say so, go on
            self.warn_once(f"the BatchNorm statistics are not recalibrated (recalibrate_bn_batches="
                           f"{self.recalibrate_bn_batches}): no training batch could be drawn ({error}).")
            return
        recalibrate_batchnorm(pl_module, batches, default_forward, norms)
        if trainer.world_size > 1:
            for norm in norms:
                for buffer in (norm.running_mean, norm.running_var):
                    buffer.copy_(trainer.strategy.reduce(buffer.clone(), reduce_op="mean"))

    def decide(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule,
               sparsity: float | None) -> None:
        """Choose the kept units (:meth:`choose_keep`) and install them (:meth:`apply_keep`)."""
        self.apply_keep(self.choose_keep(trainer, pl_module, sparsity), trainer, pl_module)

    def removed_units(self) -> dict[str, list[int]]:
        """Group name -> the units dropped (those not in :attr:`keep`)."""
        assert self.groups is not None and self.keep is not None
        return {g.name: (~k).nonzero().flatten().tolist() for g, k in zip(self.groups, self.keep)}

    def restrict_norms(self) -> None:
        """The LayerNorms that read a dropped unit compute their statistics over the kept channels only (as
        the compressed model will); nothing once the units are gone."""
        self.release_norms()
        if self.shrink.removed is None and self.groups is not None and self.keep is not None \
                and self.bound_module is not None:
            self._norm_handles = restricted_norm_hooks(self.bound_module, self.groups, self.removed_units())

    @override
    def release_module(self, pl_module: pl.LightningModule) -> None:
        self.release_norms()
        super().release_module(pl_module)

    def release_norms(self) -> None:
        for handle in self._norm_handles:
            handle.remove()
        self._norm_handles = []

    def size_metrics(self) -> dict[str, float]:
        """``prune/flops_remaining`` and ``prune/params_remaining`` of the compressed model with the kept
        units, as fractions of the dense model (counted by torch-pruning on a compressed copy); ``{}`` without
        a cost model."""
        if self.keep is None or self.groups is None:
            return {}
        removed = self.removed_units()
        metrics = {}
        if self._cost is not None:
            if self._measured is None or self._measured[0] != removed:
                self._measured = (removed, self._cost.measured_ratios(removed))
            flops, params = self._measured[1]
            metrics = {f"{PREFIX}/flops_remaining": flops, f"{PREFIX}/params_remaining": params}
        if self.target_latency is not None and self._latency is not None:
            predicted = float(self._latency.predict(removed))
            # what the allocation measured (a new timing here could run on one rank only: DDP would hang)
            cached = getattr(self._latency, "cached", None)
            measure = cached if cached is not None else getattr(self._latency, "measure", None)
            measured = measure(removed) if measure is not None else None
            metrics[f"{PREFIX}/latency_remaining"] = float(measured) if measured is not None else predicted
            metrics[f"{PREFIX}/latency_predicted"] = predicted
        return metrics

    # ------------------------------------------------------------------ logging
    @override
    def progress_line(self, step: int, metrics: dict[str, float]) -> str:
        """Units kept and FLOPs left, not the sparsity of the weights (a channel callback removes units)."""
        groups = self.groups or []
        total = sum(g.size for g in groups)
        kept = sum(int(k.sum()) for k in self.keep) if self.keep is not None else total
        flops = self.size_metrics().get(f"{PREFIX}/flops_remaining") if self.keep is not None else None
        return (f"[{type(self).__name__}] step {step}: {kept:,}/{counted(total, 'unit')} kept"
                f" ({1 - kept / max(total, 1):.1%} removed) in {counted(len(groups), 'group')}"
                + (f", FLOPs {flops:.1%} of dense" if flops is not None else ""))

    # ------------------------------------------------------------------ groups and targets
    def find_groups(self, pl_module: pl.LightningModule) -> list[ChannelGroup]:
        """The exactly removable channel groups of ``pl_module`` (and the cost model, when one is needed)."""
        prefix, root = traced_root(pl_module)
        with as_misconfiguration(), input_size_errors(self.input_size):
            example = example_inputs_for(root, self.traced_size)
            analysis = analyse_channels(root, example, self.include or None, self.exclude or None,
                                        self.prune_coupled, prefix=prefix,
                                        analysis_time_limit_s=self.analysis_time_limit_s)
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
                f" HINT: {self.no_group_hint}")
        sized = self.target_flops is not None or self.target_params is not None
        self._cost = None
        self._latency = self.latency_model  # (a measured one is measured again where the fit runs)
        if sized or self.measures_size:
            try:
                self._cost = CostModel(root, example, analysis.groups, prefix=prefix)
            except Exception as error:  # noqa: BLE001 - torch-pruning's counter on a model it cannot count
                if sized:
                    raise MisconfigurationException(
                        f"{type(self).__name__} cannot count the FLOPs and parameters of"
                        f" {type(pl_module).__name__} to meet `target_flops`/`target_params`:"
                        f" {failure_reason('counting them', error)}. HINT: use `group_targets` or the"
                        " callback's own rule (no size target) on this model.") from error
        return analysis.groups

    @override
    def select_targets(self, pl_module: pl.LightningModule) -> list[Target]:
        """The targeted weights, plus every other tensor a unit touches (biases, norms, readers' columns)."""
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

    # ------------------------------------------------------------------ compression
    def compress_now(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule,
                     in_fit: bool = True) -> None:
        """Compress the model: remove the dropped units. Inside the fit (``in_fit``) every optimizer carries
        on with the smaller parameters; otherwise :func:`lightning_prune.compress` with this plan."""
        if self.groups is None or self.keep is None:
            return
        prefix, root = traced_root(pl_module)
        removed = self.removed_units()
        sharded = any(is_sharded(p) for p in root.parameters())
        if sharded:  # FSDP2: gathered into a plain copy, compressed, sharded again (in the fit or at its end)
            if trainer is None or self._skeleton is None:
                raise MisconfigurationException(
                    f"{type(self).__name__} cannot compress a sharded model outside a fit under"
                    f" {SHARDED_STRATEGY}. HINT: gather the weights (a full-state checkpoint) and call"
                    " lp.compress on an unsharded model.")

            def size() -> None:
                log_model_size(trainer, pl_module, self.traced_size, type(self).__name__, self.verbose)

            compress_sharded_in_fit(trainer, pl_module, prefix, self._skeleton, self.groups, removed,
                                    self.traced_size, before=self.restrict_norms, after=size)
            self.shrink.removed = removed
            self.after_compression(pl_module)
            return
        example = example_inputs_for(root, self.traced_size)
        # (the restricted norms let compress prove both models equal; the cuts: the plan the compression made)
        if in_fit and trainer is not None:
            cuts = compress_in_fit(trainer, pl_module, self.groups, removed, example)
        else:
            cuts = compress_exactly(pl_module, self.groups, removed, example)
        self.shrink.removed = removed
        self.after_compression(pl_module)
        others_follow_removal(trainer, self, pl_module, cuts)
        if trainer is not None:
            log_model_size(trainer, pl_module, self.traced_size, type(self).__name__, self.verbose)

    def compress_if_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.training and self.shrink.due(int(trainer.global_step), self.decided(trainer)):
            self.compress_now(trainer, pl_module)

    def after_compression(self, pl_module: pl.LightningModule) -> None:
        """The units are gone: the norms see the kept channels only, the masks cover the smaller weights."""
        self.release_norms()
        self.retarget(pl_module)
        self._param_count = sum(p.numel() for p in pl_module.parameters())

    def _apply_recorded_removal(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                state: dict[str, Any]) -> dict[str, list[tuple[int, Tensor]]] | None:
        """Resume: the checkpoint holds the compressed model; take its shapes before Lightning loads its
        weights (under FSDP2: the sharded network gathered, sliced and sharded again, the optimizers pointed
        at the new parameters, before ModelParallelStrategy loads the checkpoint into them). Returns the cuts
        made (unsharded), which the checkpoint's optimizer state is checked against
        (:meth:`ShrinkSchedule.install_resume`)."""
        if self.shrink.removed is not None or self.groups is None:
            return None
        frozen = [str(n) for n in (state.get("shrink") or {}).get("frozen") or ()]
        sharded = any(is_sharded(p) for p in pl_module.parameters())
        if frozen and not sharded:  # layers frozen before it
            self._follow_frozen(pl_module, refreeze(pl_module, frozen, "the checkpoint"))
        if not (state.get("shrink") or {}).get("removed"):
            if frozen and sharded:  # (frozen under DDP, no unit removed: nothing is frozen on shards)
                refuse_sharded_freezing(pl_module, [g for g in self.groups if set(g.frozen) & set(frozen)]
                                        or self.groups, type(self).__name__)
            return None
        removed = recorded_removal(state, self.groups)
        if sharded:
            prefix = traced_root(pl_module)[0]
            problem = (sharded_compression_problem(pl_module, prefix) if self._skeleton is not None else
                       "the network's structure was not recorded at setup")
            if problem is not None:
                raise MisconfigurationException(
                    f"{type(self).__name__} cannot resume this checkpoint under {SHARDED_STRATEGY}: it was"
                    f" written after the units were removed inside the fit, and {problem}. HINT: resume it"
                    " under strategy='ddp' from a full-state checkpoint (ModelParallelStrategy("
                    "save_distributed_checkpoint=False)).")
            resize_sharded(trainer, pl_module, prefix, self._skeleton, self.groups, removed, frozen)
            self.shrink.frozen = sorted(set(self.shrink.frozen) | set(frozen))
            cuts = None
        else:
            cuts = parameter_cuts(pl_module, self.groups, removed)
            slice_units(pl_module, self.groups, removed)
        self.shrink.removed = removed
        self.after_compression(pl_module)
        if cuts is not None:  # (before Lightning loads their states: the checkpoint's masks, the new shapes)
            others_follow_removal(trainer, self, pl_module, cuts)
        return cuts

    @override
    def compress_for_deployment(self, module: pl.LightningModule, compress: bool | None = None) -> bool:
        """:func:`lightning_prune.restore_run`: compress the restored model with this plan when asked
        (``None``: as configured, ``compress=True``) and the units are chosen but still there."""
        want = self.shrink.enabled if compress is None else compress
        if not want or self.keep is None or self.shrink.removed is not None:
            return False
        self.compress_now(None, module, in_fit=False)
        return True

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.bind_module(pl_module)
        if stage == "fit" or self.groups is None:
            self.traced_size = traced_input_size(self.input_size, trainer, pl_module, type(self).__name__,
                                                 self.verbose)
        if self.shrink.enabled and trainer is not None and stage == "fit":
            check_strategy(trainer, type(self).__name__)
            self._refuse_stale_holders(trainer)
            if type(trainer.strategy).__name__ == SHARDED_STRATEGY and self._skeleton is None:
                # fully_shard runs after setup: the structure to rebuild the compressed network from
                self._skeleton = meta_copy(traced_root(pl_module)[1])
            self.shrink.install_resume(trainer, self.state_key,
                                       lambda state: self._apply_recorded_removal(trainer, pl_module, state))
        super().setup(trainer, pl_module, stage)  # (refuses the strategies it cannot act under)
        if (trainer is not None and not (self.shrink.enabled and stage == "fit")
                and type(trainer.strategy).__name__ != SHARDED_STRATEGY):
            # layers frozen before a checkpoint (lightning_prune.graph.frozen) are frozen again on resume; a
            # checkpoint of the compressed model loads in trainer.test/validate/predict too
            self.shrink.install_resume(trainer, self.state_key,
                                       lambda state: self._apply_recorded_removal(trainer, pl_module, state))
        self.restrict_norms()

    def _refuse_stale_holders(self, trainer: pl.Trainer) -> None:
        """Under FSDP2 the in-fit removal replaces the sharded network with a new module tree: a callback that
        holds the network's parameters or modules (another pruning callback's masks, ActivationDecay's
        wrappers) would act on the old tree from then on, silently. Refused at setup, by name. Under every
        other strategy the modules stay and the other mask callbacks cut their masks with the parameters
        (:meth:`PruningCallback.follow_removal`) -- the pruning callbacks that say they can
        (``follows_removal = True``); every other pruning callback, and any callback giving a
        ``removal_refusal``, is refused at setup, by name, with the reason and what to do."""
        if type(trainer.strategy).__name__ != SHARDED_STRATEGY:
            refuse_removal_conflicts(trainer, self, f"{type(self).__name__}(compress=True)",
                                     "compress=False (the units stay masked; compress after the fit)")
            return
        holders = [type(cb).__name__ for cb in getattr(trainer, "callbacks", []) if cb is not self
                   and (isinstance(cb, PruningCallback) or type(cb).__name__ in _HOLD_MODULES)]
        if holders:
            raise MisconfigurationException(
                f"{type(self).__name__}(compress=True) cannot share a fit under {SHARDED_STRATEGY} with"
                f" {', '.join(holders)}: the removal inside the sharded fit replaces the network with a new"
                f" module tree, and {holders[0]} holds the old tree's parameters or modules (masks, wrapped"
                " activations) that it would go on acting on. HINT: compress=False (the units stay masked;"
                " compress after the fit), or strategy='ddp', or run them in separate fits.")

    def latency_predictor(self, trainer: pl.Trainer | None) -> LatencyPredictor:
        """The latency model of ``target_latency``: ``latency_model`` when given, else the table measured on
        ``latency_device`` (default: the trainer's device) at ``latency_batch_size`` (default: the training
        batch size), measured once (every DDP rank uses rank 0's numbers)."""
        if self._latency is not None:
            return self._latency
        assert self.bound_module is not None and self.groups is not None
        prefix, root = traced_root(self.bound_module)
        device = self.latency_device or (trainer.strategy.root_device if trainer is not None else None)
        batch = self.latency_batch_size or train_batch_size(trainer)
        example = example_inputs_for(root, self.traced_size)
        share = None
        if trainer is not None and trainer.world_size > 1:
            share = lambda obj: trainer.strategy.broadcast(obj, src=0)  # noqa: E731
        with as_misconfiguration():
            latency = measure_latency_model(root, example, self.groups, prefix=prefix, device=device,
                                            batch_size=batch, share=share)
        if self.verbose:
            rank_zero_info(f"[{type(self).__name__}] {latency.describe()}"
                           + ("" if batch else "; no training batch size found: pass `latency_batch_size`"))
        self._latency = latency
        return latency

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        refuse_frozen_conflicts(trainer, self, self.groups, type(self).__name__)  # (every target is known)
        if self.target_latency is not None and self.shrink.removed is None and self.groups is not None:
            self.latency_predictor(trainer)
        if self.criterion is not None and self.criterion.needs_generator and self._importance_rng is None:
            self._importance_rng = seeded_generator(None, trainer).get_state()  # rank zero's seed everywhere
        if self.shrink.enabled and self.shrink.removed is None and any(
                is_sharded(p) for p in pl_module.parameters()):
            problem = sharded_compression_problem(pl_module, traced_root(pl_module)[0])
            if problem is not None:
                raise MisconfigurationException(
                    f"{type(self).__name__}(compress=True) cannot remove units from this sharded model inside"
                    f" the fit: {problem}. HINT: fix configure_model so, or set compress=False and compress"
                    " the trained model (lp.compress on a full-state checkpoint's weights).")
        self.shrink.resolve(trainer)
        earliest = self.decided_at_step(trainer) if self.shrink.at_step is not None else 0
        if self.shrink.at_step is not None and self.shrink.at_step < earliest:
            raise MisconfigurationException(
                f"`compress_step`/`compress_epoch` resolves to step {self.shrink.at_step}, before"
                f" {self.decision_phrase.format(step=earliest)}. HINT: the units are removed once they are"
                " decided: compress later, or leave the position unset to compress right after.")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # (after ModelParallelStrategy restored a checkpoint, which it does after on_fit_start: past the
        # removal nothing more is frozen, and a resume goes on)
        if self.shrink.removed is None:
            refuse_sharded_freezing(pl_module, self.groups, type(self).__name__)
            refuse_spawn_freezing(trainer, self.groups, type(self).__name__)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self.accumulate_importance(trainer, pl_module, optimizer)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._param_count is None:
            self._param_count = sum(p.numel() for p in pl_module.parameters())
        pl_module.log(f"{PREFIX}/params", float(self._param_count), prog_bar=True, logger=False, on_step=True,
                      on_epoch=False)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.shrink.removed is not None:  # the units are gone: they are final
            return
        sparsity = self.due(trainer)
        if sparsity is not None:
            self.decide(trainer, pl_module, sparsity)
        self.compress_if_due(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.shrink.enabled and self.shrink.removed is None and self.keep is not None:
            # compress_step=1.0 (or decided only at the end): the optimizers follow as inside the fit, since
            # a checkpoint written after this (trainer.save_checkpoint after the fit, ModelCheckpoint's own
            # on_train_end -- Lightning runs it after every other callback's) holds the compressed weights
            # and must hold optimizer state of their shapes for a resumed fit
            self.compress_now(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.release_norms()  # the model stays a plain model; setup restricts the norms again

    # ------------------------------------------------------------------ state
    @override
    def extra_state_dict(self) -> dict[str, Any]:
        keep = [k.clone() for k in self.keep] if self.keep is not None else None
        return {"keep": keep, "shrink": self.shrink.state_dict(),
                "importance": self.criterion.state_dict() if self.criterion is not None else None,
                "importance_rng": self._importance_rng.clone() if self._importance_rng is not None else None}

    @override
    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        keep = state.get("keep", state.get("unit_keep"))  # (the baselines' name before 0.2)
        self.keep = [k.to(torch.bool).cpu() for k in keep] if keep is not None else None
        self.shrink.load_state_dict(state.get("shrink"))
        if self.criterion is not None and state.get("importance") is not None:
            self.criterion.load_state_dict(state["importance"])
        rng = state.get("importance_rng")
        self._importance_rng = rng.clone() if rng is not None else self._importance_rng
        self.restrict_norms()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # process-local; ddp_spawn workers run setup again (and rebuild the cost model)
        state["_model"], state["_cost"], state["_norm_handles"] = None, None, []
        state["_latency"] = self.latency_model
        state["_skeleton"] = None
        return state
