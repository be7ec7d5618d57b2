"""The base of every channel callback: groups, kept units, restricted norms, compression, resume, size.

:class:`ChannelPruningCallback` does for a callback that removes whole units of channel groups (channels,
residual streams, attention heads, conv groups: :func:`lightning_prune.graph.analyse_channels`) everything but
the choice of the units. A subclass says *when* the units are (re)chosen (:meth:`~ChannelPruningCallback.due`)
and *which* units matter (:meth:`~ChannelPruningCallback.unit_scores`: one score per unit per group, higher =
kept); the base turns the scores into kept units with one shared allocation
(:meth:`~ChannelPruningCallback.allocate`: a uniform sparsity per group, ``group_targets`` per named group, or
the units with the largest scores across all groups that meet ``target_flops``/``target_params``, widths
rounded to ``round_to``), masks every tensor a dropped unit touches, restricts the LayerNorm statistics to the
kept channels (so that the masked model computes what the compressed one does), and, with ``compress=True``,
compresses the model inside the fit once the units are decided (or at ``compress_step``/``compress_epoch``),
the optimizers carrying their state over (:mod:`lightning_prune.callbacks.shrink`). A checkpoint of the
compressed model resumes onto a fresh module (the smaller shapes are rebuilt before Lightning loads the
weights), and :func:`lightning_prune.restore_run` compresses a restored model through
:meth:`~ChannelPruningCallback.compress_for_deployment`.

A new importance criterion is a subclass with :meth:`~ChannelPruningCallback.due` and
:meth:`~ChannelPruningCallback.unit_scores`::

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

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.callbacks.input_shape import traced_input_size
from lightning_prune.callbacks.logging import PREFIX, counted
from lightning_prune.callbacks.shrink import (
    ShrinkSchedule,
    check_strategy,
    compress_in_fit,
    log_model_size,
    recorded_removal,
)
from lightning_prune.core.compression import round_kept
from lightning_prune.core.gates import unit_masks
from lightning_prune.core.targets import Target
from lightning_prune.functional.magnitude import kept_count
from lightning_prune.graph import (
    DEFAULT_ANALYSIS_TIME_LIMIT_S,
    ChannelGroup,
    CostModel,
    analyse_channels,
    example_inputs_for,
    failure_reason,
    restricted_norm_hooks,
    slice_units,
    traced_root,
)
from lightning_prune.validation import (
    as_misconfiguration,
    check_bool,
    check_exclusive,
    check_fraction_map,
    check_group_names,
    check_input_size,
    check_int,
    check_optional,
    check_positive,
    check_size_targets,
    input_size_errors,
)

__all__ = ["ChannelPruningCallback", "top_units"]


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
        round_to: kept channel widths are multiples of it (heads and conv groups stay whole); 1 = no rounding.
        group_targets: ``{group name: fraction}``: each named group loses that fraction of its units, those
            with the smallest scores (exclusive with ``target_flops``/``target_params``).
    """

    #: build the cost model even without a size target, to log ``prune/flops_remaining`` and
    #: ``prune/params_remaining`` when the units are decided
    measures_size: bool = False
    #: what :meth:`on_fit_start` calls the moment the units are decided, in its error
    decision_phrase: str = "the masks are final (step {step})"
    #: the HINT of the error when the model has no removable channel group
    no_group_hint: str = "`include=[...]` selects other layers; `prune_coupled=True` prunes residual streams."

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
    ) -> None:
        super().__init__(include=include, exclude=exclude, types=types,
                         log_media_every_n_epochs=log_media_every_n_epochs, verbose=verbose)
        self.analysis_time_limit_s = check_optional(
            check_positive, "analysis_time_limit_s", analysis_time_limit_s,
            hint="CPU seconds the channel analysis at setup may use, e.g. 300; None for no limit.")
        self.prune_coupled = check_bool("prune_coupled", prune_coupled)
        self.target_flops, self.target_params = check_size_targets(target_flops, target_params)
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
        self._model: pl.LightningModule | None = None
        self._norm_handles: list[Any] = []
        self._param_count: int | None = None

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
        scores = self.unit_scores(trainer, pl_module)
        out = []
        for group in self.groups:
            score = scores.get(group.name)
            score = torch.zeros(group.size) if score is None else score.detach().float().cpu().reshape(-1)
            if score.numel() != group.size:
                raise ValueError(f"{type(self).__name__}.unit_scores gave {score.numel()} scores for group"
                                 f" {group.name!r} of {group.size} units")
            out.append(score)
        return out

    def allocate(self, scores: list[Tensor], sparsity: float | None = None,
                 keep: list[Tensor] | None = None) -> list[Tensor]:
        """The kept units: with ``target_flops``/``target_params`` those of :meth:`budget_keep`; otherwise
        ``keep`` (a subclass's own rule, e.g. a gate threshold) with the ``group_targets`` groups keeping
        their fraction, or, without ``keep``, the ``kept_count(size, group_sparsity(group, sparsity))`` units
        with the largest scores in every group; widths rounded up to ``round_to`` (largest scores first)."""
        assert self.groups is not None
        if self.target_flops is not None or self.target_params is not None:
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
        a group keeps at least one unit."""
        assert self.groups is not None
        out = []
        for group, kept, score in zip(self.groups, keep, scores):
            removed = (~kept.cpu()).nonzero().flatten().tolist()
            if len(removed) >= group.size:
                removed = sorted(removed, key=lambda u: -float(score[u]))[1:]  # a layer keeps one unit
            ranked = sorted(removed, key=lambda u: -float(score[u]))
            back = set(removed) - set(round_kept(group, removed, self.round_to, ranked))
            out.append(torch.tensor([u not in removed or u in back for u in range(group.size)]))
        return out

    def budget_keep(self, scores: list[Tensor]) -> list[Tensor]:
        """The kept units that meet ``target_flops``/``target_params``: the largest ``scores`` across all
        groups, as many as the budget allows, with channel widths rounded up to ``round_to``; a target the
        removable groups cannot reach is said to be unmet (what was reached, the most removal allows, the
        largest layers no group covers)."""
        assert self.groups is not None and self._cost is not None
        target = self.target_flops if self.target_flops is not None else self.target_params
        which = 0 if self.target_flops is not None else 1
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
                ranked = sorted(units, key=lambda u: -float(scores[gi][u]))  # the largest come back first
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
        step = 1
        while measured > target and lo < total:  # still above: remove more, with growing strides, until met
            lo = min(lo + step, total)
            step *= 2
            removed = removed_for(lo)
            measured = self._cost.measured_ratios(removed)[which]
        if measured > target:
            floor = measured if lo == total else self._cost.measured_ratios(removed_for(total))[which]
            self.warn_target_unmet("target_flops" if which == 0 else "target_params", target, measured, floor)
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
        what = "FLOPs" if name == "target_flops" else "parameters"
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
        self.restrict_norms()
        masks = {n: m & self.masks[n].to(m.device)
                 for n, m in unit_masks(pl_module, self.groups, self.keep).items() if n in self.masks}
        if trainer is not None:
            self.update_masks(masks, trainer)
        else:
            self.masks.update(masks)

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
                and self._model is not None:
            self._norm_handles = restricted_norm_hooks(self._model, self.groups, self.removed_units())

    def release_norms(self) -> None:
        for handle in self._norm_handles:
            handle.remove()
        self._norm_handles = []

    def size_metrics(self) -> dict[str, float]:
        """``prune/flops_remaining`` and ``prune/params_remaining`` of the compressed model with the kept
        units, as fractions of the dense model (counted by torch-pruning on a compressed copy); ``{}`` without
        a cost model."""
        if self._cost is None or self.keep is None or self.groups is None:
            return {}
        removed = self.removed_units()
        if self._measured is None or self._measured[0] != removed:
            self._measured = (removed, self._cost.measured_ratios(removed))
        flops, params = self._measured[1]
        return {f"{PREFIX}/flops_remaining": flops, f"{PREFIX}/params_remaining": params}

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
        from lightning_prune.core.compression import compress

        if self.groups is None or self.keep is None:
            return
        _, root = traced_root(pl_module)
        removed = self.removed_units()
        example = example_inputs_for(root, self.traced_size)
        if in_fit and trainer is not None:  # (the restricted norms let compress prove both models equal)
            compress_in_fit(trainer, pl_module, self.groups, removed, example)
        else:
            compress(pl_module, example, groups=self.groups, removed=removed, round_to=1)  # (the plan as is)
        self.shrink.removed = removed
        self.after_compression(pl_module)
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

    def _apply_recorded_removal(self, pl_module: pl.LightningModule, state: dict[str, Any]) -> None:
        """Resume: the checkpoint holds the compressed model; take its shapes before Lightning loads its
        weights."""
        if self.shrink.removed is not None or self.groups is None:
            return
        removed = recorded_removal(state, self.groups)
        slice_units(pl_module, self.groups, removed)
        self.shrink.removed = removed
        self.after_compression(pl_module)

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
        self._model = pl_module
        if stage == "fit" or self.groups is None:
            self.traced_size = traced_input_size(self.input_size, trainer, pl_module, type(self).__name__,
                                                 self.verbose)
        if self.shrink.enabled and trainer is not None and stage == "fit":
            check_strategy(trainer, type(self).__name__)
            self.shrink.install_resume(trainer, self.state_key,
                                       lambda state: self._apply_recorded_removal(pl_module, state))
        super().setup(trainer, pl_module, stage)
        self.restrict_norms()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.shrink.resolve(trainer)
        earliest = self.decided_at_step(trainer) if self.shrink.at_step is not None else 0
        if self.shrink.at_step is not None and self.shrink.at_step < earliest:
            raise MisconfigurationException(
                f"`compress_step`/`compress_epoch` resolves to step {self.shrink.at_step}, before"
                f" {self.decision_phrase.format(step=earliest)}. HINT: the units are removed once they are"
                " decided: compress later, or leave the position unset to compress right after.")

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
            # compress_step=1.0, or decided only at the end
            self.compress_now(trainer, pl_module, in_fit=False)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.release_norms()  # the model stays a plain model; setup restricts the norms again

    # ------------------------------------------------------------------ state
    @override
    def extra_state_dict(self) -> dict[str, Any]:
        keep = [k.clone() for k in self.keep] if self.keep is not None else None
        return {"keep": keep, "shrink": self.shrink.state_dict()}

    @override
    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        keep = state.get("keep", state.get("unit_keep"))  # (the baselines' name before 0.2)
        self.keep = [k.to(torch.bool).cpu() for k in keep] if keep is not None else None
        self.shrink.load_state_dict(state.get("shrink"))
        self.restrict_norms()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # process-local; ddp_spawn workers run setup again (and rebuild the cost model)
        state["_model"], state["_cost"], state["_norm_handles"] = None, None, []
        return state
