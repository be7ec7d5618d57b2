"""Removing units: the masks that emulate a removal on the dense model (zeros at input sites, norm
statistics over the kept channels), the physical slicing of every parameter, buffer and size attribute, and
the cuts the slicing makes to each parameter (for optimizer state)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_prune.errors import InvalidArgumentError
from lightning_prune.graph.along import ALONG_TYPES, keep_positions
from lightning_prune.graph.frozen import freeze_modules
from lightning_prune.graph.layers import (
    CONV_TYPES,
    is_depthwise,
    is_depthwise_transposed,
    is_grn,
    is_rms_norm,
)
from lightning_prune.graph.types import ChannelGroup, strip_prefix

__all__ = ["cut_like", "drop_cached_tensors", "norm_size", "parameter_cuts", "reads_now",
           "restricted_forward", "restricted_norm_hooks", "slice_extent", "slice_units", "slide_zero_hooks",
           "zero_input_hook", "zero_unit_hooks"]


def slice_extent(target: nn.Module | Tensor | None, role: str, dim: int = 0) -> int | None:
    """The size of the dim a :class:`~lightning_prune.graph.Slice` of ``role`` cuts (None where it is not one
    dim of one tensor: a ``"free"`` slice, an unknown module).

    ``target``: the module (for ``role="param"``, the parameter or buffer, cut along ``dim``). ``"in"``: the
    weight's columns (a grouped conv's: the positions within a group); ``"out"``/``"group"``: its rows;
    ``"channel"``: the channels of a per-channel module, affine weights or not (BatchNorm's ``num_features``,
    GroupNorm's ``num_channels``, a depthwise conv's ``out_channels``, LayerNorm's ``normalized_shape``)."""
    if role == "param":
        return int(target.shape[dim]) if isinstance(target, Tensor) and target.dim() > dim else None
    if not isinstance(target, nn.Module) or role == "free":
        return None
    weight = getattr(target, "weight", None)
    weight = weight if isinstance(weight, Tensor) else None
    if role == "in":
        if weight is not None and weight.dim() > 1:
            return int(weight.shape[1])
        width = getattr(target, "in_channels", getattr(target, "in_features", None))
        return int(width) // int(getattr(target, "groups", 1)) if isinstance(width, int) else None
    if role in ("out", "group"):
        if weight is not None and weight.dim() > 0:
            return int(weight.shape[0])
        width = getattr(target, "out_channels", getattr(target, "out_features", None))
        return int(width) if isinstance(width, int) else None
    for attr in ("num_features", "num_channels", "out_channels"):
        if isinstance(getattr(target, attr, None), int):
            return int(getattr(target, attr))
    shape = getattr(target, "normalized_shape", None)
    if shape:
        return int(shape[0])
    return int(weight.shape[0]) if weight is not None and weight.dim() > 0 else None


def _unit_tensor(units: Sequence[int], removed: set[int]) -> Tensor:
    return torch.tensor([u in removed for u in units], dtype=torch.bool)


def zero_unit_hooks(model: nn.Module, groups: Iterable[ChannelGroup], removed: Mapping[str, Iterable[int]],
                    prefix: str = "") -> list[Any]:
    """Forward pre-hooks that zero the removed units at every input site; returns the handles."""
    handles = []
    for group in groups:
        gone = group.feasible(removed.get(group.name, ()))
        if not gone:
            continue
        for site in group.input_sites():
            dead = [c for c, u in zip(site.channels, site.units) if u in gone]
            if not dead:
                continue
            module = model.get_submodule(strip_prefix(site.module, prefix))
            index = torch.tensor(dead, dtype=torch.long)

            def hook(m: nn.Module, args: Any, index: Tensor = index, dim: int = site.dim) -> Any:
                x = args[0]
                return (x.index_fill(dim % x.dim(), index.to(x.device), 0.0), *args[1:])

            handles.append(module.register_forward_pre_hook(hook))
    return handles


def norm_size(module: nn.Module) -> int:
    """The channel count of a norm site (LayerNorm, GroupNorm, GRN)."""
    if isinstance(module, nn.GroupNorm):
        return int(module.num_channels)
    if isinstance(module, nn.LayerNorm) or is_rms_norm(module):
        return int(module.normalized_shape[0])
    return int(module.weight.shape[0])


def restricted_forward(module: nn.Module, x: Tensor, keep: Tensor, dim: int) -> Tensor:
    """The norm's output with its statistics over the kept channels only (zeros at the others), followed by
    the module's own dropout and activation where it has them (timm's ``LayerNormAct2d``,
    ``GroupNormAct``)."""
    dim = dim % x.dim()
    if is_grn(module):
        x_g = x.norm(p=2, dim=module.spatial_dim, keepdim=True)
        mean = x_g.index_select(dim, keep).mean(dim=dim, keepdim=True)
        x_n = x_g / (mean + module.eps)
        return x + torch.addcmul(module.bias.view(module.wb_shape), module.weight.view(module.wb_shape),
                                 x * x_n)
    moved = x.movedim(dim, -1)
    kept = moved.index_select(-1, keep)
    weight = module.weight.index_select(0, keep) if getattr(module, "weight", None) is not None else None
    bias = module.bias.index_select(0, keep) if getattr(module, "bias", None) is not None else None
    if isinstance(module, nn.GroupNorm):  # GroupNorm(1): statistics over (kept C, H, W)
        y = F.group_norm(kept.movedim(-1, 1), 1, weight, bias, module.eps).movedim(1, -1)
    elif is_rms_norm(module):
        y = F.rms_norm(kept, (kept.shape[-1],), weight, module.eps)
    else:
        y = F.layer_norm(kept, (kept.shape[-1],), weight, bias, module.eps)
    out = torch.zeros_like(moved)
    out[..., keep] = y.to(out.dtype)
    out = out.movedim(-1, dim)
    for after in ("drop", "act"):  # timm's norm + activation layers (LayerNormAct2d, GroupNormAct, ...)
        layer = getattr(module, after, None)
        if isinstance(layer, nn.Module):
            out = layer(out)
    return out


def restricted_norm_hooks(model: nn.Module, groups: Iterable[ChannelGroup],
                          removed: Mapping[str, Iterable[int]], prefix: str = "") -> list[Any]:
    """Forward hooks that make every norm site compute its statistics over the kept channels (all groups'
    removed units of one norm combined), and every slide site see zeros at the removed units
    (:func:`slide_zero_hooks`): what the removal does to the readers that have no weight columns; returns
    the handles."""
    dead_by_module: dict[str, tuple[int, set[int]]] = {}
    for group in groups:
        gone = group.feasible(removed.get(group.name, ()))
        if not gone:
            continue
        for site in group.norm_sites():
            dim, dead = dead_by_module.setdefault(site.module, (site.dim, set()))
            dead.update(c for c, u in zip(site.channels, site.units) if u in gone)
    handles = []
    for name, (dim, dead) in dead_by_module.items():
        if not dead:
            continue
        module = model.get_submodule(strip_prefix(name, prefix))
        size = norm_size(module)
        keep = torch.tensor([i for i in range(size) if i not in dead], dtype=torch.long)

        def hook(m: nn.Module, args: Any, output: Any, keep: Tensor = keep, dim: int = dim,
                 size: int = size) -> Tensor:
            x = args[0]
            # the norm was sliced meanwhile: it computes over the kept channels anyway
            if x.shape[dim] != size:
                return output
            return restricted_forward(m, x, keep.to(x.device), dim).to(output.dtype)

        handles.append(module.register_forward_hook(hook))
    return handles + slide_zero_hooks(model, groups, removed, prefix)


def reads_now(module: nn.Module) -> int | None:
    """What a slide site's conv reads along its unit dim now: the kept count of one that runs at the dense
    width (:mod:`lightning_prune.graph.along`), None for a plain conv (its input as traced)."""
    return int(module.kept_index.numel()) if isinstance(module, ALONG_TYPES) else None


def zero_input_hook(channels: Tensor | Callable[[nn.Module], Tensor], dim: int, reads: int | None) -> Any:
    """A forward pre-hook zeroing ``channels`` along ``dim`` of a module's input, as long as the module reads
    what it read when the hook was made (``reads``: :func:`reads_now`; once it was sliced, nothing).
    ``channels``: the indices, or a callable giving them from the module at every call (the units whose gate
    is closed now: :meth:`lightning_prune.core.gates.GateSet.attach`)."""
    def hook(m: nn.Module, args: Any) -> Any:
        if reads_now(m) != reads:
            return None
        x = args[0]
        dead = channels(m) if callable(channels) else channels
        return (x.index_fill(dim % x.dim(), dead.to(x.device), 0.0), *args[1:])

    return hook


def slide_zero_hooks(model: nn.Module, groups: Iterable[ChannelGroup], removed: Mapping[str, Iterable[int]],
                     prefix: str = "") -> list[Any]:
    """Forward pre-hooks that zero the removed units in the input of every slide site (a conv sliding along
    them, which sees zeros there once they are sliced: :mod:`lightning_prune.graph.along`)."""
    dead_by_module: dict[tuple[str, int], set[int]] = {}
    for group in groups:
        gone = group.feasible(removed.get(group.name, ()))
        for site in group.slide_sites() if gone else ():
            dead_by_module.setdefault((site.module, site.dim), set()).update(
                c for c, u in zip(site.channels, site.units) if u in gone)
    handles = []
    for (name, dim), dead in dead_by_module.items():
        if dead:
            module = model.get_submodule(strip_prefix(name, prefix))
            handles.append(module.register_forward_pre_hook(
                zero_input_hook(torch.tensor(sorted(dead), dtype=torch.long), dim, reads_now(module))))
    return handles


# ---------------------------------------------------------------------------------------------- slicing
def _set(module: nn.Module, name: str, value: Tensor) -> None:
    current = getattr(module, name)
    if isinstance(current, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=current.requires_grad))
    else:
        setattr(module, name, value)


def _take(module: nn.Module, name: str, dim: int, keep: Tensor) -> None:
    tensor = getattr(module, name, None)
    if isinstance(tensor, Tensor):
        _set(module, name, tensor.detach().index_select(dim, keep.to(tensor.device)))


def _keep(size: int, dead: set[int]) -> Tensor:
    return torch.tensor([i for i in range(size) if i not in dead], dtype=torch.long)


@torch.no_grad()
def _slice_module(module: nn.Module, role: str, dead: set[int], dim: int = 0) -> None:
    if role == "out":
        size = module.weight.shape[0]
        keep = _keep(size, dead)
        for pname in ("weight", "bias", "gain"):
            _take(module, pname, 0, keep)
        if isinstance(module, CONV_TYPES):
            module.out_channels = len(keep)
        else:
            module.out_features = len(keep)
    elif role == "in":
        size = module.weight.shape[1]
        keep = _keep(size, dead)
        _take(module, "weight", 1, keep)
        if isinstance(module, CONV_TYPES):  # (a grouped conv: the same positions of every group)
            module.in_channels = len(keep) * module.groups
        else:
            module.in_features = len(keep)
    elif role == "group":  # whole conv groups of a grouped conv's output rows
        opg = module.out_channels // module.groups
        ipg = module.in_channels // module.groups
        gone = {c // opg for c in dead}
        rows = _keep(module.out_channels, {g * opg + j for g in gone for j in range(opg)})
        for pname in ("weight", "bias", "gain"):
            _take(module, pname, 0, rows)
        module.groups -= len(gone)
        module.out_channels = module.groups * opg
        module.in_channels = module.groups * ipg
    elif role == "channel":
        if is_depthwise(module) or is_depthwise_transposed(module):
            keep = _keep(module.out_channels, dead)
            for pname in ("weight", "bias", "gain"):
                _take(module, pname, 0, keep)
            module.in_channels = module.out_channels = module.groups = len(keep)
        elif isinstance(module, _BatchNorm):
            keep = _keep(module.num_features, dead)
            for pname in ("weight", "bias", "running_mean", "running_var"):
                _take(module, pname, 0, keep)
            module.num_features = len(keep)
        elif isinstance(module, nn.LayerNorm) or is_rms_norm(module):
            keep = _keep(module.normalized_shape[0], dead)
            for pname in ("weight", "bias"):
                _take(module, pname, 0, keep)
            module.normalized_shape = (len(keep),)
        elif isinstance(module, nn.GroupNorm):
            keep = _keep(module.num_channels, dead)
            for pname in ("weight", "bias"):
                _take(module, pname, 0, keep)
            module.num_channels = len(keep)
        else:  # pragma: no cover - describe_raw_group lets no other module through
            raise InvalidArgumentError(f"cannot slice {type(module).__name__}")


@torch.no_grad()
def slice_units(model: nn.Module, groups: Iterable[ChannelGroup], removed: Mapping[str, Iterable[int]],
                prefix: str = "") -> int:
    """Physically remove the ``removed`` units (group name -> unit indices) of ``groups`` from ``model`` in
    place; returns the number of units removed. ``prefix`` is where ``model`` sits in the names (``"model"``
    for an ImageClassifier's timm model when the groups were found on the LightningModule). The layers of a
    group losing units that compute their weight from their parameters (``ChannelGroup.frozen``) are first
    replaced by plain layers holding that weight (:func:`lightning_prune.graph.frozen.freeze_modules`)."""
    groups = list(groups)
    freeze_modules(model, groups, removed, prefix)
    dead: dict[tuple[str, str, int], set[int]] = {}
    attrs: dict[tuple[str, str], int] = {}
    slides: dict[tuple[str, int], tuple[int, set[int]]] = {}
    count = 0
    for group in groups:
        gone = group.feasible(removed.get(group.name, ()))
        if not gone:
            continue
        if len(gone) >= group.size:
            raise InvalidArgumentError(f"cannot remove all {group.size} units of group {group.name!r}")
        count += len(gone)
        for sl in group.slices:
            key = (sl.module, sl.role, sl.dim)
            dead.setdefault(key, set()).update(c for c, u in zip(sl.channels, sl.units) if u in gone)
        for site in group.slide_sites():  # a conv sliding along the units: run at the dense width
            _, dead_slide = slides.setdefault((site.module, site.dim), (site.extent, set()))
            dead_slide.update(c for c, u in zip(site.channels, site.units) if u in gone)
        for module_name, attr, per_unit in group.attrs:
            drop = (per_unit * len(gone) if isinstance(per_unit, int)
                    else sum(per_unit[u] for u in gone if u < len(per_unit)))
            attrs[(module_name, attr)] = attrs.get((module_name, attr), 0) + drop
    params = dict(model.named_parameters())
    for (name, role, dim), channels in dead.items():
        if not channels or role == "free":
            continue
        local = strip_prefix(name, prefix)
        if role == "param":
            owner_name, _, pname = local.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            tensor = params[local] if local in params else getattr(owner, pname)
            _set(owner, pname, tensor.detach().index_select(dim, _keep(tensor.shape[dim], channels)))
        else:
            _slice_module(model.get_submodule(local), role, channels, dim)
    for (name, dim), (size, channels) in slides.items():
        module = model.get_submodule(strip_prefix(name, prefix))
        keep_positions(module, dim, size, channels)
    for (name, attr), drop in attrs.items():
        module = model.get_submodule(strip_prefix(name, prefix))
        if attr.endswith("]"):  # an element of a list of sizes: ``splits[1]``
            attr, _, index = attr[:-1].partition("[")
            sizes = list(getattr(module, attr))
            sizes[int(index)] -= drop
            old = getattr(module, attr)
            setattr(module, attr, type(old)(sizes) if isinstance(old, (list, tuple)) else sizes)
        else:
            setattr(module, attr, getattr(module, attr) - drop)
    if count:
        drop_cached_tensors(model)
    return count


def drop_cached_tensors(model: nn.Module) -> None:
    """Drop the tensors ``model`` caches from its parameters in eval mode (LeViT's, EfficientFormer's and
    TinyViT's attention biases, dropped by their ``train()``), so that they are made again from the parameters
    after these were sliced or loaded; every module's mode is left as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(True)
    for m, mode in modes:
        m.training = mode


def cut_like(tensor: Tensor, cuts: Iterable[tuple[int, Tensor]]) -> Tensor:
    """``tensor`` cut like the parameter it is shaped like (``cuts``: that parameter's ``[(dim, kept indices),
    ...]`` from :func:`parameter_cuts`), as a new tensor (a copy also when nothing is cut): the parameter's
    optimizer state, a mask callback's mask."""
    for dim, keep in cuts:
        tensor = tensor.index_select(dim, keep.to(tensor.device))
    return tensor.clone()


def parameter_cuts(model: nn.Module, groups: Iterable[ChannelGroup], removed: Mapping[str, Iterable[int]],
                   prefix: str = "") -> dict[str, list[tuple[int, Tensor]]]:
    """What :func:`slice_units` will do to each parameter and buffer: ``{name: [(dim, kept indices), ...]}``
    (names relative to ``model``), so that tensors shaped like a parameter (optimizer state: momentum, Adam
    moments) can be cut the same way, and a compressed state padded back to the dense shapes."""
    dead: dict[tuple[str, str, int], set[int]] = {}
    for group in groups:
        gone = group.feasible(removed.get(group.name, ()))
        for sl in group.slices if gone else ():
            dead.setdefault((sl.module, sl.role, sl.dim), set()).update(
                c for c, u in zip(sl.channels, sl.units) if u in gone)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))  # BatchNorm statistics are cut with the channels too
    cuts: dict[str, list[tuple[int, Tensor]]] = {}

    def cut(name: str, dim: int, channels: set[int]) -> None:
        if name in params and params[name].dim() > dim:
            size = params[name].shape[dim]
            cuts.setdefault(name, []).append((dim, _keep(size, channels)))

    for (name, role, dim), channels in dead.items():
        local = strip_prefix(name, prefix)
        if not channels or role == "free":
            continue
        if role == "param":
            cut(local, dim, channels)
        elif role == "in":
            cut(f"{local}.weight", 1, channels)
        elif role == "group":
            module = model.get_submodule(local)
            opg = module.out_channels // module.groups
            rows = {(c // opg) * opg + j for c in channels for j in range(opg)}
            for pname in ("weight", "bias", "gain"):
                cut(f"{local}.{pname}", 0, rows)
        else:  # out rows; per-channel modules
            for pname in ("weight", "bias", "gain", "running_mean", "running_var"):
                cut(f"{local}.{pname}", 0, channels)
    return cuts
