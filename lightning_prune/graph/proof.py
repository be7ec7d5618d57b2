"""The proof that a removal is exact: on a float64 copy with randomised statistics, masking the removed
units must give the outputs of slicing them out; failing sets are bisected down to the single groups that
break it."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_prune.graph.inputs import call_model, cast_example
from lightning_prune.graph.layers import is_grn
from lightning_prune.graph.slicing import restricted_norm_hooks, slice_units, zero_unit_hooks
from lightning_prune.graph.types import ChannelGroup, GraphTimeoutError

__all__ = ["masked_and_sliced", "randomised_copy"]


@torch.no_grad()
def randomised_copy(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A copy in eval mode and ``dtype`` with random biases, BatchNorm statistics, norm affines, gains and
    layer scales, so that no zero and no negligible branch passes a check by chance."""
    gen = torch.Generator().manual_seed(seed)
    clone = copy.deepcopy(model).eval().to(dtype)

    def rand(t: Tensor, low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64).mul_(high - low).add_(low).to(t))

    for module in clone.modules():
        if isinstance(module, _BatchNorm):
            if module.weight is not None:
                rand(module.weight, 0.5, 1.5)
                rand(module.bias, -0.5, 0.5)
            if module.running_mean is not None:
                rand(module.running_mean, -0.5, 0.5)
                rand(module.running_var, 0.5, 2.0)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            if module.weight is not None:
                rand(module.weight, 0.5, 1.5)
            if module.bias is not None:
                rand(module.bias, -0.5, 0.5)
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() == 0:
                continue
            if pname == "bias" and not isinstance(module, (_BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                rand(p, -0.5, 0.5)
            elif pname in ("gamma", "gain", "layer_scale", "scale") or pname.endswith("gamma"):
                rand(p, 0.5, 1.5)
            elif is_grn(module):
                rand(p, -0.5, 0.5)
    return clone


def compare_outputs(reference: Any, other: Any, rtol: float) -> float:
    """The largest relative difference (max |a - b| / max |a|) over matching output tensors."""
    if isinstance(reference, Tensor):
        if not isinstance(other, Tensor) or reference.shape != other.shape:
            return math.inf
        scale = reference.abs().max().clamp_min(1e-12)
        return float((reference - other).abs().max() / scale)
    if isinstance(reference, (list, tuple)):
        return max((compare_outputs(a, b, rtol) for a, b in zip(reference, other)), default=0.0)
    if isinstance(reference, dict):
        return max((compare_outputs(reference[k], other[k], rtol) for k in reference), default=0.0)
    return 0.0


def _sample_removed(groups: Sequence[ChannelGroup], seed: int) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    removed = {}
    for group in groups:
        n = max(1, min(group.size - 1, group.size // 3))
        removed[group.name] = sorted(torch.randperm(group.size, generator=gen)[:n].tolist())
    return removed


@torch.no_grad()
def masked_and_sliced(model: nn.Module, example: Any, groups: Sequence[ChannelGroup],
                      removed: Mapping[str, Iterable[int]], seed: int = 0,
                      dtype: torch.dtype = torch.float64) -> tuple[Any, nn.Module, Any]:
    """The proof of a removal, on a copy of ``model`` with randomised weights and statistics in ``dtype``.

    Returns the copy's outputs with the ``removed`` units masked (zeros where they are read, norm statistics
    over the kept channels), the same copy with the units sliced out (a plain module: the hooks are gone), and
    its outputs. The removal is exact when the two outputs agree."""
    clone = randomised_copy(model, seed, dtype)
    example = cast_example(example, dtype)
    handles = zero_unit_hooks(clone, groups, removed) + restricted_norm_hooks(clone, groups, removed)
    try:
        masked = call_model(clone, example)
    finally:
        for h in handles:
            h.remove()
    slice_units(clone, groups, removed)
    return masked, clone, call_model(clone, example)


def _exact(model: nn.Module, example: Any, groups: Sequence[ChannelGroup], rtol: float,
           seed: int = 0) -> bool:
    """Masked (zeros at input sites, restricted norms) equals physically sliced, on a randomised copy."""
    groups = [g for g in groups if g.size > 1]
    if not groups:
        return True
    try:
        masked, _, sliced = masked_and_sliced(model, example, groups, _sample_removed(groups, seed), seed)
    except GraphTimeoutError:
        raise
    except Exception:  # noqa: BLE001 - a masking or slicing the model's code does not accept is not exact
        return False
    return compare_outputs(masked, sliced, rtol) <= rtol


def exact_subsets(model: nn.Module, example: Any, groups: list[ChannelGroup], rtol: float,
                   check: Callable[[], None]) -> tuple[list[ChannelGroup], list[ChannelGroup]]:
    """(exact, not exact): one joint check, then halves of a failing set until single groups remain."""
    check()
    if not groups or _exact(model, example, groups, rtol):
        return groups, []
    if len(groups) == 1:
        return [], groups
    half = len(groups) // 2
    good_a, bad_a = exact_subsets(model, example, groups[:half], rtol, check)
    good_b, bad_b = exact_subsets(model, example, groups[half:], rtol, check)
    good = good_a + good_b
    if good and len(good_a) and len(good_b) and not _exact(model, example, good, rtol):  # pragma: no cover
        return good_a, bad_a + good_b + bad_b  # interacting groups: keep the first half only
    return good, bad_a + bad_b
