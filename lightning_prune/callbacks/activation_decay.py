"""Activation decay: train deep, deploy shallow.

Chen et al., "VanillaNet: the Power of Minimalism in Deep Learning", 2023, arXiv:2305.12972 (the
deep-training strategy, ``huawei-noah/VanillaNet``), as ReduceNet (ohmydroid/reducenet, 2023) applies it to
residual networks: selected activations become ``A'(x) = (1 - λ) A(x) + λ x`` with λ going 0 → 1, after
which the linear layers around them fuse exactly (:func:`lightning_prune.reparameterize`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_prune.callbacks._resume import resume_loader_position
from lightning_prune.callbacks.logging import PREFIX, log_scalars
from lightning_prune.callbacks.schedules import (
    ramp,
    resolve_step,
    steps_per_epoch,
    training_steps,
    warn_if_after_training,
)
from lightning_prune.callbacks.sharding import SHARDED_STRATEGY, check_sharding
from lightning_prune.callbacks.shrink import gather_network, sharded_compression_problem
from lightning_prune.callbacks.state import CallbackState
from lightning_prune.core.reparam import (
    DecayingActivation,
    ReparamPlan,
    count_layers,
    plan_reparameterization,
    reparameterize,
    unwrap_activations,
    wrap_activations,
)
from lightning_prune.core.sharding import is_sharded
from lightning_prune.graph import meta_copy, traced_root
from lightning_prune.validation import (
    as_misconfiguration,
    check_bool,
    check_choice,
    check_exclusive,
    check_int,
    check_optional,
    check_patterns,
    check_window,
    window_positions,
)

__all__ = ["ActivationDecay", "decay_lambda"]


def decay_lambda(position: float, start: float, end: float, schedule: str = "linear") -> float:
    """λ at ``position`` (a step or an epoch): 0 up to ``start``, ``ramp`` between, 1 from ``end`` on.

    ``"linear"``: ``(p - start) / (end - start)`` (VanillaNet's ``epoch / decay_epochs``); ``"cosine"``:
    ``0.5 (1 - cos(π p'))`` (VanillaNet's cosine option, ReduceNet's ``1 - a``).

    Example::

        >>> decay_lambda(25, 0, 100), round(decay_lambda(50, 0, 100, "cosine"), 12), decay_lambda(100, 0, 100)
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
            return plan_reparameterization(model, target.include, target.exclude, target.fusable_only)

        return plan


class ActivationDecay(CallbackState):
    """Decay chosen activations to the identity during training, so linear layers fuse afterwards.

    Every selected activation module ``A`` is replaced in place by a parameter-free wrapper computing
    ``A'(x) = (1 - λ) A(x) + λ x`` (any activation: ReLU, GELU, SiLU, ...). λ goes 0 → 1 between the begin and
    end positions on a ``"linear"`` or ``"cosine"`` schedule, updated every optimizer step (ReduceNet) or
    every epoch (VanillaNet), and is logged as ``prune/lambda``. The model's ``state_dict`` keys do not
    change.

    The default set of activations is exactly those whose disappearance lets two linear layers fuse exactly
    (found by tracing the model with ``torch.fx``: a bottleneck's 3×3 → last 1×1, an inverted residual's
    depthwise → projection, a transformer MLP's fc1 → fc2, a ReduceNet block); ``include`` and ``exclude``
    globs over activation names narrow it, and ``fusable_only=False`` widens it to every activation module
    (for models ``torch.fx`` cannot trace, or to decay activations that will not fuse). :meth:`plan` shows the
    selection without training. Once λ = 1, ``fuse_on_train_end=True`` (or
    :func:`lightning_prune.reparameterize` on the finished model) fuses the model.

    Positions follow the unit rule: ``*_step`` in optimizer steps, ``*_epoch`` in epochs, either as a float in
    [0, 1] a fraction of the whole training; give at most one of each pair.

    ``torch.compile``: λ is a tensor the compiled graph reads (filled in place every step), so a compiled
    model compiles at most three times over the whole schedule (λ = 0, 0 < λ < 1, λ = 1), not once per step;
    no graph break.

    Args:
        begin_step: where λ starts rising (default 0).
        begin_epoch: the same in epochs.
        end_step: where λ reaches 1 (default 0.75 of training, leaving the rest to adapt to the linear
            network).
        end_epoch: the same in epochs (VanillaNet: 100 of 300 epochs).
        schedule: ``"linear"`` or ``"cosine"``.
        every_n_steps: update λ every that many optimizer steps (default 1, ReduceNet).
        every_n_epochs: update λ at the start of every that many epochs instead (VanillaNet: 1).
        include: globs of activation module names; narrows the default set.
        exclude: globs of activation module names to leave alone.
        fusable_only: the default set is the activations that fuse exactly (``True``) or every activation
            module.
        fuse_on_train_end: fuse the model (:func:`lightning_prune.reparameterize`) when training ends.
        verbose: print the plan at setup (rank zero).

    Raises:
        MisconfigurationException: bad arguments; at setup, a model with nothing to decay; at train start
            with ``fuse_on_train_end``, a schedule that does not reach λ = 1 before training ends.

    Example::

        print(ActivationDecay.plan(timm.create_model("resnet50")))  # dry run
        decay = ActivationDecay(end_step=0.5, schedule="cosine", fuse_on_train_end=True)
        trainer = Trainer(callbacks=[decay])
    """

    plan = _PlanMethod()

    def __init__(
        self,
        begin_step: int | float | None = None,
        begin_epoch: int | float | None = None,
        end_step: int | float | None = None,
        end_epoch: int | float | None = None,
        schedule: str = "linear",
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        fusable_only: bool = True,
        fuse_on_train_end: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        hint = "end_step=0.5 reaches λ = 1 halfway through training; end_epoch=100 at epoch 100."
        check_exclusive(every_n_steps=every_n_steps, every_n_epochs=every_n_epochs,
                        hint="λ changes every step (ReduceNet) or every epoch (VanillaNet), not both.")
        self.begin_step = self.begin_epoch = self.end_step = self.end_epoch = None
        for name, value in check_window(begin_step, begin_epoch, end_step, end_epoch, 0.75, hint,
                                        "λ rises from 0 at the begin position to 1 at the end position."):
            setattr(self, name, value)
        self.schedule = check_choice("schedule", schedule, ("linear", "cosine"))
        self.every_n_steps = check_optional(check_int, "every_n_steps", every_n_steps, 1)
        self.every_n_epochs = check_optional(check_int, "every_n_epochs", every_n_epochs, 1)
        if self.every_n_steps is None and self.every_n_epochs is None:
            self.every_n_steps = 1
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.fusable_only = check_bool("fusable_only", fusable_only)
        self.fuse_on_train_end = check_bool("fuse_on_train_end", fuse_on_train_end)
        self.verbose = check_bool("verbose", verbose)
        # state
        self.lam = 0.0
        self.decayed: list[str] = []
        self._bounds: tuple[int, int] | None = None  # resolved (begin, end) in optimizer steps
        self._skeleton: nn.Module | None = None  # under FSDP2 with fuse_on_train_end: see setup
        self._wrapped: dict[str, DecayingActivation] = {}
        self._plan: ReparamPlan | None = None
        self._fused_model: int | None = None  # id() of the module fused at train end

    def _begin_end(self) -> tuple[tuple[str, int | float], tuple[str, int | float]]:
        return window_positions(self.begin_step, self.begin_epoch, self.end_step, self.end_epoch)

    @property
    @override
    def state_key(self) -> str:
        (begin_name, begin), (end_name, end) = self._begin_end()
        return self._generate_state_key(**{begin_name: begin, end_name: end}, schedule=self.schedule,
                                        include=self.include, exclude=self.exclude)

    # ------------------------------------------------------------------ wrapping
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_sharding(trainer, "ActivationDecay", supported=True)  # (λ only; the fusion on a gathered model)
        resume_loader_position(trainer)
        modules = {id(m) for m in pl_module.modules()}
        if self._wrapped and all(id(w) in modules for w in self._wrapped.values()):
            return
        if self._fused_model is not None and self._fused_model in modules:
            return  # validate/test after fuse_on_train_end: the model is already fused
        with as_misconfiguration():
            plan = plan_reparameterization(pl_module, self.include, self.exclude, self.fusable_only)
        if not plan.decay and stage != "fit":
            return
        if not plan.decay:
            shown = list(plan.rejected.items())[:6]
            reasons = "; ".join(f"{n}: {why}" for n, why in shown) or "no activation modules"
            raise MisconfigurationException(
                f"ActivationDecay found nothing to decay in {type(pl_module).__name__}"
                f" (include={self.include or 'automatic'}, exclude={self.exclude}): {reasons}."
                " HINT: only an activation between two linear layers that compose exactly can vanish (e.g. a"
                " bottleneck's 3×3 → 1×1, an MLP's fc1 → fc2); `fusable_only=False` decays others anyway.")
        self._plan = plan
        self.decayed = list(plan.decay)
        self._wrapped = wrap_activations(pl_module, self.decayed, self.lam)
        self._skeleton = None
        if (self.fuse_on_train_end and trainer is not None and stage == "fit"
                and type(trainer.strategy).__name__ == SHARDED_STRATEGY):
            # fully_shard runs after setup: the (wrapped) network's structure, gathered into for the fusion
            self._skeleton = meta_copy(traced_root(pl_module)[1])
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
    def _resolve_bounds(self, trainer: pl.Trainer) -> tuple[int, int]:
        (begin_name, begin), (end_name, end) = self._begin_end()
        start, stop = resolve_step(begin_name, begin, trainer), resolve_step(end_name, end, trainer)
        assert start is not None and stop is not None
        warn_if_after_training("ActivationDecay", trainer, begin_name, begin, start,
                               "λ would start rising after it, so no activation decays")
        if stop < start:
            raise MisconfigurationException(
                f"`{end_name}` ({end}) resolves to step {stop}, before `{begin_name}` ({begin}) at step"
                f" {start}.")
        last = self._last_update_step(trainer)
        if self.fuse_on_train_end and last is not None and stop > last:
            raise MisconfigurationException(
                f"`fuse_on_train_end=True` but λ reaches 1 only at step {stop}, after the last update of λ"
                f" (step {last}). HINT: set `{end_name}` earlier, e.g. end_step=0.75.")
        return start, stop

    def _last_update_step(self, trainer: pl.Trainer) -> int | None:
        """The last step at which λ changes during this fit (None for a Trainer without an end)."""
        total = training_steps(trainer)
        if total is None:
            return None
        if self.every_n_epochs is None:
            n = int(self.every_n_steps or 1)
            return (max(total - 1, 0) // n) * n
        per_epoch, epochs = steps_per_epoch(trainer), trainer.max_epochs
        if per_epoch is None or not epochs or epochs < 0:
            return total - 1
        last_epoch = min(epochs - 1, max(total - 1, 0) // per_epoch)
        return (last_epoch // self.every_n_epochs) * self.every_n_epochs * per_epoch

    def lambda_at(self, step: float) -> float:
        """λ at an optimizer step once the schedule is resolved (at train start)."""
        if self._bounds is not None:
            start, end = self._bounds
        else:
            start, end = float(self.begin_step or 0), float(self.end_step or 0)
        return decay_lambda(step, start, end, self.schedule)

    def _update(self, trainer: pl.Trainer, force_log: bool = False) -> None:
        old = self.lam
        self._apply(self.lambda_at(trainer.global_step))
        every = max(int(getattr(trainer, "log_every_n_steps", 50) or 1), 1)
        if (force_log or self.every_n_epochs is not None or trainer.global_step % every == 0
                or (self.lam == 1.0 != old)):
            log_scalars(trainer, {f"{PREFIX}/lambda": self.lam})

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fuse_on_train_end and any(is_sharded(p) for p in pl_module.parameters()):
            problem = sharded_compression_problem(pl_module, traced_root(pl_module)[0])
            if problem is not None or self._skeleton is None:
                raise MisconfigurationException(
                    "ActivationDecay(fuse_on_train_end=True) cannot gather this sharded model to fuse it"
                    f" after the fit: {problem or 'it was sharded outside ModelParallelStrategy'}. HINT: fix"
                    " configure_model so, or set fuse_on_train_end=False and call lp.reparameterize on the"
                    " trained model's gathered weights (a full-state checkpoint).")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bounds is None:
            self._bounds = self._resolve_bounds(trainer)
        self._update(trainer, force_log=True)
        if self.verbose:
            rank_zero_info(f"[ActivationDecay] {len(self._wrapped)} activation(s): λ 0 → 1 ({self.schedule})"
                           f" over steps {self._bounds[0]}-{self._bounds[1]}; now λ = {self.lam:.4g}")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0:
            self._update(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is not None and trainer.current_epoch % self.every_n_epochs == 0:
            self._update(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.fuse_on_train_end:
            return
        if self.lam != 1.0:
            rank_zero_warn(f"ActivationDecay: training ended at λ = {self.lam:.4g} < 1; the model is NOT"
                           " fused (fusing would change its outputs). HINT: train longer or set `end_step`"
                           " earlier.")
            return
        if any(is_sharded(p) for p in pl_module.parameters()):
            # FSDP2: every rank gathers the network into a plain copy (the fused model is whole on every rank)
            assert self._skeleton is not None
            network = gather_network(pl_module, traced_root(pl_module)[0], self._skeleton)
            for module in network.modules():
                if isinstance(module, DecayingActivation):
                    module.lam = self.lam
            self._skeleton = None
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
    def extra_state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "decayed": list(self.decayed),
                "bounds": list(self._bounds) if self._bounds is not None else None}

    @override
    def load_extra_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._apply(float(state_dict.get("lam", 0.0)))
        bounds = state_dict.get("bounds")
        self._bounds = (int(bounds[0]), int(bounds[1])) if bounds is not None else None
        saved = list(state_dict.get("decayed", []))
        if saved and self.decayed and saved != self.decayed:
            rank_zero_warn(f"ActivationDecay: the checkpoint decayed {len(saved)} activation(s), this run"
                           f" selects {len(self.decayed)}; continuing with this run's selection.")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_wrapped"] = {}  # modules of this process's model; ddp_spawn workers wrap their own copy
        state["_skeleton"] = None
        return state
