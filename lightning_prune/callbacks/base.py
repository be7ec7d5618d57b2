"""What every pruning callback shares: target resolution, masks, state, logging, DDP consistency.

Subclass :class:`PruningCallback` to write an algorithm (built-in or plugin). It resolves the targets
at ``setup``, holds one boolean :class:`~lightning_prune.core.masks.MaskSet`, re-applies it in place right
after every optimizer step (a ``torch.optim.Optimizer`` step post-hook, so gradient accumulation, AMP
skipped steps and manual optimisation are all covered), saves it in the checkpoint and logs sparsity.
A subclass decides *when* and *which* weights to prune and calls :meth:`update_masks`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_prune.callbacks._resume import resume_loader_position
from lightning_prune.callbacks._setup_checks import warn_if_cannot_act
from lightning_prune.callbacks.logging import (
    PREFIX,
    counted,
    log_histograms,
    log_images,
    log_scalars,
    log_table,
    mask_image,
    wandb_loggers,
)
from lightning_prune.callbacks.sharding import check_sharding
from lightning_prune.callbacks.state import CallbackState, resolve_seed
from lightning_prune.core.masks import MaskSet
from lightning_prune.core.sharding import is_sharded, shard_reduce, sharding_problem
from lightning_prune.core.targets import PRUNABLE_TYPES, Target, resolve_targets
from lightning_prune.errors import NonFiniteWeightError
from lightning_prune.graph import cut_like
from lightning_prune.validation import as_misconfiguration, check_bool, check_int, check_patterns, check_types

__all__ = ["PruningCallback", "resolve_seed"]  # resolve_seed: from callbacks.state

class PruningCallback(CallbackState):
    """Base class of the pruning callbacks: targets, boolean masks applied after every optimizer step,
    checkpointed state and sparsity logging.

    Targets follow one rule (:mod:`lightning_prune.core.targets`): the default set -- every module of
    ``types`` (Conv/Linear) except each timm model's first conv and classifier -- narrowed by ``include`` and
    ``exclude``; only ``types`` widens it.

    Args:
        include: globs of module names; only the modules of the default set that match are pruned.
        exclude: globs of module names to leave alone.
        types: module types of the default set (default Conv1d/2d/3d and Linear): classes, ``torch.nn`` names
            or dotted paths, e.g. ``["Conv2d", "Linear", "BatchNorm2d"]``.
        log_media_every_n_epochs: how often mask images, weight histograms and the sparsity table go to W&B
            (``0`` = only at the end of training).
        verbose: print a summary line when masks change (rank zero).

    Subclass hooks:
        ``select_targets(pl_module)`` to change what is targeted; ``extra_state_dict()`` and
        ``load_extra_state_dict(state)`` for the subclass's own state; call ``update_masks(masks)``.
    """

    #: Module types of the default set when ``types`` is not given.
    target_types: tuple[type[torch.nn.Module], ...] = PRUNABLE_TYPES
    #: Whether the callback computes its masks from local shards under ``ModelParallelStrategy`` (FSDP2);
    #: ``False`` (the default, for every subclass that does not say otherwise) refuses that strategy at setup.
    supports_sharding: bool = False
    #: what the callback needs that shards do not give, said when it refuses ModelParallelStrategy
    sharding_refusal: str | None = None
    #: attributes that stay the same objects when the callback starts over on another module
    #: (:meth:`bind_module`): arguments that are not per-model state (a user's latency table)
    shared_on_rebind: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        types: list[str | type] | None = None,
        log_media_every_n_epochs: int = 1,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.types = check_types("types", types)
        self.log_media_every_n_epochs = check_int(
            "log_media_every_n_epochs", log_media_every_n_epochs, 0,
            hint="0 logs media only at the end of training.")
        self.verbose = check_bool("verbose", verbose)
        self.targets: list[Target] = []
        #: the targeted weights (what :meth:`select_targets` resolved), without the helper tensors
        #: (biases, BatchNorm parameters) a subclass may mask beside them
        self.weight_names: list[str] = []
        self.masks: MaskSet | None = None
        self._pending_masks: dict[str, Tensor] | None = None
        self._hook_handles: list[Any] = []
        self._media_logged: tuple[Any, ...] | None = None  # (step, pruned counts) of the last W&B media

    # ------------------------------------------------------------------ identity
    def state_key_args(self) -> dict[str, Any]:
        """The arguments that tell two instances of this callback apart (extend in subclasses)."""
        key: dict[str, Any] = {"include": self.include, "exclude": self.exclude}
        if self.types:
            key["types"] = [t.__name__ for t in self.types]
        return key

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self.state_key_args())

    # ------------------------------------------------------------------ targets and masks
    def select_targets(self, pl_module: pl.LightningModule) -> list[Target]:
        """Which parameters this callback masks; raises a clear error when nothing matches."""
        with as_misconfiguration():
            targets = resolve_targets(pl_module, self.include, self.exclude,
                                      types=self.types or self.target_types)
        self.weight_names = [t.name for t in targets]
        return targets

    # ------------------------------------------------------------------ the module it acts on
    def bind_module(self, pl_module: pl.LightningModule) -> None:
        """Act on ``pl_module`` from now on (the first thing every ``setup`` does). A callback that acted on
        another LightningModule before -- ``trainer.test(other_module, ckpt_path=...)`` in the Trainer that
        fitted the first, a second ``fit`` of a new module -- releases that module (:meth:`release_module`)
        and starts again from its state as constructed: its targets, masks, gates, channel groups, removed
        units and statistics belonged to the first module, and a checkpoint's state loads onto the new one as
        onto a new callback's (a compressed checkpoint's smaller shapes included). The state as constructed is
        a copy taken at the first ``setup`` (:attr:`shared_on_rebind` kept by reference)."""
        bound = self.bound_module
        if bound is pl_module:
            return
        if bound is None:
            state = {k: v for k, v in self.__dict__.items() if k != "_as_constructed"}
            self._as_constructed = self._copy_constructed(state)
        else:
            self.release_module(bound)
            constructed = self._as_constructed
            self.__dict__.clear()
            self.__dict__.update(self._copy_constructed(constructed))
            self._as_constructed = constructed
        self._bound_module = pl_module

    @property
    def bound_module(self) -> pl.LightningModule | None:
        """The LightningModule this callback acts on (:meth:`bind_module`; ``None`` before its first
        ``setup``)."""
        return self.__dict__.get("_bound_module")

    def _copy_constructed(self, state: dict[str, Any]) -> dict[str, Any]:
        memo = {id(state[k]): state[k] for k in self.shared_on_rebind if k in state}
        return copy.deepcopy(state, memo)

    def release_module(self, pl_module: pl.LightningModule) -> None:
        """The callback leaves ``pl_module`` for another module (:meth:`bind_module`): take back what it
        attached (its optimizer step hooks; subclasses: hooks and gates on the module). The weights, masked
        or compressed, stay as they are."""
        self._remove_hooks()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.bind_module(pl_module)
        check_sharding(trainer, type(self).__name__, self.supports_sharding, self.sharding_refusal)
        resume_loader_position(trainer)
        if trainer is not None and stage == "fit":
            warn_if_cannot_act(trainer, pl_module, type(self).__name__, getattr(self, "gates_sampled", False))
        if self.masks is not None and self.targets and self._targets_belong_to(pl_module):
            return
        self.targets = self.select_targets(pl_module)
        self.masks = MaskSet.for_targets(self.targets)
        if self._pending_masks is not None:
            self.masks.load_state_dict(self._pending_masks)
            self._pending_masks = None

    #: Whether this callback follows a removal of units by another callback inside the fit (a channel
    #: callback's ``compress=True``): :meth:`follow_removal` cuts its masks like the parameters. Opt-in: a
    #: callback with state that depends on the parameters' shapes or positions beyond plain per-weight masks
    #: (N:M or block masks, a rewind snapshot, channel groups, a plugin's own tensors) cannot follow, and the
    #: removing callback refuses it at setup, by name, with :attr:`removal_refusal`. Set it ``True`` only
    #: where cutting the masks like the parameters leaves exactly the masks the callback would hold.
    follows_removal: bool = False
    #: why this callback cannot follow such a removal, said when it is refused (``None``: a generic reason)
    removal_refusal: str | None = None

    @torch.no_grad()
    def follow_removal(self, pl_module: pl.LightningModule,
                       cuts: dict[str, list[tuple[int, Tensor]]]) -> None:
        """Another callback removed units inside the fit (the same modules, smaller parameters; under DDP the
        same units on every rank): cut this callback's masks like their parameters (``cuts``: parameter name
        -> ``[(dim, kept indices)]``, :func:`lightning_prune.graph.parameter_cuts`) and mask the new
        parameters, so that the pruned weights stay pruned and the next mask update sees the live weights.
        Called only when :attr:`follows_removal` is ``True``."""
        if self.masks is None:
            return
        # (applied: the kept zeros stay zero)
        self.rebind_targets(pl_module, lambda target, mask: cut_like(mask, cuts.get(target.name, ())))

    def rebind_targets(self, pl_module: pl.LightningModule,
                       new_mask: Callable[[Target, Tensor], Tensor | None]) -> None:
        """The layers or parameters of ``pl_module`` were replaced inside the fit (cut, frozen): point the
        targets at the parameters now under the same names (a target whose parameter is gone leaves) and the
        masks (when there are any) at them, each ``new_mask(target, its old mask)`` (``None``: mask
        nothing)."""
        params = dict(pl_module.named_parameters())
        old = self.masks
        self.targets = [Target(t.module_name, pl_module.get_submodule(t.module_name) if t.module_name
                               else pl_module, t.param_name) for t in self.targets if t.name in params]
        if old is None:
            return
        masks = MaskSet()
        for target in self.targets:
            mask = old[target.name] if target.name in old else None
            masks.add(target.name, target.param, new_mask(target, mask) if mask is not None else None)
        self.masks = masks

    def retarget(self, pl_module: pl.LightningModule) -> None:
        """The model's parameters were replaced (the model was compressed): mask the new ones, everything
        kept."""
        self.targets = PruningCallback.select_targets(self, pl_module)
        self.masks = MaskSet.for_targets(self.targets)

    def _targets_belong_to(self, pl_module: pl.LightningModule) -> bool:
        modules = {id(m) for m in pl_module.modules()}
        return all(id(t.module) in modules for t in self.targets)

    @torch.no_grad()
    def check_finite_weights(self, step: int, names: list[str] | None = None) -> None:
        """Raise :class:`~lightning_prune.errors.NonFiniteWeightError` naming the layers and ``step`` when a
        masked parameter (``names``, default all) holds NaN/inf; call it before computing masks from the
        weights, so that the masks stay as they were."""
        assert self.masks is not None, "check_finite_weights called before setup"
        names = list(self.masks) if names is None else names
        params = [self.masks.local(n) for n in names]  # sharded: this rank's shards, the verdict shared below
        finite = bool(torch.stack([p.isfinite().all() for p in params]).all()) if params else True
        reduce = shard_reduce(self.masks.param(n) for n in names)
        if reduce is not None:
            finite = not bool(reduce(torch.tensor([0.0 if finite else 1.0]), "max").item())
        if finite:
            return
        bad = []
        for name, p in zip(names, params):
            n_nan, n_inf = int(p.isnan().sum()), int(p.isinf().sum())
            if n_nan or n_inf:
                bad.append(f"{name!r} ({n_nan} NaN, {n_inf} inf of {p.numel()})")
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise NonFiniteWeightError(
            f"[{type(self).__name__}] non-finite weights at the mask update of step {step}: {shown}. The"
            " masks were left unchanged. HINT: the training diverged; lower the learning rate, clip gradients"
            " (Trainer(gradient_clip_val=1.0)) or resume from an earlier checkpoint.")

    def update_masks(self, new_masks: dict[str, Tensor], trainer: pl.Trainer | None = None) -> None:
        """Install new masks, zero the pruned weights and their optimizer state, and log."""
        assert self.masks is not None, "update_masks called before setup"
        self.masks.update(new_masks)
        if trainer is not None:
            for optimizer in trainer.optimizers:
                self.masks.mask_optimizer_state(optimizer)
            self.log_sparsity(trainer)

    # ------------------------------------------------------------------ hooks
    def bind_shards(self) -> None:
        """Follow the parameters ``fully_shard`` replaced after setup (``configure_model`` runs after the
        callbacks' ``setup``): the masks cover the sharded parameters' local shards from now on."""
        assert self.masks is not None
        params = {t.name: t.param for t in self.targets}
        self.masks.rebind({n: p for n, p in params.items() if n in self.masks})
        if not self.masks.sharded:
            return
        plain = [n for n in self.masks if not is_sharded(self.masks.param(n))]
        bad = [f"{n!r}: {why}" for n in self.masks if (why := sharding_problem(self.masks.param(n)))]
        if plain or bad:
            raise MisconfigurationException(
                f"[{type(self).__name__}] masks on shards need every targeted weight sharded alike;"
                + (f" not sharded: {plain[:4]}" if plain else "") + (f" {bad[:4]}" if bad else "")
                + ". HINT: apply torch.distributed.fsdp.fully_shard to the whole model (the root module last)"
                " in configure_model, or exclude those layers.")
        self.check_sharded_masks()

    def check_sharded_masks(self) -> None:
        """Raise when this callback's options cannot work on the shards (after :meth:`bind_shards`)."""

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.masks is not None
        self.bind_shards()
        self.masks.invalidate()  # the strategy may have moved the model since setup
        self.masks.apply_()
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._hook_handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.masks is not None:
            self.masks.apply_()

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.log_media_every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            self.log_media(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_media(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------ logging
    def reported_names(self) -> list[str]:
        """The masked parameters that sparsity metrics and W&B media describe: the targeted weights only
        (:attr:`weight_names`), never the biases and BatchNorm parameters that channel masks also cover, so
        ``prune/sparsity`` means the same for every callback and agrees with
        :func:`~lightning_prune.sparsity_report`.
        """
        if self.masks is None:
            return []
        return [n for n in self.weight_names if n in self.masks] or self.masks.names()

    def sparsity_metrics(self) -> dict[str, float]:
        """Global and per-layer sparsity of the reported weights, keyed ``prune/sparsity[/layer]``."""
        if self.masks is None:
            return {}
        counts = self.masks.pruned_counts()
        names = [n for n in self.reported_names() if n in counts]
        total = sum(counts[n][1] for n in names)
        metrics = {f"{PREFIX}/sparsity": sum(counts[n][0] for n in names) / total if total else 0.0}
        metrics.update({f"{PREFIX}/sparsity/{n}": counts[n][0] / max(counts[n][1], 1) for n in names})
        return metrics

    def log_sparsity(self, trainer: pl.Trainer, extra: dict[str, float] | None = None) -> None:
        metrics = self.sparsity_metrics()
        metrics.update(extra or {})
        log_scalars(trainer, metrics)
        if self.verbose and self.masks is not None:
            rank_zero_info(self.progress_line(trainer.global_step, metrics))

    def progress_line(self, step: int, metrics: dict[str, float]) -> str:
        """The console line of a mask update: the weight sparsity (channel callbacks say units and FLOPs)."""
        return (f"[{type(self).__name__}] step {step}: sparsity {metrics[f'{PREFIX}/sparsity']:.2%} over"
                f" {counted(len(self.reported_names()), 'tensor')}")

    def log_media(self, trainer: pl.Trainer) -> None:
        """W&B mask images, weight histograms and a per-layer sparsity table of the reported weights
        (no-op without a WandbLogger)."""
        if self.masks is None or not wandb_loggers(trainer):
            return
        names = [n for n in self.reported_names() if n in self.masks]
        counts = self.masks.pruned_counts()
        logged = (int(trainer.global_step), tuple((n, counts[n][0]) for n in names))
        if logged == self._media_logged:  # the end of training right after the last epoch's media: the same
            return
        self._media_logged = logged
        log_images(trainer, {f"{PREFIX}/mask/{n}": mask_image(self.masks[n]) for n in names})
        log_histograms(trainer, {f"{PREFIX}/weights/{n}": self.masks.local(n)[self.masks[n]] for n in names})
        rows = [[n, counts[n][1], counts[n][0], counts[n][0] / max(counts[n][1], 1)] for n in names]
        log_table(trainer, f"{PREFIX}/sparsity_table", ["layer", "params", "pruned", "sparsity"], rows)

    # ------------------------------------------------------------------ deployment (restore_run)
    @override
    def after_restore(self, module: pl.LightningModule) -> None:
        """The masks hold on the restored module."""
        if self.masks is not None:
            self.masks.invalidate()
            self.masks.apply_()

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        masks = self.masks.state_dict() if self.masks is not None else (self._pending_masks or {})
        return {"masks": masks, **super().state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        masks = state_dict.get("masks")
        if masks is None and self.masks is not None:
            # written without masks (an older version): the restored weights hold the zeros
            masks = {n: self.masks.local(n).detach() != 0 for n in self.masks}
        masks = masks or {}
        if self.masks is not None:
            self.masks.load_state_dict(masks)
        else:
            self._pending_masks = dict(masks)
        super().load_state_dict(state_dict)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_hook_handles"] = []  # hook handles are process-local (ddp_spawn pickles the callback)
        return state
