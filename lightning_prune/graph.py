"""Channel-group analysis: which channel dimensions of a model can be removed exactly, and how.

Shared by the gate callbacks, the channel baselines and :func:`lightning_prune.compress`. torch-pruning's
``DependencyGraph`` traces the model and maps indices through concatenations, residual sums, depthwise convs
and reshapes; this module expands its groups itself (a visited-set expansion that stays linear where
torch-pruning's re-adds every index subset), turns each into a :class:`ChannelGroup`, and keeps only the
groups whose removal is proven exact.

A group is a set of **units** removed together: a channel (a conv filter, a Linear unit, a residual-stream
channel with every producer, BatchNorm, LayerNorm entry, ``pos_embed``/``cls_token``/layer-scale entry and
reader column coupled to it), a whole attention **head** of timm's ``Attention`` (its q, k and v rows and its
``proj`` columns; ``num_heads`` is updated), or a whole **conv group** of a grouped convolution (ResNeXt,
RegNet: the channels that feed the group, the group's filters and their readers; ``groups`` is updated).

A unit is removed exactly when nothing reads it: every layer that mixes channels -- a Conv/Linear reading them
(an **input site**: the gate multiplies its input channels, and folds into its weight columns), a LayerNorm,
GroupNorm(1) or GRN computing statistics over them (a **norm site**: once units are pruned, its statistics are
taken over the kept channels only) -- must not see it. Depthwise convs, BatchNorms, activations, additions and
squeeze-excite multiplies act per channel and are sliced along. The claim is **checked, not assumed**: on a
float64 copy with random BatchNorm statistics, norm affines, biases, gains and layer scales, a random subset
of every group's units is masked (zero at the input sites, restricted norm sites) and the masked outputs are
compared with those of a copy from which the units were physically sliced; a group that breaks the equality
(or the slicing) is left alone with the reason. Groups that cannot be sliced at all (split sizes fixed in the
model's code, channel-mixing ops, weight-standardised readers) are rejected before that check, each with its
reason.

Example::

    analysis = analyse_channels(timm.create_model("resnet50"), torch.randn(2, 3, 64, 64))
    print(analysis.coverage, len(analysis.groups), analysis.skipped)
    small = copy.deepcopy(model); slice_units(small, analysis.groups,
                                              {g.name: [0, 1] for g in analysis.groups})
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_prune.core.targets import as_patterns, matches, uncompiled
from lightning_prune.core.threads import analysis_threads
from lightning_prune.errors import InvalidArgumentError

__all__ = [
    "GRAPH_TIME_LIMIT_S",
    "CostModel",
    "ChannelAnalysis",
    "ChannelGroup",
    "GraphTimeoutError",
    "Site",
    "Slice",
    "analyse_channels",
    "parameter_cuts",
    "call_model",
    "channel_dim",
    "example_inputs_for",
    "masked_and_sliced",
    "randomised_copy",
    "restricted_norm_hooks",
    "slice_units",
    "traced_root",
    "zero_unit_hooks",
]

#: graph analysis stops with :class:`GraphTimeoutError` after this many seconds
GRAPH_TIME_LIMIT_S = 30.0
_OP = tp.ops.OPTYPE
PRODUCER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: ops through which a channel cannot be sliced: the model's code fixes their sizes, or they mix channels
_BLOCKING = {
    _OP.SPLIT: "a split/chunk with sizes fixed in the model's code",
    _OP.SLICE: "a slice with bounds fixed in the model's code",
    _OP.UNBIND: "an unbind (attention q/k/v outside timm's Attention)",
    _OP.MHA: "nn.MultiheadAttention",
    _OP.LSTM: "an LSTM",
    _OP.EMBED: "an embedding",
    _OP.CUSTOMIZED: "a customised layer",
}


class GraphTimeoutError(InvalidArgumentError):
    """The channel-group analysis did not finish within its time limit."""


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Slice:
    """One tensor dimension that loses the group's removed units.

    Attributes:
        module: full name of the module (or of the parameter, for ``role="param"``).
        role: ``"free"`` (a parameter-free module such as an activation: nothing to slice; only its FLOPs
            shrink), ``"out"`` (Conv/Linear output rows, with bias and a weight-standardised conv's ``gain``),
            ``"in"`` (Conv/Linear input columns), ``"channel"`` (a per-channel module: BatchNorm, LayerNorm,
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
    it computes its statistics over the kept channels only.
    """

    module: str
    kind: str
    dim: int
    channels: tuple[int, ...]
    units: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Units removed together (see the module docstring).

    Attributes:
        name: the group's id (its root producer's module name).
        size: number of units.
        unit: ``"channel"``, ``"head"`` or ``"conv group"``.
        width: channels per unit (1, the head dim, or the conv-group width).
        sites: where the units are read (gates and restricted norms go there).
        slices: what loses the units when they are removed.
        producers: Conv/Linear modules whose output channels belong to the group.
        coupled: several producers meet (a residual stream): one gate value per unit shared by all readers.
        attrs: ``(module, attribute, per_unit)``: integer attributes that drop by ``per_unit`` per removed
            unit (``num_heads``, ``attn_dim``).
    """

    name: str
    size: int
    unit: str
    width: int
    sites: tuple[Site, ...]
    slices: tuple[Slice, ...]
    producers: tuple[str, ...]
    coupled: bool = False
    attrs: tuple[tuple[str, str, int], ...] = ()

    def input_sites(self) -> list[Site]:
        return [s for s in self.sites if s.kind == "input"]

    def norm_sites(self) -> list[Site]:
        return [s for s in self.sites if s.kind == "norm"]


@dataclass
class ChannelAnalysis:
    """What :func:`analyse_channels` found.

    Attributes:
        groups: the exactly removable groups.
        skipped: group name -> why it is left alone.
        weights: conv/linear module name -> weight elements (the coverage denominator: every Conv/Linear but
            the model's output layers).
        seconds: wall time of the analysis.
    """

    groups: list[ChannelGroup] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

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


# ---------------------------------------------------------------------------------------------- inputs
def traced_root(module: nn.Module) -> tuple[str, nn.Module]:
    """Where to trace: ``module`` itself when it has an ``example_input_array`` or is a timm model, else the
    first timm model inside it (``("model", ImageClassifier.model)``). A network the LightningModule compiled
    (``self.model = torch.compile(net)``) is traced through its original module
    (``("model._orig_mod", net)``, :func:`~lightning_prune.core.targets.uncompiled`)."""
    if getattr(module, "example_input_array", None) is not None or isinstance(
            getattr(module, "pretrained_cfg", None), dict):
        return uncompiled("", module)
    for name, sub in module.named_modules():
        if isinstance(getattr(sub, "pretrained_cfg", None), dict):
            return uncompiled(name, sub)
    return "", module



def example_inputs_for(module: nn.Module, input_size: Sequence[int] | None = None,
                       batch_size: int = 2) -> Any:
    """An input to trace ``module`` with: its ``example_input_array``, else a random batch of ``input_size``
    (default: timm's ``pretrained_cfg["input_size"]``, at the ViT's fixed ``img_size`` when it has one)."""
    example = getattr(module, "example_input_array", None)
    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if example is not None and input_size is None:  # (in the model's dtype: "bf16-true", "64-true" precision)
        return _cast(example.to(device), dtype) if isinstance(example, Tensor) else _cast(example, dtype)
    if input_size is None:
        cfg = getattr(module, "pretrained_cfg", None)
        if not isinstance(cfg, dict) or "input_size" not in cfg:
            raise InvalidArgumentError(
                f"Cannot tell what {type(module).__name__} takes as input."
                " HINT: pass `input_size=(3, 32, 32)` or set `example_input_array` on the LightningModule."
            )
        input_size = tuple(cfg["input_size"])
        img_size = getattr(getattr(module, "patch_embed", None), "img_size", None)
        if img_size is not None:
            input_size = (input_size[0], *tuple(img_size))
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, *input_size, generator=generator).to(device=device, dtype=dtype)


def call_model(model: nn.Module, example: Any) -> Any:
    """``model(example)``, unpacking a tuple/list into positional and a dict into keyword arguments."""
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, (list, tuple)):
        return model(*example)
    return model(example)


def like_model(example: Any, model: nn.Module) -> Any:
    """``example`` on the device of ``model``'s parameters, its floating tensors in their dtype (the strategy
    may have moved or converted the model since the example was made)."""
    param = next(iter(model.parameters()), None)
    if param is None:
        return example
    dtype = param.dtype if param.is_floating_point() else None

    def move(value: Any) -> Any:
        if isinstance(value, Tensor):
            value = value.to(param.device)
            return value.to(dtype) if dtype is not None and value.is_floating_point() else value
        if isinstance(value, (list, tuple)):
            return type(value)(move(v) for v in value)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    return move(example)


def _cast(example: Any, dtype: torch.dtype) -> Any:
    if isinstance(example, Tensor):
        return example.to(dtype) if example.is_floating_point() else example
    if isinstance(example, (list, tuple)):
        return type(example)(_cast(e, dtype) for e in example)
    if isinstance(example, dict):
        return {k: _cast(v, dtype) for k, v in example.items()}
    return example


def channel_dim(module: nn.Module) -> int:
    """The channel dimension of the tensors a module reads: last for Linear and plain LayerNorm/GRN
    (channels-last), 1 for convolutions, BatchNorm, GroupNorm and timm's ``LayerNorm2d``."""
    if isinstance(module, nn.Linear):
        return -1
    if _is_grn(module):
        return int(module.channel_dim)
    if isinstance(module, nn.LayerNorm):
        return 1 if "2d" in type(module).__name__.lower() else -1
    return 1


def _is_grn(module: nn.Module) -> bool:
    return type(module).__name__ == "GlobalResponseNorm" and hasattr(module, "channel_dim")


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, _CONV) and module.groups > 1 and module.groups == module.in_channels == \
        module.out_channels


def _is_grouped(module: nn.Module) -> bool:
    return isinstance(module, _CONV) and module.groups > 1 and not _is_depthwise(module)


def _is_std_conv(module: nn.Module) -> bool:
    """timm's weight-standardised convs (StdConv2d, ScaledStdConv2d...): the standardisation runs over the
    fan-in."""
    return isinstance(module, _CONV) and "StdConv" in type(module).__name__


def _is_timm_attention(module: nn.Module) -> bool:
    linear = all(isinstance(getattr(module, name, None), nn.Linear) for name in ("qkv", "proj"))
    sizes = ("num_heads", "head_dim", "attn_dim")
    return linear and all(isinstance(getattr(module, name, None), int) for name in sizes)


# ---------------------------------------------------------------------------------------------- time limit
@contextlib.contextmanager
def _deadline(seconds: float | None, what: str) -> Iterator[Callable[[], None]]:
    """A ``check()`` that raises :class:`GraphTimeoutError` past the deadline; in the main thread an alarm
    also interrupts code that never calls it (torch-pruning's tracing)."""
    if seconds is None:
        yield lambda: None
        return
    end = time.monotonic() + seconds

    def message() -> str:
        return (f"The channel-group analysis of {what} did not finish within {seconds:g} s. HINT: pass"
                " `include=[...]` to analyse fewer layers, or a larger `time_limit_s`.")

    def check() -> None:
        if time.monotonic() > end:
            raise GraphTimeoutError(message())

    use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")
    previous = None
    if use_alarm:
        def on_alarm(signum: int, frame: Any) -> None:
            raise GraphTimeoutError(message())

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds + 1.0)
    try:
        yield check
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------- expansion
@dataclass
class _Item:
    node: Any
    handler: Callable[..., Any]
    idxs: list[int]
    roots: list[int]


def _expand(graph: tp.DependencyGraph, module: nn.Module, fn: Callable[..., Any], idxs: Sequence[int],
            check: Callable[[], None]) -> list[_Item]:
    """The items coupled to ``fn`` on ``idxs`` of ``module``: torch-pruning's dependency walk, but each
    (node, handler) only propagates indices it has not seen, so models with many paths to one node (ReXNet's
    partial residuals) stay linear; one merged item per (node, handler)."""
    from torch_pruning import _helpers
    from torch_pruning.dependency.dependency import Dependency

    if _is_depthwise(module) and module.out_channels > 1:
        fn = tp.pruner.function.prune_depthwise_conv_out_channels
    start = [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs]
    root = graph.module2node[module]
    seen: dict[tuple[Any, Any], dict[int, Any]] = {(root, fn): {i.idx: i for i in start}}
    order = [(root, fn)]
    stack = [(Dependency(fn, fn, source=root, target=root), start)]
    steps = 0
    while stack:
        dep, current = stack.pop()
        steps += 1
        if steps % 256 == 0:
            check()
        for new_dep in dep.target.dependencies:
            if not new_dep.is_triggered_by(dep.handler):
                continue
            mapped = current
            for mapping in new_dep.index_mapping:
                if mapping is not None:
                    mapped = mapping(mapped)
            if not mapped:
                continue
            key = (new_dep.target, new_dep.handler)
            known = seen.setdefault(key, {})
            if not known:
                order.append(key)
            fresh = [i for i in mapped if i.idx not in known]
            if not fresh:
                continue
            for i in fresh:
                known[i.idx] = i
            stack.append((new_dep, fresh))
    items = []
    for node, handler in order:
        found = seen[(node, handler)]
        if found:
            ordered = sorted(found.values(), key=lambda h: h.idx)
            items.append(_Item(node, handler, [h.idx for h in ordered], [h.root_idx for h in ordered]))
    return items


def _build_graph(model: nn.Module, example: Any) -> tp.DependencyGraph:
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------- classification
@dataclass
class _Raw:
    """One expanded group before verification."""

    name: str
    items: list[_Item]
    size: int
    unit_of: Callable[[int], int]  # root channel -> unit
    unit: str = "channel"
    width: int = 1
    attrs: tuple[tuple[str, str, int], ...] = ()
    skip_modules: frozenset[int] = frozenset()  # id() of modules whose items are handled by the unit kind
    blocked: str | None = None


def _item_module(item: _Item) -> Any:
    return item.node.module


def _names(model: nn.Module, graph: tp.DependencyGraph) -> dict[int, str]:
    names = {id(m): n for n, m in model.named_modules()}
    names.update({id(p): n for n, p in model.named_parameters()})
    return names


def _describe(raw: _Raw, graph: tp.DependencyGraph, names: dict[int, str], prefix: str
              ) -> tuple[list[Site], list[Slice], list[str], str | None]:
    """Sites, slices and producers of a raw group, or the reason it cannot be sliced."""
    full = functools.partial(_prefixed, prefix)
    sites: list[Site] = []
    slices: list[Slice] = []
    producers: list[str] = []
    unit_of = raw.unit_of
    param_dims = {id(p): dim for p, dim in graph.unwrapped_parameters}
    for item in raw.items:
        module = _item_module(item)
        kind = item.node.type
        if kind in _BLOCKING and not (kind == _OP.UNBIND and raw.unit == "head"):
            return [], [], [], _BLOCKING[kind]
        if id(module) in raw.skip_modules:
            continue
        units = tuple(unit_of(r) for r in item.roots)
        channels = tuple(item.idxs)
        is_out = graph.is_out_channel_pruning_fn(item.handler)
        if kind == _OP.PARAMETER:
            name = names.get(id(module))
            if name is None or id(module) not in param_dims:
                return [], [], [], "a parameter torch-pruning cannot name"
            slices.append(Slice(full(name), "param", channels, units, dim=param_dims[id(module)]))
            continue
        if not isinstance(module, nn.Module):
            continue  # torch-pruning's own op nodes (additions, concatenations, reshapes): nothing to slice
        name = names.get(id(module))
        if name is None:
            continue
        if isinstance(module, PRODUCER_TYPES):
            if _is_depthwise(module):
                slices.append(Slice(full(name), "channel", channels, units))
            elif _is_grouped(module):
                return [], [], [], f"grouped convolution `{name}` (its groups must go whole)"
            elif is_out:
                slices.append(Slice(full(name), "out", channels, units))
                producers.append(full(name))
            else:
                if _is_std_conv(module):
                    return [], [], [], (f"weight-standardised conv `{name}` reads these channels (its"
                                        " standardisation over the fan-in changes when inputs go)")
                slices.append(Slice(full(name), "in", channels, units))
                sites.append(Site(full(name), "input", channel_dim(module), channels, units))
        elif isinstance(module, _BatchNorm):
            slices.append(Slice(full(name), "channel", channels, units))
        elif isinstance(module, nn.LayerNorm):
            if len(tuple(module.normalized_shape)) != 1:
                return [], [], [], f"LayerNorm `{name}` over several dimensions"
            slices.append(Slice(full(name), "channel", channels, units))
            sites.append(Site(full(name), "norm", channel_dim(module), channels, units))
        elif isinstance(module, nn.GroupNorm):
            if module.num_groups != 1:
                return [], [], [], f"GroupNorm `{name}` with {module.num_groups} groups"
            slices.append(Slice(full(name), "channel", channels, units))
            sites.append(Site(full(name), "norm", 1, channels, units))
        elif any(True for _ in module.parameters(recurse=False)):
            return [], [], [], f"{type(module).__name__} `{name}` (no rule to slice it)"
        elif not any(True for _ in module.children()):  # an activation, dropout, pooling: nothing to slice,
            # but its FLOPs shrink with the channels
            slices.append(Slice(full(name), "free", channels, units))
    # GRN reads channels through its own statistics: a norm site where its parameters are sliced
    for sl in list(slices):
        if sl.role == "param":
            owner_name = sl.module.rsplit(".", 1)[0]
            try:
                owner = graph.model.get_submodule(owner_name[len(prefix) + 1:] if prefix else owner_name)
            except AttributeError:
                continue
            if _is_grn(owner) and not any(s.module == owner_name for s in sites):
                sites.append(Site(owner_name, "norm", int(owner.channel_dim), sl.channels, sl.units))
    return sites, slices, producers, None


def _raw_groups(model: nn.Module, graph: tp.DependencyGraph, check: Callable[[], None]) -> list[_Raw]:
    """Every group rooted at a Conv/Linear's output channels (a timm Attention's inner dim as heads)."""
    names = _names(model, graph)
    covered: set[tuple[int, str]] = set()
    raws: list[_Raw] = []
    attention_of = {id(a.qkv): a for a in model.modules() if _is_timm_attention(a)}
    for module in [m for m in model.modules() if m in graph.module2node]:  # module order: stable group names
        if not isinstance(module, PRODUCER_TYPES) or (id(module), "out") in covered:
            continue
        check()
        if id(module) in attention_of:
            raws.append(_head_group(attention_of[id(module)], graph, names, check))
            covered.add((id(module), "out"))
            continue
        fn = graph.get_pruner_of_module(module).prune_out_channels
        n = graph.get_out_channels(module)
        if not n:
            continue
        items = _expand(graph, module, fn, list(range(n)), check)
        for item in items:
            if isinstance(item.node.module, PRODUCER_TYPES) and graph.is_out_channel_pruning_fn(item.handler):
                covered.add((id(item.node.module), "out"))
        raws.append(_Raw(names.get(id(module), "?"), items, n, lambda r: r))
    return _merge_grouped_convs(raws, graph, names)


def _head_group(attn: nn.Module, graph: tp.DependencyGraph, names: dict[int, str],
                check: Callable[[], None]) -> _Raw:
    """Whole heads of a timm ``Attention``: expanding the q rows reaches the k and v rows and the ``proj``
    columns; ``q_norm``/``k_norm`` (shared by the heads) are left as they are; ``num_heads``/``attn_dim``
    drop."""
    fn = graph.get_pruner_of_module(attn.qkv).prune_out_channels
    items = _expand(graph, attn.qkv, fn, list(range(attn.attn_dim)), check)
    hd = attn.head_dim
    shared = frozenset(id(m) for m in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None))
                       if isinstance(m, nn.Module) and any(True for _ in m.parameters()))
    name = names.get(id(attn), "?")
    return _Raw(names.get(id(attn.qkv), "?"), items, attn.num_heads, lambda r: (r % attn.attn_dim) // hd,
                unit="head", width=hd, attrs=((name, "num_heads", 1), (name, "attn_dim", hd)),
                skip_modules=shared)


def _merge_grouped_convs(raws: list[_Raw], graph: tp.DependencyGraph, names: dict[int, str]) -> list[_Raw]:
    """A grouped conv couples the group feeding it (A) and the group it produces (B) conv-group by conv-group:
    one merged group whose units are the conv groups (ResNeXt, RegNet)."""
    out_fn = graph.is_out_channel_pruning_fn

    def holder(conv: nn.Module, output: bool) -> list[_Raw]:
        return [r for r in raws if any(_item_module(i) is conv and bool(out_fn(i.handler)) == output
                                       for i in r.items)]

    used: set[int] = set()
    merged: list[_Raw] = []
    for conv in graph.model.modules():
        if not _is_grouped(conv) or conv not in graph.module2node:
            continue
        name = names.get(id(conv), "?")
        feeding, produced = holder(conv, False), holder(conv, True)
        if len(feeding) != 1 or len(produced) != 1 or feeding[0] is produced[0]:
            for r in feeding + produced:
                r.blocked = (f"grouped convolution `{name}` whose input and output channels are not two"
                             " separate groups")
            continue
        a, b = feeding[0], produced[0]
        if id(a) in used or id(b) in used:
            a.blocked = b.blocked = f"grouped convolution `{name}` next to another grouped convolution"
            continue
        item_in = next(i for i in a.items if _item_module(i) is conv and not out_fn(i.handler))
        ipg, opg = conv.in_channels // conv.groups, conv.out_channels // conv.groups
        unit_a = {r: idx // ipg for r, idx in zip(item_in.roots, item_in.idxs)}
        item_out = next(i for i in b.items if _item_module(i) is conv and out_fn(i.handler))
        unit_b = {r: idx // opg for r, idx in zip(item_out.roots, item_out.idxs)}
        if len(unit_a) != a.size or len(unit_b) != b.size:
            a.blocked = b.blocked = (f"grouped convolution `{name}` reads or writes only part of a"
                                     " channel group")
            continue
        offset = a.size
        items = [*a.items,
                 *[_Item(i.node, i.handler, i.idxs, [r + offset for r in i.roots]) for i in b.items]]

        def unit_of(r: int, unit_a: dict[int, int] = unit_a, unit_b: dict[int, int] = unit_b,
                    offset: int = offset) -> int:
            return unit_a[r] if r < offset else unit_b[r - offset]

        merged.append(_Raw(name, items, conv.groups, unit_of, unit="conv group", width=opg,
                           skip_modules=frozenset({id(conv)})))
        used.update({id(a), id(b)})
    return [r for r in raws if id(r) not in used] + merged


# ---------------------------------------------------------------------------------------------- masking
def _unit_tensor(units: Sequence[int], removed: set[int]) -> Tensor:
    return torch.tensor([u in removed for u in units], dtype=torch.bool)


def zero_unit_hooks(model: nn.Module, groups: Iterable[ChannelGroup], removed: Mapping[str, Iterable[int]],
                    prefix: str = "") -> list[Any]:
    """Forward pre-hooks that zero the removed units at every input site; returns the handles."""
    handles = []
    for group in groups:
        gone = set(removed.get(group.name, ()))
        if not gone:
            continue
        for site in group.input_sites():
            dead = [c for c, u in zip(site.channels, site.units) if u in gone]
            if not dead:
                continue
            module = model.get_submodule(_strip(site.module, prefix))
            index = torch.tensor(dead, dtype=torch.long)

            def hook(m: nn.Module, args: Any, index: Tensor = index, dim: int = site.dim) -> Any:
                x = args[0]
                return (x.index_fill(dim % x.dim(), index.to(x.device), 0.0), *args[1:])

            handles.append(module.register_forward_pre_hook(hook))
    return handles


def _prefixed(prefix: str, name: str) -> str:
    """``name`` under ``prefix`` (either may be empty)."""
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _strip(name: str, prefix: str) -> str:
    if prefix and name.startswith(prefix + "."):
        return name[len(prefix) + 1:]
    return "" if name == prefix else name


def _norm_size(module: nn.Module) -> int:
    """The channel count of a norm site (LayerNorm, GroupNorm, GRN)."""
    if isinstance(module, nn.GroupNorm):
        return int(module.num_channels)
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[0])
    return int(module.weight.shape[0])


def _restricted_forward(module: nn.Module, x: Tensor, keep: Tensor, dim: int) -> Tensor:
    """The norm's output with its statistics over the kept channels only (zeros at the others)."""
    dim = dim % x.dim()
    if _is_grn(module):
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
    else:
        y = F.layer_norm(kept, (kept.shape[-1],), weight, bias, module.eps)
    out = torch.zeros_like(moved)
    out[..., keep] = y.to(out.dtype)
    return out.movedim(-1, dim)


def restricted_norm_hooks(model: nn.Module, groups: Iterable[ChannelGroup],
                          removed: Mapping[str, Iterable[int]], prefix: str = "") -> list[Any]:
    """Forward hooks that make every norm site compute its statistics over the kept channels (all groups'
    removed units of one norm combined); returns the handles."""
    dead_by_module: dict[str, tuple[int, set[int]]] = {}
    for group in groups:
        gone = set(removed.get(group.name, ()))
        if not gone:
            continue
        for site in group.norm_sites():
            dim, dead = dead_by_module.setdefault(site.module, (site.dim, set()))
            dead.update(c for c, u in zip(site.channels, site.units) if u in gone)
    handles = []
    for name, (dim, dead) in dead_by_module.items():
        if not dead:
            continue
        module = model.get_submodule(_strip(name, prefix))
        size = _norm_size(module)
        keep = torch.tensor([i for i in range(size) if i not in dead], dtype=torch.long)

        def hook(m: nn.Module, args: Any, output: Any, keep: Tensor = keep, dim: int = dim,
                 size: int = size) -> Tensor:
            x = args[0]
            # the norm was sliced meanwhile: it computes over the kept channels anyway
            if x.shape[dim] != size:
                return output
            return _restricted_forward(m, x, keep.to(x.device), dim).to(output.dtype)

        handles.append(module.register_forward_hook(hook))
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
        _set(module, name, tensor.detach().index_select(dim, keep.to(tensor.device)).clone())


def _keep(size: int, dead: set[int]) -> Tensor:
    return torch.tensor([i for i in range(size) if i not in dead], dtype=torch.long)


@torch.no_grad()
def _slice_module(module: nn.Module, role: str, dead: set[int], dim: int = 0) -> None:
    if role == "out":
        size = module.weight.shape[0]
        keep = _keep(size, dead)
        for pname in ("weight", "bias", "gain"):
            _take(module, pname, 0, keep)
        if isinstance(module, _CONV):
            module.out_channels = len(keep)
        else:
            module.out_features = len(keep)
    elif role == "in":
        size = module.weight.shape[1]
        keep = _keep(size, dead)
        _take(module, "weight", 1, keep)
        if isinstance(module, _CONV):
            module.in_channels = len(keep)
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
        if _is_depthwise(module):
            keep = _keep(module.out_channels, dead)
            for pname in ("weight", "bias", "gain"):
                _take(module, pname, 0, keep)
            module.in_channels = module.out_channels = module.groups = len(keep)
        elif isinstance(module, _BatchNorm):
            keep = _keep(module.num_features, dead)
            for pname in ("weight", "bias", "running_mean", "running_var"):
                _take(module, pname, 0, keep)
            module.num_features = len(keep)
        elif isinstance(module, nn.LayerNorm):
            keep = _keep(module.normalized_shape[0], dead)
            for pname in ("weight", "bias"):
                _take(module, pname, 0, keep)
            module.normalized_shape = (len(keep),)
        elif isinstance(module, nn.GroupNorm):
            keep = _keep(module.num_channels, dead)
            for pname in ("weight", "bias"):
                _take(module, pname, 0, keep)
            module.num_channels = len(keep)
        else:  # pragma: no cover - _describe lets no other module through
            raise InvalidArgumentError(f"cannot slice {type(module).__name__}")


@torch.no_grad()
def slice_units(model: nn.Module, groups: Iterable[ChannelGroup], removed: Mapping[str, Iterable[int]],
                prefix: str = "") -> int:
    """Physically remove the ``removed`` units (group name -> unit indices) of ``groups`` from ``model`` in
    place; returns the number of units removed. ``prefix`` is where ``model`` sits in the names (``"model"``
    for an ImageClassifier's timm model when the groups were found on the LightningModule)."""
    dead: dict[tuple[str, str, int], set[int]] = {}
    attrs: dict[tuple[str, str], int] = {}
    count = 0
    for group in groups:
        gone = {int(u) for u in removed.get(group.name, ())}
        if not gone:
            continue
        if len(gone) >= group.size:
            raise InvalidArgumentError(f"cannot remove all {group.size} units of group {group.name!r}")
        count += len(gone)
        for sl in group.slices:
            key = (sl.module, sl.role, sl.dim)
            dead.setdefault(key, set()).update(c for c, u in zip(sl.channels, sl.units) if u in gone)
        for module_name, attr, per_unit in group.attrs:
            attrs[(module_name, attr)] = attrs.get((module_name, attr), 0) + per_unit * len(gone)
    params = dict(model.named_parameters())
    for (name, role, dim), channels in dead.items():
        if not channels or role == "free":
            continue
        local = _strip(name, prefix)
        if role == "param":
            owner_name, _, pname = local.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            tensor = params[local] if local in params else getattr(owner, pname)
            _set(owner, pname, tensor.detach().index_select(dim, _keep(tensor.shape[dim], channels)).clone())
        else:
            _slice_module(model.get_submodule(local), role, channels, dim)
    for (name, attr), drop in attrs.items():
        module = model.get_submodule(_strip(name, prefix))
        setattr(module, attr, getattr(module, attr) - drop)
    return count


def parameter_cuts(model: nn.Module, groups: Iterable[ChannelGroup], removed: Mapping[str, Iterable[int]],
                   prefix: str = "") -> dict[str, list[tuple[int, Tensor]]]:
    """What :func:`slice_units` will do to each parameter and buffer: ``{name: [(dim, kept indices), ...]}``
    (names relative to ``model``), so that tensors shaped like a parameter (optimizer state: momentum, Adam
    moments) can be cut the same way, and a compressed state padded back to the dense shapes."""
    dead: dict[tuple[str, str, int], set[int]] = {}
    for group in groups:
        gone = {int(u) for u in removed.get(group.name, ())}
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
        local = _strip(name, prefix)
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


# ---------------------------------------------------------------------------------------------- verification
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
            elif _is_grn(module):
                rand(p, -0.5, 0.5)
    return clone


def _compare(reference: Any, other: Any, rtol: float) -> float:
    """The largest relative difference (max |a - b| / max |a|) over matching output tensors."""
    if isinstance(reference, Tensor):
        if not isinstance(other, Tensor) or reference.shape != other.shape:
            return math.inf
        scale = reference.abs().max().clamp_min(1e-12)
        return float((reference - other).abs().max() / scale)
    if isinstance(reference, (list, tuple)):
        return max((_compare(a, b, rtol) for a, b in zip(reference, other)), default=0.0)
    if isinstance(reference, dict):
        return max((_compare(reference[k], other[k], rtol) for k in reference), default=0.0)
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
    example = _cast(example, dtype)
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
    except Exception:  # noqa: BLE001 - a masking or slicing the model's code does not accept is not exact
        return False
    return _compare(masked, sliced, rtol) <= rtol


def _exact_subsets(model: nn.Module, example: Any, groups: list[ChannelGroup], rtol: float,
                   check: Callable[[], None]) -> tuple[list[ChannelGroup], list[ChannelGroup]]:
    """(exact, not exact): one joint check, then halves of a failing set until single groups remain."""
    check()
    if not groups or _exact(model, example, groups, rtol):
        return groups, []
    if len(groups) == 1:
        return [], groups
    half = len(groups) // 2
    good_a, bad_a = _exact_subsets(model, example, groups[:half], rtol, check)
    good_b, bad_b = _exact_subsets(model, example, groups[half:], rtol, check)
    good = good_a + good_b
    if good and len(good_a) and len(good_b) and not _exact(model, example, good, rtol):  # pragma: no cover
        return good_a, bad_a + good_b + bad_b  # interacting groups: keep the first half only
    return good, bad_a + bad_b


# ---------------------------------------------------------------------------------------------- analysis
def analyse_channels(
    model: nn.Module,
    example_inputs: Any,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    prune_coupled: bool = True,
    prefix: str = "",
    time_limit_s: float | None = GRAPH_TIME_LIMIT_S,
    rtol: float = 1e-6,
) -> ChannelAnalysis:
    """The exactly removable channel groups of ``model``, and why the others are left alone.

    Args:
        model: the module to trace (a timm model, or a LightningModule with ``example_input_array``).
        example_inputs: what ``model`` is called with while tracing.
        include: globs over module names; only the groups with a producer that matches are considered.
        exclude: globs; a group with a producer that matches is left alone.
        prune_coupled: also the coupled groups (residual streams: several producers, one gate per channel).
        prefix: prepended to every module name (where ``model`` sits inside the LightningModule).
        time_limit_s: stop with :class:`GraphTimeoutError` after that long (``None``: no limit).
        rtol: the largest relative difference between masked and sliced outputs a group may cause.

    Raises:
        GraphTimeoutError: the analysis took longer than ``time_limit_s``.
    """
    include_p, exclude_p = as_patterns(include), as_patterns(exclude)
    start = time.monotonic()
    analysis = ChannelAnalysis()
    full = functools.partial(_prefixed, prefix)
    with analysis_threads(), _deadline(time_limit_s, type(model).__name__) as check:
        graph = _build_graph(model, example_inputs)
        check()
        names = _names(model, graph)
        raws = _raw_groups(model, graph, check)
        outputs = _output_modules(model, example_inputs)
        for name, module in model.named_modules():
            if isinstance(module, PRODUCER_TYPES) and id(module) not in outputs:
                analysis.weights[full(name)] = module.weight.numel()
                analysis._out_sizes[full(name)] = module.weight.shape[0]
        candidates: list[ChannelGroup] = []
        for raw in raws:
            gname = full(raw.name)
            sites, slices, producers, blocked = _describe(raw, graph, names, prefix)
            blocked = raw.blocked or blocked
            if raw.unit == "conv group" and blocked is None:
                slices = _grouped_slices(raw, graph, names, prefix, slices)
            if include_p and not any(matches(p, include_p) for p in producers):
                continue
            if exclude_p and any(matches(p, exclude_p) for p in producers):
                continue
            if blocked is None and not sites:
                blocked = "no layer reads these channels (model output)"
            if blocked is None and raw.size < 2:
                blocked = "a single unit"
            coupled = len(producers) > 1
            if blocked is None and coupled and not prune_coupled:
                blocked = "coupled channels (set prune_coupled=True to gate them together)"
            if blocked is not None:
                analysis.skipped[gname] = blocked
                continue
            candidates.append(ChannelGroup(gname, raw.size, raw.unit, raw.width, tuple(sites), tuple(slices),
                                           tuple(producers), coupled,
                                           tuple((full(m), a, k) for m, a, k in raw.attrs)))
        local = [_localised(g, prefix) for g in candidates]
        good, bad = _exact_subsets(model, example_inputs, local, rtol, check)
        good_names = {g.name for g in good}
        for group in candidates:
            if _strip(group.name, prefix) in good_names or (not prefix and group.name in good_names):
                analysis.groups.append(group)
            else:
                analysis.skipped[group.name] = ("removing these channels changes the outputs"
                                                " (checked on a copy)")
    analysis.seconds = time.monotonic() - start
    return analysis


def _localised(group: ChannelGroup, prefix: str) -> ChannelGroup:
    """The group with names relative to the traced module (what the checks on its copies use)."""
    if not prefix:
        return group
    s = lambda n: _strip(n, prefix)  # noqa: E731
    return ChannelGroup(
        s(group.name), group.size, group.unit, group.width,
        tuple(Site(s(x.module), x.kind, x.dim, x.channels, x.units) for x in group.sites),
        tuple(Slice(s(x.module), x.role, x.channels, x.units, x.dim) for x in group.slices),
        tuple(s(p) for p in group.producers), group.coupled, tuple((s(m), a, k) for m, a, k in group.attrs))


def _grouped_slices(raw: _Raw, graph: tp.DependencyGraph, names: dict[int, str], prefix: str,
                    slices: list[Slice]) -> list[Slice]:
    """Add the grouped conv's own slice: its output rows go conv group by conv group."""
    full = functools.partial(_prefixed, prefix)
    conv = graph.model.get_submodule(raw.name)
    rows = tuple(range(conv.out_channels))
    opg = conv.out_channels // conv.groups
    return [*slices, Slice(full(raw.name), "group", rows, tuple(r // opg for r in rows))]


def _output_modules(model: nn.Module, example: Any) -> set[int]:
    """Modules whose output is (part of) the model's output: timm's classifier, or found by a forward."""
    out: set[int] = set()
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("classifier"):
        for name in ([cfg["classifier"]] if isinstance(cfg["classifier"], str) else cfg["classifier"]):
            try:
                out.update(id(m) for m in model.get_submodule(name).modules())
            except AttributeError:
                pass
    if hasattr(model, "get_classifier"):
        classifier = model.get_classifier()
        if isinstance(classifier, nn.Module):
            out.update(id(m) for m in classifier.modules())
    return out


# ---------------------------------------------------------------------------------------------- cost
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
        from torch_pruning.utils import count_ops_and_params

        self.groups = list(groups)
        self.prefix = prefix
        self._model, self._example = model, example_inputs
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                flops, params, layer_flops, _ = count_ops_and_params(model, example_inputs, layer_wise=True)
        finally:
            model.train(was_training)
        full = functools.partial(_prefixed, prefix)
        self.dense_flops = float(flops)
        self.dense_params = float(sum(p.numel() for p in model.parameters()))
        scale = 1.0 / _batch_size(example_inputs)  # per-layer counts are per batch, the total per sample
        # what torch-pruning counts per module: leaves, and containers it counts as a whole (timm's Attention)
        counted = {id(m): float(layer_flops.get(m) or 0.0) * scale for m in model.modules()}
        own = {full(n): counted[id(m)] - sum(counted[id(c)] for c in m.children())
               for n, m in model.named_modules()}
        self._flops = {n: v for n, v in own.items() if v > 0.5}  # what each module counts beyond its children
        self._children = {full(n): [full(f"{n}.{c}" if n else c) for c, _ in m.named_modules() if c]
                          for n, m in model.named_modules() if any(True for _ in m.children())}
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
        local = _strip(sl.module, self.prefix)
        if sl.role == "param":
            return int(model.get_parameter(local).shape[sl.dim])
        module = model.get_submodule(local)
        if sl.role == "in":
            return int(module.weight.shape[1])
        if sl.role in ("out", "group"):
            return int(module.weight.shape[0])
        for attr in ("num_features", "num_channels", "out_channels"):
            if isinstance(getattr(module, attr, None), int):
                return int(getattr(module, attr))
        return int(module.normalized_shape[0])

    def cost(self, removed: Mapping[str, Iterable[int]]) -> tuple[float, float]:
        """``(flops, params)`` after removing ``removed`` (group name -> units)."""
        dead: dict[tuple[str, str, int], set[int]] = {}
        for group in self.groups:
            gone = set(removed.get(group.name, ()))
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
        for module, fracs in by_module.items():
            # a free parameter (pos_embed, gamma): its own entry
            if any(k.startswith("param") for k in fracs):
                owner, _, pname = module.rpartition(".")
                frac = next(v for k, v in fracs.items() if k.startswith("param"))
                params -= sum(numel for n, numel, _ in self._params.get(owner, [])
                              if n == pname) * (1.0 - frac)
                continue
            f_out = fracs.get("out", fracs.get("group", fracs.get("channel", fracs.get("free", 1.0))))
            f_in = fracs.get("in", 1.0) if "channel" not in fracs else 1.0
            kept_share[module] = f_out * f_in
            for pname, numel, shape in self._params.get(module, []):
                if pname == "weight" and len(shape) >= 2 and "channel" not in fracs:
                    params -= numel * (1.0 - f_out * f_in)
                else:
                    params -= numel * (1.0 - f_out)
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
        from torch_pruning.utils import count_ops_and_params

        small = copy.deepcopy(self._model).eval()
        for module in small.modules():  # gates and restricted norms of the original would follow the copy
            module._forward_pre_hooks.clear()
            module._forward_hooks.clear()
        local = [_localised(g, self.prefix) for g in self.groups]
        slice_units(small, local, {_strip(k, self.prefix): v for k, v in removed.items()})
        flops, params = count_ops_and_params(small, like_model(self._example, small))
        return float(flops) / max(self.dense_flops, 1.0), float(params) / max(self.dense_params, 1.0)


def _batch_size(example: Any) -> int:
    if isinstance(example, Tensor):
        return max(int(example.shape[0]), 1) if example.dim() else 1
    if isinstance(example, (list, tuple)) and example:
        return _batch_size(example[0])
    if isinstance(example, dict) and example:
        return _batch_size(next(iter(example.values())))
    return 1
