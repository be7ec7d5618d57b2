"""FLOPs and parameters of the model once some units are removed."""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.core.sharding import is_sharded
from lightning_prune.errors import InvalidArgumentError
from lightning_prune.graph.inputs import evaluating, example_batch_size, like_model
from lightning_prune.graph.layers import CONV_TYPES
from lightning_prune.graph.slicing import slice_extent, slice_units
from lightning_prune.graph.types import ChannelGroup, Slice, localised_group, prefixed_name, strip_prefix

__all__ = ["CostModel", "count_ops_and_params", "meta_copy"]


def count_ops_and_params(model: nn.Module, example_inputs: Any, layer_wise: bool = False) -> Any:
    """torch-pruning's ``count_ops_and_params``, with subclasses of the convs and Linear it counts (timm's
    ``StdConv2d``, ``ScaledStdConv2d``, ``Conv2dSame``, a frozen layer of
    :mod:`lightning_prune.graph.frozen`) counted as those layers: it looks their exact type up, and would
    count them as nothing."""
    from torch_pruning.utils import op_counter

    known = op_counter.MODULES_MAPPING
    extra = {}
    for module in model.modules():
        kind = type(module)
        if kind in known or kind in extra or not isinstance(module, (*CONV_TYPES, nn.Linear)):
            continue
        base = next((b for b in kind.__mro__[1:] if b in known), None)
        if base is not None:
            extra[kind] = known[base]
    before = op_counter.CUSTOM_MODULES_MAPPING  # (read by its hooks; it empties the mapping when done)
    op_counter.CUSTOM_MODULES_MAPPING = {**extra, **before}  # (a mapping the user set wins)
    try:
        with evaluating(model):  # (it puts the model in eval mode and leaves it so)
            return op_counter.count_ops_and_params(model, example_inputs, layer_wise=layer_wise)
    finally:
        op_counter.CUSTOM_MODULES_MAPPING = before


class CostModel:
    """FLOPs (as torch-pruning's ``count_ops_and_params`` counts them on ``example_inputs``) and parameters of
    the model once some units are removed, computed from the groups' slices without touching the model.

    Example::

        cost = CostModel(model, x, analysis.groups)
        flops, params = cost.cost({"layer1.0.conv1": [0, 1, 2]})
        flops / cost.dense_flops
    """

    def __init__(self, model: nn.Module, example_inputs: Any, groups: Sequence[ChannelGroup],
                 prefix: str = "") -> None:
        self.groups = list(groups)
        self.prefix = prefix
        self._model, self._example = model, example_inputs
        # what is measured once the live model is sharded (fully_shard runs after the callbacks' setup)
        try:
            self._skeleton: nn.Module | None = meta_copy(model)
        except Exception:  # noqa: BLE001 - a model deepcopy cannot copy: measured on the live model only
            self._skeleton = None
        with torch.no_grad():  # (in eval mode; every module's mode kept)
            flops, params, layer_flops, _ = count_ops_and_params(model, example_inputs, layer_wise=True)
        full = functools.partial(prefixed_name, prefix)
        self.dense_flops = float(flops)
        self.dense_params = float(sum(p.numel() for p in model.parameters()))
        # per-layer counts are per batch, the total per sample
        scale = 1.0 / example_batch_size(example_inputs)
        # what torch-pruning counts per module: leaves, and containers it counts as a whole (timm's Attention)
        counted = {id(m): float(layer_flops.get(m) or 0.0) * scale for m in model.modules()}
        own = {full(n): counted[id(m)] - sum(counted[id(c)] for c in m.children())
               for n, m in model.named_modules()}
        self._flops = {n: v for n, v in own.items() if v > 0.5}  # what each module counts beyond its children
        self._children = {full(n): [full(f"{n}.{c}" if n else c) for c, _ in m.named_modules() if c]
                          for n, m in model.named_modules() if any(True for _ in m.children())}
        # recurrent modules: their FLOPs scale with their weights (each used once per step)
        self._recurrent = {full(n) for n, m in model.named_modules() if isinstance(m, nn.RNNBase)}
        self._sizes: dict[tuple[str, str, int], int] = {}
        # module -> (pname, numel, shape)
        self._params: dict[str, list[tuple[str, int, tuple[int, ...]]]] = {}
        for name, module in model.named_modules():
            self._params[full(name)] = [(pname, p.numel(), tuple(p.shape))
                                       for pname, p in module.named_parameters(recurse=False)]
        free: dict[str, set[int]] = {}
        for group in self.groups:
            for sl in group.slices:
                key = (sl.module, sl.role, sl.dim)
                if sl.role == "free":  # channels it sees, over every group (its own width is not recorded)
                    free.setdefault(sl.module, set()).update(sl.channels)
                elif key not in self._sizes:
                    self._sizes[key] = self._size(model, sl)
        for module, channels in free.items():
            self._sizes[(module, "free", 0)] = len(channels)

    def _size(self, model: nn.Module, sl: Slice) -> int:
        local = strip_prefix(sl.module, self.prefix)
        if sl.role == "param":
            target = dict(itertools.chain(model.named_parameters(), model.named_buffers())).get(local)
        else:
            target = model.get_submodule(local)
        size = slice_extent(target, sl.role, sl.dim)
        if size is None:
            raise InvalidArgumentError(f"Cannot tell the size of `{sl.module}` ({sl.role} slice).")
        return size

    def cost(self, removed: Mapping[str, Iterable[int]]) -> tuple[float, float]:
        """``(flops, params)`` after removing ``removed`` (group name -> units)."""
        dead: dict[tuple[str, str, int], set[int]] = {}
        for group in self.groups:
            gone = group.feasible(removed.get(group.name, ()))
            if not gone:
                continue
            for sl in group.slices:
                dead.setdefault((sl.module, sl.role, sl.dim), set()).update(
                    c for c, u in zip(sl.channels, sl.units) if u in gone)
        keep: dict[tuple[str, str, int], float] = {
            key: 1.0 - len(chs) / max(self._sizes[key], 1) for key, chs in dead.items()}
        by_module: dict[str, dict[str, float]] = {}
        for (module, role, dim), frac in keep.items():
            by_module.setdefault(module, {})[role if role != "param" else f"param{dim}"] = frac
        params = self.dense_params
        kept_share: dict[str, float] = {}  # module -> share of its weight (and FLOPs) that stays
        recurrent_cut: dict[str, float] = {}  # an RNN module -> the weight its sliced parameters lose
        for module, fracs in by_module.items():
            # a free parameter (pos_embed, gamma, an LSTM's input weights): its own entry
            if any(k.startswith("param") for k in fracs):
                owner, _, pname = module.rpartition(".")
                frac = next(v for k, v in fracs.items() if k.startswith("param"))
                cut = sum(numel for n, numel, _ in self._params.get(owner, []) if n == pname) * (1.0 - frac)
                params -= cut
                if owner in self._recurrent:
                    recurrent_cut[owner] = recurrent_cut.get(owner, 0.0) + cut
                continue
            f_out = fracs.get("out", fracs.get("group", fracs.get("channel", fracs.get("free", 1.0))))
            f_in = fracs.get("in", 1.0) if "channel" not in fracs else 1.0
            kept_share[module] = f_out * f_in
            for pname, numel, shape in self._params.get(module, []):
                if pname == "weight" and len(shape) >= 2 and "channel" not in fracs:
                    params -= numel * (1.0 - f_out * f_in)
                else:
                    params -= numel * (1.0 - f_out)
        for module, cut in recurrent_cut.items():
            kept_share[module] = 1.0 - cut / max(sum(n for _, n, _ in self._params.get(module, [])), 1)
        flops = self.dense_flops
        for module, base in self._flops.items():
            if module in kept_share:
                flops -= base * (1.0 - kept_share[module])
            elif module in self._children:  # a container counted as a whole: its children's shares, by weight
                weights = [(sum(n for _, n, _ in self._params.get(c, [])), kept_share.get(c, 1.0))
                           for c in self._children[module]]
                total = sum(w for w, _ in weights)
                if total:
                    flops -= base * (1.0 - sum(w * f for w, f in weights) / total)
        return flops, params

    def ratios(self, removed: Mapping[str, Iterable[int]]) -> tuple[float, float]:
        """``(flops, params)`` remaining as fractions of the dense model's (predicted)."""
        flops, params = self.cost(removed)
        return flops / max(self.dense_flops, 1.0), params / max(self.dense_params, 1.0)

    @torch.no_grad()
    def measured_ratios(self, removed: Mapping[str, Iterable[int]]) -> tuple[float, float]:
        """The same, counted by torch-pruning on a sliced copy of the model (exact, slower)."""
        # a sharded model (FSDP2) cannot be copied and run on one rank: its shapes, on the meta device
        sharded = self._skeleton is not None and any(is_sharded(p) for p in self._model.parameters())
        small = copy.deepcopy(self._skeleton if sharded else self._model).eval()
        for module in small.modules():  # gates and restricted norms of the original would follow the copy
            module._forward_pre_hooks.clear()
            module._forward_hooks.clear()
        local = [localised_group(g, self.prefix) for g in self.groups]
        slice_units(small, local, {strip_prefix(k, self.prefix): v for k, v in removed.items()})
        flops, params = count_ops_and_params(small, like_model(self._example, small))
        return float(flops) / max(self.dense_flops, 1.0), float(params) / max(self.dense_params, 1.0)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its parameters and buffers on the ``meta`` device (shapes only)."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        empty = torch.empty_like(t, device="meta")
        is_param = isinstance(t, nn.Parameter)
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if is_param else empty
    return copy.deepcopy(model, memo)
