"""The analysis's vocabulary: a group of units, where they are read (:class:`Site`), what loses them
(:class:`Slice`), what an analysis found (:class:`ChannelAnalysis`), and its errors; with the naming helpers
that place module names under the LightningModule's prefix."""

from __future__ import annotations

import dataclasses
import linecache
from collections.abc import Iterable
from dataclasses import dataclass, field

from lightning_prune.errors import InvalidArgumentError

__all__ = ["ChannelAnalysis", "ChannelGroup", "GraphTimeoutError", "ModelInputError", "Site", "Slice",
           "code_location", "failure_reason"]


class GraphTimeoutError(InvalidArgumentError):
    """The channel-group analysis used more CPU time than its limit (``analysis_time_limit_s``)."""


class ModelInputError(InvalidArgumentError):
    """The model raised when called on the example input the analysis was given (the input, not the
    analysis, is at fault: the message names the model's exception and the line that raised it)."""


def code_location(error: BaseException) -> str:
    """Where ``error`` was raised outside torch and lightning-prune: ``"halo_attn.py:208
    (`_assert(H % self.block_size == 0, '')`)"``, or ``""``."""
    where = ""
    tb = error.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module.split(".")[0] not in ("torch", "lightning_prune", "numpy", "functools", "contextlib"):
            code = tb.tb_frame.f_code
            line = linecache.getline(code.co_filename, tb.tb_lineno).strip()
            where = f"{code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}"
            where += f" (`{line[:100]}`)" if line else ""
        tb = tb.tb_next
    return where


def failure_reason(what: str, error: BaseException) -> str:
    """Why a group (or a whole module) is left alone when ``what`` raised ``error``: the exception, and the
    package it came from (torch-pruning, torch, timm, the model's code...), on one short line."""
    origin = "the model's code"
    tb = error.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module:
            top = module.split(".")[0]
            origin = {"torch_pruning": "torch-pruning", "lightning_prune": "lightning-prune",
                      "__main__": "the model's code"}.get(top, top)
        tb = tb.tb_next
    text = " ".join(str(error).split()) or "no message"
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{what} failed in {origin} ({type(error).__name__}: {text})"


@dataclass(frozen=True)
class Slice:
    """One tensor dimension that loses the group's removed units.

    Attributes:
        module: full name of the module (or of the parameter, for ``role="param"``).
        role: ``"free"`` (a parameter-free module such as an activation: nothing to slice; only its FLOPs
            shrink), ``"out"`` (Conv/Linear output rows, with bias and a weight-standardised conv's ``gain``),
            ``"in"`` (Conv/Linear input columns; a layer that computes its weight is frozen first, see
            :attr:`ChannelGroup.frozen`), ``"channel"`` (a per-channel module: BatchNorm, LayerNorm,
            GroupNorm, depthwise conv), ``"param"`` (a free parameter such as ``pos_embed``, along ``dim``) or
            ``"group"`` (whole conv groups of a grouped conv's output).
        dim: the parameter's dimension (``role="param"`` only).
        channels: the module's index of each of the group's channels.
        units: the unit each of those channels belongs to.
    """

    module: str
    role: str
    channels: tuple[int, ...]
    units: tuple[int, ...]
    dim: int = 0


@dataclass(frozen=True)
class Site:
    """A place where a unit is read by something that mixes channels.

    ``kind="input"``: the input of a Conv/Linear (channel ``dim``); a gate multiplies these channels there
    (and folds into the weight columns). ``kind="norm"``: a LayerNorm/GroupNorm(1)/GRN; once units are pruned
    it computes its statistics over the kept channels only. ``kind="slide"``: a convolution sliding along
    the units (``dim`` is one of its spatial dims: ECA's conv1d over the channel vector); the removed units
    are zeros in its input, and once they are sliced it runs at the dense width
    (:mod:`lightning_prune.graph.along`), its weight untouched. ``weight``: the Conv/Linear weight that reads
    the channels when ``module`` is not that layer itself (a module whose forward calls ``F.linear`` with a
    child's weight: the gate goes on the module's input, and folds into that weight's columns).

    ``channels`` index the input tensor (what hooks on the module's input use); ``columns``, where not empty,
    the weight's dim 1 at each of them: a grouped conv whose units are paired across its groups reads input
    channel ``c`` with column ``c % (cin // groups)``, so several channels (one per conv group, all of one
    unit) share a column. Whatever indexes the weight uses :attr:`weight_columns` or :meth:`column_units`.
    ``extent``: a slide site's width along ``dim`` (what its conv reads there, all groups together).
    """

    module: str
    kind: str
    dim: int
    channels: tuple[int, ...]
    units: tuple[int, ...]
    weight: str = ""
    columns: tuple[int, ...] = ()
    extent: int = 0

    @property
    def weight_name(self) -> str:
        """The full name of the weight whose columns read the channels."""
        return self.weight or f"{self.module}.weight"

    @property
    def weight_columns(self) -> tuple[int, ...]:
        """The weight column (dim 1) of each of :attr:`channels` (aligned with :attr:`units`)."""
        return getattr(self, "columns", ()) or self.channels  # (a site pickled before columns existed)

    def column_units(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(columns, units)``: each weight column the site reads once, with its unit."""
        seen: dict[int, int] = {}
        for c, u in zip(self.weight_columns, self.units):
            seen.setdefault(c, u)
        return tuple(seen), tuple(seen.values())


@dataclass(frozen=True)
class ChannelGroup:
    """Units removed together (see the module docstring).

    Attributes:
        name: the group's id (its root producer's module name).
        size: number of units.
        unit: ``"channel"``, ``"head"``, ``"conv group"`` or ``"norm group"`` (the channels of one group of a
            GroupNorm: its statistics are per group).
        width: channels per unit (1, the head dim, or the conv-group width).
        sites: where the units are read (gates and restricted norms go there).
        slices: what loses the units when they are removed.
        producers: Conv/Linear modules whose output channels belong to the group.
        coupled: several producers meet (a residual stream): one gate value per unit shared by all readers.
        attrs: ``(module, attribute, per_unit)``: integer attributes that drop by ``per_unit`` per removed
            unit (``num_heads``, ``attn_dim``), or by ``per_unit[u]`` for unit ``u`` when the units hold
            different shares of the size (a slice bound drops by the removed channels before it);
            ``attribute`` may name an element of a list of sizes (``"splits[1]"``).
        floors: sets of units of which one always stays: the units that hold every channel of some module
            (a piece of a split read by a conv of its own, CoaT's heads per window size), which would be left
            with none. A removal that takes a whole floor keeps its first unit (see :meth:`feasible`).
        frozen: layers that compute their weight from their parameters (weight-standardised convs, a
            ``weight_norm`` Linear) and are frozen into plain layers (:mod:`lightning_prune.graph.frozen`)
            before any unit of the group goes: every removal (slicing, masks, folded gates, a refit) acts on
            the weight they computed at that moment.
    """

    name: str
    size: int
    unit: str
    width: int
    sites: tuple[Site, ...]
    slices: tuple[Slice, ...]
    producers: tuple[str, ...]
    coupled: bool = False
    attrs: tuple[tuple[str, str, int | tuple[int, ...]], ...] = ()
    floors: tuple[tuple[int, ...], ...] = ()
    frozen: tuple[str, ...] = ()

    def feasible(self, gone: Iterable[int]) -> set[int]:
        """``gone`` without the first unit of each floor it would take whole (no module left empty)."""
        gone = {int(u) for u in gone}
        for floor in getattr(self, "floors", ()):  # (a group pickled before floors existed has none)
            if floor and gone.issuperset(floor):
                gone.discard(floor[0])
        return gone

    def input_sites(self) -> list[Site]:
        return [s for s in self.sites if s.kind == "input"]

    def norm_sites(self) -> list[Site]:
        return [s for s in self.sites if s.kind == "norm"]

    def slide_sites(self) -> list[Site]:
        return [s for s in self.sites if s.kind == "slide"]


@dataclass
class ChannelAnalysis:
    """What :func:`analyse_channels` found.

    Attributes:
        groups: the exactly removable groups.
        skipped: group name -> why it is left alone.
        weights: conv/linear module name -> weight elements (the coverage denominator: every Conv/Linear but
            the model's output layers).
        seconds: wall time of the analysis.
        cpu_seconds: CPU time of the analysis (what ``analysis_time_limit_s`` limits).
    """

    groups: list[ChannelGroup] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    @property
    def coverage(self) -> float:
        """Fraction of the conv/linear weight elements whose output channels sit in a removable group."""
        covered: dict[str, set[int]] = {}
        out_sizes: dict[str, int] = {}
        for group in self.groups:
            for sl in group.slices:
                if sl.role in ("out", "group", "channel") and sl.module in self.weights:
                    covered.setdefault(sl.module, set()).update(sl.channels)
        total = sum(self.weights.values())
        if not total:
            return 0.0
        for name in covered:
            out_sizes[name] = self._out_sizes.get(name, max(covered[name]) + 1)
        return sum(self.weights[n] * len(c) / out_sizes[n] for n, c in covered.items()) / total

    _out_sizes: dict[str, int] = field(default_factory=dict, repr=False)


def prefixed_name(prefix: str, name: str) -> str:
    """``name`` under ``prefix`` (either may be empty)."""
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def strip_prefix(name: str, prefix: str) -> str:
    if prefix and name.startswith(prefix + "."):
        return name[len(prefix) + 1:]
    return "" if name == prefix else name


def localised_group(group: ChannelGroup, prefix: str) -> ChannelGroup:
    """The group with names relative to the traced module (what the checks on its copies use)."""
    if not prefix:
        return group
    s = lambda n: strip_prefix(n, prefix)  # noqa: E731
    return ChannelGroup(
        s(group.name), group.size, group.unit, group.width,
        tuple(dataclasses.replace(x, module=s(x.module), weight=s(x.weight) if x.weight else "")
              for x in group.sites),
        tuple(Slice(s(x.module), x.role, x.channels, x.units, x.dim) for x in group.slices),
        tuple(s(p) for p in group.producers), group.coupled, tuple((s(m), a, k) for m, a, k in group.attrs),
        group.floors, tuple(s(m) for m in getattr(group, "frozen", ())))
