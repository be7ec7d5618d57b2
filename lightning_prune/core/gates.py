"""Channel gates: one multiplicative value per unit of a :class:`~lightning_prune.graph.ChannelGroup`.

The groups and the places where their units are read come from :func:`lightning_prune.graph.analyse_channels`.
A :class:`GateSet` hooks each group's gate into every **input site** of the group (the input channels of each
Conv/Linear that reads the units: a zero gate there means nothing reads the unit, so removing it is exact),
folds the gates into those layers' weight columns, turns kept/pruned units into boolean masks over every
tensor that loses them, and -- once units are pruned -- makes the group's **norm sites** (LayerNorm,
GroupNorm(1), GRN) compute their statistics over the kept channels only, which is what the compressed
model computes.

Gates are :class:`Gate` modules held *outside* the model (the model's ``state_dict`` keeps its keys).
:class:`ScaleGate` is the group-LASSO gate (a learnable scale); the L0 callback plugs in a hard-concrete
:class:`Gate` subclass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.core.sharding import edit_full_, local_tensor
from lightning_prune.errors import InvalidArgumentError
from lightning_prune.graph import (
    ChannelGroup,
    freeze_modules,
    norm_size,
    reads_now,
    restricted_forward,
    restricted_norm_hooks,
    zero_input_hook,
)

__all__ = ["Gate", "GateSet", "ScaleGate", "unit_masks"]


class Gate(nn.Module):
    """One multiplicative value per unit of a group; subclasses implement :meth:`compute`.

    The value is computed once per forward of the traced model (the :class:`GateSet` resets it), so all the
    sites of a group share one sample even when :meth:`compute` is stochastic (hard-concrete gates).
    ``frozen`` marks units whose gate no longer moves (capture masks).
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("frozen", torch.zeros(size, dtype=torch.bool))
        self._current: Tensor | None = None

    def compute(self, training: bool) -> Tensor:
        """The ``(size,)`` gate values (stochastic in training if the gate is)."""
        raise NotImplementedError

    def deterministic(self) -> Tensor:
        """The test-time values: what :meth:`GateSet.fold_` folds into the weights."""
        with torch.no_grad():
            return self.compute(False).detach()

    def score(self) -> Tensor:
        """How much each unit matters (higher = kept first when channels are chosen to meet a size target)."""
        return self.deterministic().abs()

    def reset(self) -> None:
        self._current = None

    def value(self, training: bool) -> Tensor:
        if self._current is None:
            self._current = self.compute(training)
        return self._current

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_current"] = None
        return state


class ScaleGate(Gate):
    """A learnable scale per unit, initialised to ``init``: the group-LASSO gate (``beta`` in He et al.).

    He, Zhang, Sun, "Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017.
    """

    def __init__(self, size: int, init: float = 1.0) -> None:
        super().__init__(size)
        self.weight = nn.Parameter(torch.full((size,), float(init)))

    def compute(self, training: bool) -> Tensor:
        return self.weight


def _channel_view(values: Tensor, ndim: int, dim: int) -> Tensor:
    shape = [1] * ndim
    shape[dim % ndim] = -1
    return values.reshape(shape)


class GateSet:
    """Gates for a list of channel groups, attached to a model with hooks and folded into it.

    Example::

        analysis = analyse_channels(model, torch.randn(2, 3, 32, 32))
        gates = GateSet(analysis.groups, [ScaleGate(g.size) for g in analysis.groups])
        gates.attach(model)          # every reader of a unit now sees it multiplied by the unit's gate
        ...
        gates.fold_(model)           # bake the gate values into the readers' weights; outputs unchanged
        gates.detach()
    """

    def __init__(self, groups: Sequence[ChannelGroup], gates: Sequence[Gate]) -> None:
        if len(groups) != len(gates):
            raise InvalidArgumentError(f"{len(groups)} groups but {len(gates)} gates")
        for group, gate in zip(groups, gates):
            if gate.size != group.size:
                raise InvalidArgumentError(
                    f"gate of size {gate.size} for group {group.name!r} of {group.size} units")
        self.groups = list(groups)
        self.gates = nn.ModuleList(gates)
        self._handles: list[Any] = []
        self._norm_handles: list[Any] = []

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[tuple[ChannelGroup, Gate]]:
        return iter(zip(self.groups, self.gates))

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.gates.parameters())

    def to(self, device: torch.device | str) -> GateSet:
        self.gates.to(device)
        return self

    def reset(self) -> None:
        for gate in self.gates:
            gate.reset()

    def attach(self, root: nn.Module, traced: str = "") -> None:
        """Hook every gate into ``root`` (the groups' module names are relative to it); ``traced`` names the
        submodule whose forward starts a new gate sample (default: ``root``)."""
        self.detach()
        model = root.get_submodule(traced) if traced else root
        reset = lambda *args: self.reset()  # noqa: E731
        self._handles.append(model.register_forward_pre_hook(reset))
        self._handles.append(model.register_forward_hook(reset))
        for group, gate in self:
            seen = set()
            for site in group.input_sites():
                if (site.module, site.dim, site.channels) in seen:  # one input read by several weights (the
                    continue  # two directions of a bidirectional LSTM): gated once, folded into each weight
                seen.add((site.module, site.dim, site.channels))
                module = root.get_submodule(site.module)
                channels = torch.tensor(site.channels, dtype=torch.long)
                units = torch.tensor(site.units, dtype=torch.long)

                def hook(m: nn.Module, args: Any, gate: Gate = gate, channels: Tensor = channels,
                         units: Tensor = units, dim: int = site.dim) -> tuple[Any, ...]:
                    x = args[0]
                    d = dim % x.dim()
                    values = gate.value(m.training)
                    scale = torch.ones(x.shape[d], dtype=x.dtype, device=x.device)
                    scale = scale.index_put((channels.to(x.device),),
                                            values.to(x.dtype)[units.to(values.device)]
                                            .to(x.device))
                    return (x * _channel_view(scale, x.dim(), d), *args[1:])

                self._handles.append(module.register_forward_pre_hook(hook))
        self._attach_norms(root)

    def _attach_norms(self, root: nn.Module) -> None:
        """Norm sites compute their statistics over the channels whose gate is not exactly zero, so that a
        unit whose gate closed (a hard-concrete zero, a captured group-LASSO gate) is already absent from
        them, as in the finalised and in the compressed model."""
        by_module: dict[str, list[tuple[Gate, Tensor, Tensor, int]]] = {}
        for group, gate in self:
            for site in group.norm_sites():
                by_module.setdefault(site.module, []).append(
                    (gate, torch.tensor(site.channels), torch.tensor(site.units), site.dim))
        for name, entries in by_module.items():
            module = root.get_submodule(name)
            size = norm_size(module)

            def hook(m: nn.Module, args: Any, output: Any, entries: list = entries, size: int = size) -> Any:
                x = args[0]
                dim = entries[0][3] % x.dim()
                if x.shape[dim] != size:
                    return output
                open_ = torch.ones(size, dtype=torch.bool, device=x.device)
                for gate, channels, units, _ in entries:
                    values = gate.value(m.training).detach()
                    closed = values[units.to(values.device)].to(x.device) == 0
                    open_[channels.to(x.device)] &= ~closed
                if bool(open_.all()) or not bool(open_.any()):
                    return output
                return restricted_forward(m, x, open_.nonzero().flatten(), dim).to(output.dtype)

            self._handles.append(module.register_forward_hook(hook))
        self._attach_slides(root)

    def _attach_slides(self, root: nn.Module) -> None:
        """Slide sites (a conv sliding along the units, ECA's) see zeros at the units whose gate is exactly
        zero, as in the finalised and in the compressed model; the others as they are (a gate's value does
        not fold into such a conv: it reads them ungated before and after)."""
        by_module: dict[tuple[str, int], list[tuple[Gate, Tensor, Tensor]]] = {}
        for group, gate in self:
            for site in group.slide_sites():
                by_module.setdefault((site.module, site.dim), []).append(
                    (gate, torch.tensor(site.channels), torch.tensor(site.units)))
        for (name, dim), entries in by_module.items():
            module = root.get_submodule(name)

            def closed(m: nn.Module, entries: list = entries) -> Tensor:
                dead = []
                for gate, channels, units in entries:
                    values = gate.value(m.training).detach()
                    dead.append(channels.to(values.device)[values[units.to(values.device)] == 0])
                return torch.cat(dead)

            self._handles.append(module.register_forward_pre_hook(
                zero_input_hook(closed, dim, reads_now(module))))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.reset()

    @torch.no_grad()
    def fold_(self, root: nn.Module, scales: Sequence[Tensor] | None = None) -> None:
        """Multiply the readers' weight columns by the gate values (or ``scales``), so that the model without
        gates computes what it computed with them."""
        scales = [g.deterministic() for g in self.gates] if scales is None else scales
        # a reader computing its weight (weight standardisation) is frozen first: the gates fold into it
        freeze_modules(root, self.groups, {g.name: s.detach().cpu().ne(1).nonzero().flatten().tolist()
                                           for g, s in zip(self.groups, scales)})
        for group, scale in zip(self.groups, scales):
            for site in group.input_sites():
                weight = root.get_parameter(site.weight_name)
                device = local_tensor(weight).device
                columns, units = site.column_units()  # (a paired grouped conv: one column, many channels)
                values = scale.to(device, weight.dtype)[torch.tensor(units, device=device)]
                index = torch.tensor(columns, device=device)
                view = [1] * weight.dim()
                view[1] = -1

                def fold(w: Tensor, index: Tensor = index, values: Tensor = values,
                         view: list = view) -> None:
                    w[:, index] *= values.reshape(view)

                edit_full_(weight, fold, dims=(1,))  # sharded (FSDP2: rows): each rank folds its rows

    def restrict_norms(self, root: nn.Module, keep: Sequence[Tensor]) -> None:
        """Make the norm sites compute their statistics over the kept units only (what the compressed model
        does); ``keep`` is one boolean vector per group. Replaces the restriction of an earlier call."""
        self.release_norms()
        removed = {g.name: (~k.cpu()).nonzero().flatten().tolist() for g, k in zip(self.groups, keep)}
        self._norm_handles = restricted_norm_hooks(root, self.groups, removed)

    def release_norms(self) -> None:
        for handle in self._norm_handles:
            handle.remove()
        self._norm_handles = []

    def channel_masks(self, root: nn.Module, keep: Sequence[Tensor]) -> dict[str, Tensor]:
        """Boolean masks (``True`` = kept) over every parameter that loses the pruned units, by full name."""
        return unit_masks(root, self.groups, keep)

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": [g.name for g in self.groups],
            "gates": [{k: v.detach().cpu().clone() for k, v in gate.state_dict().items()}
                      for gate in self.gates],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = list(state.get("names", []))
        if names != [g.name for g in self.groups]:
            raise KeyError(
                f"The checkpoint's gates are for groups {names[:4]}..., this model has"
                f" {[g.name for g in self.groups][:4]}... HINT: resume with the same model and the same"
                " include/exclude/prune_coupled arguments."
            )
        for gate, gate_state in zip(self.gates, state["gates"]):
            gate.load_state_dict(gate_state)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = []
        state["_norm_handles"] = []
        return state


def unit_masks(root: nn.Module, groups: Sequence[ChannelGroup], keep: Sequence[Tensor]) -> dict[str, Tensor]:
    """Boolean masks (``True`` = kept) over every parameter of ``root`` that loses the pruned units of
    ``groups`` (``keep``: one boolean vector per group): output rows, input columns, norm and depthwise
    entries, free parameters such as ``pos_embed``. A masked model whose readers' columns are zero reads
    nothing of a pruned unit, so it computes what the compressed model computes (with the norm sites
    restricted, see :meth:`GateSet.restrict_norms`)."""
    params = dict(root.named_parameters())
    masks: dict[str, Tensor] = {}

    def mark(name: str, dim: int, index: list[int]) -> None:
        param = params.get(name)
        if param is None or not index:
            return
        # full masks (a sharded parameter's whole shape; MaskSet.update keeps each rank's part)
        mask = masks.setdefault(name, torch.ones(param.shape, dtype=torch.bool,
                                                 device=local_tensor(param).device))
        mask.index_fill_(dim % param.dim(), torch.tensor(index, device=mask.device), False)

    for group, kept in zip(groups, keep):
        dead_units = set((~kept.cpu()).nonzero().flatten().tolist())
        if not dead_units:
            continue
        for sl in group.slices:
            dead = [c for c, u in zip(sl.channels, sl.units) if u in dead_units]
            if not dead:
                continue
            if sl.role == "param":
                mark(sl.module, sl.dim, dead)
            elif sl.role == "in":
                mark(f"{sl.module}.weight", 1, dead)
            elif sl.role == "group":
                module = root.get_submodule(sl.module)
                opg = module.out_channels // module.groups
                rows = sorted({(c // opg) * opg + j for c in dead for j in range(opg)})
                for pname in ("weight", "bias", "gain"):
                    mark(f"{sl.module}.{pname}", 0, rows)
            else:  # "out" rows; "channel": BatchNorm/LayerNorm/GroupNorm entries, depthwise filters
                for pname in ("weight", "bias", "gain"):
                    mark(f"{sl.module}.{pname}", 0, dead)
    return masks
