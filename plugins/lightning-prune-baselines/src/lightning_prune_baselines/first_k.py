"""The "first k channels" control of channel-pruning experiments.

From the Habr article «Редукция нейронных сетей при помощи вариационной оптимизации» ("Reducing neural
networks with variational optimisation", in Russian: channel pruning with mask layers, group LASSO and L0
gates on CIFAR): "as a trivial reference point, to check that the algorithms do anything at all, drop the
first k neurons of every layer and fine-tune the resulting network." A learned criterion that cannot beat this
is not learning which channels matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_prune.callbacks.schedules import resolve_step
from lightning_prune.core.importance import Importance, ImportanceContext, register_importance
from lightning_prune.graph import DEFAULT_ANALYSIS_TIME_LIMIT_S, ChannelGroup
from lightning_prune.validation import check_exclusive, check_fraction, check_position
from lightning_prune_baselines._base import ChannelBaseline

__all__ = ["FirstKChannels", "FirstKImportance"]


@register_importance("first_k")
class FirstKImportance(Importance):
    """``importance="first_k"`` on any channel callback: the later a unit, the more it matters (the first
    units go); a control, as the Habr article's."""

    normalize = False
    reads_weights = False

    def group_scores(self, group: ChannelGroup, context: ImportanceContext) -> Tensor | None:
        return torch.arange(group.size, dtype=torch.float64)


class FirstKChannels(ChannelBaseline):
    """Drop the first k units of every channel group, then fine-tune (the Habr channel-pruning control).

    In each targeted Conv/Linear layer with ``C`` output channels the first
    ``k = C - max(round(C * (1 - target_sparsity)), 1)`` channels are pruned -- in every channel group of
    lightning-prune's analysis (a layer's channels, a residual stream, attention heads, conv groups), every
    tensor the unit touches: the producers' filters and biases, the norms after them, the readers' columns --
    so nothing reads a pruned unit. The masks are installed at the end of the first training batch after which
    ``trainer.global_step`` has reached ``prune_step`` (``prune_epoch`` ``e``: the step at which epoch ``e``
    starts) and kept for the rest of training: training goes on as fine-tuning of the narrower network, which
    ``compress=True`` compresses the model right then (or at ``compress_step`` / ``compress_epoch``).

    Args:
        target_sparsity: fraction of each layer's output channels to drop, in [0, 1); at least one channel
            stays.
        prune_step: when to prune: an optimizer step or a fraction of training (float in [0, 1]); default
            (neither this nor ``prune_epoch``): 0, right at the start.
        prune_epoch: the same as an epoch (at its first batch) or a fraction of training.
        include, exclude, types, log_media_every_n_epochs, verbose: see
            :class:`~lightning_prune.PruningCallback`.
        input_size, compress, compress_step, compress_epoch, analysis_time_limit_s: see
            :class:`~lightning_prune.callbacks.channels.ChannelPruningCallback`.
        importance, min_group_keep, max_group_sparsity, recalibrate_bn_batches: see
            :class:`~lightning_prune.callbacks.channels.ChannelPruningCallback` (default importance:
            ``"first_k"``, this control's own criterion, also registered for every channel callback once this
            plugin is imported).
        group_targets: ``{group name: fraction}``: the named channel groups drop that fraction of their
            units (the first ones) instead of ``target_sparsity``, e.g. what
            :func:`lightning_prune.layer_targets_from_sensitivity` makes of a ``method="channels"`` scan.

    Example::

        first_k = lightning_prune.create_callback("first_k", target_sparsity=0.5, prune_epoch=5,
                                                  compress=True)
        trainer = Trainer(callbacks=[first_k])
    """

    native_importance = "first_k"

    def __init__(
        self,
        target_sparsity: float = 0.5,
        prune_step: int | float | None = None,
        prune_epoch: int | float | None = None,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        types: list[str | type] | None = None,
        log_media_every_n_epochs: int = 1,
        verbose: bool = True,
        input_size: Sequence[int] | None = None,
        compress: bool = False,
        compress_step: int | float | None = None,
        compress_epoch: int | float | None = None,
        group_targets: dict[str, float] | None = None,
        analysis_time_limit_s: float | None = DEFAULT_ANALYSIS_TIME_LIMIT_S,
        *,
        importance: str | Importance | None = None,
        min_group_keep: float = 0.0,
        max_group_sparsity: float | None = None,
        recalibrate_bn_batches: int = 8,
    ) -> None:
        super().__init__(include=include, exclude=exclude, types=types,
                         log_media_every_n_epochs=log_media_every_n_epochs, verbose=verbose,
                         input_size=input_size, compress=compress, compress_step=compress_step,
                         compress_epoch=compress_epoch, group_targets=group_targets,
                         importance=importance, min_group_keep=min_group_keep,
                         max_group_sparsity=max_group_sparsity, recalibrate_bn_batches=recalibrate_bn_batches,
                         analysis_time_limit_s=analysis_time_limit_s)
        self.target_sparsity = check_fraction(
            "target_sparsity", target_sparsity,
            hint="the fraction of channels dropped; 0.5 halves every layer.",
        )
        hint = "0 prunes at the start of training; 0.5 halfway through."
        check_exclusive(prune_step=prune_step, prune_epoch=prune_epoch, hint=hint)
        self.prune_step = check_position("prune_step", prune_step, allow_none=True, hint=hint)
        self.prune_epoch = check_position("prune_epoch", prune_epoch, allow_none=True, hint=hint)
        self._prune_at_step: int | None = None

    @override
    def state_key_args(self) -> dict[str, Any]:
        return {**super().state_key_args(), "target_sparsity": self.target_sparsity}

    @override
    def extra_state_dict(self) -> dict[str, Any]:
        return {**super().extra_state_dict(), "prune_at_step": self._prune_at_step}

    @override
    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        super().load_extra_state_dict(state)
        self._prune_at_step = state.get("prune_at_step", self._prune_at_step)

    @property
    def pruned(self) -> bool:
        return self.updated_at_step is not None

    def prune_at_step(self, trainer: pl.Trainer) -> int:
        """The optimizer step at which the channels go (resolved on first use and checkpointed)."""
        if self._prune_at_step is None:
            name = "prune_epoch" if self.prune_epoch is not None else "prune_step"
            self._prune_at_step = resolve_step(name, getattr(self, name) or 0, trainer)
        return self._prune_at_step

    @override
    def decided_at_step(self, trainer: pl.Trainer) -> int:
        return self.prune_at_step(trainer)

    @override
    def due(self, trainer: pl.Trainer) -> float | None:
        if self.pruned:
            return None
        return self.target_sparsity if trainer.global_step >= self.prune_at_step(trainer) else None

    @override
    def unit_scores(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """The later a unit, the more it matters: the first units go."""
        assert self.groups is not None
        return {g.name: torch.arange(g.size, dtype=torch.float32) for g in self.groups}
