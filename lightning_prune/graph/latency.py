"""Latency of the model once some units are removed: a per-layer table measured on the device (HALP-style).

:class:`CostModel <lightning_prune.graph.cost.CostModel>` counts FLOPs; a user who asks for "twice as fast on
my device" needs time, and time does not fall with FLOPs (a thin layer is dominated by memory traffic and
call overhead). :func:`measure_latency_model` times, on the device and at the batch size the model will run
at, every layer whose width a removable channel group changes, at a few widths per axis (its input channels,
its output channels, or both: a grid), on standalone sliced copies of the layer (the same slicing as
:func:`~lightning_prune.graph.slicing.slice_units`, so the copy is the layer the compressed model will have).
The prediction for a removal plan is HALP's sum of per-layer tables:

    predicted = dense - sum over tabled layers of (table(full widths) - table(kept widths))

(multilinear interpolation between the measured widths), as a fraction of the dense model's measured
latency; the layers no group touches (activations, pooling, the attention's matmuls) count as they are. The
measured check (:meth:`LatencyModel.measure`) times a sliced copy of the whole model against the dense one.

Timing: inference (``eval``, no autograd); every timing is the median of ``repeats`` samples taken in turns
(interleaved: each round times every configuration once, so slow drift or a busy neighbour spreads over all
of them); a sample is as many calls as fill about a millisecond. On CUDA the clock is ``time.perf_counter``
between ``torch.cuda.synchronize`` calls; on CPU it is the thread's CPU time (``time.thread_time``) at one
intra-op thread, which other processes on the machine barely change.

Example::

    latency = measure_latency_model(model, torch.randn(64, 3, 32, 32), analysis.groups)
    latency.predict({"layer1.0.conv1": list(range(32))})      # fraction of the dense latency
    latency.measure({"layer1.0.conv1": list(range(32))})      # the same, timed on a sliced copy
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lightning_prune.core.threads import limited_threads
from lightning_prune.graph.inputs import call_model, example_batch_size, like_model
from lightning_prune.graph.layers import CONV_TYPES, channel_dim
from lightning_prune.graph.slicing import slice_extent, slice_units
from lightning_prune.graph.types import ChannelGroup, Slice, localised_group, prefixed_name, strip_prefix

__all__ = [
    "DEFAULT_LATENCY_REPEATS",
    "DEFAULT_LATENCY_WIDTHS",
    "LatencyModel",
    "LatencyPredictor",
    "LayerTable",
    "LatencyPlan",
    "batched_example",
    "interleaved_medians",
    "latency_plan",
    "measure_latency_model",
    "monotone",
]

#: widths measured per axis of a layer (from one unit to all of them)
DEFAULT_LATENCY_WIDTHS = 5
#: samples per timing (the median is kept)
DEFAULT_LATENCY_REPEATS = 5
#: the roles of a slice that change a layer's width (an axis of its table); ``"free"``: a parameter-free
#: module (an activation, a pool) that sees the channels
AXIS_ROLES = ("in", "out", "group", "channel", "free")
#: a timing sample repeats the call until it lasts about this long (seconds), at most MAX_CALLS times
SAMPLE_S = 1e-3
MAX_CALLS = 64


@runtime_checkable
class LatencyPredictor(Protocol):
    """What a latency target needs: the predicted latency of the model without ``removed`` (group name ->
    units) as a fraction of the dense model's, and optionally a measurement of the same (``None``: not
    measured; the prediction is then trusted). :class:`LatencyModel` is the measured one; a test or a user
    with their own table (a hardware simulator, a lookup measured elsewhere) passes any object with these
    methods."""

    def predict(self, removed: Mapping[str, Iterable[int]]) -> float: ...

    def measure(self, removed: Mapping[str, Iterable[int]]) -> float | None: ...


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: Sequence[Callable[[], Any]], device: torch.device | str = "cpu",
                        repeats: int = DEFAULT_LATENCY_REPEATS) -> list[float]:
    """Seconds per call of each of ``fns``: the median of ``repeats`` samples, taken in turns (one sample of
    every function per round), after one warm-up call each. CPU: thread CPU time at one intra-op thread;
    CUDA: wall time between synchronisations."""
    device = torch.device(device)
    cpu = device.type != "cuda"
    clock = time.thread_time if cpu else time.perf_counter
    threads = limited_threads(1) if cpu else contextlib.nullcontext()
    samples: list[list[float]] = [[] for _ in fns]
    with threads, torch.no_grad():
        calls = []
        for fn in fns:  # warm-up, and how many calls make one sample
            fn()
            _sync(device)
            start = clock()
            fn()
            _sync(device)
            once = clock() - start
            calls.append(min(MAX_CALLS, max(1, math.ceil(SAMPLE_S / max(once, 1e-7)))))
        for _ in range(max(int(repeats), 1)):
            for i, fn in enumerate(fns):
                _sync(device)
                start = clock()
                for _ in range(calls[i]):
                    fn()
                _sync(device)
                samples[i].append((clock() - start) / calls[i])
    return [statistics.median(s) for s in samples]


@dataclass
class LayerTable:
    """One layer's latency as a function of its widths.

    Args:
        module: the layer's full name (as in the groups' slices).
        roles: the axes: ``"in"``, ``"out"``, ``"group"`` (whole conv groups), ``"channel"`` (norms,
            depthwise convs); each a slice role that changes the layer's width.
        sizes: the dense width (channels) of each axis.
        widths: per axis, the measured widths, ascending, the last one ``sizes[i]``.
        seconds: the measured seconds, one per point of ``itertools.product(*widths)`` (row-major).
        follows: a parameter-free layer (an activation) that reads the output of ``follows`` (a full module
            name): its axis is that module's (``roles``: the role there), ``""`` for a layer of its own.
    """

    module: str
    roles: tuple[str, ...]
    sizes: tuple[int, ...]
    widths: tuple[tuple[int, ...], ...]
    seconds: tuple[float, ...]
    follows: str = ""

    def __post_init__(self) -> None:
        if not (len(self.roles) == len(self.sizes) == len(self.widths)):
            raise ValueError(f"LayerTable {self.module!r}: roles, sizes and widths differ in length")
        if len(self.seconds) != math.prod(len(w) for w in self.widths):
            raise ValueError(f"LayerTable {self.module!r}: {len(self.seconds)} timings for a grid of"
                             f" {'x'.join(str(len(w)) for w in self.widths)}")
        for size, widths in zip(self.sizes, self.widths):
            if list(widths) != sorted(set(widths)) or widths[-1] != size:
                raise ValueError(f"LayerTable {self.module!r}: widths {widths} must ascend to {size}")

    @property
    def full(self) -> float:
        """Seconds at the dense widths."""
        return self.seconds[-1]

    def at(self, kept: Sequence[float]) -> float:
        """Seconds at ``kept`` channels per axis (multilinear interpolation, clamped to the measured
        range)."""
        corners: list[list[tuple[int, float]]] = []
        for k, widths in zip(kept, self.widths):
            k = min(max(float(k), widths[0]), widths[-1])
            i = max(j for j in range(len(widths)) if widths[j] <= k)
            if i == len(widths) - 1:
                corners.append([(i, 1.0)])
            else:
                t = (k - widths[i]) / (widths[i + 1] - widths[i])
                corners.append([(i, 1.0 - t), (i + 1, t)])
        strides = [math.prod(len(w) for w in self.widths[a + 1:]) for a in range(len(self.widths))]
        total = 0.0
        for combo in itertools.product(*corners):
            weight = math.prod(w for _, w in combo)
            if weight:
                total += weight * self.seconds[sum(i * s for (i, _), s in zip(combo, strides))]
        return total


class LatencyModel:
    """The predicted latency of the model once some units are removed (the sum of per-layer tables), and its
    measurement on a sliced copy (see the module docstring). Built by :func:`measure_latency_model`, or from
    tables given by hand (then :meth:`measure` is ``None`` unless ``measure_fn`` is given).

    Args:
        groups: the channel groups (their slices say which layers' widths a removal changes).
        tables: one :class:`LayerTable` per timed layer.
        dense_seconds: the dense model's measured latency (one forward at the measured batch).
        measure_fn: ``measure_fn(removed) -> fraction`` measured on a sliced copy (optional).
        device, batch_size, setup_seconds: what was measured where, and what it cost (for the log line).
    """

    def __init__(self, groups: Sequence[ChannelGroup], tables: Sequence[LayerTable], dense_seconds: float,
                 measure_fn: Callable[[Mapping[str, Iterable[int]]], float] | None = None,
                 device: torch.device | str = "cpu", batch_size: int = 1, setup_seconds: float = 0.0) -> None:
        if not dense_seconds > 0:
            raise ValueError(f"dense_seconds must be > 0, got {dense_seconds!r}")
        self.groups = list(groups)
        self.tables = list(tables)
        self.dense_seconds = float(dense_seconds)
        self.measure_fn = measure_fn
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.setup_seconds = float(setup_seconds)
        self._measured: dict[tuple[tuple[str, tuple[int, ...]], ...], float] = {}

    @staticmethod
    def _key(removed: Mapping[str, Iterable[int]]) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return tuple(sorted((k, tuple(sorted(int(u) for u in v))) for k, v in removed.items() if v))

    def kept_widths(self, removed: Mapping[str, Iterable[int]]) -> dict[tuple[str, str], int]:
        """``(module, role) -> channels kept`` on every axis a removal in ``removed`` narrows."""
        dead: dict[tuple[str, str], set[int]] = {}
        for group in self.groups:
            gone = group.feasible(removed.get(group.name, ()))
            if not gone:
                continue
            for sl in group.slices:
                if sl.role in AXIS_ROLES:
                    dead.setdefault((sl.module, sl.role), set()).update(
                        c for c, u in zip(sl.channels, sl.units) if u in gone)
        sizes = {(t.follows or t.module, r): s for t in self.tables for r, s in zip(t.roles, t.sizes)}
        return {key: sizes[key] - len(chs) for key, chs in dead.items() if key in sizes}

    def predicted_seconds(self, removed: Mapping[str, Iterable[int]]) -> float:
        """The predicted latency (seconds) of the model without ``removed``."""
        kept = self.kept_widths(removed)
        saved = 0.0
        for table in self.tables:
            key = table.follows or table.module
            widths = [kept.get((key, r), s) for r, s in zip(table.roles, table.sizes)]
            if widths != list(table.sizes):
                saved += table.full - table.at(widths)
        return max(self.dense_seconds - saved, 0.0)

    def predict(self, removed: Mapping[str, Iterable[int]]) -> float:
        """The predicted latency without ``removed``, as a fraction of the dense model's."""
        return self.predicted_seconds(removed) / self.dense_seconds

    def measure(self, removed: Mapping[str, Iterable[int]]) -> float | None:
        """The latency of a sliced copy without ``removed`` over the dense model's, timed in turns (cached per
        plan); ``None`` without a ``measure_fn``."""
        if self.measure_fn is None:
            return None
        key = self._key(removed)
        if key not in self._measured:
            self._measured[key] = float(self.measure_fn(removed))
        return self._measured[key]

    def cached(self, removed: Mapping[str, Iterable[int]]) -> float | None:
        """The measurement of ``removed`` if :meth:`measure` took it already, else ``None`` (never times)."""
        return self._measured.get(self._key(removed))

    def describe(self) -> str:
        """One line: what was measured, where, and what it cost."""
        points = sum(len(t.seconds) for t in self.tables)
        return (f"latency table: {len(self.tables)} layers, {points} timings on {self.device}"
                f" at batch {self.batch_size} (dense {self.dense_seconds * 1e3:.2f} ms; measured in"
                f" {self.setup_seconds:.1f} s)")


def monotone(seconds: Sequence[float], shape: Sequence[int]) -> list[float]:
    """A grid of timings (row-major, ``shape``) made non-decreasing along every axis (the running maximum
    from the narrowest width up): a layer is never faster with more channels, and a timing that says so is
    noise. Without it the predicted latency would not fall monotonically as units go, and the search for the
    fewest removals that meet a target could stop anywhere."""
    grid = torch.tensor(list(seconds), dtype=torch.float64).reshape(*shape)
    for axis in range(grid.dim()):
        grid = torch.cummax(grid, dim=axis).values
    return grid.flatten().tolist()


# ---------------------------------------------------------------------------------------------- planning
@dataclass
class LatencyPlan:
    """What :func:`latency_plan` chose: the units to remove, the predicted latency (fraction of the dense),
    the measured one (``None`` when the predictor does not measure), and the measured latency of removing
    everything the ranking allows (``None`` unless the target was unmet), and every plan measured."""

    removed: dict[str, list[int]]
    predicted: float
    measured: float | None
    floor: float | None = None
    tried: dict[int, tuple[float, float]] = field(default_factory=dict)  # removals -> (predicted, measured)


def _next_removals(tried: dict[int, float], predicted: dict[int, float], last: int, aim: float, target: float,
                   fewest: Callable[[float], int]) -> int:
    """The next number of units to remove (:func:`latency_plan`): after one measurement, the fewest whose
    prediction meets the predicted goal scaled by ``aim / measured``; after more, the secant of the measured
    latency over the removals through the closest plans on both sides of ``target`` (or the two closest to
    ``aim`` when all lie on one side), towards ``aim``."""
    if len(tried) >= 2:
        slow = [k for k, m in tried.items() if m > target]
        fast = [k for k, m in tried.items() if m <= target]
        if slow and fast:
            a, b = max(slow), min(fast)
        else:
            a, b = sorted(sorted(tried, key=lambda k: abs(tried[k] - aim))[:2])
        if tried[a] != tried[b]:  # (flat: no slope to follow, the prediction scaled instead)
            return max(round(a + (aim - tried[a]) * (b - a) / (tried[b] - tried[a])), 0)
    return fewest(min(max(predicted[last] * aim / max(tried[last], 1e-9), 0.0), 1.0))


def latency_plan(removed_for: Callable[[int], dict[str, list[int]]], total: int, latency: LatencyPredictor,
                 target: float, attempts: int = 6, tolerance: float = 0.02) -> LatencyPlan:
    """The fewest removals (in the caller's ranking: ``removed_for(n)`` removes the ``n`` first units) whose
    latency meets ``target``: a bisection on ``latency.predict``, then a measurement of that plan; while the
    measurement is off by more than ``tolerance`` (or above the target) the next plan is chosen again (at
    most ``attempts`` measurements), aiming at ``aim = target - tolerance / 2``: after the first measurement
    by the predicted goal scaled by ``aim / measured``; from the second on by the secant of the *measured*
    latency over the number of units removed, between the closest plans on both sides of the target or, with
    all on one side, through the two closest to it (a prediction that is off in shape -- it saturates long
    before the measurement does -- cannot stall the search), the midpoint where a secant repeats a plan. A
    later plan stays between the plans measured too slow and those measured fast enough. The plan kept is the
    measured one closest to the target from below; with none below, the one measured fastest (the target is
    unmet: ``floor`` says what removing everything gives)."""

    def fewest(goal: float) -> int:
        lo, hi = 0, total
        while lo < hi:
            mid = (lo + hi) // 2
            if latency.predict(removed_for(mid)) <= goal:
                hi = mid
            else:
                lo = mid + 1
        return lo

    measure = getattr(latency, "measure", None)
    aim = target - tolerance / 2  # the middle of the window accepted
    tried: dict[int, float] = {}
    predicted: dict[int, float] = {}
    n = fewest(float(target))
    for _ in range(max(int(attempts), 1)):
        # inside the bracket the measurements so far give (more removed than any plan measured too slow,
        # fewer than any measured fast enough): noise in a timing cannot send the search back out
        slow = [k for k, m in tried.items() if m > target]
        fast = [k for k, m in tried.items() if m <= target]
        low, high = (max(slow) + 1 if slow else 0), (min(fast) - 1 if fast else total)
        if low <= high:
            n = min(max(n, low), high)
            if n in tried:
                n = (low + high) // 2
        if n in tried:
            break
        removed = removed_for(n)
        measured = measure(removed) if measure is not None else None
        if measured is None:
            return LatencyPlan(removed, float(latency.predict(removed)), None)
        tried[n] = float(measured)
        predicted[n] = float(latency.predict(removed))
        if target - tolerance <= measured <= target or (n == total and measured > target):
            break
        n = _next_removals(tried, predicted, n, aim, target, fewest)
    below = [(m, n) for n, m in tried.items() if m <= target]
    m, n = max(below) if below else min((m, n) for n, m in tried.items())
    removed = removed_for(n)
    floor = None
    if m > target:
        floor = m if n == total else measure(removed_for(total))  # type: ignore[misc]
    return LatencyPlan(removed, float(latency.predict(removed)), m, floor,
                       {k: (predicted[k], tried[k]) for k in sorted(tried)})


# ---------------------------------------------------------------------------------------------- measuring
def batched_example(example: Any, batch_size: int) -> Any:
    """``example`` with its batch dimension repeated (or cut) to ``batch_size`` (tensors with a batch
    dimension; lists, tuples and dicts of them)."""
    if isinstance(example, Tensor):
        if example.dim() == 0 or example.shape[0] == batch_size:
            return example
        reps = math.ceil(batch_size / max(example.shape[0], 1))
        return example.repeat(reps, *([1] * (example.dim() - 1)))[:batch_size].contiguous()
    if isinstance(example, (list, tuple)):
        return type(example)(batched_example(e, batch_size) for e in example)
    if isinstance(example, dict):
        return {k: batched_example(v, batch_size) for k, v in example.items()}
    return example


def _in_width(module: nn.Module) -> int | None:
    for attr in ("in_channels", "in_features", "num_features", "num_channels"):
        if isinstance(getattr(module, attr, None), int):
            return int(getattr(module, attr))
    shape = getattr(module, "normalized_shape", None)
    return int(shape[0]) if shape else None


def _grid(size: int, step: int, count: int) -> tuple[int, ...]:
    """``count`` widths from one unit (``step`` channels) to ``size``, multiples of ``step``."""
    units = max(size // step, 1)
    picks = {max(1, round(1 + (units - 1) * i / max(count - 1, 1))) for i in range(count)}
    return tuple(sorted(min(p * step, size) for p in picks | {units}))


def _narrowed(module: nn.Module, roles: Sequence[str], sizes: Sequence[int], widths: Sequence[int]
              ) -> nn.Module:
    """A copy of ``module`` keeping the first ``widths[i]`` channels on each axis."""
    small = copy.deepcopy(module)
    groups, removed = [], {}
    for i, (role, size, width) in enumerate(zip(roles, sizes, widths)):
        if width >= size:
            continue
        name = f"axis{i}"
        groups.append(ChannelGroup(name=name, size=size, unit="channel", width=1, sites=(),
                                   slices=(Slice("", role, tuple(range(size)), tuple(range(size))),),
                                   producers=()))
        removed[name] = list(range(width, size))
    slice_units(small, groups, removed)
    return small


def _random_in_layout(shape: Sequence[int], stride: Sequence[int], dtype: torch.dtype,
                      device: torch.device) -> Tensor:
    """A random tensor of ``shape`` laid out in memory as a tensor of strides ``stride`` is (its dims ordered
    by decreasing stride): a layer timed alone must see the layout it sees in the model -- ConvNeXt's
    depthwise convs read channels-last strides (the permute back from its NHWC MLP), for which a 7x7
    depthwise conv at a 1x1 map runs 160x faster on this CPU than on contiguous NCHW."""
    order = sorted(range(len(shape)), key=lambda d: -stride[d])
    inverse = sorted(range(len(order)), key=lambda i: order[i])
    return torch.randn([shape[d] for d in order], dtype=dtype, device=device).permute(inverse)


def _input_like(shape: torch.Size, stride: Sequence[int], dtype: torch.dtype, device: torch.device,
                module: nn.Module, dense_width: int) -> Tensor:
    shape = list(shape)
    width = _in_width(module)
    if width is not None and width != dense_width:
        dim = channel_dim(module) % len(shape)
        shape[dim] = width
    return _random_in_layout(shape, stride, dtype, device)


@torch.no_grad()
def measure_latency_model(model: nn.Module, example: Any, groups: Sequence[ChannelGroup], prefix: str = "",
                          device: torch.device | str | None = None, batch_size: int | None = None,
                          widths: int = DEFAULT_LATENCY_WIDTHS, repeats: int = DEFAULT_LATENCY_REPEATS,
                          share: Callable[[Any], Any] | None = None) -> LatencyModel:
    """Measure a :class:`LatencyModel` of ``model`` (left untouched: the timings run on copies).

    Args:
        model: the traced module (the groups' names carry ``prefix``).
        example: an input of ``model`` (its batch dimension is repeated to ``batch_size``).
        groups: the removable channel groups.
        device: where to time (default: where ``model``'s parameters are).
        batch_size: the batch to time at (default: ``example``'s).
        widths: widths per axis of a layer (from one unit to all).
        repeats: samples per timing (the median is kept).
        share: ``share(obj) -> obj`` makes every process use the same numbers (DDP: a broadcast from rank
            0), applied to the tables at setup and to every measurement.
    """
    started = time.perf_counter()
    param = next(iter(model.parameters()), None)
    device = torch.device(device) if device is not None else (param.device if param is not None
                                                              else torch.device("cpu"))
    dense = copy.deepcopy(model).to(device).eval()
    for m in dense.modules():  # gates and restricted norms of the original would follow the copy
        m._forward_pre_hooks.clear()
        m._forward_hooks.clear()
    if batch_size is not None:
        example = batched_example(example, int(batch_size))
    example = like_model(example, dense)
    batch = example_batch_size(example)
    axes: dict[str, dict[str, int]] = {}  # module -> role -> the group's unit width (channels per unit)
    free: dict[str, int] = {}  # parameter-free module -> the largest channel index a group removes + 1
    for group in groups:
        for sl in group.slices:
            if sl.role in AXIS_ROLES:
                step = max(1, len(sl.channels) // max(group.size, 1))  # channels per unit
                name = strip_prefix(sl.module, prefix)
                axes.setdefault(name, {}).setdefault(sl.role, step)
                if sl.role == "free" and sl.channels:
                    free[name] = max(free.get(name, 0), max(sl.channels) + 1)
    inputs: dict[str, tuple[torch.Size, tuple[int, ...], torch.dtype]] = {}  # shape, strides, dtype
    followers: dict[str, tuple[str, str]] = {}  # activation -> (the narrowed layer it reads, that role)
    last_out: dict[int, tuple[str, tuple[int, ...]]] = {}  # storage -> the leaf that wrote it last (in order)
    handles = []
    for name, module in dense.named_modules():
        if any(True for _ in module.children()):
            continue

        def grab(m: nn.Module, args: Any, out: Any, name: str = name) -> None:
            x = args[0] if args and isinstance(args[0], Tensor) else None
            if x is not None and name not in inputs:
                inputs[name] = (x.shape, x.stride(), x.dtype)
            source = name
            if x is not None and name not in axes and next(m.parameters(), None) is None \
                    and not isinstance(m, (nn.Identity, nn.Dropout)) and "Drop" not in type(m).__name__:
                writer = last_out.get(x.data_ptr())
                roles = axes.get(writer[0], {}) if writer is not None and writer[1] == tuple(x.shape) else {}
                role = next((r for r in ("out", "channel", "group") if r in roles), None)
                if role is not None and writer is not None:
                    followers.setdefault(name, (writer[0], role))
                    source = writer[0]
            if isinstance(out, Tensor):
                last_out[out.data_ptr()] = (source, tuple(out.shape))

        handles.append(module.register_forward_hook(grab))
    try:
        call_model(dense, example)
    finally:
        for h in handles:
            h.remove()
    (dense_seconds,) = interleaved_medians([lambda: call_model(dense, example)], device, repeats)

    tables: list[LayerTable] = []
    for name, roles_steps in axes.items():
        if name not in inputs:
            continue
        module = dense.get_submodule(name)
        if any(True for _ in module.children()):
            continue  # containers: their leaves are timed
        shape, stride, dtype = inputs[name]
        roles = tuple(sorted(roles_steps))
        dim = None
        if "free" in roles:  # the channels sit where the input is wide enough (ambiguous: NCHW or tokens)
            if len(roles) > 1 or len(shape) < 2:
                continue
            fits = [d for d in ((1, -1) if len(shape) >= 4 else (-1, 1)) if shape[d] >= free.get(name, 0)]
            if not fits:
                continue
            dim = fits[0] % len(shape)
            sizes: tuple[int | None, ...] = (int(shape[dim]),)
        else:
            sizes = tuple(slice_extent(module, r) for r in roles)
        if any(s is None for s in sizes) or (set(roles) & {"group", "channel"} and len(roles) > 1):
            continue
        steps = []
        for role, size in zip(roles, sizes):
            step = roles_steps[role]
            if role == "group" and isinstance(module, CONV_TYPES):
                step = module.out_channels // module.groups
            steps.append(max(1, min(step, size)))
        grid = tuple(_grid(s, st, widths) for s, st, in zip(sizes, steps))  # type: ignore[arg-type]
        dense_width = _in_width(module)
        fns = []
        try:
            for point in itertools.product(*grid):
                if dim is not None:  # nothing to slice: the same module on fewer channels
                    small = module
                    x = _random_in_layout([point[0] if d == dim else s for d, s in enumerate(shape)], stride,
                                          dtype, device)
                else:
                    small = _narrowed(module, roles, sizes, point).eval()  # type: ignore[arg-type]
                    x = _input_like(shape, stride, dtype, device, small, dense_width or 0)
                small(x)
                fns.append(lambda small=small, x=x: small(x))
        except Exception:  # noqa: BLE001 - a layer that cannot run alone is left out (it counts as it is)
            continue
        seconds = monotone(interleaved_medians(fns, device, repeats), [len(w) for w in grid])
        tables.append(LayerTable(prefixed_name(prefix, name), roles, sizes, grid,  # type: ignore[arg-type]
                                 tuple(seconds)))
        del fns
    tabled = {t.module: t for t in tables}
    for name, (source, role) in followers.items():  # activations: timed on the widths of what they read
        table = tabled.get(prefixed_name(prefix, source))
        if table is None or role not in table.roles or name not in inputs:
            continue
        axis = table.roles.index(role)
        shape, stride, dtype = inputs[name]
        dim = channel_dim(dense.get_submodule(source)) % len(shape)
        if shape[dim] != table.sizes[axis]:
            continue
        module = dense.get_submodule(name)
        try:
            fns = []
            for width in table.widths[axis]:
                x = _random_in_layout([width if d == dim else n for d, n in enumerate(shape)], stride, dtype,
                                      device)
                module(x)
                fns.append(lambda module=module, x=x: module(x))
        except Exception:  # noqa: BLE001 - as above
            continue
        seconds = monotone(interleaved_medians(fns, device, repeats), [len(table.widths[axis])])
        tables.append(LayerTable(prefixed_name(prefix, name), (role,), (table.sizes[axis],),
                                 (table.widths[axis],), tuple(seconds), follows=table.module))
        del fns
    if share is not None:
        dense_seconds, tables = share((dense_seconds, tables))
    local_groups = [localised_group(g, prefix) for g in groups]

    dense = dense.cpu()  # kept off the device between measurements
    example = like_model(example, dense)

    def measure(removed: Mapping[str, Iterable[int]]) -> float:
        full = copy.deepcopy(dense)
        small = copy.deepcopy(dense)
        slice_units(small, local_groups, {strip_prefix(k, prefix): list(v) for k, v in removed.items()})
        full, small = full.to(device), small.to(device)
        x = like_model(example, full)
        pruned, whole = interleaved_medians([lambda: call_model(small, x), lambda: call_model(full, x)],
                                            device, max(repeats, 7))
        ratio = pruned / whole
        return float(share(ratio)) if share is not None else ratio

    return LatencyModel(groups, tables, dense_seconds, measure, device=device, batch_size=batch,
                        setup_seconds=time.perf_counter() - started)
