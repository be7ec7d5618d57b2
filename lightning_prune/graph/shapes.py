"""Sizes the model's code takes from a tensor's shape, found by one eager forward.

In the exported graph every size is a constant: ``B, N, C = x.shape; q = self.wq(x).reshape(B, N, h, C // h)``
becomes ``view(q, [2, 16, 3, 64])``, and nothing says that the 64 is the width of ``x`` divided by three. The
label propagation (:mod:`lightning_prune.graph.labels`) needs that link: when ``x``'s width shrinks with its
units, the reshaped tensor's width must shrink with it.

:func:`shape_provenance` runs the model once in eval mode under a :class:`~torch.overrides.TorchFunctionMode`
that hands out :class:`_Sized` ints from ``Tensor.shape`` / ``Tensor.size()``: an ``int`` that remembers the
tensor and dim it was read from, kept through ``* k`` and ``// k`` with a plain integer ``k`` (any other
arithmetic gives a plain ``int``). Each reshape-like call that receives such an int records which output dims
are derived from which tensor dims. The eager tensors are then matched to the nodes of the exported graph by
their values (the exported graph is run once on the same input; a tensor is found by its shape and a
fingerprint of its values; an all-equal tensor matches nothing).

What is found is a hint, never a proof: the exactness proof of :mod:`lightning_prune.graph.proof` stays the
judge of every group.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_prune.graph.inputs import call_model, example_arguments
from lightning_prune.graph.layers import VIEW_OPS, op_name

__all__ = ["DerivedSize", "shape_provenance"]

_SHAPE_GET = Tensor.shape.__get__
_VIEWS = {"reshape", "view", "unflatten", "expand", "new_zeros", "new_ones", "new_empty", "new_full"}
_RTOL = 1e-5


@dataclass(frozen=True)
class DerivedSize:
    """Output dim ``dim`` of a reshape node has the size ``size(source, source_dim) * num / den``."""

    dim: int
    source: str  # the node whose shape it was read from
    source_dim: int
    num: int = 1
    den: int = 1


class _Sized(int):
    """An int read from dim ``dim`` of source ``src`` (an index into the pass's sources): its value is
    ``size * num / den``."""

    src: int
    dim: int
    num: int
    den: int

    def __new__(cls, value: int, src: int, dim: int, num: int = 1, den: int = 1) -> _Sized:
        obj = super().__new__(cls, value)
        g = math.gcd(num, den)
        obj.src, obj.dim, obj.num, obj.den = src, dim, num // g, den // g
        return obj

    def __floordiv__(self, other: Any) -> Any:
        if not isinstance(other, int):
            return int(self) // other
        value = int(self) // int(other)
        if type(other) is int and other > 0 and int(self) % other == 0:
            return _Sized(value, self.src, self.dim, self.num, self.den * other)
        return value

    def __mul__(self, other: Any) -> Any:
        if not isinstance(other, int):
            return int(self) * other
        value = int(self) * int(other)  # (a tagged ``other``'s own ``__rmul__`` is not called)
        if type(other) is int and other > 0:
            return _Sized(value, self.src, self.dim, self.num * other, self.den)
        return value

    __rmul__ = __mul__


def _flat_sizes(args: tuple[Any, ...]) -> list[Any]:
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return list(args[0])
    return list(args)


class _Recorder(TorchFunctionMode):
    def __init__(self, check: Callable[[], None]) -> None:
        super().__init__()
        self.check = check
        self.calls = 0
        self.sources: list[Tensor] = []
        self._index: dict[int, int] = {}
        # (output tensor, [(out dim, source index, source dim, num, den)])
        self.views: list[tuple[Tensor, list[tuple[int, int, int, int, int]]]] = []

    def _source(self, t: Tensor) -> int:
        i = self._index.get(id(t))
        if i is None or self.sources[i] is not t:
            i = len(self.sources)
            self.sources.append(t)  # kept alive: ids stay unique during the pass
            self._index[id(t)] = i
        return i

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        self.calls += 1
        if self.calls % 256 == 0:
            self.check()
        out = func(*args, **kwargs)
        if func == _SHAPE_GET or func is Tensor.size:
            t = args[0]
            if not isinstance(t, Tensor) or not t.is_floating_point():
                return out
            if isinstance(out, int):
                d = args[1] if len(args) > 1 else kwargs.get("dim")
                if type(d) is not int and not isinstance(d, int):
                    return out
                return _Sized(out, self._source(t), d % t.dim())
            src = self._source(t)
            return torch.Size([_Sized(int(v), src, d) for d, v in enumerate(out)])
        name = getattr(func, "__name__", "")
        if name in _VIEWS and isinstance(out, Tensor) and args:
            if name == "unflatten":
                start = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % max(args[0].dim(), 1)
                sizes = list(args[2] if len(args) > 2 else kwargs.get("sizes", ()))
            else:
                start = 0
                sizes = _flat_sizes(args[1:]) if len(args) > 1 else list(kwargs.get("size", kwargs.get(
                    "shape", ())))
                if name in ("reshape", "view") and not isinstance(args[0], Tensor):
                    return out
            found = [(start + j, s.src, s.dim, s.num, s.den) for j, s in enumerate(sizes)
                     if isinstance(s, _Sized)]
            if found:
                self.views.append((out, found))
        return out


def _fingerprint(t: Any) -> tuple[float, ...] | None:
    """(sum, sum of |x|, a strided partial sum, a sum weighted by ``sin`` of the position) of a tensor's
    values; None where it cannot tell tensors apart (not floating point, all equal). (The strided sum alone
    is blind to a transpose of two dims whose sizes are 1 modulo the stride: PVT-v2's ``x`` and
    ``x.permute(0, 2, 1)`` at 64 tokens of 64 channels.)"""
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.numel() < 2:
        return None
    d = t.detach().double().flatten()
    if bool(d.max() == d.min()):
        return None
    weights = torch.arange(d.numel(), dtype=torch.float64, device=d.device).sin_()
    return float(d.sum()), float(d.abs().sum()), float(d[::7].sum()), float((d * weights).sum())


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    scale = max(a[1], b[1], 1e-30)
    return all(abs(x - y) <= _RTOL * scale for x, y in zip(a, b))


@torch.no_grad()
def shape_provenance(model: nn.Module, example: Any, program: Any,
                     check: Callable[[], None] = lambda: None) -> dict[str, list[DerivedSize]]:
    """Per reshape-like node of ``program`` (``torch.export`` of ``model`` on ``example``, eval mode), the
    output dims whose size the model's code took from a tensor's shape, with the node that tensor is."""
    # on a copy: an eval forward may leave state behind (EfficientFormerV2's attention-bias cache, kept
    # across the removal of heads)
    clone = copy.deepcopy(model).eval()
    recorder = _Recorder(check)
    with recorder:
        call_model(clone, example)
    if not recorder.views:
        return {}
    # fingerprints of what is to be found: the reshapes' outputs and the sources read
    wanted_views = []
    for out, found in recorder.views:
        fp = _fingerprint(out)
        if fp is not None:
            wanted_views.append((tuple(out.shape), fp, found))
    source_fp: dict[int, tuple[tuple[int, ...], tuple[float, ...]]] = {}
    for _, _, found in wanted_views:
        for _, src, _, _, _ in found:
            if src not in source_fp:
                fp = _fingerprint(recorder.sources[src])
                if fp is not None:
                    source_fp[src] = (tuple(recorder.sources[src].shape), fp)
    shapes = {s for s, _, _ in wanted_views} | {s for s, _ in source_fp.values()}
    values = _node_fingerprints(program, example, shapes, check)
    view_nodes = {name for name, (_, _, is_view) in values.items() if is_view}
    order = {name: i for i, name in enumerate(values)}
    by_shape: dict[tuple[int, ...], list[tuple[str, tuple[float, ...]]]] = {}
    for name, (shape, fp, _) in values.items():
        by_shape.setdefault(shape, []).append((name, fp))
    result: dict[str, list[DerivedSize]] = {}
    for shape, fp, found in wanted_views:
        nodes = [n for n, f in by_shape.get(shape, []) if n in view_nodes and _close(f, fp)]
        for node in nodes:
            derived = []
            for dim, src, sdim, num, den in found:
                if src not in source_fp:
                    continue
                sshape, sfp = source_fp[src]
                sources = [n for n, f in by_shape.get(sshape, [])
                           if order[n] < order[node] and _close(f, sfp)]
                derived.extend(DerivedSize(dim, s, sdim, num, den) for s in sources)
            if derived:
                result.setdefault(node, []).extend(d for d in derived if d not in result.get(node, []))
    return result


def _node_fingerprints(program: Any, example: Any, shapes: set[tuple[int, ...]], check: Callable[[], None]
                       ) -> dict[str, tuple[tuple[int, ...], tuple[float, ...], bool]]:
    """Run the exported graph on ``example``: per node whose output has one of ``shapes``, (shape,
    fingerprint, whether the node is a reshape-like op), in graph order."""
    gm = program.module()
    found: dict[str, tuple[tuple[int, ...], tuple[float, ...], bool]] = {}

    class _Run(torch.fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            out = super().run_node(n)
            if isinstance(out, Tensor) and tuple(out.shape) in shapes:
                fp = _fingerprint(out)
                if fp is not None:
                    is_view = n.op == "call_function" and (op_name(n.target) in VIEW_OPS
                                                           or op_name(n.target) in ("expand",))
                    found[n.name] = (tuple(out.shape), fp, is_view)
            if len(found) % 64 == 0:
                check()
            return out

    args, kwargs = example_arguments(example)
    flat = _flat_inputs(program, args, kwargs)
    _Run(gm).run(*flat)
    return found


def _flat_inputs(program: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The user inputs of the unlifted module ``program.module()`` in the order of its placeholders."""
    leaves, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    return leaves
