"""Gradual magnitude pruning.

Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model compression", 2017,
arXiv:1710.01878, with the semantics and default hyperparameters of TensorFlow's ``model_pruning``; with
``pattern="N:M"``, N:M fine-grained structured sparsity (Mishra et al., "Accelerating Sparse Deep Neural
Networks", 2021, arXiv:2104.08378) reached on the same schedule (:mod:`lightning_prune.functional.nm`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.callbacks.logging import PREFIX
from lightning_prune.callbacks.schedules import (
    is_update_step,
    polynomial_sparsity,
    resolve_step,
    until_the_end,
    warn_if_after_training,
)
from lightning_prune.core.sharding import shard_reduce
from lightning_prune.core.targets import Target, matches
from lightning_prune.functional.magnitude import (
    block_magnitude,
    kept_count,
    kth_largest,
    kth_largest_across,
    kth_largest_of,
    threshold_mask,
)
from lightning_prune.functional.nm import NM_RAMPS, nm_schedule_masks, nm_violations, parse_pattern
from lightning_prune.validation import (
    check_cadence,
    check_choice,
    check_fraction,
    check_position,
    check_positive,
    sexagesimal_hint,
)

__all__ = ["GradualMagnitudePruning"]

_GLOBAL = "__global__"


class GradualMagnitudePruning(PruningCallback):
    """Gradual magnitude pruning (Zhu & Gupta 2017) on TensorFlow's cubic schedule.

    At optimizer step ``t`` the target sparsity is
    ``s(t) = target + (initial - target) * (1 - p) ** exponent`` with
    ``p = clip((t - sparsity_begin_step) / (sparsity_end_step - sparsity_begin_step), 0, 1)``; masks are
    recomputed every ``every_n_steps`` steps inside ``[begin_step, end_step]`` by keeping the
    ``round(N (1 - s))`` largest magnitudes, globally or per layer. Masked weights are exact zeros at every
    step, so masks are nested. Every ``*_step`` argument is an optimizer step (int) or a fraction of the whole
    training (float in [0, 1]).

    Args:
        target_sparsity: final fraction of targeted weights pruned, in [0, 1).
        initial_sparsity: sparsity of the first update, in [0, 1).
        begin_step: first optimizer step at which masks may change.
        end_step: last such step (default 1.0: until the end of training; TensorFlow's ``-1``).
        every_n_steps: optimizer steps between mask updates (TensorFlow's ``pruning_frequency``, default 10).
        sparsity_begin_step: where the cubic ramp starts.
        sparsity_end_step: where it reaches ``target_sparsity`` (default 0.75: at 75% of training).
        exponent: the schedule's exponent (3 = cubic).
        threshold_decay: EMA of the threshold, ``thr = (1 - d) * new + d * old`` (TensorFlow 1.15 default 0).
        scope: ``"global"`` (one threshold over all targets) or ``"layer"`` (each layer to the same sparsity).
        layer_targets: ``{glob: target}``; matching layers are pruned on their own to
            ``s(t) * target / target_sparsity`` (TensorFlow's ``weight_sparsity_map``; needs initial 0).
        block_size: ``(h, w)`` blocks for 2-D (Linear) weights, scored by ``block_pooling``; ``-1`` = whole
            dim.
        block_pooling: ``"avg"`` or ``"max"``.
        pattern: ``"N:M"`` (e.g. ``"2:4"``, NVIDIA's sparse tensor cores): at most N non-zeros in every block
            of M consecutive weights along the input dimension (dim 1 of every Linear and Conv weight, Apple
            coremltools' ``n_m_ratio``). ``target_sparsity`` must be at least ``1 - N/M`` (more prunes
            inside the pattern); the schedule ramps the pattern in as ``pattern_ramp`` says.
        pattern_ramp: ``"blend"``: on the way to the target only weights outside the final N:M pattern are
            pruned, by magnitude, and the pattern holds exactly from ``sparsity_end_step`` on; ``"steps"``:
            the pattern holds at every update, with ``round(M (1 - s(t)))`` weights kept per block
            (``4:4 -> 3:4 -> 2:4``).
        include, exclude, types, log_media_every_n_epochs, verbose: see :class:`PruningCallback`.

    Sharded training (``ModelParallelStrategy`` with ``fully_shard``): the masks cover each rank's shards,
    every threshold is computed exactly over all shards (a radix selection on all-reduced histograms, no
    weight travels), so the masks equal those of the same run under DDP; ``block_size`` is refused there.

    Example::

        trainer = Trainer(callbacks=[GradualMagnitudePruning(target_sparsity=0.9)])
        trainer = Trainer(callbacks=[GradualMagnitudePruning(pattern="2:4", sparsity_end_step=0.5)])
    """

    def __init__(
        self,
        target_sparsity: float = 0.5,
        initial_sparsity: float = 0.0,
        begin_step: int | float = 0,
        end_step: int | float = 1.0,
        every_n_steps: int = 10,
        sparsity_begin_step: int | float = 0,
        sparsity_end_step: int | float = 0.75,
        exponent: float = 3.0,
        threshold_decay: float = 0.0,
        scope: str = "global",
        layer_targets: Mapping[str, float] | None = None,
        block_size: Sequence[int] | None = None,
        block_pooling: str = "avg",
        pattern: str | None = None,
        pattern_ramp: str = "blend",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        types: list[str | type] | None = None,
        log_media_every_n_epochs: int = 1,
        verbose: bool = True,
    ) -> None:
        super().__init__(include=include, exclude=exclude, types=types,
                         log_media_every_n_epochs=log_media_every_n_epochs, verbose=verbose)
        hint = "sparsity is the fraction of weights removed; 0.9 keeps one weight in ten."
        self.target_sparsity = check_fraction("target_sparsity", target_sparsity, hint=hint)
        self.initial_sparsity = check_fraction("initial_sparsity", initial_sparsity, hint=hint)
        when = "a step (int) or a fraction of training (float in [0, 1]), e.g. 0.75."
        self.begin_step = check_position("begin_step", begin_step, hint=when)
        self.end_step = check_position(
            "end_step", end_step,
            hint="end_step=1.0 keeps updating masks until training ends (TensorFlow's -1).")
        self._check_order("begin_step", self.begin_step, "end_step", self.end_step)
        self.every_n_steps = check_cadence(
            "every_n_steps", every_n_steps, hint="masks are updated every `every_n_steps` optimizer steps.")
        if isinstance(self.every_n_steps, float):
            raise MisconfigurationException(
                f"`every_n_steps` must be an int >= 1 here, got {every_n_steps!r}. HINT: TensorFlow's default"
                " is 10.")
        self.sparsity_begin_step = check_position("sparsity_begin_step", sparsity_begin_step, hint=when)
        self.sparsity_end_step = check_position("sparsity_end_step", sparsity_end_step, hint=when)
        self._check_order("sparsity_begin_step", self.sparsity_begin_step, "sparsity_end_step",
                          self.sparsity_end_step)
        self.exponent = check_positive("exponent", exponent, hint="3 is Zhu & Gupta's cubic schedule.")
        self.threshold_decay = check_fraction("threshold_decay", threshold_decay)
        self.scope = check_choice("scope", scope, ("global", "layer"))
        if layer_targets is not None and not isinstance(layer_targets, Mapping):
            raise MisconfigurationException(
                f"`layer_targets` must be a mapping {{glob: target_sparsity}}, got {layer_targets!r}.")
        self.layer_targets = {str(k): check_fraction(f"layer_targets[{k!r}]", v)
                              for k, v in dict(layer_targets or {}).items()}
        if self.layer_targets and self.initial_sparsity != 0.0:
            raise MisconfigurationException(
                "`layer_targets` needs `initial_sparsity=0` (layer schedules are s(t) * target /"
                " target_sparsity).")
        if self.layer_targets and self.target_sparsity == 0.0:
            raise MisconfigurationException(
                "`layer_targets` needs `target_sparsity` > 0 to scale layer schedules.")
        if block_size is not None:
            ok = (isinstance(block_size, Sequence) and not isinstance(block_size, str)
                  and len(block_size) == 2
                  and all(isinstance(b, int) and not isinstance(b, bool) and (b >= 1 or b == -1)
                          for b in block_size))
            if not ok:
                raise MisconfigurationException(
                    "`block_size` must be two integers (h, w), each >= 1 or -1 for the whole dim, got"
                    f" {block_size!r}."
                )
            block_size = tuple(block_size)
        self.block_size = block_size
        self.block_pooling = check_choice("block_pooling", block_pooling, ("avg", "max"))
        self.pattern, self.pattern_ramp = pattern, check_choice(
            "pattern_ramp", pattern_ramp, NM_RAMPS,
            hint="'blend' prunes outside the pattern first; 'steps' keeps a pattern at every update.")
        self._nm: tuple[int, int] | None = None
        if pattern is not None:
            try:
                self._nm = parse_pattern(pattern)
            except ValueError:
                raise MisconfigurationException(
                    f"`pattern` must be 'N:M' with integers 1 <= N < M, got {pattern!r}"
                    + (sexagesimal_hint(pattern) or ". HINT: '2:4' is what NVIDIA's sparse tensor cores run;"
                       " None prunes unstructured.")) from None
            n, m = self._nm
            if self.target_sparsity < 1.0 - n / m - 1e-9:
                raise MisconfigurationException(
                    f"`target_sparsity` ({self.target_sparsity:g}) must be at least {1 - n / m:g} with"
                    f" `pattern`={pattern!r}: {n} of every {m} weights kept is already {1 - n / m:.0%}"
                    " sparse."
                    f" HINT: target_sparsity={1 - n / m:g}.")
            for name, value, off in (("block_size", block_size, None),
                                     ("layer_targets", self.layer_targets, {}),
                                     ("threshold_decay", self.threshold_decay, 0.0)):
                if value != off:
                    raise MisconfigurationException(
                        f"`{name}` cannot be combined with `pattern` (got {value!r}): the N:M pattern decides"
                        f" the structure. HINT: leave `{name}` at its default, or set pattern=None.")
        # another callback's in-fit removal (compress=True): plain masks are cut with the weights; N:M groups
        # and blocks run along the weights' dims, which a cut shifts (PruningCallback.follows_removal)
        self.follows_removal = pattern is None and block_size is None
        if pattern is not None:
            self.removal_refusal = (f"pattern={pattern!r} groups every {self._nm[1]} consecutive weights"
                                    " along the input dimension, which the cut shifts (the cut masks would no"
                                    " longer be N:M)")
        elif block_size is not None:
            self.removal_refusal = (f"block_size={block_size!r} masks whole blocks, which the cut shifts (the"
                                    " cut masks would no longer be block-aligned)")
        # state
        self.last_update = 0
        self.thresholds: dict[str, float] = {}
        self.current_target = 0.0
        self._schedule: tuple[int, int, int, int] | None = None  # resolved begin, end, sparsity begin, end

    supports_sharding = True

    @staticmethod
    def _check_order(first_name: str, first: int | float, second_name: str, second: int | float) -> None:
        if type(first) is type(second) and second < first:
            raise MisconfigurationException(
                f"`{second_name}` ({second}) must not come before `{first_name}` ({first}).")

    @override
    def state_key_args(self) -> dict[str, Any]:
        key = {**super().state_key_args(), "target_sparsity": self.target_sparsity, "scope": self.scope}
        if self.pattern is not None:  # (unstructured instances keep the keys of older checkpoints)
            key["pattern"] = self.pattern
        return key

    @override
    def select_targets(self, pl_module: pl.LightningModule) -> list[Target]:
        targets = super().select_targets(pl_module)
        flat = [t.name for t in targets if t.param.dim() < 2]
        if self._nm is not None and flat:
            raise MisconfigurationException(
                f"`pattern`={self.pattern!r} needs weights with an input dimension (Linear, Conv), but"
                f" {len(flat)} targets are 1-D: {flat[:4]}. HINT: narrow `types`/`include` to Conv/Linear"
                " layers, or prune those with a second, unstructured GradualMagnitudePruning.")
        return targets

    @override
    def check_sharded_masks(self) -> None:
        assert self.masks is not None
        if self.block_size is not None:
            raise MisconfigurationException(
                f"`block_size`={self.block_size!r} cannot be used on sharded weights: blocks would"
                " straddle the shards. HINT: leave block_size=None under ModelParallelStrategy, or train with"
                " strategy='ddp'.")
        if self._nm is not None:
            across = [n for n in self.masks
                      if any(p.is_shard() and p.dim == 1
                             for p in self.masks.param(n).placements)]
            if across:
                raise MisconfigurationException(
                    f"`pattern`={self.pattern!r} needs whole rows of the input dimension on each rank, but"
                    f" {across[:4]} are sharded along dim 1. HINT: shard along dim 0 (fully_shard's"
                    " default).")

    # ------------------------------------------------------------------ schedule
    def _resolve_schedule(self, trainer: pl.Trainer) -> tuple[int, int, int, int]:
        """``(begin_step, end_step, sparsity_begin_step, sparsity_end_step)`` in optimizer steps (saved)."""
        if self._schedule is None:
            begin, s_begin, s_end = (resolve_step(name, getattr(self, name), trainer) for name in (
                "begin_step", "sparsity_begin_step", "sparsity_end_step"))
            # the first update: at or after begin_step, every_n_steps after the last one (TensorFlow's rule)
            first = max(begin, self.last_update + int(self.every_n_steps))  # type: ignore[type-var]
            name = "begin_step" if begin >= self.last_update + int(self.every_n_steps) else "every_n_steps"
            warn_if_after_training("GradualMagnitudePruning", trainer, name, getattr(self, name), first,
                                   "no mask is ever computed", None if name == "begin_step"
                                   else "lower `every_n_steps`, or train longer.")
            # the end of training (1.0) is "never stop":
            # estimated_stepping_batches undercounts manual optimisation
            end = (sys.maxsize if until_the_end(self.end_step)
                   else resolve_step("end_step", self.end_step, trainer))
            self._schedule = (begin, max(end, begin), s_begin, max(s_end, s_begin))  # type: ignore[type-var]
        return self._schedule  # type: ignore[return-value]

    def sparsity_at(self, step: int) -> float:
        """The scheduled global target at optimizer step ``step`` (after :meth:`on_fit_start`)."""
        if self._schedule is not None:
            begin, end = self._schedule[2], self._schedule[3]
        else:
            begin, end = int(self.sparsity_begin_step), int(self.sparsity_end_step)
        return polynomial_sparsity(step, self.initial_sparsity, self.target_sparsity, begin, end,
                                   self.exponent)

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
        # sharded weights: the local shards, every count and threshold over all shards (reduce)
        reduce = shard_reduce(self.masks.param(n) for n in self.masks)
        scores = {n: block_magnitude(self.masks.local(n), self.block_size, self.block_pooling)
                  for n in self.masks}
        if self._nm is not None:
            n, m = self._nm
            if self.scope == "layer":
                return {name: nm_schedule_masks({name: score}, sparsity, n, m, self.pattern_ramp,
                                                reduce=reduce)[name]
                        for name, score in scores.items()}
            return nm_schedule_masks(scores, sparsity, n, m, self.pattern_ramp, reduce=reduce)
        new, pooled = {}, []
        for name, score in scores.items():
            layer_target = self._layer_target(name) if self.layer_targets else None
            if layer_target is not None or self.scope == "layer":
                s = sparsity if layer_target is None else sparsity * layer_target / self.target_sparsity
                k = kept_count(self.masks.param(name).numel(), s)
                thr = self._smoothed(name, kth_largest(score, k) if reduce is None
                                     else kth_largest_across([score], k, reduce))
                new[name] = threshold_mask(score, thr)
            else:
                pooled.append(name)
        if pooled:
            numel = sum(self.masks.param(n).numel() for n in pooled)
            k = kept_count(numel, sparsity)
            thr = self._smoothed(_GLOBAL, kth_largest_of([scores[n] for n in pooled], k) if reduce is None
                                 else kth_largest_across([scores[n] for n in pooled], k, reduce))
            new.update({n: threshold_mask(scores[n], thr) for n in pooled})
        return new

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if not getattr(trainer.strategy, "restore_checkpoint_after_setup", False):
            self._start(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(trainer.strategy, "restore_checkpoint_after_setup", False):
            # ModelParallelStrategy restores the callbacks' state after on_fit_start: the target of the last
            # update (last_update) is known only now (the loader's position: _resume.resume_loader_position)
            self._start(trainer)

    def _start(self, trainer: pl.Trainer) -> None:
        _, _, begin, end = self._resolve_schedule(trainer)
        # the target of the last update (a resumed fit restores it; Lightning restores global_step only later)
        self.current_target = self.sparsity_at(self.last_update)
        if self.verbose:
            pattern = f", {self.pattern} pattern ({self.pattern_ramp})" if self.pattern else ""
            rank_zero_info(
                f"[GradualMagnitudePruning] {len(self.targets)} tensors, {self.scope} scope: sparsity"
                f" {self.initial_sparsity:.0%} -> {self.target_sparsity:.0%} over steps {begin}-{end},"
                f" masks every {self.every_n_steps} steps{pattern}"
            )

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        begin, end, _, _ = self._resolve_schedule(trainer)
        if not is_update_step(step, begin, end, int(self.every_n_steps), self.last_update):
            return
        self.check_finite_weights(step)
        self.last_update = step
        self.current_target = self.sparsity_at(step)
        self.update_masks(self.compute_masks(self.current_target), trainer)

    @override
    def log_sparsity(self, trainer: pl.Trainer, extra: dict[str, float] | None = None) -> None:
        metrics = {f"{PREFIX}/target_sparsity": self.current_target}
        if self._nm is not None:
            metrics[f"{PREFIX}/pattern_violations"] = float(self.pattern_violations())
        super().log_sparsity(trainer, {**metrics, **(extra or {})})

    def pattern_violations(self) -> int:
        """Blocks of the targeted weights that hold more than N non-zeros (0 once the N:M pattern holds)."""
        if self._nm is None or self.masks is None:
            return 0
        n, m = self._nm
        local = sum(nm_violations(self.masks.local(name), n, m) for name in self.masks)
        reduce = shard_reduce(self.masks.param(name) for name in self.masks)
        return local if reduce is None else int(reduce(torch.tensor([local]), "sum").item())

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
        self._schedule = (tuple(int(v) for v in schedule) if schedule is not None and len(schedule) == 4
                          else None)
