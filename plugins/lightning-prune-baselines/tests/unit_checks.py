"""Checks of channel units shared by the plugin's tests: what a pruned unit must lose, and that nothing
reads it.

A unit of a :class:`lightning_prune.graph.ChannelGroup` is cut along every
:class:`~lightning_prune.graph.Slice` of its group: the producers' output rows (weight, bias), the
BatchNorm/LayerNorm/depthwise entries, the readers' input columns, free parameters such as ``pos_embed``
along their dimension. These helpers build what the masks must be from the slices alone, check that every
tensor of a pruned unit is wholly masked (and no kept unit is), that pruned units output exact zeros, and
that the masked model computes what the physically sliced one does.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

import lightning_prune as lp
from lightning_prune.graph import ChannelGroup, Slice, channel_dim, restricted_norm_hooks, slice_units


def _tensors(source: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """A model's parameters by name, or a state dict as it is (for a model compressed since)."""
    return dict(source.named_parameters()) if isinstance(source, nn.Module) else source


def removed_units(groups: Sequence[ChannelGroup], keep: Sequence[Tensor]) -> dict[str, list[int]]:
    """Group name -> pruned unit indices (what ``lp.compress(..., removed=...)`` takes)."""
    return {g.name: (~k).nonzero().flatten().tolist() for g, k in zip(groups, keep)}


def slice_tensors(sl: Slice) -> list[tuple[str, int]]:
    """``(parameter name, dimension)`` of every tensor a slice cuts (names that are no parameter are skipped
    by the callers: a BatchNorm without affine, a conv without bias)."""
    if sl.role == "free":
        return []
    if sl.role == "param":
        return [(sl.module, sl.dim)]
    if sl.role == "in":
        return [(f"{sl.module}.weight", 1)]
    return [(f"{sl.module}.{p}", 0) for p in ("weight", "bias", "gain")]  # "out", "channel", "group"


def expected_masks(
    model: nn.Module | Mapping[str, Tensor], groups: Sequence[ChannelGroup], keep: Sequence[Tensor]
) -> dict[str, Tensor]:
    """The masks built from the slices alone: ``False`` at every channel of every pruned unit in every tensor
    of its group, ``True`` elsewhere; only the tensors that lose something. ``model``: the model, or its
    state dict."""
    params = _tensors(model)
    masks: dict[str, Tensor] = {}
    for group, kept in zip(groups, keep):
        gone = set((~kept).nonzero().flatten().tolist())
        for sl in group.slices:
            channels = [c for c, u in zip(sl.channels, sl.units) if u in gone]
            for name, dim in slice_tensors(sl) if channels else []:
                if name in params:
                    ones = torch.ones_like(params[name], dtype=torch.bool, device="cpu")
                    mask = masks.setdefault(name, ones)
                    mask.index_fill_(dim % mask.dim(), torch.tensor(channels), False)
    return masks


def wholly_masked_units(mask: Tensor, dim: int, sl: Slice) -> set[int]:
    """The units of ``sl`` whose channels are masked along ``dim`` in all their entries; asserts that no unit
    is cut in part (some of its channels wholly masked, others not)."""
    dim = dim % mask.dim()
    wholly = ~mask.movedim(dim, 0).reshape(mask.shape[dim], -1).any(1)
    by_unit: dict[int, list[bool]] = {}
    for c, u in zip(sl.channels, sl.units):
        by_unit.setdefault(u, []).append(bool(wholly[c]))
    partial = [u for u, v in by_unit.items() if any(v) and not all(v)]
    assert not partial, f"{sl.module}: units {partial} cut in part"
    return {u for u, v in by_unit.items() if all(v)}


def check_unit_masks(
    model: nn.Module | Mapping[str, Tensor],
    groups: Sequence[ChannelGroup],
    keep: Sequence[Tensor],
    masks: Mapping[str, Tensor],
) -> None:
    """``masks`` cut exactly the pruned units: every tensor of a pruned unit is wholly masked at the unit's
    channels (producer rows, norm entries, the readers' columns, ``pos_embed``...), no kept unit loses a
    channel anywhere, and nothing else is masked. ``model``: the model, or its state dict."""
    params = _tensors(model)
    expected = expected_masks(model, groups, keep)
    missing = set(expected) - set(masks)
    assert not missing, f"tensors of pruned units left unmasked: {sorted(missing)}"
    for name, mask in masks.items():
        want = expected.get(name, torch.ones_like(params[name], dtype=torch.bool, device="cpu"))
        assert torch.equal(mask.cpu(), want), name
    for group, kept in zip(groups, keep):
        pruned = set((~kept).nonzero().flatten().tolist())
        for sl in group.slices:
            for name, dim in slice_tensors(sl):
                if name in params:
                    ones = torch.ones_like(params[name], dtype=torch.bool, device="cpu")
                    mask = masks[name].cpu() if name in masks else ones
                    assert wholly_masked_units(mask, dim, sl) == pruned, (group.name, name)


def check_weights_masked(state: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """The parameters (``state``: a state dict) are exact zeros where masked, and not all zero elsewhere."""
    for name, mask in masks.items():
        value = state[name].detach().cpu()
        assert torch.all(value[~mask.cpu()] == 0), name
        assert value[mask.cpu()].abs().sum() > 0, name


def check_pruned_outputs_zero(
    model: nn.Module, groups: Sequence[ChannelGroup], keep: Sequence[Tensor], x: Tensor
) -> None:
    """In eval and train mode, every module that carries a pruned unit (a producer, a BatchNorm, a LayerNorm,
    a depthwise conv, the squeeze-excite gate's expand conv...) outputs exact zeros at the unit's channels."""
    dead: dict[str, set[int]] = {}
    for group, kept in zip(groups, keep):
        gone = set((~kept).nonzero().flatten().tolist())
        for sl in group.slices:
            if sl.role in ("out", "channel", "group"):
                channels = (c for c, u in zip(sl.channels, sl.units) if u in gone)
                dead.setdefault(sl.module, set()).update(channels)
    dead = {n: c for n, c in dead.items() if c}
    assert dead
    outputs: dict[str, Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: outputs.__setitem__(n, out))
        for n in dead
    ]
    try:
        for train in (False, True):  # running statistics, then batch statistics
            model.train(train)
            with torch.no_grad():
                model(x)
            for name, channels in dead.items():
                out = outputs[name]
                dim = channel_dim(model.get_submodule(name)) % out.dim()
                kept = [c for c in range(out.shape[dim]) if c not in channels]
                assert torch.all(out.index_select(dim, torch.tensor(sorted(channels))) == 0), (name, train)
                assert out.index_select(dim, torch.tensor(kept)).abs().sum() > 0, (name, train)
    finally:
        for hook in hooks:
            hook.remove()
        model.eval()


def check_masked_equals_sliced(
    model: nn.Module, groups: Sequence[ChannelGroup], keep: Sequence[Tensor], x: Tensor, atol: float = 1e-5
) -> nn.Module:
    """The masked ``model`` with restricted LayerNorm statistics computes, in eval mode, what a copy with the
    pruned units physically sliced out computes; returns that copy (which has fewer parameters)."""
    removed = removed_units(groups, keep)
    small = copy.deepcopy(model).eval()
    assert slice_units(small, groups, removed) == sum(len(v) for v in removed.values())
    model.eval()
    handles = restricted_norm_hooks(model, groups, removed)
    try:
        with torch.no_grad():
            masked, sliced = model(x), small(x)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(sliced, masked, atol=atol, rtol=0)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    return small


class CompressAtFitEnd(Callback):
    """At the end of fit, while the pruner's restricted norms are still attached (its teardown removes them),
    record the model's state, metrics, sparsity report and hooks, check that the pruned units output zeros,
    then compress the model in place with the pruner's own groups and units and record both eval outputs.

    Put it after the pruner in ``callbacks``."""

    def __init__(self, pruner: lp.PruningCallback, x: Tensor) -> None:
        self.pruner, self.x = pruner, x

    def on_fit_end(self, trainer, pl_module) -> None:
        pruner = self.pruner
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.masks = pruner.masks.state_dict()
        self.metrics = pruner.sparsity_metrics()
        self.report = {layer.name: layer for layer in lp.sparsity_report(pl_module).layers}
        self.hooked_norms = [n for n, m in pl_module.named_modules() if m._forward_hooks]
        check_pruned_outputs_zero(pl_module, pruner.groups, pruner.keep, self.x)
        pl_module.eval()
        with torch.no_grad():
            self.masked = pl_module(self.x)
        self.params_before = sum(p.numel() for p in pl_module.parameters())
        removed = removed_units(pruner.groups, pruner.keep)
        lp.compress(pl_module, self.x, groups=pruner.groups, removed=removed, round_to=1)  # raises if the
        # outputs change
        with torch.no_grad():
            self.compressed = pl_module(self.x)
        self.params_after = sum(p.numel() for p in pl_module.parameters())

    def check(self, groups: Sequence[ChannelGroup], keep: Sequence[Tensor]) -> None:
        """The compressed model's logits equal the masked one's, it lost exactly the masked entries, and the
        callback's restricted norms sat on exactly the norm sites of the pruned units."""
        torch.testing.assert_close(self.compressed, self.masked, atol=1e-4, rtol=0)
        masked_entries = sum(int((~m).sum()) for m in self.masks.values())
        assert self.params_before - self.params_after == masked_entries > 0
        removed = removed_units(groups, keep)
        norms = {s.module for g in groups for s in g.norm_sites()
                 if any(u in removed[g.name] for u in s.units)}
        assert set(self.hooked_norms) == norms
