"""Channel gates attached with forward hooks, over channel groups found by torch-pruning's DependencyGraph.

A *channel group* is a set of output channels that must be removed together: the output channels of a
Conv/Linear, the BatchNorm after it, the input channels of every layer that reads them, and every other
layer coupled to them (a residual addition, a depthwise conv, a squeeze-excite multiply, a concatenation).
torch-pruning's ``DependencyGraph`` finds the couplings; :func:`find_channel_groups` decides where one
gate per channel can sit so that a zero gate makes every reader of the channel see exact zeros:

* the gate multiplies the output of the BatchNorm that follows a Conv/Linear (its affine output, before the
  activation of timm's ``BatchNormAct2d``), or the Conv/Linear's output when no BatchNorm follows (point 6
  of the Habr article «Редукция нейронных сетей при помощи вариационной оптимизации», "Reducing neural
  networks with variational optimisation", in Russian: masks after BatchNorm, whose statistics break once
  channels vanish);
* a group with several producers (residual additions) is *coupled*: it is left alone unless
  ``prune_coupled=True``, which puts one shared gate after every producer (the Habr channel-pruning
  article's "buffer layers");
* the choice is *checked*, not assumed: on a copy of the model whose biases and BatchNorm statistics are
  randomised, the candidate gate sites are zeroed and every reader of the group must see exact zeros
  (an activation with f(0) != 0, a BatchNorm between the gate and a reader, or a channel-mixing op fails).

Gates are :class:`Gate` modules held *outside* the model (the model's ``state_dict`` keeps its keys); a
:class:`GateSet` attaches them with hooks and folds them into the weights. :class:`ScaleGate` is the
group-LASSO gate (a learnable scale); the L0 callback plugs in a hard-concrete :class:`Gate` subclass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_prune.errors import InvalidArgumentError
from lightning_prune.functional.channels import channel_view, fold_scale
from lightning_prune.targets import as_patterns, matches, timm_default_exclusions

__all__ = [
    "ChannelGroup",
    "Gate",
    "GateSet",
    "ScaleGate",
    "example_inputs_for",
    "find_channel_groups",
    "traced_root",
]

PRODUCER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_OP = tp.ops.OPTYPE
# Ops across which a channel cannot be removed on its own (they mix channels or reshape them into heads).
_BLOCKING = {_OP.LN, _OP.GN, _OP.IN, _OP.UNBIND, _OP.SPLIT, _OP.SLICE, _OP.EXPAND, _OP.MHA, _OP.LSTM,
             _OP.EMBED, _OP.PARAMETER, _OP.CUSTOMIZED, _OP.OUTPUT}


# ---------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class ChannelGroup:
    """Output channels that are gated, pruned and removed together.

    Attributes:
        name: the root producer's module name (the group's id).
        size: number of channels.
        sites: modules whose output the gate multiplies (a BatchNorm, or the Conv/Linear itself).
        producers: Conv/Linear modules whose output channels belong to the group.
        norms: BatchNorms that directly follow a producer.
        coupled: several producers meet (a residual addition): one shared gate after each of them.
    """

    name: str
    size: int
    sites: tuple[str, ...]
    producers: tuple[str, ...]
    norms: tuple[str, ...] = ()
    coupled: bool = False

    def channel_params(self) -> list[tuple[str, str]]:
        """``(module, parameter)`` pairs whose channel-``j`` slice dies with channel ``j``."""
        seen: list[tuple[str, str]] = []
        for module in (*self.sites, *self.producers, *self.norms):
            for pname in ("weight", "bias"):
                if (module, pname) not in seen:
                    seen.append((module, pname))
        return seen


@dataclass
class _Analysed:
    """One DependencyGraph group, reduced to what gating and compression need."""

    root: nn.Module
    root_fn: Callable[..., Any]
    size: int
    # (module, idxs, root idxs)
    producers: list[tuple[nn.Module, list[int], list[int]]] = field(default_factory=list)
    consumers: list[tuple[nn.Module, list[int], list[int]]] = field(default_factory=list)
    norms: dict[nn.Module, _BatchNorm] = field(default_factory=dict)  # producer -> BatchNorm right after it
    blocked: str | None = None


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1


def _is_grouped(module: nn.Module) -> bool:
    groups = getattr(module, "groups", 1)
    return groups > 1 and not (groups == module.in_channels == module.out_channels)


def _following_norm(graph: tp.DependencyGraph, module: nn.Module, hops: int = 3) -> _BatchNorm | None:
    """The BatchNorm that reads ``module``'s output, through at most ``hops`` single-output elementwise nodes
    (timm's ``BatchNormAct2d`` shows up as a functional batch-norm node followed by the module's node)."""
    node = graph.module2node[module]
    for _ in range(hops):
        if len(node.outputs) != 1:
            return None
        node = node.outputs[0]
        if isinstance(node.module, _BatchNorm):
            return node.module
        if node.type != _OP.ELEMENTWISE:
            return None
    return None


def build_graph(model: nn.Module, example_inputs: Any) -> tuple[tp.DependencyGraph, list[_Analysed]]:
    """Trace ``model`` (in eval mode) with torch-pruning and reduce each group rooted at a Conv/Linear."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    finally:
        model.train(was_training)
    analysed = []
    for group in graph.get_all_groups(root_module_types=PRODUCER_TYPES):
        info = _Analysed(group[0].dep.target.module, group[0].dep.handler, len(group[0].idxs))
        for item in group.items:
            dep, module = item.dep, item.dep.target.module
            if dep.target.type in _BLOCKING:
                info.blocked = f"{dep.target.type.name} in the group"
            if isinstance(module, PRODUCER_TYPES):
                if _is_grouped(module):
                    info.blocked = "grouped convolution in the group"
                elif graph.is_out_channel_pruning_fn(dep.handler):
                    info.producers.append((module, list(item.idxs), list(item.root_idxs)))
                    norm = _following_norm(graph, module)
                    if norm is not None:
                        info.norms[module] = norm
                else:
                    info.consumers.append((module, list(item.idxs), list(item.root_idxs)))
        if not info.consumers and info.blocked is None:
            info.blocked = "no layer reads these channels (model output)"
        analysed.append(info)
    return graph, analysed


@torch.no_grad()
def _randomised_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy in eval mode with random biases and BatchNorm statistics, so zeros cannot pass by chance."""
    gen = torch.Generator().manual_seed(seed)
    clone = copy.deepcopy(model).eval()

    def rand(t: Tensor, low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=gen).mul_(high - low).add_(low).to(t))

    for module in clone.modules():
        if isinstance(module, _BatchNorm):
            if module.weight is not None:
                rand(module.weight, 0.5, 1.5)
                rand(module.bias, 0.2, 1.0)
            if module.running_mean is not None:
                rand(module.running_mean, -1.0, 1.0)
                rand(module.running_var, 0.5, 2.0)
        elif isinstance(getattr(module, "bias", None), nn.Parameter):
            rand(module.bias, 0.2, 1.0)
    return clone


def _zero_hook(idxs: Tensor, dim: int) -> Callable[..., Any]:
    def hook(module: nn.Module, args: Any, output: Any = None) -> Any:
        x = output if output is not None else args[0]
        x = x.index_fill(dim % x.dim(), idxs.to(x.device), 0.0)
        return x if output is not None else (x, *args[1:])

    return hook


def _register_site_hook(module: nn.Module, hook_out: Callable[..., Any], hook_pre: Callable[..., Any]) -> Any:
    """Hook a gate site: timm's norm+act modules are gated before their activation, others after forward."""
    act = getattr(module, "act", None)
    if isinstance(module, _BatchNorm) and isinstance(act, nn.Module):
        return act.register_forward_pre_hook(hook_pre)
    return module.register_forward_hook(hook_out)


@torch.no_grad()
def _covers(clone: nn.Module, names: dict[nn.Module, str], example: Any,
            sites: Sequence[tuple[nn.Module, list[int]]],
            consumers: Sequence[tuple[nn.Module, list[int]]]) -> bool:
    """Whether zeroing ``sites`` at their indices makes every consumer read exact zeros at its indices."""
    handles, seen = [], {}
    for module, idxs in sites:
        target = clone.get_submodule(names[module])
        hook = _zero_hook(torch.tensor(idxs), _channel_dim(target))
        handles.append(_register_site_hook(target, hook, lambda m, a, h=hook: h(m, a)))
    for module, idxs in consumers:
        target = clone.get_submodule(names[module])
        key = names[module]
        index = torch.tensor(idxs)

        def check(m: nn.Module, args: Any, key: str = key, index: Tensor = index) -> None:
            x = args[0]
            zero = bool((x.index_select(_channel_dim(m) % x.dim(), index.to(x.device)) == 0).all())
            seen[key] = seen.get(key, True) and zero

        handles.append(target.register_forward_pre_hook(check))
    try:
        _call(clone, example)
    finally:
        for h in handles:
            h.remove()
    return len(seen) == len({names[m] for m, _ in consumers}) and all(seen.values())


def _call(model: nn.Module, example: Any) -> Any:
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, (list, tuple)):
        return model(*example)
    return model(example)


def _readers(info: _Analysed, root_idxs: Iterable[int] | None = None) -> list[tuple[nn.Module, list[int]]]:
    """Each reader with its indices (restricted to those coming from ``root_idxs``)."""
    if root_idxs is None:
        return [(m, idxs) for m, idxs, _ in info.consumers]
    wanted = set(root_idxs)
    out = []
    for module, idxs, roots in info.consumers:
        sel = [i for i, r in zip(idxs, roots) if r in wanted]
        if sel:
            out.append((module, sel))
    return out


def find_channel_groups(
    model: nn.Module,
    example_inputs: Any,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    prune_coupled: bool = False,
    prefix: str = "",
    exclusion_root: nn.Module | None = None,
) -> tuple[list[ChannelGroup], dict[str, str]]:
    """The gateable channel groups of ``model``, and why the other groups were left alone.

    Args:
        model: the module to trace (a timm model, or a LightningModule with ``example_input_array``).
        example_inputs: what ``model`` is called with while tracing.
        include: globs over module names; a group is considered when one of its producers matches.
            Replaces the default (every group except those of timm's ``first_conv`` and ``classifier``).
        exclude: globs; a group is dropped when one of its producers matches.
        prune_coupled: also gate coupled groups (residual additions) with one shared gate after every
            producer.
        prefix: prepended to every module name (where ``model`` sits inside the LightningModule).
        exclusion_root: where timm's default exclusions are read (default ``model``).

    Returns:
        ``(groups, skipped)`` where ``skipped`` maps a group's root name to the reason it is not gated.
    """
    include_p, exclude_p = as_patterns(include), as_patterns(exclude)
    names = {m: n for n, m in model.named_modules()}

    def full(n: str) -> str:
        return f"{prefix}.{n}" if prefix and n else (prefix or n)

    excluded = set() if include_p else timm_default_exclusions(exclusion_root or model)
    _, analysed = build_graph(model, example_inputs)
    clone = _randomised_copy(model)
    groups, skipped = [], {}
    for info in analysed:
        root_name = full(names[info.root])
        producer_names = [full(names[p]) for p, _, _ in info.producers]
        if include_p and not any(matches(n, include_p) for n in producer_names):
            continue
        if any(n in excluded for n in producer_names) or (exclude_p and any(matches(n, exclude_p)
                                                                            for n in producer_names)):
            continue
        if info.blocked:
            skipped[root_name] = info.blocked
            continue
        sites = []
        for producer, idxs, root_idxs in info.producers:
            norm = info.norms.get(producer)
            site = norm if norm is not None and norm.affine else producer
            identity = idxs == root_idxs == list(range(info.size))
            if norm is not None and not norm.affine:
                identity = False  # a gate before a non-affine BatchNorm is not foldable
            sites.append((site, idxs, identity, producer))
        chosen: list[nn.Module] | None = None
        for site, idxs, identity, _ in sites:
            if identity and _covers(clone, names, example_inputs, [(site, idxs)], _readers(info)):
                chosen = [site]
                break
        coupled = False
        if chosen is None and len(sites) > 1:
            if not prune_coupled:
                skipped[root_name] = "coupled channels (set prune_coupled=True to gate them together)"
                continue
            if all(s[2] for s in sites) and _covers(clone, names, example_inputs,
                                                    [(s[0], s[1]) for s in sites], _readers(info)):
                chosen, coupled = list(dict.fromkeys(s[0] for s in sites)), True
        if chosen is None:
            skipped[root_name] = "no gate position makes the channels' readers see zeros"
            continue
        groups.append(ChannelGroup(
            name=root_name, size=info.size, sites=tuple(full(names[s]) for s in chosen),
            producers=tuple(producer_names), norms=tuple(full(names[n]) for n in info.norms.values()),
            coupled=coupled,
        ))
    return groups, skipped


# ---------------------------------------------------------------------------------------------- inputs
def traced_root(module: nn.Module) -> tuple[str, nn.Module]:
    """Where to trace: ``module`` itself when it has an ``example_input_array`` or is a timm model, else the
    first timm model inside it (``("model", ImageClassifier.model)``)."""
    if getattr(module, "example_input_array", None) is not None or isinstance(
            getattr(module, "pretrained_cfg", None), dict):
        return "", module
    for name, sub in module.named_modules():
        if isinstance(getattr(sub, "pretrained_cfg", None), dict):
            return name, sub
    return "", module


def example_inputs_for(module: nn.Module, input_size: Sequence[int] | None = None,
                       batch_size: int = 2) -> Any:
    """An input to trace ``module`` with: its ``example_input_array``, else a random batch of ``input_size``
    (default: timm's ``pretrained_cfg["input_size"]``, at the ViT's fixed ``img_size`` when it has one)."""
    example = getattr(module, "example_input_array", None)
    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    if example is not None and input_size is None:
        return example.to(device) if isinstance(example, Tensor) else example
    if input_size is None:
        cfg = getattr(module, "pretrained_cfg", None)
        if not isinstance(cfg, dict) or "input_size" not in cfg:
            raise InvalidArgumentError(
                f"Cannot tell what {type(module).__name__} takes as input. HINT: pass `input_size=(3, 32,"
                " 32)` or set `example_input_array` on the LightningModule."
            )
        input_size = tuple(cfg["input_size"])
        img_size = getattr(getattr(module, "patch_embed", None), "img_size", None)
        if img_size is not None:
            input_size = (input_size[0], *tuple(img_size))
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, *input_size, generator=generator).to(device)


# ---------------------------------------------------------------------------------------------- gates
class Gate(nn.Module):
    """One multiplicative value per channel of a :class:`ChannelGroup`; subclasses implement :meth:`compute`.

    The value is computed once per forward of the traced model (the :class:`GateSet` resets it), so a
    coupled group's sites share one sample even when :meth:`compute` is stochastic (hard-concrete gates).
    ``frozen`` marks channels whose gate no longer moves (capture masks).
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

    def reset(self) -> None:
        self._current = None

    def value(self, training: bool) -> Tensor:
        if self._current is None:
            self._current = self.compute(training)
        return self._current

    def forward(self, x: Tensor, dim: int = 1, training: bool = True) -> Tensor:
        return x * channel_view(self.value(training), x.dim(), dim).to(x.dtype)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_current"] = None
        return state


class ScaleGate(Gate):
    """A learnable scale per channel, initialised to ``init``: the group-LASSO gate (``beta`` in He et al.).

    He, Zhang, Sun, "Channel Pruning for Accelerating Very Deep Neural Networks", 2017.
    """

    def __init__(self, size: int, init: float = 1.0) -> None:
        super().__init__(size)
        self.weight = nn.Parameter(torch.full((size,), float(init)))

    def compute(self, training: bool) -> Tensor:
        return self.weight


class GateSet:
    """Gates for a list of channel groups, attached to a model with hooks and folded into it.

    Example::

        groups, _ = find_channel_groups(model, torch.randn(2, 3, 32, 32))
        gates = GateSet(groups, [ScaleGate(g.size) for g in groups])
        gates.attach(model)          # the model's forward now multiplies each group's channels by its gate
        ...
        gates.fold_(model)           # bake the gate values into the weights; outputs unchanged
        gates.detach()
    """

    def __init__(self, groups: Sequence[ChannelGroup], gates: Sequence[Gate]) -> None:
        if len(groups) != len(gates):
            raise ValueError(f"{len(groups)} groups but {len(gates)} gates")
        for group, gate in zip(groups, gates):
            if gate.size != group.size:
                raise ValueError(
                    f"gate of size {gate.size} for group {group.name!r} of {group.size} channels")
        self.groups = list(groups)
        self.gates = nn.ModuleList(gates)
        self._handles: list[Any] = []

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
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
        """Hook every gate into ``root`` (module names are relative to it).

        ``traced`` names the submodule whose forward starts a new gate sample (default: ``root``)."""
        self.detach()
        model = root.get_submodule(traced) if traced else root
        reset = lambda *args: self.reset()  # noqa: E731
        self._handles.append(model.register_forward_pre_hook(reset))
        self._handles.append(model.register_forward_hook(reset))
        for group, gate in self:
            for site in group.sites:
                module = root.get_submodule(site)
                dim = _channel_dim(module)

                def out_hook(m: nn.Module, args: Any, output: Tensor, gate: Gate = gate,
                             dim: int = dim) -> Tensor:
                    return gate(output, dim, m.training)

                def pre_hook(m: nn.Module, args: Any, gate: Gate = gate, dim: int = dim) -> tuple[Any, ...]:
                    return (gate(args[0], dim, m.training), *args[1:])

                self._handles.append(_register_site_hook(module, out_hook, pre_hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.reset()

    @torch.no_grad()
    def fold_(self, root: nn.Module, scales: Sequence[Tensor] | None = None) -> None:
        """Multiply each site's weight and bias by its gate's deterministic values (or ``scales``), so the
        model without gates computes what it computed with them."""
        scales = [g.deterministic() for g in self.gates] if scales is None else scales
        for group, scale in zip(self.groups, scales):
            for site in group.sites:
                module = root.get_submodule(site)
                weight, bias = module.weight, getattr(module, "bias", None)
                new_w, new_b = fold_scale(weight.data, None if bias is None else bias.data,
                                          scale.to(weight.device))
                weight.data.copy_(new_w)
                if bias is not None:
                    bias.data.copy_(new_b)

    def channel_masks(self, root: nn.Module, keep: Sequence[Tensor]) -> dict[str, Tensor]:
        """Boolean masks (``True`` = kept) for every parameter slice of the pruned channels, by full name."""
        masks: dict[str, Tensor] = {}
        for group, kept in zip(self.groups, keep):
            for module_name, pname in group.channel_params():
                param = getattr(root.get_submodule(module_name), pname, None)
                if not isinstance(param, nn.Parameter) or param.shape[0] != group.size:
                    continue
                name = f"{module_name}.{pname}"
                mask = (kept.to(param.device, torch.bool).reshape([-1] + [1] * (param.dim() - 1))
                        .expand_as(param))
                masks[name] = masks[name] & mask if name in masks else mask.clone()
        return masks

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
        return state
