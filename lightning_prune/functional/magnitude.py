"""Magnitude scores, thresholds and masks (Zhu & Gupta 2017; TensorFlow ``model_pruning`` semantics)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "block_magnitude",
    "kept_count",
    "kth_largest",
    "kth_largest_across",
    "kth_largest_of",
    "magnitude_mask",
    "threshold_mask",
]


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
    bh = rows if block_size[0] == -1 else block_size[0]
    bw = cols if block_size[1] == -1 else block_size[1]
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


@torch.no_grad()
def kth_largest_of(tensors: Sequence[Tensor], k: int, bins: int = 2048) -> Tensor:
    """The ``k``-th largest value over several tensors, without concatenating them.

    A histogram over all values locates the bin that holds the answer; exact comparisons then count what lies
    above the bin and collect the (few) values inside it, and only those are sorted. The result equals
    ``kth_largest(torch.cat([t.flatten() for t in tensors]), k)`` exactly; when the histogram is misleading
    (rounding at a bin edge) it falls back to that.
    """
    flats = [t.reshape(-1).float() for t in tensors if t.numel()]
    total = sum(f.numel() for f in flats)
    k = min(max(k, 1), total)
    low = min(float(f.min()) for f in flats)
    high = max(float(f.max()) for f in flats)
    if high <= low or total < 4 * bins:
        return kth_largest(torch.cat(flats), k)
    hist = sum(torch.histc(f, bins=bins, min=low, max=high) for f in flats)
    from_top = torch.flip(hist, [0]).cumsum(0)
    top_bin = int(torch.searchsorted(from_top, torch.tensor(float(k), dtype=from_top.dtype)))
    b = bins - 1 - min(top_bin, bins - 1)  # the bin (from the bottom) that holds the k-th largest value
    width = (high - low) / bins
    lo = low + b * width
    hi = low + (b + 1) * width if b < bins - 1 else float("inf")
    above = sum(int((f >= hi).sum()) for f in flats)
    inside = torch.cat([f[(f >= lo) & (f < hi)] for f in flats])
    if not above < k <= above + inside.numel():
        return kth_largest(torch.cat(flats), k)
    return kth_largest(inside, k - above)


@torch.no_grad()
def kth_largest_across(tensors: Sequence[Tensor], k: int,
                       reduce: Callable[[Tensor, str], Tensor] | None = None) -> Tensor:
    """The ``k``-th largest value of non-negative scores spread over tensors and processes, exactly.

    A radix selection on the bits of the ``float32`` values (for non-negative floats the order of the bits
    read as ``int32`` is the order of the values): four rounds of a 256-bin histogram of one byte, each
    combined over processes by ``reduce(hist, "sum")`` (``None``: this process holds everything), fix the
    answer's bits from the top. Only ``4 x 256`` counts travel, never a weight. The result equals
    ``kth_largest(torch.cat([t.flatten() for t in all tensors of all processes]), k)`` bit for bit.
    """
    bits = [t.detach().reshape(-1).float().view(torch.int32).clamp_min(0) for t in tensors]  # -0.0 -> 0
    device = bits[0].device if bits else torch.device("cpu")
    total = torch.tensor([sum(b.numel() for b in bits)], dtype=torch.int64, device=device)
    if reduce is not None:
        total = reduce(total, "sum")
    k = min(max(int(k), 1), int(total.item()))
    prefix, remaining = 0, k
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(256, dtype=torch.int64, device=device)
        for b in bits:
            chosen = b if shift == 24 else b[(b >> (shift + 8)) == prefix]
            hist += torch.bincount(((chosen >> shift) & 0xFF).long(), minlength=256)
        if reduce is not None:
            hist = reduce(hist, "sum")
        from_top = torch.flip(hist, [0]).cumsum(0)
        index = int(torch.searchsorted(from_top, torch.tensor(remaining, dtype=from_top.dtype,
                                                              device=from_top.device)))
        index = min(index, 255)
        remaining -= int(from_top[index - 1]) if index > 0 else 0
        prefix = (prefix << 8) | (255 - index)
    return torch.tensor([prefix], dtype=torch.int32).view(torch.float32)[0].to(device)


def threshold_mask(scores: Tensor, threshold: Tensor | float) -> Tensor:
    """Keep scores ``>= threshold`` (ties keep extra weights, as TFMOT does); zeros are never kept.

    Never keeping zeros makes masks nested: weights pruned (and zeroed) at one update stay pruned.
    """
    return (scores >= threshold) & (scores > 0)


def magnitude_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep the ``kept_count(numel, sparsity)`` largest scores of one tensor."""
    return threshold_mask(scores, kth_largest(scores, kept_count(scores.numel(), sparsity)))
