"""N:M fine-grained structured sparsity: at most ``N`` non-zeros in every block of ``M`` consecutive weights.

Blocks run along the **input dimension** (dimension 1 of a Linear ``(out, in)`` or Conv ``(out, in, *kernel)``
weight): for every output row -- and every kernel position of a conv -- the input weights are cut into runs
of ``M``, as NVIDIA's 2:4 sparse tensor cores (Mishra et al., "Accelerating Sparse Deep Neural Networks",
2021, arXiv:2104.08378; apex ASP's ``m4n2_1d``) and Apple coremltools' ``n_m_ratio`` (``dim=1``) define it.
A last, shorter block (an input size that is not a multiple of ``M``) keeps at most ``N`` too, as if padded
with zeros.

:func:`nm_schedule_masks` is the schedule that :class:`~lightning_prune.GradualMagnitudePruning` follows with
``pattern="N:M"``: it ramps a dense model into the pattern (Zhou et al., "Learning N:M Fine-grained
Structured Sparse Neural Networks From Scratch", ICLR 2021, arXiv:2102.04010, train N:M from dense; here by
Zhu & Gupta's gradual schedule).

Example::

    >>> w = torch.tensor([[0.0, -0.9, 0.3, 0.0, 5.0, 4.0, -3.0, 0.0]])
    >>> nm_mask(w.abs(), 2, 4).int().tolist()
    [[0, 1, 1, 0, 1, 1, 0, 0]]
    >>> nm_violations(w, 2, 4)   # the second block has three non-zeros
    1
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from lightning_prune.functional.magnitude import (
    kept_count,
    kth_largest_across,
    kth_largest_of,
    threshold_mask,
)

__all__ = ["NM_RAMPS", "nm_blocks", "nm_mask", "nm_schedule_masks", "nm_violations", "parse_pattern",
           "ramp_kept"]

#: how :func:`nm_schedule_masks` goes from dense to N:M: ``"blend"`` (unstructured magnitude pruning that
#: removes only weights outside the final pattern, landing on it exactly) or ``"steps"`` (the pattern holds at
#: every update, ``M:M`` -> ... -> ``N:M``, one kept weight per block less at a time)
NM_RAMPS = ("blend", "steps")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; ``N`` and ``M`` integers with ``1 <= N < M``.

    Raises:
        ValueError: anything else.
    """
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 1 <= n < m:
            return n, m
    raise ValueError(
        f"an N:M pattern is a string 'N:M' with integers 1 <= N < M (e.g. '2:4'), got {pattern!r}")


def nm_blocks(tensor: Tensor, m: int, dim: int = 1, fill: float = 0.0) -> Tensor:
    """``tensor`` as ``(..., blocks, m)``: dimension ``dim`` moved last, padded with ``fill`` to a multiple of
    ``m`` and cut into runs of ``m``."""
    if tensor.dim() < 2:
        raise ValueError(
            f"N:M blocks need a weight with at least 2 dimensions, got shape {tuple(tensor.shape)}")
    moved = tensor.movedim(dim, -1)
    pad = (-moved.shape[-1]) % m
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad), value=fill)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


def _unblock(blocks: Tensor, like: Tensor, dim: int) -> Tensor:
    moved_shape = list(like.movedim(dim, -1).shape)
    flat = blocks.reshape(*blocks.shape[:-2], -1)[..., :moved_shape[-1]]
    return flat.reshape(moved_shape).movedim(-1, dim)


def nm_mask(scores: Tensor, n: int, m: int, dim: int = 1) -> Tensor:
    """Keep the ``n`` highest scores of every block of ``m`` along ``dim`` (a bool tensor of ``scores``'
    shape). Zero scores are kept only where a block has fewer than ``n`` non-zero ones."""
    blocks = nm_blocks(scores.float(), m, dim, fill=float("-inf"))
    top = blocks.topk(min(n, m), dim=-1).indices
    keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, top, True)
    keep &= torch.isfinite(blocks)  # the padding of a last, shorter block
    return _unblock(keep, scores, dim)


@torch.no_grad()
def nm_violations(tensor: Tensor, n: int, m: int, dim: int = 1) -> int:
    """How many blocks of ``m`` along ``dim`` hold more than ``n`` non-zeros (0: the tensor is N:M sparse)."""
    nonzero = nm_blocks(tensor.detach().ne(0), m, dim, fill=0).sum(dim=-1)
    return int((nonzero > n).sum())


def ramp_kept(sparsity: float, n: int, m: int) -> int:
    """Weights kept per block of ``m`` by the ``"steps"`` ramp at scheduled ``sparsity``:
    ``round(m (1 - s))``, clipped to ``[n, m]``.

    Example::

        >>> [ramp_kept(s, 2, 4) for s in (0.0, 0.1, 0.2, 0.4, 0.5, 0.9)]
        [4, 4, 3, 2, 2, 2]
    """
    return min(max(int(m * (1.0 - sparsity) + 0.5), n), m)


@torch.no_grad()
def nm_schedule_masks(scores: Mapping[str, Tensor], sparsity: float, n: int, m: int, ramp: str = "blend",
                      dim: int = 1,
                      reduce: Callable[[Tensor, str], Tensor] | None = None) -> dict[str, Tensor]:
    """Masks that keep ``kept_count(total, sparsity)`` weights of ``scores`` (pooled: one count for all of
    them) on the way to the N:M pattern.

    Let ``P`` be each tensor's pattern: the top-``n`` of every block (``"blend"``) or the
    top-``ramp_kept(s)`` (``"steps"``). While the count allows more weights than ``P`` holds, below sparsity
    ``1 - n/m`` ``"blend"`` keeps all of ``P`` and the largest of the others (so it is unstructured magnitude
    pruning that removes only weights outside the final pattern) and ``"steps"`` keeps exactly ``P``; once
    the count is smaller, both keep the largest weights of ``P``. At sparsity ``1 - n/m`` and beyond every
    block of every tensor holds at most ``n`` non-zeros (all of ``P``, fewer weights than the count, where
    blocks were already sparser than the pattern); with ``"steps"`` every block holds at most
    ``ramp_kept(s)`` at every sparsity. Zero scores are never kept, so masks are nested, as in
    :func:`~lightning_prune.functional.threshold_mask`.

    ``reduce`` (``reduce(tensor, op)``, op "sum" or "max") spans the scores over processes: each holds its
    shards (whole rows: blocks run along ``dim``, never across the shards' cut) and every count, maximum
    and threshold is the one of all shards together (:func:`~lightning_prune.functional.kth_largest_across`).
    """
    if ramp not in NM_RAMPS:
        raise ValueError(f"Unknown N:M ramp {ramp!r}; expected one of {list(NM_RAMPS)}.")
    if not scores:
        return {}
    per_block = n if ramp == "blend" else ramp_kept(sparsity, n, m)

    def total(values: list[int]) -> int:
        count = sum(values)
        if reduce is None:
            return count
        return int(reduce(torch.tensor([count], dtype=torch.int64), "sum").item())

    def kth(tensors: list[Tensor], k: int) -> Tensor:
        return kth_largest_of(tensors, k) if reduce is None else kth_largest_across(tensors, k, reduce)

    numel = total([s.numel() for s in scores.values()])
    if per_block >= m:  # "steps" at M:M: no pattern yet, plain magnitude pruning
        threshold = kth(list(scores.values()), kept_count(numel, sparsity))
        return {name: threshold_mask(s, threshold) for name, s in scores.items()}
    patterns = {name: nm_mask(s, per_block, m, dim) & (s > 0) for name, s in scores.items()}
    k = kept_count(numel, sparsity)
    in_pattern = total([int(p.sum()) for p in patterns.values()])
    if ramp == "blend" and k > in_pattern and sparsity < 1.0 - n / m - 1e-9:
        # on the way: keep the whole pattern and the largest weights outside it (every weight of the pattern
        # outranks every weight outside it). From 1 - n/m on the pattern holds, even where blocks with fewer
        # than n non-zeros (weights that were zeros already) leave it holding fewer weights than the count
        top = max((float(s.max()) for s in scores.values() if s.numel()), default=float("-inf"))
        if reduce is not None:
            top = float(reduce(torch.tensor([top], dtype=torch.float64), "max").item())
        keys = {name: torch.where(patterns[name], s.float() + (top + 1.0), s.float())
                for name, s in scores.items()}
        threshold = kth(list(keys.values()), k)
        return {name: threshold_mask(keys[name], threshold) & (scores[name] > 0) for name in scores}
    # the largest weights of the pattern (all of it when it holds fewer than the count)
    keys = {name: s.float() * patterns[name] for name, s in scores.items()}
    threshold = kth(list(keys.values()), max(min(k, in_pattern), 1))
    return {name: threshold_mask(keys[name], threshold) & patterns[name] for name in scores}
