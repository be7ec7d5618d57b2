"""Random unstructured (weight-level) pruning: the control for magnitude and lottery-ticket pruning.

Random pruning at a matched layer-wise sparsity is the standard control of Frankle & Carbin, "The Lottery
Ticket Hypothesis", ICLR 2019, arXiv:1803.03635 (their "randomly pruned" networks), here on the gradual
schedule of Zhu & Gupta 2017, arXiv:1710.01878.
"""

from __future__ import annotations

from torch import Tensor
from typing_extensions import override

from lightning_prune.core.sharding import gather_full
from lightning_prune_baselines._base import ScheduledBaselinePruning
from lightning_prune_baselines.channels import nested_random_keep

__all__ = ["RandomUnstructured"]


class RandomUnstructured(ScheduledBaselinePruning):
    """Seeded random pruning of individual weights, in one shot or on a polynomial schedule.

    At each mask update every targeted weight tensor with ``N`` entries keeps exactly
    ``max(round(N * (1 - s)), 1)`` of them, ``s`` the scheduled sparsity; the weights to drop are drawn
    uniformly among the survivors of the previous update (masks are nested) from the callback's own
    seeded generator.

    Args:
        target_sparsity: final fraction of weights pruned in every targeted layer, in [0, 1).
        initial_sparsity, begin_step, end_step, every_n_steps, sparsity_begin_step, sparsity_end_step,
            exponent, seed: the schedule and the generator, as for
            :class:`~lightning_prune.GradualMagnitudePruning` (see
            :class:`~lightning_prune_baselines._base.ScheduledBaselinePruning`).
        include, exclude, types, log_media_every_n_epochs, verbose: see
            :class:`~lightning_prune.PruningCallback`.

    Example::

        RandomUnstructured(target_sparsity=0.9, sparsity_end_step=0.75, every_n_steps=10)
    """

    channel_wise = False
    #: under ModelParallelStrategy (FSDP2) the draws are made over each weight's full mask (gathered, 1 byte
    #: per weight, one tensor at a time) from the shared generator, so every rank keeps its part of DDP's mask
    supports_sharding = True
    #: beside a channel callback's in-fit removal (``compress=True``) the masks are cut with the weights and
    #: the next draws keep their share of the smaller tensors (``PruningCallback.follows_removal``)
    follows_removal = True

    @override
    def compute_masks(self, sparsity: float) -> dict[str, Tensor]:
        assert self.masks is not None
        generator = self.generator()
        new = {n: nested_random_keep(gather_full(self.masks[n], self.masks.param(n)), sparsity, generator)
               for n in self.weight_names}
        self.save_generator(generator)
        return new
