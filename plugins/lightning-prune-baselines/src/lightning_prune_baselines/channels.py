"""Channel units of lightning-prune's groups, and the pure functions that choose which units to drop.

The units are those of :func:`lightning_prune.graph.analyse_channels`: a channel with everything coupled to it
(a layer's filter, the BatchNorm after it and the columns of every layer that reads it; a whole
residual-stream channel; an attention head; a conv group), each provably removable. Masks over a unit's
tensors come from :func:`lightning_prune.gates.unit_masks`.

Everything here is usable on a plain ``nn.Module`` as well as inside the callbacks; the channel-pruning
benchmarks compare against :func:`first_k_channel_masks` and :func:`random_channel_masks`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.functional import kept_count
from lightning_prune.gates import unit_masks
from lightning_prune.graph import (
    DEFAULT_ANALYSIS_TIME_LIMIT_S,
    ChannelGroup,
    analyse_channels,
    example_inputs_for,
    traced_root,
)
from lightning_prune.masks import MaskSet

__all__ = [
    "apply_channel_masks",
    "channel_groups",
    "first_k_channel_masks",
    "first_k_keep",
    "first_k_pruned",
    "nested_random_keep",
    "random_channel_masks",
]


# ---------------------------------------------------------------------- choosing channels
def first_k_pruned(channels: int, sparsity: float) -> int:
    """How many leading channels the first-k baseline drops: ``channels - kept_count(channels, sparsity)``.

    At least one channel always survives (``kept_count`` keeps ``max(round(C (1 - sparsity)), 1)``).

    Example::

        >>> first_k_pruned(48, 0.5), first_k_pruned(10, 0.25), first_k_pruned(3, 0.99)
        (24, 2, 2)
    """
    return channels - kept_count(channels, sparsity)


def nested_random_keep(previous: Tensor, sparsity: float, generator: torch.Generator) -> Tensor:
    """Randomly prune a boolean keep-vector down to ``kept_count(numel, sparsity)`` survivors.

    Entries already pruned in ``previous`` stay pruned (the masks are nested); among the survivors the
    ones with the lowest ``torch.rand`` draws from ``generator`` go. Exactly ``numel`` numbers are drawn,
    whatever the sparsity, so the generator advances the same way on every rank.

    Args:
        previous: a boolean tensor of any shape (``True`` = kept); the result has its shape.
        sparsity: the fraction of all entries to prune, in [0, 1).
        generator: a CPU ``torch.Generator``.
    """
    flat = previous.reshape(-1).cpu()
    scores = torch.rand(flat.numel(), generator=generator)
    scores[~flat] = -1.0  # already pruned: always among the lowest
    keep = min(kept_count(flat.numel(), sparsity), int(flat.sum()))
    kept = torch.zeros_like(flat)
    if keep > 0:
        kept[torch.topk(scores, keep, sorted=False).indices] = True
    return kept.reshape(previous.shape)


def first_k_keep(size: int, sparsity: float) -> Tensor:
    """The keep-vector of the first-k baseline: the first ``first_k_pruned(size, sparsity)`` units go.

    Example::

        >>> first_k_keep(5, 0.4).tolist()
        [False, False, True, True, True]
    """
    return torch.arange(size) >= first_k_pruned(size, sparsity)


def channel_groups(
    model: nn.Module,
    example_input: Any = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    input_size: Sequence[int] | None = None,
    analysis_time_limit_s: float | None = DEFAULT_ANALYSIS_TIME_LIMIT_S,
) -> list[ChannelGroup]:
    """The exactly removable channel groups of ``model`` (names relative to ``model``).

    Args:
        model: any ``nn.Module`` (a timm model, a LightningModule holding one).
        example_input: what the traced model is called with (default: ``example_input_array``, else a random
            batch at timm's ``pretrained_cfg["input_size"]`` or ``input_size``).
        include, exclude: globs over module names: the groups whose producers match (do not match).
        input_size: ``(C, H, W)`` of the random example.
        analysis_time_limit_s: CPU seconds the analysis may use (``None``: no limit).
    """
    prefix, root = traced_root(model)
    example = example_input if example_input is not None else example_inputs_for(root, input_size)
    return analyse_channels(root, example, include, exclude, prefix=prefix,
                            analysis_time_limit_s=analysis_time_limit_s).groups


# ---------------------------------------------------------------------- one-shot helpers
def first_k_channel_masks(
    model: nn.Module,
    sparsity: float,
    example_input: Any = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Masks that drop the first ``first_k_pruned(U, sparsity)`` units of every channel group.

    The control of the Habr article «Редукция нейронных сетей при помощи вариационной оптимизации» ("Reducing
    neural networks with variational optimisation", in Russian): "remove the first k channels of every layer,
    then fine-tune". Keys are ``model``'s parameter names (every tensor a pruned unit touches). A model with
    LayerNorm-normalised streams computes exactly what the compressed one does only with
    :func:`lightning_prune.graph.restricted_norm_hooks` (the callbacks install them).

    Example::

        masks = first_k_channel_masks(timm_model, 0.5, example_input=torch.randn(2, 3, 32, 32))
        kept = apply_channel_masks(timm_model, masks)   # a MaskSet; call kept.apply_() after optimizer steps
    """
    groups = channel_groups(model, example_input, include, exclude)
    return unit_masks(model, groups, [first_k_keep(g.size, sparsity) for g in groups])


def random_channel_masks(
    model: nn.Module,
    sparsity: float,
    seed: int = 0,
    example_input: Any = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Masks that drop ``U - kept_count(U, sparsity)`` random units of every channel group.

    Groups draw, in order, from one ``torch.Generator`` seeded with ``seed``: the same seed gives the same
    masks on every machine and rank.
    """
    generator = torch.Generator().manual_seed(seed)
    groups = channel_groups(model, example_input, include, exclude)
    keep = [nested_random_keep(torch.ones(g.size, dtype=torch.bool), sparsity, generator) for g in groups]
    return unit_masks(model, groups, keep)


def apply_channel_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> MaskSet:
    """Zero the masked entries of ``model`` in place; the returned :class:`MaskSet` re-applies them.

    Call ``apply_()`` on it after every optimizer step of a fine-tuning loop.
    """
    mask_set = MaskSet()
    for name, mask in masks.items():
        mask_set.add(name, model.get_parameter(name), mask)
    return mask_set
