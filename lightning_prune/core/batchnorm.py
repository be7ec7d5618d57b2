"""BatchNorm statistics recalibrated after a removal: running means and variances recomputed on a few batches.

Removing units changes what every BatchNorm after them sees; the running statistics of the dense model then
mis-normalise the pruned one until fine-tuning has moved them. :func:`recalibrate_batchnorm` resets the
running statistics of the norms, runs the model forward on a few batches without gradients, the norms in
training mode with a cumulative average (``momentum=None``) and every other module in evaluation mode
(dropout off, nothing else changes), and restores each module's mode and momentum: the weights are not
touched, and the statistics are those a fresh pass over the batches computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["batch_norms", "recalibrate_batchnorm"]


def batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorms of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Sequence[Any], forward: Callable[[nn.Module, Any], Any],
                          norms: Iterable[_BatchNorm] | None = None) -> int:
    """Recompute the running statistics of ``norms`` (default: :func:`batch_norms`) on ``batches`` (each
    passed as ``forward(model, batch)``); returns the number of norms recalibrated (0 without batches)."""
    norms = list(batch_norms(model) if norms is None else norms)
    if not norms or not batches:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average over the batches
            norm.train()
        for batch in batches:
            forward(model, batch)
    finally:
        for module, mode in modes:
            module.training = mode
        for norm, momentum in momenta:
            norm.momentum = momentum
    return len(norms)
