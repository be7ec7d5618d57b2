"""Random channel pruning: the control that any structured criterion has to beat.

Random pruning as a baseline for channel pruning, as in Liu et al., "Rethinking the Value of Network
Pruning", ICLR 2019, arXiv:1810.05270, and Li et al., "Revisiting Random Channel Pruning for Neural
Network Compression", CVPR 2022, arXiv:2205.05676; on the gradual schedule of Zhu & Gupta 2017,
arXiv:1710.01878.
"""

from __future__ import annotations

from torch import Tensor
from typing_extensions import override

from lightning_prune_baselines._base import ScheduledBaselinePruning
from lightning_prune_baselines.channels import channel_masks, nested_random_keep

__all__ = ["RandomChannels"]


class RandomChannels(ScheduledBaselinePruning):
    """Seeded random pruning of whole output channels, in one shot or on a polynomial schedule.

    At each mask update every targeted layer with ``C`` output channels keeps
    ``max(round(C * (1 - s)), 1)`` of them, ``s`` the scheduled sparsity; the channels to drop are drawn
    among the survivors of the previous update (masks are nested) from the callback's own seeded
    generator. A dropped channel loses its weight row, its bias entry and the following BatchNorm's
    ``weight`` and ``bias`` entries, so its output is exactly zero.

    Args:
        target_sparsity: final fraction of output channels dropped in every targeted layer, in [0, 1).
        initial_sparsity, begin_step, end_step, every_n_steps, sparsity_begin_step, sparsity_end_step,
            exponent, seed: the schedule and the generator, as for
            :class:`~lightning_prune.GradualMagnitudePruning` (see
            :class:`~lightning_prune_baselines._base.ScheduledBaselinePruning`).
        include, exclude, types, log_media_every_n_epochs, verbose: see
            :class:`~lightning_prune.PruningCallback`.

    Example::

        RandomChannels(target_sparsity=0.5)                                   # one shot at the start
        RandomChannels(target_sparsity=0.5, sparsity_end_step=0.5, every_n_steps=20, seed=3)  # first half
    """

    channel_wise = True

    @override
    def compute_masks(self, sparsity: float) -> dict[str, Tensor]:
        assert self.masks is not None and self.groups is not None
        params = {n: self.masks.param(n) for n in self.masks}
        generator = self.generator()
        keep = {
            g.weight: nested_random_keep(self.channel_keep(g.weight), sparsity, generator)
            for g in self.groups
        }
        self.save_generator(generator)
        return channel_masks(self.groups, params, keep)
