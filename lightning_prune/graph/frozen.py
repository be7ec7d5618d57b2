"""Readers whose weight is computed from their parameters in ``forward``, frozen into plain layers.

A Conv/Linear whose forward hands ``F.conv2d``/``F.linear`` a weight computed from its parameters (weight
standardisation: timm's ``StdConv2d``, ``ScaledStdConv2d`` and their ``*Same`` variants, which standardise
every filter over its fan-in; ``torch.nn.utils.parametrizations.weight_norm``; a user's own WS conv) cannot
lose input channels as it is: the computation over the remaining fan-in gives another weight. It can once
**frozen**: replaced by a plain layer (:class:`FrozenConv2d`, :class:`FrozenLinear`, ...: ``nn.Conv2d`` /
``nn.Linear`` with the same stride, padding, dilation, groups and bias) whose weight is the computed weight
evaluated at that moment. The frozen layer computes exactly what the original computed, and its columns can be
sliced like any other reader's, so a group read by such a layer is proven exact by the masked-vs-sliced check
like any other.

The price of exactness: a frozen layer trains on as a plain layer -- after a removal inside the fit its
weight is no longer re-standardised (or re-normalised) at every step. Output channels of a weight-standardised
conv need no freezing (the statistics are per filter): they are sliced in place and the layer stays what it
was.

The computation is found by running the layer once on a small zero input and recording the layer call
(``conv1d/2d/3d``, ``linear``) its forward makes, with a ``TorchFunctionMode``: no list of classes. A
forward that makes one such call on its own input, with a weight of the parameter's shape, returns what that
call returns and pads nothing (or pads dynamically like TensorFlow's ``SAME``, as timm's ``*Same`` convs do
with ``pad_same``: the frozen conv pads the same way) can be frozen; any other is left alone with the reason.
The probe leaves the layer's buffers as they were; a layer whose forward changes them (a spectral norm in
train mode, a QAT observer) has a weight computation with state and is left alone too.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_prune.graph.along import ALONG_TYPES
from lightning_prune.graph.types import strip_prefix

__all__ = ["FROZEN_MARKER", "FROZEN_TYPES", "FrozenConv1d", "FrozenConv2d", "FrozenConv3d", "FrozenLinear",
           "computed_weight", "effective_weight", "freeze", "freeze_modules", "freeze_reason",
           "frozen_in_state", "frozen_names", "pad_same", "refreeze"]


#: the persistent buffer every frozen layer holds (a 0-dim ``int64`` one). Its key in a ``state_dict``
#: (``<layer>.frozen_by_lightning_prune``) marks the layer frozen: a strict ``load_state_dict`` of such a
#: state into the architecture whose layer still computes its weight fails with an unexpected key, by name,
#: instead of loading the computed weight as the raw one (which the layer would standardise once more,
#: silently computing something else). lightning-prune's loaders freeze the layers first (:func:`refreeze`,
#: :func:`frozen_in_state`).
FROZEN_MARKER = "frozen_by_lightning_prune"


def pad_same(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """``x`` zero-padded like TensorFlow's ``SAME`` (the output has ``ceil(size / stride)`` positions; an odd
    padding puts the extra zero after): what timm's ``pad_same`` does, for any number of spatial dims."""
    return F.pad(x, _same_pads(x, list(kernel_size), list(stride), list(dilation)))


def _same_pads(x: Tensor, kernel_size: list[int], stride: list[int], dilation: list[int]) -> list[int]:
    """The ``F.pad`` amounts of :func:`pad_same` (TorchScript-able: the frozen convs' forward calls it)."""
    pads: list[int] = []
    n = len(kernel_size)
    for j in range(n):  # F.pad takes the last dim first
        i = n - 1 - j
        size = x.shape[x.dim() - n + i]
        total = max(((size + stride[i] - 1) // stride[i] - 1) * stride[i] + (kernel_size[i] - 1) * dilation[i]
                    + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return pads


def _mark(module: nn.Module, device: Any = None) -> None:
    module.register_buffer(FROZEN_MARKER, torch.ones((), dtype=torch.long, device=device), persistent=True)


class _Marked:
    """A frozen layer takes a state lacking its :data:`FROZEN_MARKER` (a file or checkpoint written before the
    marker existed; the marker holds nothing to load): a strict load reports no missing key for it. A frozen
    state loaded into the layer that still computes its weight fails as before, on the unexpected key."""

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        key = prefix + FROZEN_MARKER
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)


class _FrozenConv(_Marked):
    """A plain conv whose weight was computed by another layer's forward and frozen at a removal; with
    ``same_pad`` it pads its input like TensorFlow's ``SAME`` first (its own ``padding`` is then 0), from the
    input's size at every call -- ``torch.jit.script`` keeps that; ``torch.jit.trace`` records the padding of
    the traced size, as it does for timm's own ``Conv2dSame``: trace at the size it will run at, or script."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.same_pad = False
        _mark(self, kwargs.get("device"))  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        if self.same_pad:
            x = F.pad(x, _same_pads(x, list(self.kernel_size), list(self.stride),  # type: ignore[attr-defined]
                                    list(self.dilation)))  # type: ignore[attr-defined]
        return self._conv_forward(x, self.weight, self.bias)  # type: ignore[attr-defined]


class FrozenConv1d(_FrozenConv, nn.Conv1d):
    """``nn.Conv1d`` holding a frozen computed weight (see the module docstring)."""


class FrozenConv2d(_FrozenConv, nn.Conv2d):
    """``nn.Conv2d`` holding a frozen computed weight (see the module docstring)."""


class FrozenConv3d(_FrozenConv, nn.Conv3d):
    """``nn.Conv3d`` holding a frozen computed weight (see the module docstring)."""


class FrozenLinear(_Marked, nn.Linear):
    """``nn.Linear`` holding a frozen computed weight (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _mark(self, kwargs.get("device"))


FROZEN_TYPES = (FrozenConv1d, FrozenConv2d, FrozenConv3d, FrozenLinear)
_CONVS = {torch.conv1d: (FrozenConv1d, 1), torch.conv2d: (FrozenConv2d, 2), torch.conv3d: (FrozenConv3d, 3)}
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class _Call:
    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: Any


class _Record(TorchFunctionMode):
    """Records every layer call (conv, linear) and every ``F.pad`` made under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[_Call] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CONVS or func is F.linear or func is F.pad or func is torch.constant_pad_nd:
            self.calls.append(_Call(func, tuple(args), dict(kwargs), out))
        return out


@dataclass
class Computed:
    """What a layer's forward computes: the layer call it makes and how to rebuild it plainly."""

    weight: Tensor
    bias: Tensor | None
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    same_pad: bool = False


def _arg(call: _Call, index: int, name: str, default: Any) -> Any:
    if len(call.args) > index:
        return call.args[index]
    return call.kwargs.get(name, default)


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    return tuple(int(v) for v in value)


def _parameter_weight(module: nn.Module) -> Tensor | None:
    """The layer's weight as stored: the parameter, or the original of a parametrised weight."""
    params = module.__dict__.get("_parameters", {})
    weight = params.get("weight")
    if isinstance(weight, Tensor):
        return weight
    try:
        from torch.nn.utils import parametrize

        if parametrize.is_parametrized(module, "weight"):
            return module.weight
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, Tensor) else None


def _probe(module: nn.Module, side: int) -> Tensor:
    weight = _parameter_weight(module)
    dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
    device = weight.device if weight is not None else torch.device("cpu")
    if isinstance(module, nn.Linear):
        return torch.zeros(1, module.in_features, dtype=dtype, device=device)
    spatial = [side + (k - 1) * d for k, d in zip(module.kernel_size, module.dilation)]
    return torch.zeros(1, module.in_channels, *spatial, dtype=dtype, device=device)


def _own_forward(module: nn.Module, x: Tensor) -> Any:
    """The layer's own forward, without the hooks others put on it (gates), but with the hooks that make its
    weight (the old ``torch.nn.utils.weight_norm``'s, which sets ``module.weight`` before every forward;
    ``torch.nn.utils.prune``'s, which sets it to ``weight_orig * weight_mask``)."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, _weight_hooks()):
            hook(module, (x,))
    return module.forward(x)


def _weight_hooks() -> tuple[type, ...]:
    """The classes of the forward pre-hooks that set a layer's weight from other tensors of the layer (the old
    ``weight_norm``, ``spectral_norm``, ``torch.nn.utils.prune``'s methods): part of the weight computation,
    run by the probe, and left behind by a frozen layer (which holds the computed weight and none of those
    tensors)."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return WeightNorm, SpectralNorm, BasePruningMethod


@torch.no_grad()
def _record(module: Any, x: Tensor) -> tuple[list[_Call], Any]:
    with _Record() as rec:
        out = module(x)
    return rec.calls, out


def computed_weight(module: nn.Module) -> Computed | str | None:
    """``None`` when ``module`` is no Conv/Linear or uses its weight parameter as it is; else what its forward
    computes (:class:`Computed`), or why it cannot be frozen (a string)."""
    if not isinstance(module, _LAYERS) or isinstance(module, (*FROZEN_TYPES, *ALONG_TYPES)):
        return None
    own = module.__dict__.get("_parameters", {}).get("weight")
    if type(module) in _LAYERS and isinstance(own, Tensor):
        return None  # a torch layer uses its parameter as it is (a parametrised one is another class)
    saved = [(owner, key, buffer, buffer.detach().clone()) for owner in module.modules()
             for key, buffer in owner._buffers.items() if isinstance(buffer, Tensor)]
    try:
        weight = _parameter_weight(module)  # (a parametrised weight is computed here already)
        found = _probe_calls(module, weight) if weight is not None else None
    finally:  # the probe leaves the module as it was (a spectral norm's _u, a QAT observer's ranges)
        changed = False
        with torch.no_grad():
            for owner, key, buffer, value in saved:
                now = owner._buffers.get(key)
                changed = changed or now is not buffer or not torch.equal(buffer, value)
                owner._buffers[key] = buffer
                buffer.copy_(value)
    if changed:
        return "its weight computation has state (buffers its forward changes)"
    if found is None or isinstance(found, str):
        return found
    assert weight is not None
    return _computed(module, own, weight, found)


def _probe_calls(module: nn.Module, weight: Tensor) -> list[tuple[Tensor, list[_Call], _Call]] | str:
    run = functools.partial(_own_forward, module)
    found = []
    for side in (3, 4):  # two sizes of different parity: a dynamic padding shows itself
        try:
            x = _probe(module, side)
            calls, out = _record(run, x)
        except Exception as error:  # noqa: BLE001 - a layer that does not run on the probe
            return f"its forward did not run on a probe input ({type(error).__name__})"
        layers = [c for c in calls if c.func in _CONVS or c.func is F.linear]
        if len(layers) != 1:
            return f"its forward makes {len(layers)} conv/linear calls"
        call = layers[0]
        if call.out is not out:
            return "its forward changes the conv/linear output"
        w = _arg(call, 1, "weight", None)
        if not isinstance(w, Tensor) or tuple(w.shape) != tuple(weight.shape):
            return "its forward uses a weight of another shape"
        found.append((x, calls, call))
    return found


def _computed(module: nn.Module, own: Tensor | None, weight: Tensor,
              found: list[tuple[Tensor, list[_Call], _Call]]) -> Computed | str | None:
    x0, _, call0 = found[0]
    w = _arg(call0, 1, "weight", None)
    if w is own:
        return None  # the parameter as it is (a plain layer, perhaps with a custom forward)
    bias = _arg(call0, 2, "bias", None)
    if call0.func is F.linear:
        if call0.args[0] is not x0:
            return "its forward changes the input of its linear"
        return Computed(w, bias)
    n = _CONVS[call0.func][1]
    stride = _tuple(_arg(call0, 3, "stride", 1), n)
    padding_arg = _arg(call0, 4, "padding", 0)
    if isinstance(padding_arg, str):
        return f"its conv pads {padding_arg!r}"
    padding = _tuple(padding_arg, n)
    dilation = _tuple(_arg(call0, 5, "dilation", 1), n)
    groups = int(_arg(call0, 6, "groups", 1))
    if getattr(module, "padding_mode", "zeros") != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    same = False
    kernel = tuple(int(k) for k in module.kernel_size)
    for x, calls, call in found:
        if call.args[0] is x:
            continue
        pads = [c for c in calls if c.func is F.pad and c.args and c.args[0] is x and c.out is call.args[0]]
        want = pad_same(x, kernel, stride, dilation)
        if (any(padding) or len(pads) != 1 or _arg(pads[0], 2, "mode", "constant") != "constant"
                or float(_arg(pads[0], 3, "value", 0) or 0) != 0
                or tuple(call.args[0].shape) != tuple(want.shape)
                or [int(p) for p in _arg(pads[0], 1, "pad", ())] != _same_pads(x, list(kernel), list(stride),
                                                                               list(dilation))):
            return "its forward pads its input in a way not followed (only TensorFlow's SAME is)"
        same = True
    return Computed(w, bias, stride, padding, dilation, groups, same)


def freeze_reason(module: nn.Module) -> str | None:
    """None when ``module`` computes its weight and can be frozen; else why not."""
    found = computed_weight(module)
    if isinstance(found, Computed):
        return None
    return found or "it uses its weight parameter as it is"


@torch.no_grad()
def frozen_layer(module: nn.Module) -> nn.Module | None:
    """The plain layer computing what ``module`` computes now (None when ``module`` needs no freezing or
    cannot be frozen)."""
    found = computed_weight(module)
    if not isinstance(found, Computed):
        return None
    weight = found.weight.detach().clone()
    own = module.__dict__.get("_parameters", {}).get("weight")
    grad = (bool(own.requires_grad) if isinstance(own, Tensor)  # (a parametrised weight: its originals')
            else any(p.requires_grad for p in module.parameters()))
    bias = found.bias
    if isinstance(module, nn.Linear):
        new: nn.Module = FrozenLinear(module.in_features, module.out_features, bias=bias is not None,
                                      device="meta")
    else:
        cls = _CONVS[torch.conv1d if len(module.kernel_size) == 1 else
                     torch.conv2d if len(module.kernel_size) == 2 else torch.conv3d][0]
        new = cls(module.in_channels, module.out_channels, module.kernel_size, stride=found.stride,
                  padding=found.padding, dilation=found.dilation, groups=found.groups,
                  bias=bias is not None, device="meta")
        new.same_pad = found.same_pad
    _mark(new, weight.device)
    new.weight = nn.Parameter(weight, requires_grad=grad)
    if bias is not None:
        own_bias = module.__dict__.get("_parameters", {}).get("bias")
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=bool(
            own_bias.requires_grad) if isinstance(own_bias, Tensor) else grad)
    new.train(module.training)
    return new


#: the hook dicts of a module that the frozen layer takes over (what others hooked on the layer: a
#: distillation's feature hints, gates on its input, ...)
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """``new`` takes ``old``'s forward and backward hooks: the very dicts, so that the handles their owners
    hold still remove them. The hooks of the weight computation itself (:func:`_weight_hooks`: the old
    ``weight_norm``'s and ``spectral_norm``'s pre-hooks, ``torch.nn.utils.prune``'s, which set ``weight`` from
    tensors the frozen layer does not have) stay behind: a dict holding one is copied without it (its other
    hooks then follow without their handles)."""
    own = _weight_hooks()
    for attr in _HOOK_DICTS:
        hooks = old.__dict__.get(attr)
        if hooks is None:
            continue
        if any(isinstance(h, own) for h in hooks.values()):
            hooks = type(hooks)((k, h) for k, h in hooks.items() if not isinstance(h, own))
        setattr(new, attr, hooks)
    if "_is_full_backward_hook" in old.__dict__:  # (how the backward hooks were registered)
        new._is_full_backward_hook = old._is_full_backward_hook


def freeze(model: nn.Module, name: str) -> bool:
    """Replace the submodule ``name`` of ``model`` (every place it is registered) by its frozen layer when it
    computes its weight; returns whether it was replaced. The frozen layer computes what the layer computed
    and takes over the hooks others put on it (:func:`_carry_hooks`): a forward hook on the layer (a
    distillation's feature hint, a gate on its input) goes on acting, and its handle still removes it."""
    module = model.get_submodule(name)
    new = frozen_layer(module)
    if new is None:
        return False
    if not name:  # pragma: no cover - the model itself is the layer
        raise ValueError("cannot freeze the root module in place")
    _carry_hooks(module, new)
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is module:
                parent._modules[child_name] = new
    return True


def refreeze(model: nn.Module, names: Iterable[str], source: str) -> list[str]:
    """Freeze again the layers ``names`` that ``source`` (a file, a checkpoint) recorded frozen
    (:func:`frozen_names`); a layer already frozen is left as it is. Returns the names frozen now.

    Raises:
        InvalidArgumentError: a name is no layer of ``model``, or a layer that does not compute its weight.
    """
    from lightning_prune.errors import InvalidArgumentError

    done = []
    for name in names:
        name = str(name)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if module is None or not name:
            raise InvalidArgumentError(
                f"{source} holds `{name}` frozen into a plain layer, but {type(model).__name__} has no layer"
                f" `{name}`. HINT: pass a fresh model of the architecture that was compressed.")
        if isinstance(module, FROZEN_TYPES):
            continue
        if not freeze(model, name):
            raise InvalidArgumentError(
                f"{source} holds `{name}` frozen into a plain layer, but this model's `{name}` does not"
                f" compute its weight ({freeze_reason(module)}). HINT: pass a fresh model of the architecture"
                " that was compressed.")
        done.append(name)
    return done


def freeze_modules(model: nn.Module, groups: Iterable[Any], removed: Mapping[str, Iterable[int]],
                   prefix: str = "", everywhere: bool = False) -> list[str]:
    """Freeze the layers of ``groups`` that must be frozen before their units go (``ChannelGroup.frozen``)
    for every group losing units (``removed``; ``everywhere``: every group); returns the names frozen
    (relative to ``model``)."""
    done = []
    for group in groups:
        names = getattr(group, "frozen", ())
        if not names or not (everywhere or group.feasible(removed.get(group.name, ()))):
            continue
        for name in names:
            local = strip_prefix(name, prefix)
            if local not in done and freeze(model, local):
                done.append(local)
    return done


def effective_weight(module: nn.Module) -> Tensor:
    """The weight ``module``'s forward computes (its weight parameter when it uses it as it is)."""
    found = computed_weight(module)
    if isinstance(found, Computed):
        return found.weight.detach()
    return module.weight


def frozen_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s frozen layers (what :func:`lightning_prune.save_compressed` records)."""
    return [n for n, m in model.named_modules() if isinstance(m, FROZEN_TYPES)]


def frozen_in_state(state: Iterable[str]) -> list[str]:
    """The names of the layers a ``state_dict`` (its keys) holds frozen: those whose :data:`FROZEN_MARKER`
    it holds. ``refreeze(model, frozen_in_state(state), ...)`` makes a fresh model take it strictly."""
    tail = "." + FROZEN_MARKER
    return [key[: -len(tail)] for key in state if isinstance(key, str) and key.endswith(tail)]
