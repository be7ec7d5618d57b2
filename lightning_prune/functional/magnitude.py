"""Magnitude scores, thresholds and masks (Zhu & Gupta 2017; TensorFlow ``model_pruning`` semantics)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["block_magnitude", "kept_count", "kth_largest", "magnitude_mask", "threshold_mask"]


def kept_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights survive at ``sparsity``: ``max(round(numel * (1 - s)), 1)``."""
    return max(int(round(numel * (1.0 - sparsity))), 1)


def block_magnitude(weight: Tensor, block_size: Sequence[int] | None = None, pooling: str = "avg") -> Tensor:
    """``|weight|``, pooled over ``(bh, bw)`` blocks for 2-D weights and expanded back to the weight's shape.

    Blocks are cut from the top-left corner, as TensorFlow does with ``'SAME'`` pooling: the last row and
    column of blocks may be partial and are averaged over their real elements. ``-1`` means the whole
    dimension. Weights that are not 2-D are scored per element.
    """
    score = weight.detach().abs()
    if block_size is None or weight.dim() != 2 or tuple(block_size) == (1, 1):
        return score
    rows, cols = weight.shape
    bh, bw = (rows if block_size[0] == -1 else block_size[0]), (cols if block_size[1] == -1 else block_size[1])
    pad = (0, (-cols) % bw, 0, (-rows) % bh)
    padded = F.pad(score, pad)[None, None]
    if pooling == "avg":
        sums = F.avg_pool2d(padded, (bh, bw), stride=(bh, bw), divisor_override=1)
        counts = F.avg_pool2d(F.pad(torch.ones_like(score), pad)[None, None], (bh, bw), stride=(bh, bw),
                              divisor_override=1)
        pooled = sums / counts
    elif pooling == "max":
        pooled = F.max_pool2d(padded, (bh, bw), stride=(bh, bw))
    else:
        raise ValueError(f"Unknown block pooling {pooling!r}; expected 'avg' or 'max'.")
    expanded = pooled[0, 0].repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return expanded[:rows, :cols]


def kth_largest(scores: Tensor, k: int) -> Tensor:
    """The ``k``-th largest value of a flat tensor (``k >= 1``)."""
    flat = scores.reshape(-1)
    k = min(max(k, 1), flat.numel())
    return torch.kthvalue(flat.float(), flat.numel() - k + 1).values


def threshold_mask(scores: Tensor, threshold: Tensor | float) -> Tensor:
    """Keep scores ``>= threshold`` (ties keep extra weights, as TFMOT does); zeros are never kept.

    Never keeping zeros makes masks nested: weights pruned (and zeroed) at one update stay pruned.
    """
    return (scores >= threshold) & (scores > 0)


def magnitude_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep the ``kept_count(numel, sparsity)`` largest scores of one tensor."""
    return threshold_mask(scores, kth_largest(scores, kept_count(scores.numel(), sparsity)))
