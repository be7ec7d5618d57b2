"""Raw channel groups from torch-pruning's ``DependencyGraph``: trace the model, expand every Conv/Linear's
output channels through what couples them (one visited-set walk per producer), group timm's attention
heads and grouped convs' conv groups, and describe each raw group as sites and slices (or the reason it
cannot be sliced). This is the part the operator-graph engine replaces."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_prune.graph.inputs import call_model, evaluating
from lightning_prune.graph.layers import (
    PRODUCER_TYPES,
    channel_dim,
    is_depthwise,
    is_grn,
    is_grouped,
    is_std_conv,
    is_timm_attention,
)
from lightning_prune.graph.types import GraphTimeoutError, Site, Slice, failure_reason, prefixed_name

_OP = tp.ops.OPTYPE

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


class _Index(NamedTuple):
    """A unit index as torch-pruning's index mappings take and return it: where it is now, and the root
    channel it came from."""

    idx: int
    root_idx: int


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
    partial residuals) stay linear; one merged item per (node, handler). (torch-pruning's index mappings read
    and return ``(idx, root_idx)`` pairs: :class:`_Index` is ours, nothing private of torch-pruning is
    imported.)"""
    if is_depthwise(module) and module.out_channels > 1:
        fn = tp.pruner.function.prune_depthwise_conv_out_channels
    start = [_Index(idx=i, root_idx=i) for i in idxs]
    root = graph.module2node[module]
    seen: dict[tuple[Any, Any], dict[int, Any]] = {(root, fn): {i.idx: i for i in start}}
    order = [(root, fn)]
    stack: list[tuple[Any, Callable[..., Any], list[Any]]] = [(root, fn, start)]
    steps = 0
    while stack:
        node, handler, current = stack.pop()
        steps += 1
        if steps % 256 == 0:
            check()
        for new_dep in node.dependencies:
            if not new_dep.is_triggered_by(handler):
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
            stack.append((new_dep.target, new_dep.handler, fresh))
    items = []
    for node, handler in order:
        found = seen[(node, handler)]
        if found:
            ordered = sorted(found.values(), key=lambda h: h.idx)
            items.append(_Item(node, handler, [h.idx for h in ordered], [h.root_idx for h in ordered]))
    return items


def build_dependency_graph(model: nn.Module, example: Any) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model`` traced on ``example`` (in eval mode, one forward: through
    :func:`call_model`). Whatever happens, the model keeps its mode and no hook torch-pruning registered
    stays behind (it leaves them when the forward raises)."""
    before = {id(m): set(m._forward_hooks) for m in model.modules()}
    try:
        with torch.enable_grad(), evaluating(model):
            return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False,
                                                         forward_fn=call_model)
    finally:
        for m in model.modules():
            for key in set(m._forward_hooks) - before.get(id(m), set()):
                del m._forward_hooks[key]


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


def module_names_by_id(model: nn.Module, graph: tp.DependencyGraph) -> dict[int, str]:
    names = {id(m): n for n, m in model.named_modules()}
    names.update({id(p): n for n, p in model.named_parameters()})
    return names


def describe_raw_group(raw: _Raw, graph: tp.DependencyGraph, names: dict[int, str], prefix: str
              ) -> tuple[list[Site], list[Slice], list[str], str | None]:
    """Sites, slices and producers of a raw group, or the reason it cannot be sliced."""
    full = functools.partial(prefixed_name, prefix)
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
            if is_depthwise(module):
                slices.append(Slice(full(name), "channel", channels, units))
            elif is_grouped(module):
                return [], [], [], f"grouped convolution `{name}` (its groups must go whole)"
            elif is_out:
                slices.append(Slice(full(name), "out", channels, units))
                producers.append(full(name))
            else:
                if is_std_conv(module):
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
            if is_grn(owner) and not any(s.module == owner_name for s in sites):
                sites.append(Site(owner_name, "norm", int(owner.channel_dim), sl.channels, sl.units))
    return sites, slices, producers, None


def raw_groups(model: nn.Module, graph: tp.DependencyGraph, check: Callable[[], None]
                ) -> tuple[list[_Raw], dict[str, str]]:
    """Every group rooted at a Conv/Linear's output channels (a timm Attention's inner dim as heads), and
    ``{producer name: reason}`` for the producers whose expansion failed (what torch-pruning raised: the
    producer is left alone, the others go on)."""
    names = module_names_by_id(model, graph)
    covered: set[tuple[int, str]] = set()
    raws: list[_Raw] = []
    failed: dict[str, str] = {}
    attention_of = {id(a.qkv): a for a in model.modules() if is_timm_attention(a)}
    for module in [m for m in model.modules() if m in graph.module2node]:  # module order: stable group names
        if not isinstance(module, PRODUCER_TYPES) or (id(module), "out") in covered:
            continue
        check()
        name = names.get(id(module), "?")
        try:
            if id(module) in attention_of:
                raws.append(_head_group(attention_of[id(module)], graph, names, check))
                covered.add((id(module), "out"))
                continue
            fn = graph.get_pruner_of_module(module).prune_out_channels
            n = graph.get_out_channels(module)
            if not n:
                continue
            items = _expand(graph, module, fn, list(range(n)), check)
        except GraphTimeoutError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever the dependency graph raises skips this group
            failed[name] = failure_reason("following its channels through the graph", error)
            covered.add((id(module), "out"))
            continue
        for item in items:
            if isinstance(item.node.module, PRODUCER_TYPES) and graph.is_out_channel_pruning_fn(item.handler):
                covered.add((id(item.node.module), "out"))
        raws.append(_Raw(name, items, n, lambda r: r))
    return _merge_grouped_convs(raws, graph, names), failed


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
        if not is_grouped(conv) or conv not in graph.module2node:
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


def grouped_slices(raw: _Raw, graph: tp.DependencyGraph, names: dict[int, str], prefix: str,
                    slices: list[Slice]) -> list[Slice]:
    """Add the grouped conv's own slice: its output rows go conv group by conv group."""
    full = functools.partial(prefixed_name, prefix)
    conv = graph.model.get_submodule(raw.name)
    rows = tuple(range(conv.out_channels))
    opg = conv.out_channels // conv.groups
    return [*slices, Slice(full(raw.name), "group", rows, tuple(r // opg for r in rows))]
