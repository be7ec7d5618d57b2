"""One-shot pruning of a trained model from calibration batches, then fine-tuning in the same fit.

At the start of ``fit`` (or at ``prune_step``) the callback draws ``calibration_batches`` batches from the
training loader and prunes the model once with :mod:`lightning_prune.core.one_shot` -- ``"wanda"`` (Sun et al.
2023, arXiv:2306.11695), ``"sparsegpt"`` (Frantar & Alistarh 2023, arXiv:2301.00774), ``"magnitude"`` (the
baseline), unstructured or ``pattern="N:M"``, or ``"channels"`` (activation-based unit importance, or
``importance=``, e.g. first-order Taylor from the training step's gradients on the calibration batches, and a
least-squares refit of the readers, removed physically) -- and the rest of the fit fine-tunes: weight masks
are re-applied after every optimizer step; removed units stay removed, the optimizers carried over
(:func:`lightning_prune.callbacks.shrink.compress_in_fit`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.callbacks.input_shape import traced_input_size
from lightning_prune.callbacks.logging import PREFIX, log_scalars
from lightning_prune.callbacks.schedules import resolve_step, warn_if_after_training
from lightning_prune.callbacks.shrink import (
    ShrinkSchedule,
    check_strategy,
    compress_in_fit,
    follow_replaced_parameters,
    others_follow_removal,
    recorded_removal,
    refuse_frozen_conflicts,
    refuse_removal_conflicts,
    refuse_spawn_freezing,
)
from lightning_prune.callbacks.state import seeded_generator
from lightning_prune.core.one_shot import (
    check_importance,
    check_method,
    check_pattern,
    default_forward,
    draw_batches,
    find_channel_groups,
    prune_channels,
    prune_unstructured,
    sharded_model,
)
from lightning_prune.core.targets import Target
from lightning_prune.validation import (
    as_misconfiguration,
    check_bool,
    check_fraction,
    check_input_size,
    check_int,
    check_latency_options,
    check_position,
    check_positive,
    check_size_targets,
    input_size_errors,
)

__all__ = ["OneShotPruning"]

def calibration_loader(trainer: pl.Trainer) -> Any:
    """Where the calibration batches come from: for a map-style ``DataLoader``, a plain, unshuffled loader
    over the same data set, batch size and collate function -- rank ``r`` of ``W`` taking batches ``r``,
    ``r + W``, ... -- so that the batches do not depend on the training loader's shuffling, epoch or resume
    state (and drawing them leaves that state alone); any other loader as it is."""
    from torch.utils.data import DataLoader, IterableDataset

    loader = trainer.train_dataloader
    if isinstance(loader, (list, tuple)) and loader:
        loader = loader[0]
    elif isinstance(loader, dict) and loader:
        loader = next(iter(loader.values()))
    if (not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset)
            or loader.batch_size is None or not hasattr(loader.dataset, "__len__")):
        return loader
    size, bs = len(loader.dataset), int(loader.batch_size)  # type: ignore[arg-type]
    world, rank = max(int(trainer.world_size), 1), int(trainer.global_rank)
    batches = range(rank, size // bs if loader.drop_last else -(-size // bs), world)
    indices = [i for b in batches for i in range(b * bs, min((b + 1) * bs, size))]
    return DataLoader(loader.dataset, batch_size=bs, sampler=indices, collate_fn=loader.collate_fn,
                      num_workers=0)


class OneShotPruning(PruningCallback):
    """One-shot pruning of a trained model from calibration data (Wanda, SparseGPT, channels), then fine-tune.

    Channels are removed with a least-squares compensation of the layers that read them.

    Layer by layer (one layer's input statistics in memory at a time; float64 Hessians), each layer on the
    outputs of the layers pruned before it. Under DDP the statistics are summed over the ranks, so every rank
    prunes identically. Under ``ModelParallelStrategy`` with ``fully_shard`` (FSDP2) the weight methods
    (unstructured and N:M) do the same on shards: the statistics summed over the ranks, each layer's weight
    gathered whole for its mask and update (one layer at a time), every rank keeping its shard of the weight
    and of the mask (the DDP run's masks and weights, bit for bit); the calibration forwards run to the end
    (a forward is a collective), every rank on as many batches as the rank with the fewest.
    ``method="channels"`` is refused under FSDP2 at setup (the message says what to use instead).

    The checkpoint after the pruning step holds the masks (and, for ``"channels"``, the
    removed units): a resumed fit does not prune again.

    Args:
        method: ``"sparsegpt"``, ``"wanda"``, ``"magnitude"`` (weights) or ``"channels"`` (units removed).
        target_sparsity: the fraction of every targeted layer's weights pruned (``"channels"`` without a size
            target: the fraction of units removed).
        pattern: ``"N:M"`` (e.g. ``"2:4"``): N of every M consecutive input weights kept (weight methods).
        target_flops: ``"channels"``: keep at most this fraction of the dense FLOPs, in (0, 1].
        target_params: the same for the parameters (exclusive with ``target_flops``).
        target_latency: ``"channels"``: the same for the inference latency measured on ``latency_device``
            (default: the training device) at ``latency_batch_size`` (default: the calibration batch size),
            with a per-layer latency table measured at the pruning step, or ``latency_model``'s prediction
            (see :class:`~lightning_prune.callbacks.channels.ChannelPruningCallback`); exclusive with the two
            above.
        calibration_batches: how many training batches the statistics come from (4 batches of 32 are the 128
            samples the papers calibrate with).
        compensate: ``"channels"``: refit the readers' weights and bias by least squares on the calibration
            activations (``False``: the ablation, the removed units only cut).
        prune_step: when to prune: an optimizer step, or a fraction of training (0 = at the start of fit).
        damping: relative damping of SparseGPT's Hessian (``damping * mean(diag H)``; 1% in the paper) and
            of the ``"channels"`` least-squares refit (ridge).
        block_size: SparseGPT's columns per lazy batch and mask selection (128 in the paper).
        round_to: ``"channels"``: kept widths multiples of it (heads and conv groups stay whole).
        importance: ``"channels"``: what ranks the units instead of the calibration activations
            (``None``): ``"taylor"`` (first-order Taylor, ``|sum w * dL/dw|`` per unit, the gradients of the
            LightningModule's own ``training_step`` loss summed over the calibration batches; the model in
            training mode, its gradients, modes, ``requires_grad`` flags, buffers and random state restored
            afterwards, so the fit's first step is unaffected; under DDP the per-unit statistics averaged
            over the ranks), ``"weight_norm"``, ``"bn_scale"``, ``"random"`` (seeded by ``seed_everything``),
            or a plugin's criterion (:mod:`lightning_prune.core.importance`); each group's scores divided by
            their mean. The least-squares refit (``compensate``) runs whichever criterion ranked.
        input_size: ``(C, H, W)`` to trace the model for ``"channels"`` (default: ``example_input_array``,
            else the first training batch's shape, else timm's ``pretrained_cfg["input_size"]``): the FLOPs
            of ``target_flops`` are counted there.
        include, exclude, types, log_media_every_n_epochs, verbose: see :class:`PruningCallback`.

    Example::

        trainer = Trainer(max_epochs=1, callbacks=[OneShotPruning("sparsegpt", target_sparsity=0.5)])
        trainer = Trainer(callbacks=[OneShotPruning("channels", target_flops=0.5)])
    """

    shared_on_rebind = ("latency_model",)
    #: ``"channels"`` under ModelParallelStrategy (FSDP2): refused at setup, with what to use instead
    sharding_refusal = ("method='channels' removes units physically at the pruning step with a"
                        " least-squares refit of their readers, and neither the unit scores and refit"
                        " (whole-layer reads and writes through the traced graph) nor OneShotPruning's"
                        " removal run on shards; the weight methods ('sparsegpt', 'wanda', 'magnitude',"
                        " unstructured or N:M) do."
                        " Alternatives: prune channels with OneShotPruning under DDP or one device and"
                        " fine-tune the smaller model under ModelParallelStrategy, or remove units inside the"
                        " sharded fit with GroupLassoPruning/L0Pruning(compress=True)")

    def __init__(
        self,
        method: str = "sparsegpt",
        target_sparsity: float = 0.5,
        pattern: str | None = None,
        target_flops: float | None = None,
        target_params: float | None = None,
        calibration_batches: int = 4,
        compensate: bool = True,
        prune_step: int | float = 0,
        damping: float = 0.01,
        block_size: int = 128,
        round_to: int = 1,
        input_size: Sequence[int] | None = None,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        types: list[str | type] | None = None,
        log_media_every_n_epochs: int = 1,
        verbose: bool = True,
        *,
        target_latency: float | None = None,
        latency_device: str | None = None,
        latency_batch_size: int | None = None,
        latency_model: Any = None,
        importance: str | None = None,
    ) -> None:
        super().__init__(include=include, exclude=exclude, types=types,
                         log_media_every_n_epochs=log_media_every_n_epochs, verbose=verbose)
        self.method = check_method(method, MisconfigurationException)
        # the weight methods act on FSDP2 shards (statistics summed over ranks, a layer gathered at a time)
        self.supports_sharding = self.method != "channels"
        if self.method == "channels":
            self.removal_refusal = "method='channels' removes units too (one callback removes units per fit)"
        # (its unstructured masks are cut with the weights; N:M groups run along the input dim, which a cut
        # shifts: PruningCallback.follows_removal)
        self.follows_removal = self.method != "channels" and pattern is None
        if self.method != "channels" and pattern is not None:
            self.removal_refusal = (f"pattern={pattern!r} groups consecutive weights along the input"
                                    " dimension, which the cut shifts (the cut masks would no longer be N:M)")
        self.importance = importance
        self.criterion = self._criterion(importance)
        self.target_sparsity = check_fraction("target_sparsity", target_sparsity,
                                              hint="0.5 prunes half of every layer's weights.")
        self.pattern = pattern
        self._nm = check_pattern(pattern, self.target_sparsity, MisconfigurationException)
        self.target_flops, self.target_params, self.target_latency = check_size_targets(
            target_flops, target_params, target_latency)
        self.latency_device, self.latency_batch_size, self.latency_model = check_latency_options(
            latency_device, latency_batch_size, latency_model)
        for name, value in (("target_flops", self.target_flops), ("target_params", self.target_params),
                            ("target_latency", self.target_latency)):
            if value is not None and self.method != "channels":
                raise MisconfigurationException(
                    f"`{name}` asks for a size: it needs method='channels', got method={self.method!r}."
                    " HINT: weight methods prune to `target_sparsity`.")
        if self._nm is not None and self.method == "channels":
            raise MisconfigurationException(
                f"`pattern`={pattern!r} prunes weights N:M; it does not go with method='channels'.")
        self.calibration_batches = check_int("calibration_batches", calibration_batches, 1,
                                             hint="4 batches of 32: SparseGPT's 128 samples.")
        self.compensate = check_bool("compensate", compensate)
        self.prune_step = check_position("prune_step", prune_step,
                                         hint="0 prunes at the start of fit; 0.5 after half of training.")
        self.damping = check_positive("damping", damping, hint="0.01 is the papers' 1%.")
        self.block_size = check_int("block_size", block_size, 1, hint="128 is SparseGPT's.")
        self.round_to = check_int("round_to", round_to, 1, hint="8 keeps widths multiples of 8.")
        self.input_size = check_input_size("input_size", input_size)
        self.shrink = ShrinkSchedule(self.method == "channels", None, None, type(self).__name__)
        # state
        self.done = False
        self.prune_at_step: int | None = None
        self.errors: dict[str, float] = {}
        self.flops_remaining: float | None = None
        self.groups: list[Any] | None = None
        self._cost: Any = None
        self._channels: tuple[str, nn.Module, Any] | None = None  # (prefix, traced root, example)
        #: the ``(C, H, W)`` the channels were traced at (None: the module's example input or timm's size)
        self.traced_size: tuple[int, ...] | None = None
        self._batches: list[Any] | None = None  # the calibration batches, until the pruning step

    def _criterion(self, importance: Any) -> Any:
        """The ``importance`` criterion (``None``: the calibration activations); refused for weight methods.
        A gradient criterion (``"taylor"``) is fed the gradients of the training step's loss on the
        calibration batches (:meth:`calibration_loss`)."""
        with as_misconfiguration():
            return check_importance(importance, self.method, type(self).__name__, MisconfigurationException)

    # ------------------------------------------------------------------ identity and targets
    @override
    def state_key_args(self) -> dict[str, Any]:
        key = {**super().state_key_args(), "method": self.method, "target_sparsity": self.target_sparsity}
        for name in ("pattern", "target_flops", "target_params", "target_latency"):
            if getattr(self, name) is not None:
                key[name] = getattr(self, name)
        return key

    @override
    def select_targets(self, pl_module: pl.LightningModule) -> list[Target]:
        targets = super().select_targets(pl_module)
        if self.method == "channels":
            return targets
        bad = [t.name for t in targets if isinstance(t.module, nn.Conv3d)
               or not isinstance(t.module, (nn.Linear, nn.Conv1d, nn.Conv2d))]
        if bad and self.method != "magnitude":
            raise MisconfigurationException(
                f"method={self.method!r} prunes Linear, Conv1d and Conv2d weights; {bad[:4]} are not. HINT:"
                " `exclude=[...]` them, or narrow `types`.")
        return targets

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.method != "channels":
            return
        fit = trainer is not None and stage == "fit"
        if fit:  # every fit, also one after a validate/test that already found the groups
            check_strategy(trainer, type(self).__name__)
            refuse_removal_conflicts(trainer, self, f"{type(self).__name__}(method='channels')")
            if self.criterion is not None and self.criterion.needs_gradients:
                self._refuse_manual_optimization(pl_module)
        if trainer is not None:  # (a checkpoint of the compressed model loads in trainer.test/validate too)
            self.shrink.install_resume(trainer, self.state_key,
                                       lambda state: self._apply_removed(trainer, pl_module, state))
        if (self.groups is not None and self._channels is not None
                and self._channels[1] in set(pl_module.modules())):
            return
        # traced where the model trains: the first training batch's shape unless `input_size` or the module's
        # example_input_array says otherwise (at timm's pretrained size, SAM2-Hiera's 896x896, the analysis
        # did not finish and FLOPs were counted at the wrong size)
        size = self.traced_size = traced_input_size(self.input_size, trainer, pl_module, type(self).__name__,
                                                    self.verbose)
        with as_misconfiguration(), input_size_errors(size):
            from lightning_prune.graph import example_inputs_for, traced_root

            _, root = traced_root(pl_module)
            example = example_inputs_for(root, size)
            prefix, root, groups, cost, example = find_channel_groups(
                pl_module, self.include, self.exclude, size, example)
        self.groups, self._cost, self._channels = groups, cost, (prefix, root, example)

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.method == "channels":  # frozen readers vs the other callbacks' masks (every target is known)
            refuse_frozen_conflicts(trainer, self, self.groups, f"{type(self).__name__}(method='channels')")
            if not self.done:
                refuse_spawn_freezing(trainer, self.groups, f"{type(self).__name__}(method='channels')")
        if self.prune_at_step is None:
            self.prune_at_step = int(resolve_step("prune_step", self.prune_step, trainer) or 0)
        if not self.done:
            warn_if_after_training(type(self).__name__, trainer, "prune_step", self.prune_step,
                                   self.prune_at_step, "the model is never pruned")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.done:
            return
        # drawn at the start of every fit (a resumed one too), the random states left as they were: a fit
        # resumed before the pruning step prunes on the same batches as the uninterrupted one
        if self.method != "magnitude":
            with as_misconfiguration():
                self._batches = draw_batches(calibration_loader(trainer), self.calibration_batches,
                                             type(self).__name__)
        if trainer.global_step >= (self.prune_at_step or 0):
            self.prune(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self.done and self.prune_at_step is not None and trainer.global_step >= self.prune_at_step:
            self.prune(trainer, pl_module)

    # ------------------------------------------------------------------ pruning
    def _progress(self, what: str) -> Any:
        def report(i: int, n: int, layer: str, error: float) -> None:
            if self.verbose:
                shown = "" if error != error else f": relative output error {error:.4g}"
                rank_zero_info(f"[OneShotPruning] {what} {i}/{n} {layer}{shown}")
        return report

    @torch.no_grad()
    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw the calibration batches, prune once, log; the fit then fine-tunes the pruned model."""
        from lightning_prune.graph import traced_root

        batches, self._batches = self._batches or [], None
        if self.method != "magnitude" and not batches:
            with as_misconfiguration():
                batches = draw_batches(calibration_loader(trainer), self.calibration_batches,
                                       type(self).__name__)
        if self.method != "magnitude" and sharded_model(pl_module):
            batches = batches[:self._fewest(trainer, len(batches))]
        _, root = traced_root(pl_module)

        def forward(model: nn.Module, batch: Any) -> Any:
            return default_forward(root, batch)

        reduce = None
        if trainer.world_size > 1:
            def reduce(t: Tensor) -> Tensor:
                return trainer.strategy.reduce(t.clone(), reduce_op="sum")
        with as_misconfiguration():
            if self.method == "channels":
                self._prune_channels(trainer, pl_module, batches, forward, reduce)
            else:
                self._prune_weights(trainer, pl_module, batches, forward, reduce)
        self.done = True

    @staticmethod
    def _fewest(trainer: pl.Trainer, count: int) -> int:
        """The fewest calibration batches any rank drew: under FSDP2 every forward needs every rank."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return count
        fewest = torch.tensor([count], dtype=torch.int64, device=trainer.strategy.root_device)
        dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
        return int(fewest.item())

    def _prune_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any],
                       forward: Any, reduce: Any) -> None:
        assert self.masks is not None
        targets = [t for t in self.targets if t.name in set(self.weight_names)]
        masks, errors = prune_unstructured(pl_module, targets, self.method, batches, self.target_sparsity,
                                           self._nm, forward, reduce, self.damping, self.block_size,
                                           self._progress("layer"))
        self.errors = {k: float(v) for k, v in errors.items()}
        self.update_masks({n: m & self.masks[n].to(m.device) for n, m in masks.items()}, trainer)
        log_scalars(trainer, self.error_metrics())

    def _prune_channels(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any],
                        forward: Any, reduce: Any) -> None:
        from lightning_prune.graph import frozen_names, restricted_norm_hooks

        assert self.groups is not None and self._channels is not None
        prefix, root, example = self._channels
        latency = None
        if self.target_latency is not None:
            latency = self.latency_model
            if latency is None:
                from lightning_prune.core.one_shot import one_shot_latency_model

                latency = one_shot_latency_model(root, example, self.groups, prefix, batches,
                                                 self.latency_device or trainer.strategy.root_device,
                                                 self.latency_batch_size, reduce)
                if self.verbose:
                    rank_zero_info(f"[OneShotPruning] {latency.describe()}")
        generator = (seeded_generator(None, trainer) if self.criterion is not None
                     and self.criterion.needs_generator else None)
        loss_fn = None
        if self.criterion is not None and self.criterion.needs_gradients:
            def loss_fn(model: nn.Module, batch: Any) -> Any:
                index = next((i for i, b in enumerate(batches) if b is batch), 0)
                return self.calibration_loss(trainer, pl_module, batch, index)
        old = {id(p): n for n, p in pl_module.named_parameters()}
        before = set(frozen_names(pl_module))
        removed, errors = prune_channels(pl_module, batches, self.groups, self._cost, prefix, root,
                                         self.target_flops, self.target_params, self.target_sparsity,
                                         self.compensate, self.round_to, forward, reduce,
                                         self._progress("reader"), self.damping,
                                         target_latency=self.target_latency, latency=latency,
                                         importance=self.criterion, generator=generator, loss_fn=loss_fn)
        latency_metrics = {}
        if latency is not None:
            predicted = float(latency.predict(removed))
            measure = getattr(latency, "measure", None)
            measured = measure(removed) if measure is not None else None
            latency_metrics = {f"{PREFIX}/latency_remaining": float(measured) if measured is not None
                               else predicted, f"{PREFIX}/latency_predicted": predicted}
        frozen = set(frozen_names(pl_module)) - before  # (weight-standardised readers, now plain layers)
        if frozen:
            self.shrink.frozen = sorted(set(self.shrink.frozen) | frozen)
            follow_replaced_parameters(trainer, pl_module, old, {f"{n}.weight" for n in frozen})
        self.errors = {k: float(v) for k, v in errors.items()}
        self.flops_remaining, params = self._cost.measured_ratios(removed)
        handles = restricted_norm_hooks(root, self.groups, removed, prefix=prefix)
        try:
            cuts = compress_in_fit(trainer, pl_module, self.groups, removed, example)
        finally:
            for h in handles:
                h.remove()
        self.shrink.removed = removed
        self.retarget(pl_module)
        others_follow_removal(trainer, self, pl_module, cuts)
        units = sum(len(v) for v in removed.values())
        metrics = {f"{PREFIX}/flops_remaining": float(self.flops_remaining),
                   f"{PREFIX}/params_remaining": float(params), **latency_metrics, **self.error_metrics()}
        log_scalars(trainer, metrics)
        if self.verbose:
            rank_zero_info(f"[OneShotPruning] removed {units} units of {sum(g.size for g in self.groups)}:"
                           f" {self.flops_remaining:.1%} of the FLOPs, {params:.1%} of the parameters left;"
                           " fine-tuning continues")

    def _refuse_manual_optimization(self, pl_module: pl.LightningModule) -> None:
        """A gradient criterion runs the training_step on the calibration batches: refused (at setup) under
        manual optimization, whose training_step steps the optimizers itself."""
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                f"importance={self.importance!r} ranks units by the gradients of the training_step loss on"
                " the calibration batches, but the LightningModule uses manual optimization (its"
                " training_step steps the optimizers itself). HINT: importance=None (the calibration"
                " activations), or lp.prune_one_shot(model, loader, method='channels', importance='taylor',"
                " loss_fn=...).")

    def calibration_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                         batch_idx: int) -> Any:
        """The loss of ``pl_module.training_step(batch, batch_idx)`` on a calibration batch (moved to the
        device by the strategy; a dict's ``"loss"``), with ``self.log`` silenced: the ranking's backward is
        not a training step. Manual optimization is refused (at setup too: its training_step steps the
        optimizers)."""
        self._refuse_manual_optimization(pl_module)
        batch = trainer.strategy.batch_to_device(batch)
        silenced = {name: pl_module.__dict__.get(name) for name in ("log", "log_dict")}
        pl_module.__dict__["log"] = pl_module.__dict__["log_dict"] = lambda *args, **kwargs: None
        try:
            out = pl_module.training_step(batch, batch_idx)
        finally:
            for name, value in silenced.items():
                if value is None:
                    pl_module.__dict__.pop(name, None)
                else:
                    pl_module.__dict__[name] = value
        if isinstance(out, dict):
            out = out.get("loss")
        if out is None:
            raise MisconfigurationException(
                f"importance={self.importance!r} needs the loss of training_step on the calibration batches,"
                " but it returned None (or a dict without 'loss'). HINT: importance=None (the calibration"
                " activations).")
        return out

    def error_metrics(self) -> dict[str, float]:
        """``prune/one_shot/error`` (the mean) and ``prune/one_shot/error/<layer>``: relative reconstruction
        errors of the layers' outputs on the calibration inputs."""
        if not self.errors:
            return {}
        metrics = {f"{PREFIX}/one_shot/error": sum(self.errors.values()) / len(self.errors)}
        metrics.update({f"{PREFIX}/one_shot/error/{k}": v for k, v in self.errors.items()})
        return metrics

    def _apply_removed(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                       state: dict[str, Any]) -> dict[str, list[tuple[int, Tensor]]] | None:
        """Resume: the checkpoint holds the smaller model; take its shapes (and the other callbacks' masks
        theirs) before Lightning loads them. Returns the cuts made."""
        from lightning_prune.graph import parameter_cuts, slice_units

        if self.shrink.removed is not None or self.groups is None:
            return None
        removed = recorded_removal(state, self.groups)
        cuts = parameter_cuts(pl_module, self.groups, removed)
        slice_units(pl_module, self.groups, removed)
        self.shrink.removed = removed
        self.retarget(pl_module)
        others_follow_removal(trainer, self, pl_module, cuts)
        return cuts

    # ------------------------------------------------------------------ state
    @override
    def extra_state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "prune_at_step": self.prune_at_step, "errors": dict(self.errors),
                "flops_remaining": self.flops_remaining, "shrink": self.shrink.state_dict()}

    @override
    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        self.done = bool(state.get("done", False))
        at = state.get("prune_at_step")
        self.prune_at_step = int(at) if at is not None else None
        self.errors = {str(k): float(v) for k, v in dict(state.get("errors", {})).items()}
        flops = state.get("flops_remaining")
        self.flops_remaining = float(flops) if flops is not None else None
        removed_before = self.shrink.removed
        self.shrink.load_state_dict(state.get("shrink"))
        if removed_before is not None:  # (the resume hook sliced the model already)
            self.shrink.removed = removed_before

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_cost"] = None  # process-local (holds the model); ddp_spawn workers run setup again
        state["_channels"] = None
        state["_batches"] = None
        return state

