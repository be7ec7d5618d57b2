"""How much each unit of a channel group matters: the criteria a channel callback ranks units by.

Every channel callback (:class:`~lightning_prune.callbacks.channels.ChannelPruningCallback` and its
subclasses) takes ``importance=``, one of :func:`importance_names`:

``"gate"``
    the magnitude of the unit's learned gate (group-LASSO, L0): the gate callbacks' own scores and default.
``"weight_norm"``
    torch-pruning's ``GroupNormImportance`` (``GroupMagnitudeImportance(p=2, group_reduction="mean",
    normalizer="mean", bias=False)``): for every Conv/Linear weight and norm scale the unit owns across
    the group -- the producers' filters (output rows), the readers' input columns, depthwise filters,
    BatchNorm / LayerNorm / GroupNorm ``weight`` -- the sum of the squared entries of the unit's slice,
    averaged over those tensors, and the group's vector divided by its mean (so that groups compare in a
    global ranking). torch-pruning normalises per group, after the reduction over the tensors, not per
    tensor; so does this.
``"taylor"``
    first-order Taylor (Molchanov et al., CVPR 2019): ``|sum w * dL/dw|`` over every parameter entry the unit
    owns (weights, biases, norm scales and shifts, free parameters such as ``pos_embed``), computed after each
    optimizer step's backward (gradients unscaled under AMP, averaged across DDP ranks) and accumulated as
    the sum of the per-step absolute values since the last decision; divided by the group's mean. On a gated
    model the gate sits between the unit and its readers, so the readers' weights see the gated activations:
    the criterion is the same weight Taylor on every callback (no separate gate term).
``"taylor_elementwise"``
    the same with the absolute value of every entry's product taken before the sum, ``sum |w * dL/dw|``
    (torch-pruning's ``TaylorImportance``; ``Taylor(elementwise=True)``): less cancellation between a unit's
    entries; on the shapes benchmark ahead of ``"taylor"`` on 34 of 46 seed pairs (seven models).
``"bn_scale"``
    Network Slimming's ``|gamma|`` of the BatchNorm (or LayerNorm/GroupNorm) that normalises the group's
    channels, divided by the group's mean (torch-pruning's ``BNScaleImportance``); a group without an affine
    norm falls back to ``"weight_norm"`` (said once).
``"random"``
    uniform draws from the callback's seeded generator (identical on every rank, checkpointed).

A plugin adds a criterion in a few lines -- a subclass of :class:`Importance` registered under a name, either
with :func:`register_importance` or in the ``lightning_prune.importance`` entry-point group::

    import lightning_prune as lp

    @lp.register_importance("bias_norm")
    class BiasNorm(lp.Importance):
        def group_scores(self, group, context):
            return lp.unit_reduce(context.model, group, lambda x: x.abs().sum(1), roles=("out",),
                                  params=("bias",))

    lp.GroupLassoPruning(importance="bias_norm", target_flops=0.5)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_prune.errors import InvalidArgumentError
from lightning_prune.graph.types import ChannelGroup, strip_prefix

__all__ = [
    "ENTRY_POINT_GROUP",
    "Importance",
    "ImportanceContext",
    "get_importance",
    "importance_names",
    "register_importance",
    "unit_reduce",
    "UnitSlice",
    "unit_slices",
]

#: the entry-point group a distribution registers importance criteria in (name = the criterion's name)
ENTRY_POINT_GROUP = "lightning_prune.importance"

_REGISTRY: dict[str, type[Importance]] = {}
_LOCK = threading.Lock()


@dataclass
class ImportanceContext:
    """What a criterion may read when it scores units.

    Attributes:
        model: the module the groups' names resolve on (the LightningModule).
        prefix: where ``model`` sits in the names (usually ``""``).
        generator: the callback's seeded CPU generator (``"random"``), or ``None``.
        native: the callback's own scores (``"gate"``: the gates), or ``None``.
        reduce: averages a tensor across the ranks (identity on one process).
        warn: says something once (the callback's ``rank_zero_warn``).
    """

    model: nn.Module
    prefix: str = ""
    generator: torch.Generator | None = None
    native: Callable[[], Mapping[str, Tensor]] | None = None
    reduce: Callable[[Tensor], Tensor] = lambda t: t
    warn: Callable[[str], None] = lambda message: None


class Importance:
    """A criterion: one score per unit of every channel group (higher = kept).

    A subclass implements :meth:`group_scores` (one group's raw scores, or ``None`` when it cannot score the
    group); :attr:`normalize` divides each group's scores by their mean, as torch-pruning's
    ``normalizer="mean"`` does, so that a global ranking compares groups of different sizes and scales. A
    data-driven criterion also implements :meth:`accumulate` (called after every optimizer step's backward,
    the gradients final), :meth:`reset` (after each decision) and :meth:`state_dict` /
    :meth:`load_state_dict` (checkpointed with the callback).
    """

    #: the name it is registered under (set by :func:`register_importance`)
    name: ClassVar[str] = ""
    #: divide each group's scores by their mean
    normalize: ClassVar[bool] = True
    #: :meth:`accumulate` needs the gradients after each backward
    needs_gradients: ClassVar[bool] = False
    #: draws from the callback's seeded generator (``context.generator``)
    needs_generator: ClassVar[bool] = False
    #: reads the model's parameters (or their gradients): a sharded (FSDP2) model holds only shards of them,
    #: so a channel callback refuses such a criterion under ``ModelParallelStrategy``
    reads_weights: ClassVar[bool] = True

    def group_scores(self, group: ChannelGroup, context: ImportanceContext) -> Tensor | None:
        """One raw score per unit of ``group`` (float, CPU), or ``None`` to fall back to ``"weight_norm"``."""
        raise NotImplementedError

    def scores(self, groups: Iterable[ChannelGroup], context: ImportanceContext) -> dict[str, Tensor]:
        """Group name -> one score per unit, normalised per group when :attr:`normalize`."""
        out: dict[str, Tensor] = {}
        fallback: list[str] = []
        for group in groups:
            score = self.group_scores(group, context)
            fell_back = score is None
            if score is None:
                fallback.append(group.name)
                score = WeightNorm().group_scores(group, context)
                assert score is not None
            score = score.detach().double().cpu().reshape(-1)
            if self.normalize or fell_back:
                score = _mean_normalised(score)
            out[group.name] = score.float()
        if fallback:
            self.warn_fallback(fallback, context)
        return out

    def warn_fallback(self, names: list[str], context: ImportanceContext) -> None:
        """Say (once per criterion object) which groups were scored by ``"weight_norm"`` instead."""
        if getattr(self, "_warned_fallback", False):
            return
        self._warned_fallback = True
        more = f" and {len(names) - 4} more" if len(names) > 4 else ""
        shown = ", ".join(f"`{n}`" for n in names[:4]) + more
        context.warn(f"importance={self.name!r} cannot score {len(names)} channel group(s) ({shown}):"
                     " they are ranked by 'weight_norm' instead.")

    # ------------------------------------------------------------------ data-driven criteria
    def accumulate(self, groups: Iterable[ChannelGroup], context: ImportanceContext) -> None:
        """After a backward (the gradients final): fold this step into the running statistics."""

    def reset(self) -> None:
        """A decision was made: start the statistics anew."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


def _mean_normalised(score: Tensor) -> Tensor:
    mean = score.mean() if score.numel() else score.new_zeros(())
    return score / mean if float(mean) > 0 else score


# ---------------------------------------------------------------------------------------------- the units
@dataclass(frozen=True)
class UnitSlice:
    """One parameter slice the units of a group own: ``tensor`` along ``dim`` at ``channels`` (the unit of
    each in ``units``); ``role`` is the :class:`~lightning_prune.graph.Slice` role."""

    name: str
    tensor: Tensor
    dim: int
    channels: Tensor
    units: Tensor
    role: str

    def rows(self, values: Tensor | None = None) -> Tensor:
        """``values`` (default: the parameter; e.g. its ``.grad``) at the slice, as ``(channels, rest)``."""
        t = self.tensor if values is None else values
        return t.detach().index_select(self.dim, self.channels.to(t.device)).movedim(self.dim, 0) \
            .reshape(len(self.channels), -1)


def unit_slices(model: nn.Module, group: ChannelGroup, prefix: str = "",
                roles: Iterable[str] = ("out", "in", "channel", "group", "param"),
                params: Iterable[str] = ("weight",)) -> Iterator[UnitSlice]:
    """Every parameter slice the group's units own (:class:`UnitSlice`).

    ``roles`` picks the kinds of :class:`~lightning_prune.graph.Slice` (``"out"``: producers' output rows,
    ``"in"``: readers' input columns, ``"channel"``: norms and depthwise filters, ``"group"``: whole conv
    groups, ``"param"``: free parameters such as ``pos_embed``); ``params`` which parameters of a module
    (``"weight"``, ``"bias"``; a norm's ``weight`` is its scale; readers' columns are weights only). The
    tensors are the live ones (a masked unit's entries are zeros); a slice that does not fit its tensor (the
    model was compressed meanwhile) is skipped.
    """
    roles, params = set(roles), tuple(params)
    named = dict(model.named_parameters())
    for sl in group.slices:
        if sl.role not in roles or sl.role == "free":
            continue
        local = strip_prefix(sl.module, prefix)
        if sl.role == "param":
            entries = [(local, sl.dim)]
        else:
            dim = 1 if sl.role == "in" else 0
            entries = [(f"{local}.{p}" if local else p, dim) for p in params
                       if p == "weight" or sl.role != "in"]
        for name, dim in entries:
            tensor = named.get(name)
            if tensor is None or tensor.dim() <= dim or not sl.channels:
                continue
            channels = torch.tensor(sl.channels, dtype=torch.long)
            if int(channels.max()) >= tensor.shape[dim]:
                continue
            yield UnitSlice(name, tensor, dim, channels, torch.tensor(sl.units, dtype=torch.long), sl.role)


def unit_reduce(model: nn.Module, group: ChannelGroup, per_row: Callable[[Tensor], Tensor],
                prefix: str = "", roles: Iterable[str] = ("out", "in", "channel", "group"),
                params: Iterable[str] = ("weight",), average: bool = True) -> Tensor | None:
    """One value per unit: ``per_row`` (``(channels, rest) -> (channels,)``, in float64) of each slice of
    :func:`unit_slices`, summed into the units, averaged over the tensors (``average``: torch-pruning's
    ``group_reduction="mean"``); ``None`` when no tensor matched."""
    total = torch.zeros(group.size, dtype=torch.float64)
    count = 0
    for piece in unit_slices(model, group, prefix, roles, params):
        total.index_add_(0, piece.units, per_row(piece.rows().double()).cpu())
        count += 1
    if not count:
        return None
    return total / count if average else total


# ---------------------------------------------------------------------------------------------- criteria
def register_importance(name: str, cls: type[Importance] | None = None) -> Any:
    """Register ``cls`` (an :class:`Importance` subclass) as ``importance=name``; usable as a decorator.
    Registering a name again replaces it."""
    def add(cls: type[Importance]) -> type[Importance]:
        if not (isinstance(cls, type) and issubclass(cls, Importance)):
            raise InvalidArgumentError(
                f"register_importance({name!r}) needs an Importance subclass, got {cls!r}")
        with _LOCK:
            cls.name = name
            _REGISTRY[name] = cls
        return cls

    return add if cls is None else add(cls)


def _entry_point_classes() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def importance_names(native: str | None = None) -> list[str]:
    """The names ``importance=`` accepts (``native``: the callback's own scores, e.g. ``"gate"``)."""
    names = set(_REGISTRY) | set(_entry_point_classes())
    names.discard("gate")
    if native:
        names.add(native)
    return sorted(names)


def get_importance(name: str | Importance, native: str | None = None,
                   who: str = "the callback") -> Importance:
    """A fresh criterion object for ``name`` (an :class:`Importance` is used as it is); a clear error
    listing the choices for an unknown name."""
    if isinstance(name, Importance):
        return name
    if isinstance(name, str):
        if name in _REGISTRY and name != "gate":
            return _REGISTRY[name]()
        eps = _entry_point_classes()
        if name in eps:
            cls = eps[name].load()
            register_importance(name, cls)
            return cls()
    choices = ", ".join(repr(n) for n in importance_names(native))
    extra = "" if native == "gate" else " ('gate' needs a gate callback: GroupLassoPruning, L0Pruning)"
    raise InvalidArgumentError(
        f"`importance` of {who} must be one of {choices}{extra}, got {name!r}. HINT: a plugin adds a"
        " criterion with lightning_prune.register_importance(name, cls) or the 'lightning_prune.importance'"
        " entry-point group.")


@register_importance("weight_norm")
class WeightNorm(Importance):
    """torch-pruning's ``GroupNormImportance``: mean over the unit's weight tensors of ``sum w**2`` of its
    slice, the group divided by its mean."""

    def group_scores(self, group: ChannelGroup, context: ImportanceContext) -> Tensor | None:
        score = unit_reduce(context.model, group, lambda x: x.pow(2).sum(1), context.prefix)
        return score if score is not None else torch.zeros(group.size, dtype=torch.float64)


def _is_norm_slice(model: nn.Module, name: str) -> bool:
    module = model.get_submodule(name.rpartition(".")[0])
    return isinstance(module, (_BatchNorm, nn.LayerNorm, nn.GroupNorm))


@register_importance("bn_scale")
class BatchNormScale(Importance):
    """``|gamma|`` of the norms that normalise the unit's channels (Network Slimming; torch-pruning's
    ``BNScaleImportance``), the group divided by its mean; ``None`` (weight norm) without such a norm."""

    def group_scores(self, group: ChannelGroup, context: ImportanceContext) -> Tensor | None:
        total = torch.zeros(group.size, dtype=torch.float64)
        count = 0
        for piece in unit_slices(context.model, group, context.prefix, roles=("channel",)):
            if _is_norm_slice(context.model, piece.name):
                total.index_add_(0, piece.units, piece.rows().double().abs().sum(1).cpu())
                count += 1
        return total / count if count else None


@register_importance("taylor")
class Taylor(Importance):
    """First-order Taylor: per step ``|sum w * dL/dw|`` over every parameter entry a unit owns, summed over
    the steps since the last decision (averaged across ranks each step); the group divided by its mean.

    ``elementwise=True`` takes the absolute value of every entry's product before the sum instead,
    ``sum |w * dL/dw|`` (torch-pruning's ``TaylorImportance`` default, ``multivariable=False``)."""

    needs_gradients = True

    def __init__(self, elementwise: bool = False) -> None:
        self.elementwise = bool(elementwise)
        self.sums: dict[str, Tensor] = {}
        self.steps = 0

    def step_scores(self, groups: Iterable[ChannelGroup], context: ImportanceContext) -> dict[str, Tensor]:
        """This step's signed ``sum w * dL/dw`` per unit (before the absolute value; ``elementwise``:
        ``sum |w * dL/dw|``)."""
        out = {}
        # summed on the parameters' device: one copy to the CPU a step
        device = next(iter(context.model.parameters()), torch.zeros(())).device
        device = torch.device("cpu") if device.type == "mps" else device  # (no float64 on MPS)
        for group in groups:
            total = torch.zeros(group.size, dtype=torch.float64, device=device)
            for piece in unit_slices(context.model, group, context.prefix, params=("weight", "bias")):
                grad = piece.tensor.grad
                if grad is None or grad.shape != piece.tensor.shape:
                    continue
                product = piece.rows().double() * piece.rows(grad).double()
                if self.elementwise:
                    product = product.abs()
                total.index_add_(0, piece.units.to(device), product.sum(1).to(device))
            out[group.name] = total
        return out

    def warn_reparametrised(self, groups: Iterable[ChannelGroup], context: ImportanceContext) -> None:
        """Say (once per criterion object) which layers' weights are left out of the scores: a weight computed
        from other parameters (``weight_norm``, another parametrization) has no ``.grad`` of its own."""
        if getattr(self, "_warned_reparametrised", False):
            return
        from torch.nn.utils import parametrize

        names = set()
        for group in groups:
            for sl in group.slices:
                if sl.role in ("free", "param"):
                    continue
                local = strip_prefix(sl.module, context.prefix)
                try:
                    module = context.model.get_submodule(local)
                except AttributeError:
                    continue
                if parametrize.is_parametrized(module, "weight") or hasattr(module, "weight_g"):
                    names.add(sl.module)
        if names:
            self._warned_reparametrised = True
            more = f" and {len(names) - 4} more" if len(names) > 4 else ""
            shown = ", ".join(f"`{n}`" for n in sorted(names)[:4]) + more
            context.warn(f"importance={self.name!r} leaves the weights of {len(names)} layer(s) ({shown}) out"
                         " of the scores: they are computed from other parameters (weight_norm or another"
                         " parametrization), which hold the gradients. The units are ranked by their other"
                         " layers. HINT: remove the parametrization before pruning, or another importance.")

    def accumulate(self, groups: Iterable[ChannelGroup], context: ImportanceContext) -> None:
        groups = list(groups)
        self.warn_reparametrised(groups, context)
        step = self.step_scores(groups, context)
        flat = torch.cat([step[g.name] for g in groups]) if groups else torch.zeros(0, dtype=torch.float64)
        flat = context.reduce(flat).double().cpu().abs()
        if not bool(torch.isfinite(flat).all()):  # an AMP step with overflowed gradients (skipped): left out
            return
        offset = 0
        for group in groups:
            part = flat[offset:offset + group.size]
            offset += group.size
            previous = self.sums.get(group.name)
            self.sums[group.name] = part.clone() if previous is None or previous.numel() != part.numel() \
                else previous + part
        self.steps += 1

    def group_scores(self, group: ChannelGroup, context: ImportanceContext) -> Tensor | None:
        score = self.sums.get(group.name)
        if score is None or score.numel() != group.size or not self.steps:
            return None  # no backward yet: weight norm (said once)
        return score.clone()

    def reset(self) -> None:
        self.sums, self.steps = {}, 0

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.clone() for k, v in self.sums.items()}, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums = {k: v.clone().double() for k, v in dict(state.get("sums") or {}).items()}
        self.steps = int(state.get("steps", 0))


@register_importance("taylor_elementwise")
class TaylorElementwise(Taylor):
    """``importance="taylor_elementwise"``: :class:`Taylor` with ``elementwise=True``, per step
    ``sum |w * dL/dw|`` (torch-pruning's ``TaylorImportance``): the form that ranked best on most of the
    shapes benchmark's models (README, "Which of ours to use")."""

    def __init__(self) -> None:
        super().__init__(elementwise=True)


@register_importance("random")
class RandomImportance(Importance):
    """Uniform draws from the callback's seeded generator (one per unit, groups in order)."""

    normalize = False
    needs_generator = True
    reads_weights = False

    def group_scores(self, group: ChannelGroup, context: ImportanceContext) -> Tensor | None:
        if context.generator is None:
            raise InvalidArgumentError("importance='random' needs the callback's seeded generator")
        return torch.rand(group.size, generator=context.generator, dtype=torch.float64)
