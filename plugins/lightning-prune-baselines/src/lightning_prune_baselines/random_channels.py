"""Random channel pruning: the control that any structured criterion has to beat.

Random pruning as a baseline for channel pruning, as in Liu et al., "Rethinking the Value of Network
Pruning", ICLR 2019, arXiv:1810.05270, and Li et al., "Revisiting Random Channel Pruning for Neural
Network Compression", CVPR 2022, arXiv:2205.05676; on the gradual schedule of Zhu & Gupta 2017,
arXiv:1710.01878.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_prune.core.importance import Importance
from lightning_prune.graph import DEFAULT_ANALYSIS_TIME_LIMIT_S, ChannelGroup
from lightning_prune_baselines._base import ChannelBaseline, GradualSchedule

__all__ = ["RandomChannels"]


class RandomChannels(GradualSchedule, ChannelBaseline):
    """Seeded random pruning of whole channel units, in one shot or on a polynomial schedule.

    At each mask update every channel group with ``U`` units (lightning-prune's analysis: a layer's channels,
    a residual stream, attention heads, conv groups) keeps ``max(round(U * (1 - s)), 1)`` of them, ``s`` the
    scheduled sparsity; the units to drop are drawn among the survivors of the previous update (masks are
    nested) from the callback's own seeded generator. Every tensor a dropped unit touches is masked (filters,
    BatchNorm entries, the readers' columns), so nothing reads it.

    Args:
        target_sparsity: final fraction of the units dropped in every channel group, in [0, 1).
        initial_sparsity, begin_step, end_step, every_n_steps, sparsity_begin_step, sparsity_end_step,
            exponent, seed: the schedule and the generator, as for
            :class:`~lightning_prune.GradualMagnitudePruning` (see
            :class:`~lightning_prune_baselines._base.GradualSchedule`).
        include, exclude, types, log_media_every_n_epochs, verbose: see
            :class:`~lightning_prune.PruningCallback`.
        input_size, compress, compress_step, compress_epoch, analysis_time_limit_s: see
            :class:`~lightning_prune.callbacks.channels.ChannelPruningCallback` (the units are decided once
            the schedule reached ``target_sparsity``, or at ``end_step``).
        group_targets: ``{group name: fraction}``: the named channel groups end at that fraction of their
            units dropped instead of ``target_sparsity``, on the same schedule (at scheduled sparsity ``s`` a
            named group drops ``fraction * s / target_sparsity``); e.g. what
            :func:`lightning_prune.layer_targets_from_sensitivity` makes of a ``method="channels"`` scan.
        importance, min_group_keep, max_group_sparsity, recalibrate_bn_batches: see
            :class:`~lightning_prune.callbacks.channels.ChannelPruningCallback` (default ``"random"``: this
            baseline's own nested draws from its schedule's generator; another criterion makes it a gradual
            schedule of that criterion).

    Example::

        RandomChannels(target_sparsity=0.5)                                   # one shot at the start
        RandomChannels(target_sparsity=0.5, compress=True)                    # ... and removed at once
        RandomChannels(target_sparsity=0.5, sparsity_end_step=0.5, every_n_steps=20, seed=3)  # first half
    """

    channel_wise = True
    native_importance = "random"  # (its own draws: nested masks, the schedule's generator)

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
        self.init_schedule(target_sparsity, initial_sparsity, begin_step, end_step, every_n_steps,
                           sparsity_begin_step, sparsity_end_step, exponent, seed)

    @override
    def group_sparsity(self, group: ChannelGroup, sparsity: float) -> float:
        """A named group follows the schedule scaled to end at its ``group_targets`` fraction."""
        fraction = self._group_targets.get(group.name)
        if fraction is None:
            return sparsity
        return fraction * (sparsity / self.target_sparsity if self.target_sparsity > 0 else 1.0)

    @override
    def unit_scores(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """Uniform draws from the callback's generator; the units dropped before score -1 (nested masks)."""
        assert self.groups is not None
        generator = self.generator()
        previous = self.keep or [torch.ones(g.size, dtype=torch.bool) for g in self.groups]
        scores = {}
        for group, kept in zip(self.groups, previous):
            score = torch.rand(group.size, generator=generator)  # (as many draws whatever the sparsity)
            score[~kept] = -1.0
            scores[group.name] = score
        self.save_generator(generator)
        return scores
