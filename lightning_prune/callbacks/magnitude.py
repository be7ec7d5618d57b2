"""Gradual magnitude pruning.

Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model compression", 2017,
arXiv:1710.01878, with the semantics and default hyperparameters of TensorFlow's ``model_pruning``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_prune.callbacks.base import PruningCallback, check_choice, check_fraction, check_int
from lightning_prune.functional.magnitude import (
    block_magnitude,
    kept_count,
    kth_largest,
    kth_largest_of,
    threshold_mask,
)
from lightning_prune.logging import PREFIX
from lightning_prune.schedules import is_update_step, polynomial_sparsity
from lightning_prune.targets import matches

__all__ = ["GradualMagnitudePruning"]

_GLOBAL = "__global__"


def _step_or_fraction(name: str, value: int | float | None, total: int) -> int | None:
    """An int is a step; a float in (0, 1] is a fraction of the training steps."""
    if value is None or isinstance(value, int):
        return value
    return int(round(value * total))


class GradualMagnitudePruning(PruningCallback):
    """Gradual magnitude pruning (Zhu & Gupta 2017) on TensorFlow's cubic schedule.

    At optimizer step ``t`` the target sparsity is
    ``s(t) = target + (initial - target) * (1 - p) ** exponent`` with
    ``p = clip((t - sparsity_begin_step) / (sparsity_end_step - sparsity_begin_step), 0, 1)``; masks are
    recomputed every ``frequency`` steps inside ``[begin_step, end_step]`` by keeping the
    ``round(N (1 - s))`` largest magnitudes, globally or per layer. Masked weights are exact zeros at every
    step, so masks are nested.

    Args:
        target_sparsity: final fraction of targeted weights pruned, in [0, 1).
        initial_sparsity: sparsity of the first update, in [0, 1).
        begin_step: first optimizer step at which masks may change.
        end_step: last such step; ``-1`` = until the end of training.
        frequency: steps between mask updates (TensorFlow's default 10).
        sparsity_begin_step: where the schedule starts (a step, or a float fraction of training).
        sparsity_end_step: where it reaches ``target_sparsity``; default: 75% of
            ``trainer.estimated_stepping_batches`` (a float is a fraction of training).
        exponent: the schedule's exponent (3 = cubic).
        threshold_decay: EMA of the threshold, ``thr = (1 - d) * new + d * old`` (TensorFlow 1.15 default 0).
        scope: ``"global"`` (one threshold over all targets) or ``"layer"`` (each layer to the same sparsity).
        layer_targets: ``{glob: target}``; matching layers are pruned on their own to
            ``s(t) * target / target_sparsity`` (TensorFlow's ``weight_sparsity_map``; needs initial 0).
        block_size: ``(h, w)`` blocks for 2-D (Linear) weights, scored by ``block_pooling``; ``-1`` = whole dim.
        block_pooling: ``"avg"`` or ``"max"``.
        include, exclude, log_masks_every_n_epochs, verbose: see :class:`PruningCallback`.

    Example::

        trainer = Trainer(callbacks=[GradualMagnitudePruning(target_sparsity=0.9)])
    """

    def __init__(
        self,
        target_sparsity: float = 0.5,
        initial_sparsity: float = 0.0,
        begin_step: int = 0,
        end_step: int = -1,
        frequency: int = 10,
        sparsity_begin_step: int | float = 0,
        sparsity_end_step: int | float | None = None,
        exponent: float = 3.0,
        threshold_decay: float = 0.0,
        scope: str = "global",
        layer_targets: Mapping[str, float] | None = None,
        block_size: Sequence[int] | None = None,
        block_pooling: str = "avg",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        log_masks_every_n_epochs: int = 1,
        verbose: bool = True,
    ) -> None:
        super().__init__(include, exclude, log_masks_every_n_epochs, verbose)
        hint = "sparsity is the fraction of weights removed; 0.9 keeps one weight in ten."
        self.target_sparsity = check_fraction("target_sparsity", target_sparsity, hint=hint)
        self.initial_sparsity = check_fraction("initial_sparsity", initial_sparsity, hint=hint)
        self.begin_step = check_int("begin_step", begin_step, 0)
        if not isinstance(end_step, int) or isinstance(end_step, bool) or (end_step < begin_step and end_step != -1):
            raise MisconfigurationException(
                f"`end_step` must be -1 (until the end of training) or >= `begin_step` ({begin_step}), got {end_step!r}."
                " HINT: end_step=-1 keeps updating masks until training ends."
            )
        self.end_step = end_step
        self.frequency = check_int("frequency", frequency, 1, hint="masks are updated every `frequency` steps.")
        self.sparsity_begin_step = self._check_step_arg("sparsity_begin_step", sparsity_begin_step)
        self.sparsity_end_step = self._check_step_arg("sparsity_end_step", sparsity_end_step)
        if (isinstance(self.sparsity_begin_step, type(self.sparsity_end_step))
                and self.sparsity_end_step is not None and self.sparsity_end_step < self.sparsity_begin_step):
            raise MisconfigurationException(
                f"`sparsity_end_step` ({sparsity_end_step}) must not come before `sparsity_begin_step`"
                f" ({sparsity_begin_step})."
            )
        if not isinstance(exponent, (int, float)) or exponent <= 0:
            raise MisconfigurationException(f"`exponent` must be > 0, got {exponent!r}.")
        self.exponent = float(exponent)
        self.threshold_decay = check_fraction("threshold_decay", threshold_decay)
        self.scope = check_choice("scope", scope, ("global", "layer"))
        self.layer_targets = {str(k): check_fraction(f"layer_targets[{k!r}]", v)
                              for k, v in dict(layer_targets or {}).items()}
        if self.layer_targets and self.initial_sparsity != 0.0:
            raise MisconfigurationException(
                "`layer_targets` needs `initial_sparsity=0` (layer schedules are s(t) * target / target_sparsity)."
            )
        if self.layer_targets and self.target_sparsity == 0.0:
            raise MisconfigurationException("`layer_targets` needs `target_sparsity` > 0 to scale layer schedules.")
        if block_size is not None:
            block_size = tuple(block_size)
            if len(block_size) != 2 or not all(isinstance(b, int) and (b >= 1 or b == -1) for b in block_size):
                raise MisconfigurationException(
                    f"`block_size` must be two integers (h, w), each >= 1 or -1 for the whole dim, got {block_size!r}."
                )
        self.block_size = block_size
        self.block_pooling = check_choice("block_pooling", block_pooling, ("avg", "max"))
        # state
        self.last_update = 0
        self.thresholds: dict[str, float] = {}
        self.current_target = 0.0
        self._schedule: tuple[int, int] | None = None  # resolved (sparsity_begin_step, sparsity_end_step)

    @staticmethod
    def _check_step_arg(name: str, value: int | float | None) -> int | float | None:
        if isinstance(value, float) and value > 1.0 and value.is_integer():
            value = int(value)  # a config parser may hand over `3` as 3.0: above 1 it can only be a step
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        if isinstance(value, float) and 0.0 <= value <= 1.0:
            return value
        raise MisconfigurationException(
            f"`{name}` must be a step (int >= 0) or a fraction of training (float in [0, 1]), got {value!r}."
        )

    @override
    def state_key_args(self) -> dict[str, Any]:
        return {**super().state_key_args(), "target_sparsity": self.target_sparsity, "scope": self.scope}

    # ------------------------------------------------------------------ schedule
    def _resolve_schedule(self, trainer: pl.Trainer) -> tuple[int, int]:
        if self._schedule is None:
            end = self.sparsity_end_step if self.sparsity_end_step is not None else 0.75
            total = trainer.estimated_stepping_batches
            if math.isinf(total) and (isinstance(end, float) or isinstance(self.sparsity_begin_step, float)):
                raise MisconfigurationException(
                    "`sparsity_end_step` defaults to a fraction of training, but this Trainer has no end"
                    " (max_epochs=-1, max_steps=-1). HINT: pass sparsity_begin_step and sparsity_end_step as steps."
                )
            total = 0 if math.isinf(total) else int(total)
            begin = _step_or_fraction("sparsity_begin_step", self.sparsity_begin_step, total)
            self._schedule = (begin, max(_step_or_fraction("sparsity_end_step", end, total), begin))
        return self._schedule

    def sparsity_at(self, step: int) -> float:
        """The scheduled global target at optimizer step ``step`` (after :meth:`on_fit_start`)."""
        begin, end = self._schedule or (self.sparsity_begin_step or 0, self.sparsity_end_step or 100)
        return polynomial_sparsity(step, self.initial_sparsity, self.target_sparsity, begin, end, self.exponent)

    def _layer_target(self, name: str) -> float | None:
        module_name = name.rsplit(".", 1)[0]
        for pattern, target in self.layer_targets.items():
            if matches(module_name, [pattern]):
                return target
        return None

    # ------------------------------------------------------------------ masks
    def _smoothed(self, key: str, threshold: Tensor) -> Tensor:
        if self.threshold_decay:
            old = self.thresholds.get(key, 0.0)
            threshold = (1.0 - self.threshold_decay) * threshold + self.threshold_decay * old
        self.thresholds[key] = float(threshold)
        return threshold

    @torch.no_grad()
    def compute_masks(self, sparsity: float) -> dict[str, Tensor]:
        """Masks for every target at global target ``sparsity`` (per-layer targets scaled from it)."""
        assert self.masks is not None
        scores = {n: block_magnitude(self.masks.param(n), self.block_size, self.block_pooling) for n in self.masks}
        new, pooled = {}, []
        for name, score in scores.items():
            layer_target = self._layer_target(name) if self.layer_targets else None
            if layer_target is not None or self.scope == "layer":
                s = sparsity if layer_target is None else sparsity * layer_target / self.target_sparsity
                thr = self._smoothed(name, kth_largest(score, kept_count(score.numel(), s)))
                new[name] = threshold_mask(score, thr)
            else:
                pooled.append(name)
        if pooled:
            numel = sum(scores[n].numel() for n in pooled)
            thr = self._smoothed(_GLOBAL, kth_largest_of([scores[n] for n in pooled], kept_count(numel, sparsity)))
            new.update({n: threshold_mask(scores[n], thr) for n in pooled})
        return new

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        begin, end = self._resolve_schedule(trainer)
        self.current_target = self.sparsity_at(trainer.global_step)
        if self.verbose:
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(
                f"[GradualMagnitudePruning] {len(self.targets)} tensors, {self.scope} scope: sparsity"
                f" {self.initial_sparsity:.0%} -> {self.target_sparsity:.0%} over steps {begin}-{end},"
                f" masks every {self.frequency} steps"
            )

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not is_update_step(step, self.begin_step, self.end_step, self.frequency, self.last_update):
            return
        self.last_update = step
        self.current_target = self.sparsity_at(step)
        self.update_masks(self.compute_masks(self.current_target), trainer)

    @override
    def log_sparsity(self, trainer: pl.Trainer, extra: dict[str, float] | None = None) -> None:
        super().log_sparsity(trainer, {f"{PREFIX}/target_sparsity": self.current_target, **(extra or {})})

    # ------------------------------------------------------------------ state
    @override
    def extra_state_dict(self) -> dict[str, Any]:
        return {"last_update": self.last_update, "thresholds": dict(self.thresholds),
                "current_target": self.current_target,
                "schedule": list(self._schedule) if self._schedule is not None else None}

    @override
    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        self.last_update = int(state.get("last_update", 0))
        self.thresholds = dict(state.get("thresholds", {}))
        self.current_target = float(state.get("current_target", 0.0))
        schedule = state.get("schedule")
        self._schedule = tuple(schedule) if schedule is not None else None
