"""What the three baselines share, built on lightning-prune's public API only.

:class:`~lightning_prune.callbacks.base.PruningCallback` resolves the targets, holds the boolean masks,
re-applies them after every optimizer step, checkpoints them and logs sparsity. This module adds what the
baselines have in common: *when* to prune (:meth:`BaselinePruning.due`, asked at the end of every training
batch), the channel groups lightning-prune's analysis proves exactly removable
(:func:`lightning_prune.graph.analyse_channels`: channels, residual streams, attention heads, conv groups)
with one keep-vector of units per group, physical removal of the pruned units inside the fit
(:mod:`lightning_prune.shrink`: the optimizers carry their state over, checkpoints of the smaller model
resume), a seeded random generator kept in the callback state, and sparsity metrics over the targeted weights
only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_prune.callbacks.base import PruningCallback, resolve_seed
from lightning_prune.gates import unit_masks
from lightning_prune.graph import (
    DEFAULT_ANALYSIS_TIME_LIMIT_S,
    ChannelGroup,
    example_inputs_for,
    restricted_norm_hooks,
    slice_units,
    traced_root,
)
from lightning_prune.logging import PREFIX, log_scalars
from lightning_prune.schedules import polynomial_sparsity, resolve_step, until_the_end
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
from lightning_prune_baselines.channels import channel_groups

__all__ = ["BaselinePruning", "ScheduledBaselinePruning"]


class BaselinePruning(PruningCallback):
    """Base of the baselines: prune when :meth:`due` says so, to the masks :meth:`compute_masks` returns.

    With ``channel_wise = True`` the units are those of lightning-prune's channel groups (one keep-vector per
    group, :attr:`unit_keep`); the masks cover every tensor that loses a pruned unit (producer rows, reader
    columns, BatchNorm and LayerNorm entries, ``pos_embed``...), so nothing reads a pruned unit, and the
    LayerNorms that read them compute their statistics over the kept channels: the masked model computes what
    :func:`lightning_prune.compress` makes of it.

    With ``compress=True`` (channel-wise baselines) the pruned units are removed physically once they are
    decided (:meth:`decided`), or at ``compress_step`` / ``compress_epoch``: training continues on the smaller
    model, every optimizer holding the new parameters with their state cut to the kept units
    (:func:`lightning_prune.shrink.compress_in_fit`).

    Args:
        input_size: ``(C, H, W)`` used to trace the model for its channel groups (default: the
            LightningModule's ``example_input_array``, else timm's ``pretrained_cfg["input_size"]``).
        compress: remove the pruned units inside the fit (default ``False``: masks only).
        compress_step: when, in optimizer steps or as a fraction of training (``1.0`` = at the end of
            training); default: right after the units are decided.
        compress_epoch: the same in epochs.
        analysis_time_limit_s: CPU seconds the channel analysis at ``setup`` may use (``None``: no limit);
            past it the fit stops with an error naming this argument. No signal or timer is used.
    """

    #: Whether masks act on whole channel units (and so on every tensor of the unit).
    channel_wise: bool = True

    def __init__(
        self,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        types: list[str | type] | None = None,
        log_media_every_n_epochs: int = 1,
        verbose: bool = True,
        input_size: Sequence[int] | None = None,
        *,
        compress: bool = False,
        compress_step: int | float | None = None,
        compress_epoch: int | float | None = None,
        analysis_time_limit_s: float | None = DEFAULT_ANALYSIS_TIME_LIMIT_S,
    ) -> None:
        super().__init__(include, exclude, types, log_media_every_n_epochs, verbose)
        self.input_size = check_input_size("input_size", input_size)
        self.analysis_time_limit_s = check_optional(
            check_positive, "analysis_time_limit_s", analysis_time_limit_s,
            hint="CPU seconds the channel analysis at setup may use, e.g. 300; None for no limit.")
        self.shrink = ShrinkSchedule(compress, compress_step, compress_epoch, type(self).__name__)
        if self.shrink.enabled and not self.channel_wise:
            raise MisconfigurationException(
                f"{type(self).__name__} prunes single weights: nothing can be removed physically."
                " HINT: compress=True needs a channel baseline (first_k, random_channels).")
        self.groups: list[ChannelGroup] | None = None
        self._norm_handles: list[Any] = []
        self._model: pl.LightningModule | None = None
        # state
        self.last_update = -1  # global step of the last mask update; -1 = never
        self.current_sparsity = 0.0
        self.unit_keep: list[Tensor] | None = None  # per group, the kept units (channel_wise)
        self.group_targets: dict[str, float] | None = None  # set by the channel baselines that take it
        self._group_targets: dict[str, float] = {}  # group_targets by the groups' full names (at setup)

    # ------------------------------------------------------------------ subclass interface
    def due(self, trainer: pl.Trainer) -> float | None:
        """The sparsity to prune to now (end of a training batch), or ``None`` to leave the masks alone."""
        raise NotImplementedError

    def compute_masks(self, sparsity: float) -> dict[str, Tensor]:
        """New masks at ``sparsity`` (channel-wise baselines set :attr:`unit_keep` and return
        :meth:`unit_keep_masks`)."""
        raise NotImplementedError

    def set_group_targets(self, group_targets: Any) -> None:
        """Validate ``group_targets`` (``{group name: fraction of its units to drop}``; checked against the
        model's groups at ``setup``)."""
        self.group_targets = check_fraction_map(
            "group_targets", group_targets,
            hint="the fraction of each named group's units to drop, e.g. lp.layer_targets_from_sensitivity("
                 "table, 0.5) of a method='channels' scan.")

    def group_sparsity(self, group: ChannelGroup, sparsity: float) -> float:
        """The fraction of ``group``'s units to drop when the others drop ``sparsity``: its
        ``group_targets`` entry, else ``sparsity``."""
        return self._group_targets.get(group.name, sparsity)

    def decided(self, trainer: pl.Trainer) -> bool:
        """Whether the masks are final (the units to remove are known): by default, once the masks reached
        ``target_sparsity``."""
        return self.last_update >= 0 and self.current_sparsity >= getattr(self, "target_sparsity", 0.0)

    def decided_at_step(self, trainer: pl.Trainer) -> int:
        """The earliest optimizer step at which the masks can be final (``compress_step`` may not come
        sooner)."""
        return 0

    # ------------------------------------------------------------------ targets
    @override
    def select_targets(self, pl_module: pl.LightningModule) -> list[Target]:
        targets = super().select_targets(pl_module)  # also sets self.weight_names
        if not self.channel_wise:
            return targets
        with as_misconfiguration(), input_size_errors(self.input_size):
            self.groups = channel_groups(pl_module, include=self.include or None,
                                         exclude=self.exclude or None, input_size=self.input_size,
                                         analysis_time_limit_s=self.analysis_time_limit_s)
        if not self.groups:
            raise MisconfigurationException(
                f"{type(self).__name__} found no removable channel group in {type(pl_module).__name__}."
                " HINT: check `include`/`exclude`, or use a weight-level baseline (random_unstructured).")
        self._group_targets = check_group_names(
            "group_targets", self.group_targets or {}, [g.name for g in self.groups],
            f"{type(self).__name__} (on {type(pl_module).__name__})", prefix=traced_root(pl_module)[0],
            hint="The callback has only the groups its include/exclude select.")
        known = {t.name for t in targets}
        params = dict(pl_module.named_parameters())
        everything = [torch.zeros(g.size, dtype=torch.bool) for g in self.groups]
        for name in unit_masks(pl_module, self.groups, everything):  # every tensor a unit touches
            if name not in known and name in params:
                module_name, _, pname = name.rpartition(".")
                targets.append(Target(module_name, pl_module.get_submodule(module_name), pname))
                known.add(name)
        return targets

    def unit_keep_masks(self, keep: list[Tensor]) -> dict[str, Tensor]:
        """Install ``keep`` (one boolean vector per group) and return the parameter masks it means."""
        assert self.groups is not None and self._model is not None
        self.unit_keep = [k.to(torch.bool).cpu() for k in keep]
        self._restrict_norms()
        return unit_masks(self._model, self.groups, self.unit_keep)

    def _restrict_norms(self) -> None:
        for handle in self._norm_handles:
            handle.remove()
        self._norm_handles = []
        if self.shrink.removed is not None:  # the units are gone: the norms see the kept channels only
            return
        if self.groups is not None and self.unit_keep is not None and self._model is not None:
            removed = {g.name: (~k).nonzero().flatten().tolist() for g, k in zip(self.groups, self.unit_keep)}
            self._norm_handles = restricted_norm_hooks(self._model, self.groups, removed)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._model = pl_module
        if self.shrink.enabled and trainer is not None and stage == "fit":
            check_strategy(trainer, type(self).__name__)
            self.shrink.install_resume(trainer, self.state_key,
                                       lambda state: self._apply_removed(pl_module, state))
        super().setup(trainer, pl_module, stage)
        self._restrict_norms()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.shrink.resolve(trainer)
        earliest = self.decided_at_step(trainer) if self.shrink.at_step is not None else 0
        if self.shrink.at_step is not None and self.shrink.at_step < earliest:
            raise MisconfigurationException(
                f"`compress_step`/`compress_epoch` resolves to step {self.shrink.at_step}, before the masks"
                f" are final (step {earliest}). HINT: the units are removed once they are decided: compress"
                " later, or leave the position unset to compress right after pruning.")

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.shrink.removed is not None:  # the pruned units are gone: the masks are final
            return
        sparsity = self.due(trainer)
        if sparsity is not None:
            self.check_finite_weights(int(trainer.global_step))
            self.last_update = int(trainer.global_step)
            self.current_sparsity = float(sparsity)
            self.update_masks(self.compute_masks(sparsity), trainer)
        if self.shrink.due(int(trainer.global_step), self.decided(trainer)):
            self.shrink_now(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.shrink.enabled and self.shrink.removed is None and self.unit_keep is not None:
            # compress_step=1.0, or never decided before the end
            self.shrink_now(trainer, pl_module, in_fit=False)

    # ------------------------------------------------------------------ shrink
    def removed_units(self) -> dict[str, list[int]]:
        """Group name -> the units the masks prune."""
        assert self.groups is not None and self.unit_keep is not None
        return {g.name: (~k).nonzero().flatten().tolist() for g, k in zip(self.groups, self.unit_keep)}

    def shrink_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule, in_fit: bool = True) -> None:
        """Remove the pruned units physically; inside the fit the optimizers carry on with the smaller
        parameters."""
        from lightning_prune.compression import compress

        assert self.groups is not None and self.unit_keep is not None
        _, root = traced_root(pl_module)
        removed = self.removed_units()
        example = example_inputs_for(root, self.input_size)
        if in_fit:  # (the restricted norms let compress prove the masked and the sliced model equal)
            compress_in_fit(trainer, pl_module, self.groups, removed, example)
        else:
            compress(pl_module, example, groups=self.groups, removed=removed, round_to=1)  # (the plan as is)
        self.shrink.removed = removed
        self._restrict_norms()  # (removes them: the norms of the smaller model see the kept channels only)
        self.retarget(pl_module)
        log_model_size(trainer, pl_module, self.input_size, type(self).__name__, self.verbose)

    def _apply_removed(self, pl_module: pl.LightningModule, state: dict[str, Any]) -> None:
        """Resume: the checkpoint holds the smaller model; take its shapes before Lightning loads its
        weights."""
        if self.shrink.removed is not None or self.groups is None:
            return
        removed = recorded_removal(state, self.groups)
        slice_units(pl_module, self.groups, removed)
        self.shrink.removed = removed
        self._restrict_norms()
        self.retarget(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._norm_handles:  # the model stays a plain model; setup restricts the norms again
            handle.remove()
        self._norm_handles = []
        super().teardown(trainer, pl_module, stage)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_model"], state["_norm_handles"] = None, []
        return state

    # ------------------------------------------------------------------ logging
    @override
    def sparsity_metrics(self) -> dict[str, float]:
        """Sparsity of the targeted weights (biases and BatchNorms left out), and of their output channels."""
        metrics = super().sparsity_metrics()
        if not metrics:
            return {}
        if self.channel_wise and self.unit_keep is not None:
            units = sum(k.numel() for k in self.unit_keep)
            metrics[f"{PREFIX}/channel_sparsity"] = (sum(int((~k).sum()) for k in self.unit_keep)
                                                     / max(units, 1))
        metrics[f"{PREFIX}/target_sparsity"] = self.current_sparsity
        return metrics

    @override
    def log_sparsity(self, trainer: pl.Trainer, extra: dict[str, float] | None = None) -> None:
        metrics = {**self.sparsity_metrics(), **(extra or {})}
        log_scalars(trainer, metrics)
        if self.verbose:
            channels = (
                f", channel sparsity {metrics[f'{PREFIX}/channel_sparsity']:.2%}"
                if f"{PREFIX}/channel_sparsity" in metrics
                else ""
            )
            rank_zero_info(
                f"[{type(self).__name__}] step {trainer.global_step}: weight sparsity"
                f" {metrics.get(f'{PREFIX}/sparsity', 0.0):.2%}{channels}"
                f" over {len(self.weight_names)} layers"
            )

    # ------------------------------------------------------------------ state
    @override
    def extra_state_dict(self) -> dict[str, Any]:
        keep = [k.clone() for k in self.unit_keep] if self.unit_keep is not None else None
        return {"last_update": self.last_update, "current_sparsity": self.current_sparsity, "unit_keep": keep,
                "shrink": self.shrink.state_dict()}

    @override
    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        self.last_update = int(state.get("last_update", -1))
        self.current_sparsity = float(state.get("current_sparsity", 0.0))
        keep = state.get("unit_keep")
        self.unit_keep = [k.to(torch.bool).cpu() for k in keep] if keep is not None else None
        self.shrink.load_state_dict(state.get("shrink"))
        self._restrict_norms()


class ScheduledBaselinePruning(BaselinePruning):
    """A baseline that prunes once, or gradually on Zhu & Gupta's schedule, from a seeded generator.

    The arguments mean what they mean for :class:`~lightning_prune.GradualMagnitudePruning`: masks may change
    inside ``[begin_step, end_step]``, every ``every_n_steps`` steps, and the scheduled sparsity at optimizer
    step ``t`` is ``lightning_prune.schedules.polynomial_sparsity(t, initial_sparsity, target_sparsity,
    sparsity_begin_step, sparsity_end_step, exponent)``. The first update comes at the end of the first
    training batch at which ``trainer.global_step >= begin_step``, and updates stop once ``target_sparsity``
    is reached; with the default ``sparsity_end_step=0`` the target is reached at once (one shot). Every
    ``*_step`` argument is an optimizer step (int) or a fraction of the whole training (float in [0, 1]).

    Args:
        target_sparsity: final fraction pruned in every targeted layer, in [0, 1).
        initial_sparsity: the schedule's value at ``sparsity_begin_step``, in [0, ``target_sparsity``].
        begin_step: first step at which masks may change.
        end_step: last such step (default 1.0: until the end of training).
        every_n_steps: optimizer steps between mask updates.
        sparsity_begin_step: where the ramp starts.
        sparsity_end_step: where it reaches ``target_sparsity`` (default 0: one shot).
        exponent: the schedule's exponent (3 = cubic).
        seed: seeds the callback's own ``torch.Generator`` (``None`` = ``torch.initial_seed()``, i.e. what
            ``seed_everything`` set); its state is checkpointed, so resumed and uninterrupted runs draw the
            same numbers, and every DDP rank draws the same masks.
    """

    def __init__(
        self,
        target_sparsity: float = 0.5,
        initial_sparsity: float = 0.0,
        begin_step: int | float = 0,
        end_step: int | float = 1.0,
        every_n_steps: int = 10,
        sparsity_begin_step: int | float = 0,
        sparsity_end_step: int | float = 0,
        exponent: float = 3.0,
        seed: int | None = None,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        types: list[str | type] | None = None,
        log_media_every_n_epochs: int = 1,
        verbose: bool = True,
    ) -> None:
        super().__init__(include, exclude, types, log_media_every_n_epochs, verbose)
        self.target_sparsity = check_fraction(
            "target_sparsity", target_sparsity, hint="0.75 prunes three quarters of every targeted layer."
        )
        self.initial_sparsity = check_fraction(
            "initial_sparsity",
            initial_sparsity,
            high=self.target_sparsity,
            high_inclusive=True,
            hint="the schedule grows from `initial_sparsity` to `target_sparsity`.",
        )
        when = "a step (int) or a fraction of training (float in [0, 1])."
        self.begin_step = check_position("begin_step", begin_step, hint=when)
        self.end_step = check_position("end_step", end_step, hint="1.0 keeps the window open to the end.")
        self._check_order("begin_step", self.begin_step, "end_step", self.end_step)
        self.every_n_steps = check_int(
            "every_n_steps", every_n_steps, 1, hint="masks change every `every_n_steps` optimizer steps."
        )
        self.sparsity_begin_step = check_position("sparsity_begin_step", sparsity_begin_step, hint=when)
        self.sparsity_end_step = check_position(
            "sparsity_end_step", sparsity_end_step, hint="0 prunes to the target at once (one shot)."
        )
        self._check_order(
            "sparsity_begin_step", self.sparsity_begin_step, "sparsity_end_step", self.sparsity_end_step
        )
        self.exponent = check_positive("exponent", exponent, hint="3 is the cubic schedule.")
        self.seed = check_optional(check_int, "seed", seed, 0)
        # state
        self.rng_state: Tensor | None = None if self.seed is None else self._seeded_state(self.seed)
        self.schedule: tuple[int, int, int, int] | None = None

    @staticmethod
    def _check_order(first_name: str, first: int | float, second_name: str, second: int | float) -> None:
        """Reject a window or ramp that ends before it begins, as GradualMagnitudePruning does.

        Positions of the same kind only: a step and a fraction are compared once resolved."""
        if type(first) is type(second) and second < first:
            raise MisconfigurationException(
                f"`{second_name}` ({second}) must not come before `{first_name}` ({first})."
            )

    @staticmethod
    def _seeded_state(seed: int) -> Tensor:
        return torch.Generator().manual_seed(seed).get_state()

    @override
    def state_key_args(self) -> dict[str, Any]:
        return {**super().state_key_args(), "target_sparsity": self.target_sparsity, "seed": self.seed}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.rng_state is None:  # seed=None: what seed_everything set, rank zero's on every rank
            self.rng_state = self._seeded_state(resolve_seed(None, trainer))

    def resolve_schedule(self, trainer: pl.Trainer) -> tuple[int, int, int, int]:
        """``(begin, end, sparsity_begin, sparsity_end)`` in optimizer steps.

        Fixed on first use and checkpointed.
        """
        if self.schedule is None:
            begin = resolve_step("begin_step", self.begin_step, trainer)
            end = 2**62 if until_the_end(self.end_step) else resolve_step("end_step", self.end_step, trainer)
            s_begin = resolve_step("sparsity_begin_step", self.sparsity_begin_step, trainer)
            s_end = resolve_step("sparsity_end_step", self.sparsity_end_step, trainer)
            assert begin is not None and end is not None and s_begin is not None and s_end is not None
            self.schedule = (begin, max(end, begin), s_begin, max(s_end, s_begin))
        return self.schedule

    def sparsity_at(self, step: int) -> float:
        if self.schedule is not None:
            begin, end = self.schedule[2], self.schedule[3]
        else:
            begin = end = int(self.sparsity_begin_step)
        return polynomial_sparsity(
            step, self.initial_sparsity, self.target_sparsity, begin, end, self.exponent
        )

    @override
    def due(self, trainer: pl.Trainer) -> float | None:
        step = int(trainer.global_step)
        begin, end, _, _ = self.resolve_schedule(trainer)
        if step < begin or step > end:
            return None
        if self.last_update >= 0 and (
            self.current_sparsity >= self.target_sparsity or step - self.last_update < self.every_n_steps
        ):
            return None
        return self.sparsity_at(step)

    @override
    def decided(self, trainer: pl.Trainer) -> bool:
        """Final once ``target_sparsity`` is reached, or once the window closed (``end_step``)."""
        _, end, _, _ = self.resolve_schedule(trainer)
        return super().decided(trainer) or (self.last_update >= 0 and trainer.global_step >= end)

    @override
    def decided_at_step(self, trainer: pl.Trainer) -> int:
        begin, end, _, sparsity_end = self.resolve_schedule(trainer)
        return min(max(begin, sparsity_end), end)

    def generator(self) -> torch.Generator:
        """A CPU generator at the checkpointed state; call :meth:`save_generator` after drawing."""
        if self.rng_state is None:
            self.rng_state = self._seeded_state(resolve_seed(None))
        generator = torch.Generator()
        generator.set_state(self.rng_state)
        return generator

    def save_generator(self, generator: torch.Generator) -> None:
        self.rng_state = generator.get_state()

    @override
    def extra_state_dict(self) -> dict[str, Any]:
        return {
            **super().extra_state_dict(),
            "rng_state": self.rng_state.clone() if self.rng_state is not None else None,
            "schedule": list(self.schedule) if self.schedule is not None else None,
        }

    @override
    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        super().load_extra_state_dict(state)
        if state.get("rng_state") is not None:
            self.rng_state = state["rng_state"].clone()
        schedule = state.get("schedule")
        self.schedule = (tuple(int(v) for v in schedule) if schedule is not None and len(schedule) == 4
                         else None)
