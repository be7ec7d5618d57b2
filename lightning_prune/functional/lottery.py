"""Iterative magnitude pruning of the surviving weights, as the lottery-ticket procedure uses it.

Frankle & Carbin, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural Networks", ICLR 2019,
arXiv:1803.03635; late rewinding from Frankle, Dziugaite, Roy & Carbin, "Stabilizing the Lottery Ticket
Hypothesis", 2019, arXiv:1903.01611.

Each round prunes ``round(rate * alive)`` of the weights still alive, the smallest magnitudes first, exactly
as ``torch.nn.utils.prune.l1_unstructured`` / ``global_unstructured`` do when applied repeatedly, so
``0.8 ** k`` of the weights remain after ``k`` rounds at 20%. (open_lth's ``sparse_global`` prunes
``ceil(rate * alive)`` and then everything ``<=`` the threshold, one weight more; google-research's
``prune_by_percent_once`` likewise prunes ``round(p n) + 1``.) Ties are broken by position, so the result
is deterministic on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from lightning_prune.functional.magnitude import kth_largest_across

__all__ = ["prune_by_percent", "prune_by_percent_across", "prune_count", "remaining_fraction", "shuffle_like"]


def prune_count(alive: int, rate: float) -> int:
    """How many of ``alive`` weights one round at ``rate`` removes: ``round(rate * alive)`` (torch's rule)."""
    return min(int(round(rate * alive)), alive)


def _prune_smallest(scores: Tensor, alive: Tensor, rate: float) -> Tensor:
    """Mask (same shape as ``scores``) that drops the ``round(rate * n_alive)`` smallest alive scores."""
    flat_alive = alive.reshape(-1)
    idx = flat_alive.nonzero().squeeze(1)
    k = prune_count(idx.numel(), rate)
    new = flat_alive.clone()
    if k:
        order = torch.argsort(scores.reshape(-1)[idx].float(), stable=True)
        new[idx[order[:k]]] = False
    return new.view_as(alive)


@torch.no_grad()
def prune_by_percent(
    weights: Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None = None,
    rate: float = 0.2,
    scope: str = "global",
    layer_rates: Mapping[str, float] | None = None,
) -> dict[str, Tensor]:
    """One round of magnitude pruning of the surviving weights.

    Args:
        weights: ``{name: weight}``; scores are ``|weight|``.
        masks: the current boolean masks (``True`` = alive); all alive when ``None`` or a name is missing.
        rate: fraction of the surviving weights removed this round, in [0, 1].
        scope: ``"global"`` ranks all weights (except those in ``layer_rates``) together;
            ``"layer"`` prunes ``rate`` of each tensor on its own.
        layer_rates: ``{name: rate}`` for tensors pruned on their own at their own rate, whatever the scope
            (Frankle & Carbin prune the output layer at half the rate; ``0`` leaves a tensor alone).

    Returns:
        the new masks, nested in the old ones.

    Example::

        >>> w = {"fc": torch.arange(1.0, 11.0)}
        >>> prune_by_percent(w, rate=0.2)["fc"].tolist()
        [False, False, True, True, True, True, True, True, True, True]
    """
    if scope not in ("global", "layer"):
        raise ValueError(f"Unknown scope {scope!r}; expected 'global' or 'layer'.")
    masks = dict(masks or {})
    layer_rates = dict(layer_rates or {})
    unknown = sorted(set(layer_rates) - set(weights))
    if unknown:
        raise KeyError(f"`layer_rates` names tensors that are not in `weights`: {unknown}")
    alive = {n: (masks[n].to(w.device, torch.bool) if n in masks else torch.ones_like(w, dtype=torch.bool))
             for n, w in weights.items()}
    new: dict[str, Tensor] = {}
    pooled: list[str] = []
    for name, weight in weights.items():
        if name in layer_rates or scope == "layer":
            new[name] = _prune_smallest(weight.detach().abs(), alive[name], layer_rates.get(name, rate))
        else:
            pooled.append(name)
    if pooled:
        scores = torch.cat([weights[n].detach().abs().reshape(-1).float().cpu() for n in pooled])
        flat = _prune_smallest(scores, torch.cat([alive[n].reshape(-1).cpu() for n in pooled]), rate)
        for name, part in zip(pooled, flat.split([weights[n].numel() for n in pooled])):
            new[name] = part.view_as(weights[name]).to(weights[name].device)
    return {n: new[n] for n in weights}


def _prune_smallest_across(scores: list[Tensor], alive: list[Tensor], rate: float,
                           reduce: Callable[[Tensor, str], Tensor], position: int,
                           positions: int) -> list[Tensor]:
    """:func:`_prune_smallest` of the concatenation of ``scores`` over every process, each holding its shards:
    the ``k``-th smallest alive score by an exact selection across processes, all below it dropped, and of
    those equal to it the first ones in the concatenation's order (tensor by tensor, shard ``position`` of
    ``positions`` after the shards before it), as a stable sort does."""
    flat = [s.reshape(-1).float() for s in scores]
    live = [a.reshape(-1).to(s.device, torch.bool) for a, s in zip(alive, flat)]

    def total(values: list[int]) -> int:
        return int(reduce(torch.tensor([sum(values)], dtype=torch.int64), "sum").item())

    n_alive = total([int(a.sum()) for a in live])
    k = prune_count(n_alive, rate)
    new = [a.clone() for a in live]
    if k:
        value = kth_largest_across([s[a] for s, a in zip(flat, live)], n_alive - k + 1, reduce)
        below = [a & (s < value) for s, a in zip(flat, live)]
        ties = [a & (s == value) for s, a in zip(flat, live)]
        quota = k - total([int(b.sum()) for b in below])
        counts = torch.zeros(len(flat), positions, dtype=torch.int64)
        counts[:, position] = torch.tensor([int(t.sum()) for t in ties], dtype=torch.int64)
        counts = reduce(counts, "sum").cpu()
        for i, (b, t) in enumerate(zip(below, ties)):
            before = int(counts[:i].sum()) + int(counts[i, :position].sum())
            take = max(0, min(quota - before, int(counts[i, position])))
            new[i][b] = False
            if take:
                new[i][t.nonzero().squeeze(1)[:take]] = False
    return [n.view_as(a) for n, a in zip(new, alive)]


@torch.no_grad()
def prune_by_percent_across(
    weights: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    rate: float,
    scope: str,
    layer_rates: Mapping[str, float] | None,
    reduce: Callable[[Tensor, str], Tensor],
    position: int,
    positions: int,
) -> dict[str, Tensor]:
    """:func:`prune_by_percent` on shards: ``weights`` and ``masks`` are this process's shards (row blocks in
    the order of the processes' ``position`` among ``positions``), ``reduce(tensor, op)`` sums over the
    processes (each element of the full tensors counted once). The masks are the shards of the masks
    :func:`prune_by_percent` gives for the full tensors, bit for bit."""
    if scope not in ("global", "layer"):
        raise ValueError(f"Unknown scope {scope!r}; expected 'global' or 'layer'.")
    layer_rates = dict(layer_rates or {})
    new: dict[str, Tensor] = {}
    pooled = [n for n in weights if n not in layer_rates and scope != "layer"]
    for name, weight in weights.items():
        if name not in pooled:
            new[name] = _prune_smallest_across([weight.detach().abs()], [masks[name]],
                                               layer_rates.get(name, rate), reduce, position, positions)[0]
    if pooled:
        parts = _prune_smallest_across([weights[n].detach().abs() for n in pooled],
                                       [masks[n] for n in pooled], rate, reduce, position, positions)
        new.update(zip(pooled, parts))
    return {n: new[n] for n in weights}


def remaining_fraction(masks: Iterable[Tensor]) -> float:
    """Fraction of the masked weights still alive (Frankle & Carbin's ``P_m``)."""
    kept = total = 0
    for mask in masks:
        kept += int(mask.sum().item())
        total += mask.numel()
    return kept / total if total else 1.0


def shuffle_like(tensor: Tensor, generator: torch.Generator) -> Tensor:
    """A random permutation of ``tensor``'s values (same shape): a fresh draw from its own initialisation.

    For the random re-initialisation control: permuting an i.i.d. initialisation within a tensor gives
    another sample of the same distribution (and keeps constant initialisations, such as zero biases or
    BatchNorm's ones, exactly), for any model and without knowing its initialiser.
    """
    flat = tensor.detach().reshape(-1)
    perm = torch.randperm(flat.numel(), generator=generator).to(flat.device)
    return flat[perm].view_as(tensor).clone()
