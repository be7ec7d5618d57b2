"""Physical removal of dead channels through torch-pruning's DependencyGraph, and save/load of the result.

A channel is *dead* when its output is identically zero: the Conv/Linear filter and its bias are zero
(no BatchNorm after it), or the BatchNorm after it has zero weight and zero bias. Whoever zeroed it (a
gate callback, a mask, the user) does not matter. :func:`compress` removes a dead channel from every
layer coupled to it (the reader's input channels, a depthwise conv, a squeeze-excite branch, ...) when the
zero provably reaches every reader of the channel: the same check as
:func:`lightning_prune.gates.find_channel_groups` (on a copy with randomised biases and BatchNorm statistics,
zeroing the dead sites must give every reader exact zeros). A channel of a residual sum is removed only when
every branch of the sum is dead.

The result is a plain ``nn.Module`` with smaller layers whose eval outputs equal the masked model's
(checked after removal). Save it with :func:`save_compressed` and load it back onto a freshly created model
of the same architecture in one line::

    model = lp.load_compressed("small.pt", timm.create_model("resnet18", num_classes=10))
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_prune.errors import CompressionError, InvalidArgumentError
from lightning_prune.functional.channels import zero_channels
from lightning_prune.gates import (
    _call,
    _covers,
    _randomised_copy,
    _readers,
    build_graph,
    example_inputs_for,
    traced_root,
)

__all__ = ["CompressionError", "compress", "dead_channels", "load_compressed", "save_compressed"]


def _site_zero(producer: nn.Module, norm: nn.Module | None) -> Tensor:
    if norm is not None:
        if norm.weight is None:
            return torch.zeros(norm.num_features, dtype=torch.bool)
        return zero_channels(norm.weight, norm.bias).cpu()
    return zero_channels(producer.weight, getattr(producer, "bias", None)).cpu()


def dead_channels(model: nn.Module, example_inputs: Any,
                  round_to: int = 1) -> list[tuple[str, list[int], int]]:
    """The removable dead channels of ``model``: ``(root module name, root channel indices, group size)`` per
    group (one channel of each group is always kept, as torch-pruning needs; with ``round_to``, enough dead
    channels are kept for the remaining width to be a multiple of it)."""
    names = {m: n for n, m in model.named_modules()}
    return [(names[m], idxs, size) for m, _, idxs, size in _plan(model, example_inputs, round_to)[1]]


@torch.no_grad()
def _plan(model: nn.Module, example_inputs: Any, round_to: int = 1
          ) -> tuple[tp.DependencyGraph, list[tuple[nn.Module, Any, list[int], int]]]:
    graph, analysed = build_graph(model, example_inputs)
    names = {m: n for n, m in model.named_modules()}
    clone: nn.Module | None = None
    plan = []
    for info in analysed:
        if info.blocked:
            continue
        patterns: dict[int, list[tuple[nn.Module, list[int]]]] = {}
        for producer, idxs, root_idxs in info.producers:
            norm = info.norms.get(producer)
            zero = _site_zero(producer, norm)
            site = norm if norm is not None else producer
            for idx, root_idx in zip(idxs, root_idxs):
                if idx < zero.numel() and zero[idx]:
                    patterns.setdefault(root_idx, []).append((site, idx))
        if not patterns:
            continue
        if clone is None:
            clone = _randomised_copy(model)
        # channels whose dead sites are the same modules share one check
        by_sites: dict[tuple[str, ...], list[int]] = {}
        for root_idx, sites in patterns.items():
            by_sites.setdefault(tuple(sorted(names[s] for s, _ in sites)), []).append(root_idx)
        removable = []
        for root_idxs in by_sites.values():
            sites = {}
            for root_idx in root_idxs:
                for site, idx in patterns[root_idx]:
                    sites.setdefault(site, []).append(idx)
            consumer_idx = _readers(info, root_idxs)
            if consumer_idx and _covers(clone, names, example_inputs, list(sites.items()), consumer_idx):
                removable.extend(root_idxs)
        removable = sorted(set(removable))
        if len(removable) >= info.size:
            removable = removable[1:]  # keep one (zero) channel: torch-pruning cannot remove a whole layer
        if round_to > 1 and removable:  # keep a few dead channels so that the width is a multiple of round_to
            keep = -(-(info.size - len(removable)) // round_to) * round_to
            removable = removable[:max(info.size - keep, 0)]
        if removable:
            plan.append((info.root, info.root_fn, removable, info.size))
    return graph, plan


def compress(
    model: nn.Module,
    example_inputs: Any = None,
    input_size: Sequence[int] | None = None,
    inplace: bool = True,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    round_to: int = 1,
) -> nn.Module:
    """Physically remove every dead channel of ``model``; returns the smaller model.

    Args:
        model: a timm model, any ``nn.Module``, or a LightningModule holding a timm model (compressed in place
            inside it).
        example_inputs: what the model is called with; default: ``example_input_array``, or a random batch at
            timm's ``pretrained_cfg["input_size"]`` (or ``input_size``).
        input_size: ``(C, H, W)`` of the random example.
        inplace: modify ``model`` (default) or a deep copy.
        verify: compare eval outputs before and after on ``example_inputs``; raise if they differ.
        atol, rtol: tolerances of that comparison.
        round_to: keep enough dead channels that every pruned layer's width stays a multiple of ``round_to``
            (CPU/GPU kernels are faster on widths that are multiples of 8 or 16); outputs are unchanged.

    Raises:
        CompressionError: the outputs changed (a dead channel was not really dead).

    Example::

        small = lp.compress(trained_model, input_size=(3, 32, 32))
        lp.save_compressed(small, "small.pt")
    """
    if not inplace:
        model = copy.deepcopy(model)
    prefix, root = traced_root(model)
    example = example_inputs if example_inputs is not None else example_inputs_for(root, input_size)
    was_training = model.training
    model.eval()
    try:
        before_params = sum(p.numel() for p in root.parameters())
        with torch.no_grad():
            reference = _call(root, example) if verify else None
        graph, plan = _plan(root, example, round_to)
        removed = 0
        for module, fn, idxs, _ in plan:  # groups are disjoint: pruning one leaves the others' indices valid
            graph.get_pruning_group(module, fn, idxs).prune()
            removed += len(idxs)
        if verify and plan:
            with torch.no_grad():
                after = _call(root, example)
            _check_same(reference, after, atol, rtol)
        after_params = sum(p.numel() for p in root.parameters())
        rank_zero_info(f"[compress] removed {removed} channels in {len(plan)} groups: parameters"
                       f" {before_params:,} -> {after_params:,}")
    finally:
        model.train(was_training)
    return model


def _check_same(reference: Any, after: Any, atol: float, rtol: float) -> None:
    if isinstance(reference, Tensor):
        if reference.shape != after.shape or not torch.allclose(reference, after, atol=atol, rtol=rtol):
            diff = (reference - after).abs().max().item() if reference.shape == after.shape else float("nan")
            raise CompressionError(
                f"Removing the dead channels changed the outputs (max abs difference {diff:.3g})."
                " HINT: an activation with f(0) != 0 or a channel-mixing layer reads a zeroed channel;"
                " exclude that layer, or call compress(..., verify=False) to keep the result anyway."
            )
    elif isinstance(reference, (list, tuple)):
        for a, b in zip(reference, after):
            _check_same(a, b, atol, rtol)
    elif isinstance(reference, dict):
        for key in reference:
            _check_same(reference[key], after[key], atol, rtol)


_SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                "normalized_shape", "num_channels", "num_groups")
FORMAT = "lightning_prune.compressed/1"


def save_compressed(model: nn.Module, path: str | Path) -> None:
    """Save a compressed model: its ``state_dict`` plus the channel counts of its resized layers.

    The file holds only tensors and Python scalars (it loads with ``torch.load(weights_only=True)``).
    """
    attributes = {}
    for name, module in model.named_modules():
        found = {k: getattr(module, k) for k in _SHAPE_ATTRS if k in vars(module)}  # instance attributes only
        if found:
            attributes[name] = found
    torch.save({"format": FORMAT, "state_dict": model.state_dict(), "attributes": attributes}, str(path))


@torch.no_grad()
def load_compressed(path: str | Path, model: nn.Module, map_location: Any = "cpu") -> nn.Module:
    """Load what :func:`save_compressed` wrote onto a fresh model of the same architecture; returns it.

    Every parameter and buffer whose saved shape differs is resized, the layers' channel counts are set, and
    the state is loaded strictly.

    Example::

        model = lp.load_compressed("small.pt", timm.create_model("resnet18", num_classes=10))
    """
    payload = torch.load(str(path), map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InvalidArgumentError(f"{path} was not written by lightning_prune.save_compressed.")
    state = payload["state_dict"]
    for key, value in state.items():
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        current = getattr(module, attr, None)
        if isinstance(current, Tensor) and current.shape != value.shape:
            fresh = torch.empty(value.shape, dtype=current.dtype, device=current.device)
            if isinstance(current, nn.Parameter):
                setattr(module, attr, nn.Parameter(fresh, requires_grad=current.requires_grad))
            else:
                setattr(module, attr, fresh)
    for name, attrs in payload["attributes"].items():
        module = model.get_submodule(name) if name else model
        for key, value in attrs.items():
            setattr(module, key, value)
    model.load_state_dict(state, strict=True)
    return model
