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
from lightning_prune.graph.types import ChannelGroup, GraphTimeoutError, code_location

__all__ = ["check_removal", "masked_and_sliced", "randomised_copy"]


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


#: the shares of each group's units the proof removes, one check each: two samples, so that sizes which agree
#: by coincidence at one removal (CrossViT's ``C // self.num_heads`` with the stream and the heads both cut by
#: a third) disagree at the other
PROOF_SHARES = (1 / 3, 0.45)


def _sample_removed(groups: Sequence[ChannelGroup], seed: int, share: float = 1 / 3) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    removed = {}
    for group in groups:
        n = max(1, min(group.size - 1, int(group.size * share + 1e-9)))
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


def _outputs_by_module(model: nn.Module, record: list[tuple[str, Tensor]]) -> list[Any]:
    """Forward hooks appending ``(module name, output)`` for every submodule's tensor output."""
    def hook(name: str) -> Callable[..., None]:
        def save(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                record.append((name, output.detach()))
        return save

    return [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]


def _first_difference(model: nn.Module, masked: list[tuple[str, Tensor]], sliced: list[tuple[str, Tensor]],
                      rtol: float) -> str:
    """The first module (in call order) whose output has the same shape masked and sliced but differs."""
    after = {}
    for name, out in sliced:
        after.setdefault(name, out)
    for name, out in masked:
        other = after.get(name)
        if other is not None and other.shape == out.shape and compare_outputs(out, other, rtol) > rtol:
            return f"; first differs at `{name}` ({type(model.get_submodule(name)).__name__})"
    return ""


def check_removal(model: nn.Module, example: Any, groups: Sequence[ChannelGroup], rtol: float,
                  seed: int = 0, locate: bool = False) -> str | None:
    """None when masking a sample of the groups' units (zeros at input sites, restricted norms) equals slicing
    them out, on a randomised float64 copy, for each share of :data:`PROOF_SHARES`; else why not: the
    exception slicing or the sliced model raised (with the model's line), or the difference (``locate``: and
    the first module whose output differs)."""
    for i, share in enumerate(PROOF_SHARES):
        why = _check_sample(model, example, groups, rtol, seed + i, share, locate)
        if why is not None:
            return why
    return None


def _check_sample(model: nn.Module, example: Any, groups: Sequence[ChannelGroup], rtol: float, seed: int,
                  share: float, locate: bool) -> str | None:
    groups = [g for g in groups if g.size > 1]
    if not groups:
        return None
    removed = _sample_removed(groups, seed, share)
    clone = randomised_copy(model, seed, torch.float64)
    x = cast_example(example, torch.float64)
    seen_masked: list[tuple[str, Tensor]] = []
    seen_sliced: list[tuple[str, Tensor]] = []
    stage = "masking"
    try:
        with torch.no_grad():
            handles = zero_unit_hooks(clone, groups, removed) + restricted_norm_hooks(clone, groups, removed)
            handles += _outputs_by_module(clone, seen_masked) if locate else []
            try:
                masked = call_model(clone, x)
            finally:
                for h in handles:
                    h.remove()
            stage = "slicing"
            slice_units(clone, groups, removed)
            stage = "the sliced model"
            handles = _outputs_by_module(clone, seen_sliced) if locate else []
            try:
                sliced = call_model(clone, x)
            finally:
                for h in handles:
                    h.remove()
    except GraphTimeoutError:
        raise
    except Exception as error:  # noqa: BLE001 - a masking or slicing the model's code does not accept
        where = code_location(error)
        text = " ".join(str(error).split())[:140] or "no message"
        return f"{stage} raised {type(error).__name__}{' at ' + where if where else ''}: {text}"
    diff = compare_outputs(masked, sliced, rtol)
    if diff <= rtol:
        return None
    return (f"the outputs differ by {diff:.1e} (relative)"
            + (_first_difference(clone, seen_masked, seen_sliced, rtol) if locate else ""))


def _exact(model: nn.Module, example: Any, groups: Sequence[ChannelGroup], rtol: float,
           seed: int = 0) -> bool:
    """Masked (zeros at input sites, restricted norms) equals physically sliced, on a randomised copy."""
    return check_removal(model, example, groups, rtol, seed) is None


def exact_subsets(model: nn.Module, example: Any, groups: list[ChannelGroup], rtol: float,
                  check: Callable[[], None], reasons: dict[str, str] | None = None
                  ) -> tuple[list[ChannelGroup], list[ChannelGroup]]:
    """(exact, not exact): one joint check, then halves of a failing set until single groups remain;
    ``reasons`` (if given) receives why each single group failed (:func:`check_removal`)."""
    check()
    if not groups:
        return groups, []
    if len(groups) == 1:
        why = check_removal(model, example, groups, rtol, locate=reasons is not None)
        if why is None:
            return groups, []
        if reasons is not None:
            reasons[groups[0].name] = why
        return [], groups
    if _exact(model, example, groups, rtol):
        return groups, []
    half = len(groups) // 2
    good_a, bad_a = exact_subsets(model, example, groups[:half], rtol, check, reasons)
    good_b, bad_b = exact_subsets(model, example, groups[half:], rtol, check, reasons)
    good = good_a + good_b
    if good and len(good_a) and len(good_b) and not _exact(model, example, good, rtol):  # pragma: no cover
        if reasons is not None:
            for g in good_b:
                reasons[g.name] = "exact alone, not together with other groups"
        return good_a, bad_a + good_b + bad_b  # interacting groups: keep the first half only
    return good, bad_a + bad_b
