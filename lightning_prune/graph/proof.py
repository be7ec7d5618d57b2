"""The proof that a removal is exact: on a float64 copy with randomised statistics, masking the removed
units must give the outputs of slicing them out; failing sets are bisected down to the single groups that
break it."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_prune.graph.inputs import call_model, cast_example
from lightning_prune.graph.layers import is_grn, is_rms_norm
from lightning_prune.graph.slicing import restricted_norm_hooks, slice_units, zero_unit_hooks
from lightning_prune.graph.types import ChannelGroup, GraphTimeoutError, code_location

__all__ = ["check_removal", "masked_and_sliced", "proof_copies", "randomised_copy"]


@torch.no_grad()
def randomised_copy(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A copy in eval mode and ``dtype`` with random biases, BatchNorm statistics, norm affines, gains, layer
    scales and constant (zero-initialised) weights, so that no zero and no negligible branch passes a check
    by chance."""
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
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or is_rms_norm(module):
            if getattr(module, "weight", None) is not None:
                rand(module.weight, 0.5, 1.5)
            if getattr(module, "bias", None) is not None:
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
            elif p.numel() > 1 and bool((p == p.reshape(-1)[0]).all()):
                # a constant (zero-initialised) weight -- a classifier head, a last conv -- would make every
                # output the same whatever is removed: random values of its fan-in's scale
                fan_in = p[0].numel() if p.dim() > 1 else 1
                drawn = torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in)
                p.copy_(drawn.to(p))
    return clone


#: the randomised copies of the models under analysis, one per (model, seed, dtype), while
#: :func:`proof_copies` is active: ``{(id(model), seed, dtype): (model, copy)}``
_COPIES: contextvars.ContextVar[dict[tuple[int, int, torch.dtype], tuple[nn.Module, nn.Module]] | None] = (
    contextvars.ContextVar("proof_copies", default=None))


#: the largest model (its parameters in the proof's dtype) whose randomised copies :func:`proof_copies` keeps
_MAX_CACHED_BYTES = 1 << 30


@contextlib.contextmanager
def proof_copies() -> Iterator[None]:
    """Within the block, each proof starts from one randomised copy of the model per seed, made once and never
    run (each proof runs and slices copies of it that share its parameters), instead of randomising a fresh
    deep copy every time. The model must not change inside
    the block (one analysis). A model over 1 GiB (in float64) is copied afresh each time instead, so that no
    two copies are held at once."""
    token = _COPIES.set({})
    try:
        yield
    finally:
        _COPIES.reset(token)


def _proof_base(model: nn.Module, seed: int, dtype: torch.dtype) -> tuple[nn.Module, bool]:
    """A randomised copy of ``model`` and whether the caller may run it: inside :func:`proof_copies` the
    block's one copy per seed (never run: copy it with :func:`_sharing_copy`), else a fresh one."""
    cache = _COPIES.get()
    size = sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()
    if cache is None or size > _MAX_CACHED_BYTES:  # a large model: one copy at a time, not one per seed held
        return randomised_copy(model, seed, dtype), True
    key = (id(model), seed, dtype)
    hit = cache.get(key)
    if hit is None or hit[0] is not model:
        hit = cache[key] = (model, randomised_copy(model, seed, dtype))
    return hit[1], False


_EMPTY_CONTAINER_TYPES = (dict, OrderedDict, set, list)


def _sharing_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares its parameters (slicing a copy replaces its tensors, never writes
    into them; a forward in eval mode without grad does not write into parameters).

    The empty containers among the modules' attributes (a dozen hook dicts per module) are handed to
    ``deepcopy`` as fresh empty ones: what it would make of them, without its generic reduce path (a third
    of the CPU time of the copies, which were a quarter of the analysis of EfficientFormerV2)."""
    memo: dict[int, Any] = {id(p): p for p in model.parameters()}
    for module in model.modules():
        for value in module.__dict__.values():
            if type(value) in _EMPTY_CONTAINER_TYPES and not value:
                memo[id(value)] = type(value)()
    return copy.deepcopy(model, memo)


def _max_abs(t: Tensor) -> Tensor:
    """``t.abs().max()``; for floating point as max(-min, max): one pass and no ``|t|`` temporary (a NaN
    propagates alike)."""
    if t.is_floating_point():
        low, high = torch.aminmax(t)
        return torch.maximum(-low, high)
    return t.abs().max()


def compare_outputs(reference: Any, other: Any, rtol: float) -> float:
    """The largest relative difference (max |a - b| / max |a|) over matching output tensors."""
    if isinstance(reference, Tensor):
        if not isinstance(other, Tensor) or reference.shape != other.shape:
            return math.inf
        if reference.numel() == 0:
            return 0.0
        scale = _max_abs(reference).clamp_min(1e-12)
        return float(_max_abs(reference - other) / scale)
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
        if other is None or other.shape != out.shape or torch.equal(out, other):
            continue  # (torch.equal: the outputs before the removed units, bit for bit, without a temporary)
        if compare_outputs(out, other, rtol) > rtol:
            return f"; first differs at `{name}` ({type(model.get_submodule(name)).__name__})"
    return ""


def check_removal(model: nn.Module, example: Any, groups: Sequence[ChannelGroup], rtol: float,
                  seed: int = 0, locate: bool = False) -> str | None:
    """None when masking a sample of the groups' units (zeros at input sites, restricted norms) equals slicing
    them out, on a randomised float64 copy, for each share of :data:`PROOF_SHARES`; else why not: the
    exception slicing or the sliced model raised (with the model's line), or the difference (``locate``: and
    the first module whose output differs)."""
    return _check(model, example, groups, rtol, seed, locate)[0]


def _check(model: nn.Module, example: Any, groups: Sequence[ChannelGroup], rtol: float, seed: int = 0,
           locate: bool = False) -> tuple[str | None, list[str]]:
    """:func:`check_removal`, and the modules (innermost first) that were running when the masked or the
    sliced model raised (empty when none did). With ``locate``, each module's output is recorded in the same
    two forwards (the records hold every activation: asked for only for single groups, which the bisection
    reaches where a set failed, and most of which fail themselves; checking without records and again with
    them cost two more forwards per failing group, a fifth of the analysis of halonet26t)."""
    for i, share in enumerate(PROOF_SHARES):
        why, where = _check_sample(model, example, groups, rtol, seed + i, share, locate)
        if why is not None:
            return why, where
    return None, []


_DIFFER = "the outputs differ by"


def _raising_modules(clone: nn.Module, error: BaseException) -> list[str]:
    """The names of ``clone``'s modules whose code was running when ``error`` was raised, innermost first."""
    names = {id(m): n for n, m in clone.named_modules()}
    found: list[str] = []
    tb = error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        name = names.get(id(owner)) if isinstance(owner, nn.Module) else None
        if name is not None and name not in found:
            found.append(name)
        tb = tb.tb_next
    return found[::-1]


def _check_sample(model: nn.Module, example: Any, groups: Sequence[ChannelGroup], rtol: float, seed: int,
                  share: float, locate: bool) -> tuple[str | None, list[str]]:
    groups = [g for g in groups if g.size > 1]
    if not groups:
        return None, []
    removed = _sample_removed(groups, seed, share)
    x = cast_example(example, torch.float64)
    seen_masked: list[tuple[str, Tensor]] = []
    seen_sliced: list[tuple[str, Tensor]] = []
    base, runnable = _proof_base(model, seed, torch.float64)
    clone = _sharing_copy(base)
    stage = "slicing"
    try:
        with torch.no_grad():  # the sliced model first: most failing sets raise there (no masked forward)
            slice_units(clone, groups, removed)
            stage = "the sliced model"
            handles = _outputs_by_module(clone, seen_sliced) if locate else []
            try:
                sliced = call_model(clone, x)
            finally:
                for h in handles:
                    h.remove()
            stage = "masking"
            clone = base if runnable else _sharing_copy(base)
            handles = zero_unit_hooks(clone, groups, removed) + restricted_norm_hooks(clone, groups, removed)
            handles += _outputs_by_module(clone, seen_masked) if locate else []
            try:
                masked = call_model(clone, x)
            finally:
                for h in handles:
                    h.remove()
    except GraphTimeoutError:
        raise
    except Exception as error:  # noqa: BLE001 - a masking or slicing the model's code does not accept
        where = code_location(error)
        text = " ".join(str(error).split())[:140] or "no message"
        return (f"{stage} raised {type(error).__name__}{' at ' + where if where else ''}: {text}",
                _raising_modules(clone, error) if stage != "slicing" else [])
    diff = compare_outputs(masked, sliced, rtol)
    if diff <= rtol:
        return None, []
    return (f"{_DIFFER} {diff:.1e} (relative)"
            + (_first_difference(clone, seen_masked, seen_sliced, rtol) if locate else "")), []


def _exact(model: nn.Module, example: Any, groups: Sequence[ChannelGroup], rtol: float,
           seed: int = 0) -> bool:
    """Masked (zeros at input sites, restricted norms) equals physically sliced, on a randomised copy."""
    return check_removal(model, example, groups, rtol, seed) is None


def _touches(group: ChannelGroup, module: str) -> bool:
    """Whether ``group`` reads, slices or resizes ``module`` or anything inside it."""
    inside = module + "."
    names = [x.module for x in (*group.sites, *group.slices)] + [m for m, _, _ in group.attrs]
    return any(n == module or n.startswith(inside) for n in names)


def _split(groups: list[ChannelGroup], raised_in: list[str], suspects: Collection[str]
           ) -> tuple[list[ChannelGroup], list[ChannelGroup]]:
    """Two parts of a failing set, the likely culprits second: the groups that touch the innermost module that
    raised, else the ``suspects`` (groups the labels found a size written in the model's code for), when they
    are some but not all of the set; else two halves. Any split is sound: each part is proven on its own, and
    the exact groups of all parts together again."""
    for module in raised_in:
        culprits = [g for g in groups if _touches(g, module)]
        if 0 < len(culprits) < len(groups):
            return [g for g in groups if not _touches(g, module)], culprits
    culprits = [g for g in groups if g.name in suspects]
    if 0 < len(culprits) < len(groups):
        return [g for g in groups if g.name not in suspects], culprits
    half = len(groups) // 2
    return groups[:half], groups[half:]


def _bisect(model: nn.Module, example: Any, groups: list[ChannelGroup], rtol: float,
            check: Callable[[], None], reasons: dict[str, str] | None, suspects: Collection[str], merge: bool
            ) -> tuple[list[ChannelGroup], list[ChannelGroup], bool]:
    """(exact, not exact, whether the exact ones were proven together) of ``groups``; ``merge``: prove the
    exact groups of the two parts of a failing set together (keeping the first part's alone if they fail)."""
    check()
    if not groups:
        return [], [], True
    if len(groups) == 1:
        why = check_removal(model, example, groups, rtol, locate=reasons is not None)
        if why is None:
            return groups, [], True
        if reasons is not None:
            reasons[groups[0].name] = why
        return [], groups, True
    why, raised_in = _check(model, example, groups, rtol)
    if why is None:
        return groups, [], True
    part_a, part_b = _split(groups, raised_in, suspects)
    good_a, bad_a, whole_a = _bisect(model, example, part_a, rtol, check, reasons, suspects, merge)
    good_b, bad_b, whole_b = _bisect(model, example, part_b, rtol, check, reasons, suspects, merge)
    if not good_a or not good_b:
        return good_a + good_b, bad_a + bad_b, whole_a if good_a else whole_b
    if not merge:
        return good_a + good_b, bad_a + bad_b, False
    if _exact(model, example, good_a + good_b, rtol):
        return good_a + good_b, bad_a + bad_b, True
    if reasons is not None:
        for g in good_b:
            reasons[g.name] = "exact alone, not together with other groups"
    return good_a, bad_a + good_b + bad_b, whole_a  # interacting groups: keep the first part only


def exact_subsets(model: nn.Module, example: Any, groups: list[ChannelGroup], rtol: float,
                  check: Callable[[], None], reasons: dict[str, str] | None = None,
                  suspects: Collection[str] = ()) -> tuple[list[ChannelGroup], list[ChannelGroup]]:
    """(exact, not exact), the exact groups always proven together: one joint check, then parts of a failing
    set (:func:`_split`) until single groups remain, then the exact ones together once more (should that fail,
    groups that are exact alone interact: the parts again, each merge proven). ``reasons`` (if given)
    receives why each single group failed (:func:`check_removal`); ``suspects``: names of groups likely to
    fail, kept apart from the others when a set fails."""
    good, bad, whole = _bisect(model, example, groups, rtol, check, reasons, suspects, merge=False)
    if whole or _exact(model, example, good, rtol):
        return _in_order(good, groups), _in_order(bad, groups)
    good, more, _ = _bisect(model, example, good, rtol, check, reasons, suspects, merge=True)
    return _in_order(good, groups), _in_order(bad + more, groups)


def _in_order(some: list[ChannelGroup], groups: list[ChannelGroup]) -> list[ChannelGroup]:
    order = {id(g): i for i, g in enumerate(groups)}
    return sorted(some, key=lambda g: order[id(g)])
