"""What the three baselines share, built on lightning-prune's public API only.

The channel baselines subclass :class:`~lightning_prune.callbacks.channels.ChannelPruningCallback`, which owns
the channel groups (:func:`lightning_prune.graph.analyse_channels`: channels, residual streams, attention
heads, conv groups), the kept units, the masks of every tensor a unit touches, compression inside the fit
(``compress=True``), resume onto a fresh module and ``group_targets``: a baseline only says *when*
(``due``) and *which* units matter (``unit_scores``). This module adds the baselines' bookkeeping
(:class:`BaselineMixin`: the step of the last update and the sparsity it pruned to, logged and checkpointed)
and Zhu & Gupta's gradual schedule with a seeded generator (:class:`GradualSchedule`), shared by the random
channel and the random weight baselines.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.callbacks.channels import ChannelPruningCallback
from lightning_prune.callbacks.logging import PREFIX, log_scalars
from lightning_prune.callbacks.schedules import polynomial_sparsity, resolve_step, until_the_end
from lightning_prune.callbacks.state import resolve_seed, seeded_generator
from lightning_prune.validation import (
    check_fraction,
    check_int,
    check_optional,
    check_position,
    check_positive,
)

__all__ = ["BaselineMixin", "ChannelBaseline", "GradualSchedule", "ScheduledBaselinePruning"]


class BaselineMixin:
    """The step of the last mask update (``updated_at_step``, ``None`` = never) and the sparsity it pruned to
    (``current_target``, the name :class:`~lightning_prune.GradualMagnitudePruning` uses): checkpointed,
    logged as ``prune/target_sparsity``, and what :meth:`decided` reads (final once ``target_sparsity`` is
    reached). Checkpoints of before 0.2 load (``current_sparsity``, and ``last_update`` with -1 = never: the
    magnitude schedule's ``last_update`` is another state, the step its next period counts from)."""

    updated_at_step: int | None = None
    current_target: float = 0.0

    def record_update(self, trainer: pl.Trainer, sparsity: float) -> None:
        self.check_finite_weights(int(trainer.global_step))  # type: ignore[attr-defined]
        self.updated_at_step = int(trainer.global_step)
        self.current_target = float(sparsity)

    def decided(self, trainer: pl.Trainer) -> bool:
        reached = self.current_target >= getattr(self, "target_sparsity", 0.0)
        return self.updated_at_step is not None and reached

    def sparsity_metrics(self) -> dict[str, float]:
        """Sparsity of the targeted weights (biases and BatchNorms left out), and of the channel units."""
        metrics = super().sparsity_metrics()  # type: ignore[misc]
        if not metrics:
            return {}
        keep = getattr(self, "keep", None)
        if keep is not None:
            units = sum(k.numel() for k in keep)
            metrics[f"{PREFIX}/channel_sparsity"] = sum(int((~k).sum()) for k in keep) / max(units, 1)
        metrics[f"{PREFIX}/target_sparsity"] = self.current_target
        return metrics

    def log_sparsity(self, trainer: pl.Trainer, extra: dict[str, float] | None = None) -> None:
        metrics = {**self.sparsity_metrics(), **(extra or {})}
        log_scalars(trainer, metrics)
        if self.verbose:  # type: ignore[attr-defined]
            rank_zero_info(self.progress_line(trainer.global_step, metrics))  # type: ignore[attr-defined]

    def extra_state_dict(self) -> dict[str, Any]:
        return {**super().extra_state_dict(), "updated_at_step": self.updated_at_step,  # type: ignore[misc]
                "current_target": self.current_target}

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        super().load_extra_state_dict(state)  # type: ignore[misc]
        step = state.get("updated_at_step", state.get("last_update"))
        self.updated_at_step = None if step is None or int(step) < 0 else int(step)
        self.current_target = float(state.get("current_target", state.get("current_sparsity", 0.0)))


class ChannelBaseline(BaselineMixin, ChannelPruningCallback):
    """A channel baseline: :class:`ChannelPruningCallback` with the baselines' bookkeeping; a subclass gives
    ``due`` and ``unit_scores`` (and ``decided_at_step`` when the units cannot be final sooner)."""

    #: masks act on whole channel units
    channel_wise = True
    #: FLOPs and parameters of the kept units are counted (logged, and said in the console line)
    measures_size = True
    no_group_hint = "check `include`/`exclude`, or use a weight-level baseline (random_unstructured)."
    #: the units are chosen without reading the weights (positions, the shared generator), so under
    #: ModelParallelStrategy (FSDP2) the base cuts the unit masks to each rank's shards and compresses in the
    #: fit (lightning_prune.callbacks.shrink.compress_sharded_in_fit)
    supports_sharding = True

    @override
    def decide(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule,
               sparsity: float | None) -> None:
        if trainer is not None and sparsity is not None:
            self.record_update(trainer, sparsity)
        super().decide(trainer, pl_module, sparsity)

    @property
    def unit_keep(self) -> list[Tensor] | None:
        """The kept units per group (the name before ``keep``)."""
        return self.keep

    @override
    def decided(self, trainer: pl.Trainer) -> bool:
        return BaselineMixin.decided(self, trainer)


class GradualSchedule(BaselineMixin):
    """Mixin: a baseline that prunes once, or gradually on Zhu & Gupta's schedule, from a seeded generator.

    The arguments mean what they mean for :class:`~lightning_prune.GradualMagnitudePruning`: masks may change
    inside ``[begin_step, end_step]``, every ``every_n_steps`` steps, and the scheduled sparsity at optimizer
    step ``t`` is
    ``lightning_prune.callbacks.schedules.polynomial_sparsity(t, initial_sparsity, target_sparsity,
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

    def init_schedule(
        self,
        target_sparsity: float,
        initial_sparsity: float,
        begin_step: int | float,
        end_step: int | float,
        every_n_steps: int,
        sparsity_begin_step: int | float,
        sparsity_end_step: int | float,
        exponent: float,
        seed: int | None,
    ) -> None:
        """Validate and keep the schedule's arguments (call from ``__init__``)."""
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
        return seeded_generator(seed).get_state()

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
        if self.updated_at_step is not None and (
            self.current_target >= self.target_sparsity or step - self.updated_at_step < self.every_n_steps
        ):
            return None
        return self.sparsity_at(step)

    @override
    def decided(self, trainer: pl.Trainer) -> bool:
        """Final once ``target_sparsity`` is reached, or once the window closed (``end_step``)."""
        _, end, _, _ = self.resolve_schedule(trainer)
        return super().decided(trainer) or (self.updated_at_step is not None and trainer.global_step >= end)

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


class ScheduledBaselinePruning(GradualSchedule, PruningCallback):
    """A weight-level baseline on the gradual schedule: a subclass gives :meth:`compute_masks`.

    Args:
        target_sparsity, initial_sparsity, begin_step, end_step, every_n_steps, sparsity_begin_step,
            sparsity_end_step, exponent, seed: see :class:`GradualSchedule`.
        include, exclude, types, log_media_every_n_epochs, verbose: see
            :class:`~lightning_prune.PruningCallback`.
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
        super().__init__(include=include, exclude=exclude, types=types,
                         log_media_every_n_epochs=log_media_every_n_epochs, verbose=verbose)
        self.init_schedule(target_sparsity, initial_sparsity, begin_step, end_step, every_n_steps,
                           sparsity_begin_step, sparsity_end_step, exponent, seed)

    #: masks act on single weights
    channel_wise = False

    def compute_masks(self, sparsity: float) -> dict[str, Tensor]:
        """New masks of the targeted weights at ``sparsity``."""
        raise NotImplementedError

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        sparsity = self.due(trainer)
        if sparsity is not None:
            self.record_update(trainer, sparsity)
            self.update_masks(self.compute_masks(sparsity), trainer)
