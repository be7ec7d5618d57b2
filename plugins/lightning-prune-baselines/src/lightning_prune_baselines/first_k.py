"""The "first k channels" control of channel-pruning experiments.

From the seed article on channel pruning with mask layers (group LASSO and L0 gates on CIFAR): "as a
trivial reference point, to check that the algorithms do anything at all, drop the first k neurons of
every layer and fine-tune the resulting network." A learned criterion that cannot beat this is not
learning which channels matter.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_prune.callbacks.base import check_fraction, check_int
from lightning_prune_baselines._base import BaselinePruning
from lightning_prune_baselines.channels import channel_masks, first_k_pruned

__all__ = ["FirstKChannels"]


class FirstKChannels(BaselinePruning):
    """Drop the first k output channels of every targeted layer once, then fine-tune (the seed's baseline).

    In each targeted Conv/Linear layer with ``C`` output channels the first
    ``k = C - max(round(C * (1 - amount)), 1)`` channels are pruned: their weight rows (whole filters),
    their bias entries and, when a BatchNorm directly follows the layer, its ``weight`` and ``bias``
    entries, so the channel outputs exactly zero. The masks are installed at the end of the first training
    batch of epoch ``prune_epoch`` (or, when ``prune_step`` is set, of the first batch after which
    ``trainer.global_step >= prune_step``) and kept for the rest of training: training goes on as
    fine-tuning of the narrower network.

    Args:
        amount: fraction of each layer's output channels to drop, in [0, 1); at least one channel stays.
        prune_epoch: the epoch in which to prune (0 = right at the start).
        prune_step: prune after this many optimizer steps instead (overrides ``prune_epoch``).
        include, exclude, log_masks_every_n_epochs, verbose: see :class:`~lightning_prune.PruningCallback`.

    Example::

        trainer = Trainer(callbacks=[lightning_prune.create_callback("first_k", amount=0.5, prune_epoch=5)])
    """

    def __init__(
        self,
        amount: float = 0.5,
        prune_epoch: int = 0,
        prune_step: int | None = None,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        log_masks_every_n_epochs: int = 1,
        verbose: bool = True,
    ) -> None:
        super().__init__(include, exclude, log_masks_every_n_epochs, verbose)
        self.amount = check_fraction(
            "amount", amount, hint="amount is the fraction of channels dropped; 0.5 halves every layer."
        )
        self.prune_epoch = check_int("prune_epoch", prune_epoch, 0, hint="0 prunes at the start of training.")
        self.prune_step = (
            None
            if prune_step is None
            else check_int("prune_step", prune_step, 0, hint="leave it None to prune at `prune_epoch`.")
        )

    @override
    def state_key_args(self) -> dict[str, Any]:
        return {**super().state_key_args(), "amount": self.amount}

    @property
    def pruned(self) -> bool:
        return self.last_update >= 0

    @override
    def due(self, trainer: pl.Trainer) -> float | None:
        if self.pruned:
            return None
        if self.prune_step is not None:
            return self.amount if trainer.global_step >= self.prune_step else None
        return self.amount if trainer.current_epoch >= self.prune_epoch else None

    @override
    def compute_masks(self, sparsity: float) -> dict[str, Tensor]:
        assert self.masks is not None and self.groups is not None
        params = {n: self.masks.param(n) for n in self.masks}
        keep = {}
        for group in self.groups:
            channels = params[group.weight].shape[0]
            keep[group.weight] = torch.arange(channels) >= first_k_pruned(channels, sparsity)
        return channel_masks(self.groups, params, keep)
