"""Decaying activations and linear fusion: train deep, deploy shallow.

VanillaNet's deep-training strategy (Chen et al., "VanillaNet: the Power of Minimalism in Deep Learning",
2023, arXiv:2305.12972) as ReduceNet (ohmydroid/reducenet, 2023) applies it to any architecture: an
activation ``A`` between two linear layers is replaced during training by ``A'(x) = (1 - λ) A(x) + λ x``
with λ going 0 → 1; once λ = 1 the activation is the identity, and the two layers (with their BatchNorms)
fuse into one exactly, RepVGG style (Ding et al. 2021, arXiv:2101.03697).

This module holds what does not depend on Lightning:

- :class:`DecayingActivation`, the wrapper (no parameters, no buffers: the model's ``state_dict`` keys stay
  those of a fresh timm model), :func:`wrap_activations` / :func:`unwrap_activations`;
- :func:`plan_reparameterization`, which traces a model with ``torch.fx`` and finds the activations whose
  disappearance lets two linear layers fuse *exactly* (conv k×k → 1×1, linear → linear, 1×1 → unpadded k×k,
  unpadded k×k → unpadded k×k; BatchNorms on the way fold in), and says why every other one does not;
- :func:`reparameterize`, which removes decayed activations, applies timm's own ``reparameterize_model``
  (RepVGG, MobileOne, the ReduceNet blocks of :mod:`lightning_prune.training.reducenet`), fuses the decayed
  links and folds every conv+BN pair.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_prune.core.targets import as_patterns, matches, uncompiled
from lightning_prune.errors import CompressionError, InvalidArgumentError
from lightning_prune.functional.fusion import (
    expand_groups,
    fold_bn,
    fuse_1x1_kxk,
    fuse_conv_1x1,
    fuse_kxk_kxk,
)

__all__ = [
    "DecayingActivation",
    "Fusion",
    "ReparamPlan",
    "count_layers",
    "is_activation",
    "plan_reparameterization",
    "reparameterize",
    "set_lambda",
    "unwrap_activations",
    "wrap_activations",
]

_TORCH_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Hardshrink, nn.Softshrink, nn.LogSigmoid,
)
_PASS_TYPES: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
_LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


# ---------------------------------------------------------------------------------------------- wrapper
class DecayingActivation(nn.Module):
    """``A'(x) = (1 - λ) A(x) + λ x`` around any activation module (VanillaNet's deep-training activation).

    λ lives in a 0-dim float32 tensor that is neither a parameter nor a buffer: wrapping adds no
    ``state_dict`` key, and setting ``lam`` fills that tensor in place, so a ``torch.compile``d model reads
    the new value without recompiling (a Python float would be baked into the graph as a constant: one
    recompilation per step, until dynamo's cache limit silently sends the model back to eager). The forward
    takes one of three paths -- ``A(x)`` at λ = 0, the blend for 0 < λ < 1, ``x`` at λ = 1 -- so a compiled
    model compiles at most three times over the whole schedule. ``lam`` reads back as a Python float (no
    device synchronisation).
    For ReLU the blend equals ``F.leaky_relu(x, λ)``, VanillaNet's implementation. An in-place activation is
    switched to out-of-place while wrapped (the blend needs ``x``) and restored by :meth:`unwrap`.

    Args:
        act: the activation module to wrap (must have no parameters or buffers).
        lam: the initial λ in [0, 1].
    """

    def __init__(self, act: nn.Module, lam: float = 0.0) -> None:
        super().__init__()
        if any(True for _ in act.parameters()) or any(True for _ in act.buffers()):
            raise ValueError(f"{type(act).__name__} has parameters or buffers; only parameter-free"
                             " activations can decay without changing the model's state_dict")
        self.act = act
        self._lam_tensor = torch.zeros((), dtype=torch.float32)
        # 0: λ = 0, 1: 0 < λ < 1, 2: λ = 1 (a Python int: what a compiled graph branches on)
        self._phase = 0
        self._lam_value = 0.0
        self.lam = lam
        self._inplace = getattr(act, "inplace", None)
        if self._inplace:
            act.inplace = False

    @property
    def lam(self) -> float:
        """λ as a Python float."""
        return self._lam_value

    @lam.setter
    def lam(self, value: float) -> None:
        value = float(value)
        self._lam_value = value
        self._phase = 0 if value == 0.0 else 2 if value == 1.0 else 1
        self._lam_tensor.fill_(value)

    def forward(self, x: Tensor) -> Tensor:
        if self._phase == 0:
            return self.act(x)
        if self._phase == 2:
            return x
        lam = self._lam_tensor
        if lam.device != x.device:  # follows the model once (it is not a buffer, so .to() leaves it)
            lam = self._lam_tensor = lam.to(x.device)
        a = self.act(x)
        return torch.lerp(a, x, lam.to(a.dtype))

    def _apply(self, fn: Any, recurse: bool = True) -> DecayingActivation:
        result = super()._apply(fn, recurse)
        # follow .to(device) / .cuda() (not the dtype: λ stays float32, cast at use)
        moved = fn(torch.zeros((), dtype=torch.float32))
        if moved.device != self._lam_tensor.device:
            self._lam_tensor = self._lam_tensor.to(moved.device)
        return result

    def unwrap(self) -> nn.Module:
        """The original activation module, with its ``inplace`` flag restored."""
        if self._inplace:
            self.act.inplace = True
        return self.act

    def extra_repr(self) -> str:
        return f"lam={self.lam:.4g}"


def is_activation(module: nn.Module) -> bool:
    """An elementwise activation module: torch's, timm's (``timm.layers.activations*``) or a wrapper."""
    if isinstance(module, DecayingActivation):
        return True
    if isinstance(module, _TORCH_ACTIVATIONS):
        return True
    return type(module).__module__.startswith("timm.layers.activations")


def wrap_activations(model: nn.Module, names: Iterable[str],
                     lam: float = 0.0) -> dict[str, DecayingActivation]:
    """Replace the named activation modules by :class:`DecayingActivation` wrappers, in place."""
    wrapped = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, DecayingActivation):
            module = DecayingActivation(module, lam)
            model.set_submodule(name, module)
        module.lam = float(lam)
        wrapped[name] = module
    return wrapped


def unwrap_activations(model: nn.Module) -> list[str]:
    """Put the original activations back in place of every :class:`DecayingActivation`; return the names."""
    names = [n for n, m in model.named_modules() if isinstance(m, DecayingActivation)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).unwrap())
    return names


def count_layers(model: nn.Module) -> int:
    """Conv and linear modules in ``model`` (the depth that fusion reduces)."""
    return sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) for m in model.modules())


def set_lambda(model: nn.Module, lam: float) -> int:
    """Set λ on every :class:`DecayingActivation` in ``model``; returns how many there are."""
    count = 0
    for module in model.modules():
        if isinstance(module, DecayingActivation):
            module.lam = float(lam)
            count += 1
    return count


# ---------------------------------------------------------------------------------------------- tracing
class _Tracer(torch.fx.Tracer):
    """FX tracer that keeps activations, norms and wrappers as leaves, with timm's no-trace registrations."""

    def __init__(self) -> None:
        try:
            from timm.layers import get_notrace_functions, get_notrace_modules

            functions, self._notrace = tuple(get_notrace_functions()), tuple(get_notrace_modules())
        except ImportError:  # pragma: no cover - timm is a dependency
            functions, self._notrace = (), ()
        super().__init__(autowrap_functions=functions)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (DecayingActivation, _BatchNorm)) or is_activation(m):
            return True
        if self._notrace and isinstance(m, self._notrace):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> torch.fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure becomes one clear message
        raise InvalidArgumentError(
            f"Could not trace {type(model).__name__} with torch.fx to find fusable activations"
            f" ({type(err).__name__}:"
            f" {err}). HINT: pass `fusable_only=False` with `include=[...]` globs naming the activations to"
            " decay."
        ) from err


def _roots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost timm models inside ``model`` (by ``pretrained_cfg``), else ``model`` itself; a compiled
    network through its original module (:func:`~lightning_prune.core.targets.uncompiled`)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(getattr(module, "pretrained_cfg", None), dict) and not any(
                name == r or name.startswith(f"{r}.") or r == "" for r, _ in found):
            found.append(uncompiled(name, module))
    return found or [uncompiled("", model)]


def _activation_names(model: nn.Module) -> list[str]:
    """Names of the activation modules (a wrapper counts, the activation inside it does not)."""
    inner = {id(m.act) for m in model.modules() if isinstance(m, DecayingActivation)}
    return [n for n, m in model.named_modules() if n and is_activation(m) and id(m) not in inner]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _ops(name: str, module: nn.Module) -> list[tuple[str, str]] | None:
    """The elementary ops of a leaf module: ``("lin"|"bn"|"act"|"pass", name)``; ``None`` for the rest."""
    if type(module) in _LINEAR_TYPES:
        return [("lin", name)]
    if isinstance(module, _BatchNorm):
        if not (type(module).__module__.startswith(("torch.nn", "timm.layers.norm_act"))
                and module.running_mean is not None and module.running_var is not None):
            return None
        ops = [("bn", name)]
        drop = getattr(module, "drop", None)
        if drop is not None and not isinstance(drop, _PASS_TYPES):
            return None
        act = getattr(module, "act", None)
        if act is not None:
            if isinstance(act, _PASS_TYPES):
                ops.append(("pass", f"{name}.act"))
            elif is_activation(act):
                ops.append(("act", f"{name}.act"))
            else:
                return None
        return ops
    if is_activation(module):
        return [("act", name)]
    if isinstance(module, _PASS_TYPES):
        return [("pass", name)]
    return None


def _describe(node: torch.fx.Node, model: nn.Module) -> str:
    if node.op == "call_module":
        return f"`{node.target}` ({type(model.get_submodule(node.target)).__name__})"
    if node.op in ("call_function", "call_method"):
        return f"{getattr(node.target, '__name__', node.target)}()"
    return node.op


def _padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    if isinstance(conv.padding, str):
        return (0, 0) if conv.padding == "valid" or conv.kernel_size == (1, 1) else None
    return tuple(conv.padding)  # type: ignore[return-value]


def fusion_kind(first: nn.Module, second: nn.Module) -> tuple[str | None, str]:
    """How ``second ∘ first`` fuses into one layer, or ``(None, why not)``."""
    if type(first) is nn.Linear and type(second) is nn.Linear:
        return "linear∘linear", ""
    if not (type(first) is nn.Conv2d and type(second) is nn.Conv2d):
        return None, f"{type(first).__name__} → {type(second).__name__} is not conv→conv or linear→linear"
    if first.dilation != (1, 1) or second.dilation != (1, 1):
        return None, "dilated convolution"
    p1, p2 = _padding(first), _padding(second)
    if p1 is None or p2 is None:
        return None, "'same' string padding with an even kernel"
    if second.kernel_size == (1, 1) and second.stride == (1, 1) and p2 == (0, 0):
        return "conv∘1×1", ""
    if p2 != (0, 0):
        k1, k2 = "×".join(map(str, first.kernel_size)), "×".join(map(str, second.kernel_size))
        return None, f"conv {k1} → conv {k2} with zero padding {p2[0]}: not exact at the border"
    if first.stride != (1, 1) or p1 != (0, 0) or second.padding_mode != "zeros":
        return None, "the first conv is strided or padded"
    if first.kernel_size == (1, 1):
        return "1×1∘k×k", ""
    return "k×k∘k×k", ""


@dataclass(frozen=True)
class Fusion:
    """Two linear layers that fuse once the activations between them are the identity.

    Attributes:
        first: the first layer's module name (the fused layer takes its place).
        second: the second layer's module name (becomes ``nn.Identity``).
        kind: ``"conv∘1×1"``, ``"linear∘linear"``, ``"1×1∘k×k"`` or ``"k×k∘k×k"``.
        activations: the activations between them (they must decay).
        between: every module between them (BatchNorms fold into ``first``).
        params_before: weights of the two layers; ``params_after``: of the fused layer.
    """

    first: str
    second: str
    kind: str
    activations: tuple[str, ...]
    between: tuple[str, ...]
    params_before: int
    params_after: int


@dataclass
class ReparamPlan:
    """What :class:`~lightning_prune.ActivationDecay` will decay and what :func:`reparameterize` will fuse.

    Attributes:
        decay: activation module names that will decay to the identity.
        fusions: the exact fusions those make possible.
        rejected: ``{activation name: why it does not decay}`` for every other activation.
    """

    decay: list[str] = field(default_factory=list)
    fusions: list[Fusion] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.decay)

    def __str__(self) -> str:
        lines = [f"ActivationDecay plan: {len(self.decay)} activation(s) decay,"
                 f" {len(self.fusions)} exact fusion(s)"]
        for f in self.fusions:
            through = ", ".join(f.activations) or "-"
            lines.append(f"  fuse {f.first} + {f.second} ({f.kind}) through {through}:"
                         f" {f.params_before:,} -> {f.params_after:,} weights")
        fused = {a for f in self.fusions for a in f.activations}
        for name in self.decay:
            if name not in fused:
                lines.append(f"  decay {name} (fusable_only=False; no exact fusion)")
        for name, why in self.rejected.items():
            lines.append(f"  keep  {name}: {why}")
        return "\n".join(lines)


def _linear_chains(model: nn.Module, prefix: str = "") -> tuple[list[tuple], dict[str, str], dict[str, int]]:
    """Walk the traced graph: every ``lin → (bn|act|pass)* → lin`` chain with single-use intermediates.

    Returns ``(chains, reasons, call_counts)``: chains as ``(first, second, ops)`` (names relative to
    ``model``), a reason for every activation call site not on a chain, and how often each module is called.
    """
    graph = _trace(model)
    modules = dict(model.named_modules())
    node_ops: dict[torch.fx.Node, list[tuple[str, str]] | None] = {}
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            node_ops[node] = _ops(node.target, modules[node.target])
            calls[node.target] = calls.get(node.target, 0) + 1
            for kind, name in node_ops[node] or []:
                if kind == "act" and name != node.target:  # the act inside a BN+act module
                    calls[name] = calls.get(name, 0) + 1
    chains, on_chain = [], set()
    for node, ops in node_ops.items():
        if ops is None or ops[0][0] != "lin":
            continue
        cur, between = node, []
        while True:
            users = list(cur.users)
            if len(users) != 1:
                break
            nxt = users[0]
            if nxt.op != "call_module" or node_ops.get(nxt) is None or len(nxt.args) != 1 or nxt.kwargs:
                break
            if nxt.args[0] is not cur:
                break
            nops = node_ops[nxt]
            if nops[0][0] == "lin":
                chains.append((node.target, nxt.target, between))
                on_chain.update(n for _, n in between)
                break
            between = between + nops
            cur = nxt
    reasons: dict[str, str] = {}
    for node, ops in node_ops.items():
        for kind, name in ops or []:
            if kind == "act" and name not in on_chain:
                src = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
                users = list(node.users)
                out = ", ".join(_describe(u, model) for u in users[:3]) or "the output"
                inp = _describe(src, model) if src is not None else "an input"
                reasons[name] = f"not between two fusable linear layers (input from {inp}, output to {out})"
    return chains, reasons, calls


def _n_params(module: nn.Module) -> int:
    return module.weight.numel()


def _fused_params(first: nn.Module, second: nn.Module, kind: str) -> int:
    if kind == "linear∘linear":
        return second.out_features * first.in_features
    if kind == "conv∘1×1":
        return second.out_channels * first.in_channels * first.kernel_size[0] * first.kernel_size[1]
    kh = first.kernel_size[0] + second.kernel_size[0] - 1
    kw = first.kernel_size[1] + second.kernel_size[1] - 1
    return second.out_channels * first.in_channels * kh * kw


def plan_reparameterization(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    fusable_only: bool = True,
) -> ReparamPlan:
    """Find the activations whose disappearance lets two linear layers fuse exactly (a dry run).

    An activation is fusable when every call of its module sits on a ``linear → (BN | activation |
    dropout | identity)* → linear`` path whose intermediates have no other user, and the two layers compose
    exactly (:func:`fusion_kind`). The default set is the fusable activations (every activation module with
    ``fusable_only=False``); ``include`` globs over activation names narrow it and ``exclude`` removes names.

    Raises:
        InvalidArgumentError: the model cannot be traced with torch.fx and ``fusable_only`` is set.
    """
    include_p, exclude_p = as_patterns(include), as_patterns(exclude)
    plan = ReparamPlan()
    all_acts = _activation_names(model)
    fusable: dict[str, list[Fusion]] = {}
    reasons: dict[str, str] = {}
    try:
        for prefix, root in _roots(model):
            chains, why, calls = _linear_chains(root, prefix)
            reasons.update({_join(prefix, k): v for k, v in why.items()})
            for first, second, between in chains:
                acts = tuple(_join(prefix, n) for k, n in between if k == "act")
                if not acts:
                    continue  # a linear chain without activation: left as the architect designed it
                m1, m2 = root.get_submodule(first), root.get_submodule(second)
                kind, why_not = fusion_kind(m1, m2)
                if calls.get(first, 0) > 1 or calls.get(second, 0) > 1:
                    kind, why_not = None, f"`{first}` or `{second}` is called more than once (shared weights)"
                for act in acts:
                    module = model.get_submodule(act)
                    inner = module.act if isinstance(module, DecayingActivation) else module
                    if any(True for _ in inner.parameters()) or any(True for _ in inner.buffers()):
                        kind, why_not = None, f"`{act}` ({type(inner).__name__}) has parameters"
                if kind is None:
                    for act in acts:
                        reasons[act] = why_not
                    continue
                fusion = Fusion(_join(prefix, first), _join(prefix, second), kind, acts,
                                tuple(_join(prefix, n) for _, n in between),
                                _n_params(m1) + _n_params(m2), _fused_params(m1, m2, kind))
                for act in acts:
                    fusable.setdefault(act, []).append(fusion)
            # an activation module called at several places decays everywhere: all of them must fuse
            for act_rel, count in calls.items():
                act = _join(prefix, act_rel)
                if act in fusable and count > len(fusable[act]):
                    reasons[act] = f"called at {count} places, only {len(fusable[act])} of them fuse"
                    del fusable[act]
    except InvalidArgumentError:
        if fusable_only:
            raise
    # fusions whose every activation is selected
    selected = [n for n in all_acts if n in fusable or not fusable_only]
    if include_p:
        for n in selected:
            if not matches(n, include_p):
                reasons.setdefault(n, "not selected by `include`")
        selected = [n for n in selected if matches(n, include_p)]
    if exclude_p:
        for n in selected:
            if matches(n, exclude_p):
                reasons[n] = "excluded by `exclude`"
        selected = [n for n in selected if not matches(n, exclude_p)]
    chosen = set(selected)
    seen: set[tuple[str, str]] = set()
    for act in selected:
        for fusion in fusable.get(act, []):
            if set(fusion.activations) <= chosen and (fusion.first, fusion.second) not in seen:
                seen.add((fusion.first, fusion.second))
                plan.fusions.append(fusion)
    plan.decay = selected
    default_reason = "not on a linear→linear path"
    plan.rejected = {n: reasons.get(n, default_reason)
                     for n in all_acts if n not in chosen}
    return plan


# ---------------------------------------------------------------------------------------------- fusion
def _affine(module: nn.Module) -> tuple[Tensor, Tensor]:
    weight = module.weight.detach()
    bias = (module.bias.detach() if module.bias is not None
            else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
    return weight, bias


def _fold_bns(weight: Tensor, bias: Tensor, bns: Iterable[_BatchNorm]) -> tuple[Tensor, Tensor]:
    for bn in bns:
        weight, bias = fold_bn(weight, bias, bn.running_mean, bn.running_var,
                               bn.weight.detach() if bn.weight is not None else None,
                               bn.bias.detach() if bn.bias is not None else None, bn.eps)
    return weight, bias


def _new_layer(template: nn.Module, weight: Tensor, bias: Tensor, **conv_kwargs: Any) -> nn.Module:
    if isinstance(template, nn.Linear):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    else:
        layer = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[-2:]), bias=True,
                          **conv_kwargs)
    layer = layer.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    layer.train(template.training)
    return layer


def _fuse_pair(first: nn.Module, second: nn.Module, kind: str, bns: list[_BatchNorm]) -> nn.Module:
    w1, b1 = _fold_bns(*_affine(first), bns)
    w2, b2 = _affine(second)
    if kind == "linear∘linear":
        w, b = fuse_conv_1x1(w1, b1, w2, b2)
        return _new_layer(first, w, b)
    w1, w2 = expand_groups(w1, first.groups), expand_groups(w2, second.groups)
    if kind == "conv∘1×1":
        w, b = fuse_conv_1x1(w1, b1, w2, b2)
        return _new_layer(first, w, b, stride=first.stride, padding=first.padding,
                          padding_mode=first.padding_mode)
    if kind == "1×1∘k×k":
        w, b = fuse_1x1_kxk(w1, b1, w2, b2)
    else:
        w, b = fuse_kxk_kxk(w1, b1, w2, b2)
    return _new_layer(first, w, b, stride=second.stride, padding=0)


def _bn_replacement(bn: _BatchNorm) -> nn.Module:
    """What is left of a (BatchNorm + act) module once its BatchNorm is folded away."""
    act = getattr(bn, "act", None)
    if act is None or isinstance(act, _PASS_TYPES):
        return nn.Identity()
    return act


def _fold_conv_bn(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a conv/linear layer (through identities) into it."""
    folded = 0
    for _, root in _roots(model):
        graph = _trace(root)
        modules = dict(root.named_modules())
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for node in list(graph.nodes):
            if (node.op != "call_module" or type(modules[node.target]) not in _LINEAR_TYPES
                    or calls[node.target] > 1):
                continue
            cur = node
            while len(cur.users) == 1:
                nxt = next(iter(cur.users))
                if (nxt.op != "call_module" or len(nxt.args) != 1 or nxt.args[0] is not cur
                        or calls[nxt.target] > 1):
                    break
                ops = _ops(nxt.target, modules[nxt.target])
                if ops is None:
                    break
                if ops[0][0] == "bn":
                    bn = modules[nxt.target]
                    layer = modules[node.target]
                    w, b = _fold_bns(*_affine(layer), [bn])
                    kwargs = {} if isinstance(layer, nn.Linear) else dict(
                        stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                        groups=layer.groups, padding_mode=layer.padding_mode)
                    if isinstance(layer, nn.Conv2d):
                        new = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, bias=True,
                                        **kwargs)
                    else:
                        new = nn.Linear(layer.in_features, layer.out_features, bias=True)
                    new = new.to(device=w.device, dtype=w.dtype).train(layer.training)
                    with torch.no_grad():
                        new.weight.copy_(w)
                        new.bias.copy_(b)
                    root.set_submodule(node.target, new)
                    root.set_submodule(nxt.target, _bn_replacement(bn))
                    modules[node.target] = new
                    folded += 1
                    break
                if ops[0][0] != "pass":
                    break
                cur = nxt
    return folded


def _fuse_links(model: nn.Module, decayed: set[str]) -> list[Fusion]:
    """Fuse every exact linear pair whose path holds a decayed (now identity) activation, until none is."""
    done: list[Fusion] = []
    while True:
        progress = False
        for prefix, root in _roots(model):
            chains, _, calls = _linear_chains(root, prefix)
            used: set[str] = set()
            for first, second, between in chains:
                names = [_join(prefix, n) for _, n in between]
                if not decayed.intersection(names) or first in used or second in used:
                    continue
                shared = calls.get(first, 0) > 1 or calls.get(second, 0) > 1
                if shared or any(kind == "act" for kind, _ in between):
                    continue
                m1, m2 = root.get_submodule(first), root.get_submodule(second)
                kind, _ = fusion_kind(m1, m2)
                if kind is None:
                    continue
                bns = [root.get_submodule(n) for k, n in between if k == "bn"]
                fused = _fuse_pair(m1, m2, kind, bns)
                done.append(Fusion(_join(prefix, first), _join(prefix, second), kind,
                                   tuple(n for n in names if n in decayed), tuple(names),
                                   _n_params(m1) + _n_params(m2), _n_params(fused)))
                root.set_submodule(first, fused)
                root.set_submodule(second, nn.Identity())
                bn_names = [n for k, n in between if k == "bn"]
                for k, n in between:
                    if k == "bn":
                        root.set_submodule(n, nn.Identity())  # its act is the identity (on the chain)
                    elif not any(n.startswith(f"{b}.") for b in bn_names):
                        root.set_submodule(n, nn.Identity())
                used.update((first, second))
                progress = True
        if not progress:
            return done


def reparameterize(
    model: nn.Module,
    decayed: str | Sequence[str] | None = None,
    inplace: bool = True,
    strict: bool = True,
) -> nn.Module:
    """Fuse a model trained with :class:`~lightning_prune.ActivationDecay` into a shallower, equivalent one.

    1. Every :class:`DecayingActivation` must be at λ = 1 and becomes ``nn.Identity``; so do the
       activations named by ``decayed`` (for a model loaded from a checkpoint, without wrappers).
    2. timm's ``reparameterize_model`` runs on modules that support it (RepVGG, MobileOne, FastViT, the
       ReduceNet blocks, which fold their identity residual into the kernel).
    3. Linear layers joined through a decayed activation fuse (conv∘1×1, linear∘linear, and 1×1∘k×k or
       k×k∘k×k only without padding), BatchNorms on the way folded in.
    4. Every remaining conv+BN (eval statistics) is folded.

    The result is meant for inference (``model.eval()``); its outputs equal the unfused model's in eval mode.

    Args:
        model: the trained model (a timm model, or a LightningModule holding one).
        decayed: globs of activation names to treat as identity (e.g. ``ActivationDecay.plan(model).decay``).
        inplace: fuse ``model`` itself; otherwise a deep copy.
        strict: raise when nothing was fused.

    Raises:
        CompressionError: an activation has λ < 1 (fusing would change the outputs); or, with ``strict``,
            nothing could be fused.

    Example::

        fused = lp.reparameterize(trainer.lightning_module.model).eval()
    """
    not_done = {n: m.lam for n, m in model.named_modules()
                if isinstance(m, DecayingActivation) and m.lam != 1.0}
    if not_done:
        shown = ", ".join(f"{n} (λ={v:.4g})" for n, v in list(not_done.items())[:4])
        raise CompressionError(
            f"Cannot fuse: {len(not_done)} decaying activation(s) have λ < 1, so they are not yet the"
            f" identity: {shown}. HINT: train until λ reaches 1 (ActivationDecay's `end_step` before the end"
            " of training).")
    if not inplace:
        model = copy.deepcopy(model)
    names = as_patterns(decayed)
    decayed_names = set()
    wrapped = {n for n, m in model.named_modules() if isinstance(m, DecayingActivation)}
    for name in _activation_names(model):
        if name in wrapped or (names and matches(name, names)):
            decayed_names.add(name)
    for name in sorted(decayed_names, key=len, reverse=True):
        model.set_submodule(name, nn.Identity())
    # timm's own reparameterisation (RepVGG, MobileOne, ReduceNet blocks, ...)
    from timm.models import reparameterize_model

    before = sum(1 for _ in model.modules())
    reparameterize_model(model, inplace=True)
    timm_changed = sum(1 for _ in model.modules()) != before
    fusions = _fuse_links(model, decayed_names)
    folded = _fold_conv_bn(model)
    model._lightning_prune_fusions = fusions  # type: ignore[attr-defined]
    if strict and not (fusions or timm_changed or decayed_names):
        raise CompressionError(
            f"Nothing to fuse in {type(model).__name__}: no decayed activation and no timm re-parameterisable"
            f" module ({folded} conv+BN pair(s) folded). HINT: train with ActivationDecay (see"
            " `ActivationDecay.plan(model)`), or pass `decayed=[...]` for a model loaded from a checkpoint.")
    return model
