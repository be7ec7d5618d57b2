"""Activation decay: train deep, deploy shallow.

Chen et al., "VanillaNet: the Power of Minimalism in Deep Learning", 2023, arXiv:2305.12972 (the
deep-training strategy, ``huawei-noah/VanillaNet``), as ReduceNet (ohmydroid/reducenet, 2023) applies it to
residual networks: selected activations become ``A'(x) = (1 - λ) A(x) + λ x`` with λ going 0 → 1, after
which the linear layers around them fuse exactly (:func:`lightning_prune.reparameterize`).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_prune.callbacks.base import check_choice
from lightning_prune.logging import PREFIX, log_scalars
from lightning_prune.reparam import (
    DecayingActivation,
    ReparamPlan,
    count_layers,
    plan_reparameterization,
    reparameterize,
    unwrap_activations,
    wrap_activations,
)
from lightning_prune.schedules import ramp
from lightning_prune.targets import as_patterns

__all__ = ["ActivationDecay", "decay_lambda"]


def decay_lambda(position: float, start: float, end: float, schedule: str = "linear") -> float:
    """λ at ``position`` (a step or an epoch): 0 up to ``start``, ``ramp`` between, 1 from ``end`` on.

    ``"linear"``: ``(p - start) / (end - start)`` (VanillaNet's ``epoch / decay_epochs``); ``"cosine"``:
    ``0.5 (1 - cos(π p'))`` (VanillaNet's cosine option, ReduceNet's ``1 - a``).

    Example::

        >>> decay_lambda(25, 0, 100), decay_lambda(50, 0, 100, "cosine"), decay_lambda(100, 0, 100)
        (0.25, 0.5, 1.0)
    """
    if position >= end:
        return 1.0
    if position <= start:
        return 0.0
    return ramp((position - start) / (end - start), schedule)


class _PlanMethod:
    """``ActivationDecay.plan(model)`` on the class uses the defaults; on an instance, its include/exclude."""

    def __get__(self, obj: ActivationDecay | None, objtype: type[ActivationDecay]) -> Any:
        target = obj if obj is not None else objtype(verbose=False)

        def plan(model: nn.Module) -> ReparamPlan:
            """A dry run: what decays and what fuses in ``model`` (see :func:`plan_reparameterization`)."""
            return plan_reparameterization(model, target.include, target.exclude)

        return plan


class ActivationDecay(Callback):
    """Decay chosen activations to the identity during training, so linear layers fuse afterwards.

    Every selected activation module ``A`` is replaced in place by a parameter-free wrapper computing
    ``A'(x) = (1 - λ) A(x) + λ x`` (any activation: ReLU, GELU, SiLU, ...). λ goes 0 → 1 between ``start``
    and ``end`` on a ``"linear"`` or ``"cosine"`` schedule, per optimizer step or per epoch, and is logged as
    ``prune/lambda``. The model's ``state_dict`` keys do not change.

    By default the selection is exactly the activations whose disappearance lets two linear layers fuse
    exactly (found by tracing the model with ``torch.fx``: a bottleneck's 3×3 → last 1×1, an inverted
    residual's depthwise → projection, a transformer MLP's fc1 → fc2, a ReduceNet block); ``include`` and
    ``exclude`` globs over activation names override it. :meth:`plan` shows the selection without training.
    Once λ = 1, ``fuse_on_train_end=True`` (or :func:`lightning_prune.reparameterize` on the finished model)
    fuses the model.

    Args:
        start: where λ starts rising: an epoch (int) or a fraction of training (float in [0, 1]).
        end: where λ reaches 1 (same units); default 75% of training, leaving the rest to adapt to the
            linear network. VanillaNet: 100 of 300 epochs.
        schedule: ``"linear"`` or ``"cosine"``.
        interval: update λ every optimizer ``"step"`` (ReduceNet) or every ``"epoch"`` (VanillaNet).
        include: globs of activation module names to decay (replaces the automatic selection).
        exclude: globs of activation module names to leave alone.
        fuse_on_train_end: fuse the model (:func:`lightning_prune.reparameterize`) when training ends.
        verbose: print the plan at setup (rank zero).

    Raises:
        MisconfigurationException: bad arguments; at setup, a model with nothing to decay; at train start
            with ``fuse_on_train_end``, a schedule that does not reach λ = 1 before training ends.

    Example::

        print(ActivationDecay.plan(timm.create_model("resnet50")))  # dry run
        trainer = Trainer(callbacks=[ActivationDecay(end=0.5, schedule="cosine", fuse_on_train_end=True)])
    """

    plan = _PlanMethod()

    def __init__(
        self,
        start: int | float = 0,
        end: int | float = 0.75,
        schedule: str = "linear",
        interval: str = "step",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        fuse_on_train_end: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.start = self._check_position("start", start)
        self.end = self._check_position("end", end)
        if type(self.start) is type(self.end) and self.end < self.start:
            raise MisconfigurationException(
                f"`end` ({end}) must not come before `start` ({start})."
                " HINT: λ rises from 0 at `start` to 1 at `end`.")
        self.schedule = check_choice("schedule", schedule, ("linear", "cosine"))
        self.interval = check_choice("interval", interval, ("step", "epoch"))
        self.include = list(as_patterns(include))
        self.exclude = list(as_patterns(exclude))
        self.fuse_on_train_end = bool(fuse_on_train_end)
        self.verbose = verbose
        # state
        self.lam = 0.0
        self.decayed: list[str] = []
        self._bounds: tuple[float, float] | None = None  # resolved (start, end) in steps or epochs
        self._wrapped: dict[str, DecayingActivation] = {}
        self._plan: ReparamPlan | None = None
        self._fused_model: int | None = None  # id() of the module fused at train end

    @staticmethod
    def _check_position(name: str, value: int | float) -> int | float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            ok = False
        elif isinstance(value, int):
            ok = value >= 0
        else:
            ok = 0.0 <= value <= 1.0
        if not ok:
            raise MisconfigurationException(
                f"`{name}` must be an epoch (int >= 0) or a fraction of training (float in [0, 1]),"
                f" got {value!r}."
                " HINT: end=0.5 reaches λ = 1 halfway through training; end=100 at epoch 100.")
        return value

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(start=self.start, end=self.end, schedule=self.schedule,
                                        interval=self.interval, include=self.include, exclude=self.exclude)

    # ------------------------------------------------------------------ wrapping
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        modules = {id(m) for m in pl_module.modules()}
        if self._wrapped and all(id(w) in modules for w in self._wrapped.values()):
            return
        if self._fused_model is not None and self._fused_model in modules:
            return  # validate/test after fuse_on_train_end: the model is already fused
        plan = plan_reparameterization(pl_module, self.include, self.exclude)
        if not plan.decay and stage != "fit":
            return
        if not plan.decay:
            shown = list(plan.rejected.items())[:6]
            reasons = "; ".join(f"{n}: {why}" for n, why in shown) or "no activation modules"
            raise MisconfigurationException(
                f"ActivationDecay found nothing to decay in {type(pl_module).__name__}"
                f" (include={self.include or 'automatic'}, exclude={self.exclude}): {reasons}."
                " HINT: only an activation between two linear layers that compose exactly can vanish (e.g. a"
                " bottleneck's 3×3 → 1×1, an MLP's fc1 → fc2); pass `include=[...]` to decay others anyway.")
        self._plan = plan
        self.decayed = list(plan.decay)
        self._wrapped = wrap_activations(pl_module, self.decayed, self.lam)
        if self.verbose:
            rank_zero_info(str(plan))

    def unwrap(self, pl_module: nn.Module) -> list[str]:
        """Put the original activation modules back (the model then computes λ = 0 again)."""
        self._wrapped = {}
        return unwrap_activations(pl_module)

    def _apply(self, lam: float) -> None:
        self.lam = float(lam)
        for module in self._wrapped.values():
            module.lam = self.lam

    # ------------------------------------------------------------------ schedule
    def _resolve_bounds(self, trainer: pl.Trainer) -> tuple[float, float]:
        estimated = float(trainer.estimated_stepping_batches)
        finite = math.isfinite(estimated)
        if not finite and (isinstance(self.start, float) or isinstance(self.end, float)):
            raise MisconfigurationException(
                "`start`/`end` given as fractions of training need a finite training length; got max_epochs=-1"
                " and no max_steps. HINT: give `start` and `end` as epochs (ints).")
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        total = max(int(estimated), 1) if finite else math.inf
        if finite and max_epochs:
            per_epoch, epochs = total / max_epochs, float(max_epochs)
        else:
            batches = float(trainer.num_training_batches)
            accumulate = max(trainer.accumulate_grad_batches, 1)
            per_epoch = max(int(batches) // accumulate, 1) if math.isfinite(batches) else 1
            epochs = total / per_epoch

        def resolve(value: int | float) -> float:
            if self.interval == "step":
                return float(value * per_epoch) if isinstance(value, int) else float(round(value * total))
            return float(value) if isinstance(value, int) else float(value * epochs)

        start, end = resolve(self.start), resolve(self.end)
        if end < start:
            raise MisconfigurationException(
                f"`end` ({self.end}) resolves to {end:g} {self.interval}s, before `start` ({self.start})"
                f" at {start:g}.")
        last = total - 1 if self.interval == "step" else epochs - 1
        if self.fuse_on_train_end and end > last:
            raise MisconfigurationException(
                f"`fuse_on_train_end=True` but λ reaches 1 only at {self.interval} {end:g}, after the last one"
                f" ({last:g}). HINT: set `end` earlier, e.g. end=0.75.")
        return start, end

    def lambda_at(self, position: float) -> float:
        """λ at a step or epoch (per ``interval``) once the schedule is resolved (at train start)."""
        start, end = self._bounds if self._bounds is not None else (float(self.start), float(self.end))
        return decay_lambda(position, start, end, self.schedule)

    def _position(self, trainer: pl.Trainer) -> int:
        return trainer.global_step if self.interval == "step" else trainer.current_epoch

    def _update(self, trainer: pl.Trainer, force_log: bool = False) -> None:
        old = self.lam
        self._apply(self.lambda_at(self._position(trainer)))
        every = max(int(getattr(trainer, "log_every_n_steps", 50) or 1), 1)
        if force_log or self.interval == "epoch" or trainer.global_step % every == 0 or (self.lam == 1.0 != old):
            log_scalars(trainer, {f"{PREFIX}/lambda": self.lam})

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bounds = self._resolve_bounds(trainer)
        self._update(trainer, force_log=True)
        if self.verbose:
            rank_zero_info(f"[ActivationDecay] {len(self._wrapped)} activation(s): λ 0 → 1 ({self.schedule}) over"
                           f" {self.interval}s {self._bounds[0]:g}-{self._bounds[1]:g}; now λ = {self.lam:.4g}")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.interval == "step":
            self._update(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch":
            self._update(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.fuse_on_train_end:
            return
        if self.lam != 1.0:
            rank_zero_warn(f"ActivationDecay: training ended at λ = {self.lam:.4g} < 1; the model is NOT fused"
                           " (fusing would change its outputs). HINT: train longer or set `end` earlier.")
            return
        before = count_layers(pl_module)
        reparameterize(pl_module)
        self._wrapped = {}
        self._fused_model = id(pl_module)
        after = count_layers(pl_module)
        log_scalars(trainer, {f"{PREFIX}/layers_before_fusion": float(before),
                              f"{PREFIX}/layers_after_fusion": float(after)})
        if self.verbose:
            rank_zero_info(f"[ActivationDecay] fused: {before} -> {after} conv/linear layers, conv+BN folded;"
                           " the model is ready for inference (use it in eval mode).")

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "decayed": list(self.decayed),
                "bounds": list(self._bounds) if self._bounds is not None else None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._apply(float(state_dict.get("lam", 0.0)))
        bounds = state_dict.get("bounds")
        self._bounds = (float(bounds[0]), float(bounds[1])) if bounds is not None else None
        saved = list(state_dict.get("decayed", []))
        if saved and self.decayed and saved != self.decayed:
            rank_zero_warn(f"ActivationDecay: the checkpoint decayed {len(saved)} activation(s), this run selects"
                           f" {len(self.decayed)}; continuing with this run's selection.")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_wrapped"] = {}  # modules of this process's model; ddp_spawn workers wrap their own copy
        return state
