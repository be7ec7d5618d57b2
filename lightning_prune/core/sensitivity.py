"""Per-layer sensitivity scan: prune one layer at a time to each sparsity, evaluate, restore.

Han, Pool, Tran & Dally, "Learning both Weights and Connections for Efficient Neural Networks", NeurIPS 2015,
arXiv:1506.02626 (Fig. 6: accuracy against the pruned share of each single layer, used to choose per-layer
thresholds), as Distiller's sensitivity analysis and SparseML's ``pr_sensitivity`` ran it; Li et al., "Pruning
Filters for Efficient ConvNets", ICLR 2017, arXiv:1608.08710 (the same scan over filters, by their L2 norm).

:func:`sensitivity` measures a metric with one layer (``method="magnitude"``: its smallest weights, chosen by
:func:`lightning_prune.functional.magnitude_mask`) or one channel group (``method="channels"``: the units of
:func:`lightning_prune.graph.analyse_channels` with the smallest L2 norm, or the first ones; every tensor they
touch masked by :func:`lightning_prune.core.gates.unit_masks`) pruned at a time; the rest of the model stays
dense.
:func:`layer_targets_from_sensitivity` turns the table into per-layer sparsities that meet a global target --
the ``layer_targets`` of :class:`~lightning_prune.GradualMagnitudePruning`, or a ratio per channel group (the
``group_targets`` of :class:`~lightning_prune.GroupLassoPruning` and :class:`~lightning_prune.L0Pruning`;
:func:`channel_removal` makes it a plan for :func:`lightning_prune.compress`).

Example::

    table = lp.sensitivity(model, datamodule.val_dataloader(), sparsities=(0.5, 0.8, 0.9, 0.95, 0.98),
                           heatmap="sensitivity.png")
    print(table)
    targets = lp.layer_targets_from_sensitivity(table, target_sparsity=0.95)
    trainer = Trainer(callbacks=[lp.GradualMagnitudePruning(target_sparsity=0.95, layer_targets=targets)])
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune.core.gates import unit_masks
from lightning_prune.core.targets import resolve_targets
from lightning_prune.errors import InvalidArgumentError, InvalidArgumentTypeError
from lightning_prune.functional.distill import output_logits
from lightning_prune.functional.magnitude import block_magnitude, kept_count, magnitude_mask
from lightning_prune.graph import (
    ChannelGroup,
    analyse_channels,
    call_model,
    example_inputs_for,
    like_model,
    module_modes,
    restore_modes,
    restricted_norm_hooks,
    traced_root,
)
from lightning_prune.validation import (
    check_bool,
    check_choice,
    check_fraction,
    check_group_names,
    check_input_size,
    check_int,
    check_nonnegative,
    check_optional,
    check_patterns,
    check_types,
)

__all__ = [
    "METHODS",
    "SensitivityTable",
    "channel_removal",
    "layer_targets_from_sensitivity",
    "sensitivity",
]

METHODS = ("magnitude", "channels")
CHANNEL_CRITERIA = ("l2", "first_k")
_METRICS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], bool]] = {
    "accuracy": (lambda logits, y: (logits.argmax(dim=-1) == y).float().mean(), True),
    "loss": (lambda logits, y: F.cross_entropy(logits.float(), y), False),
}


# ---------------------------------------------------------------------------------------------- the table
@dataclass
class SensitivityTable:
    """Layer × sparsity → metric, measured with only that layer pruned.

    Attributes:
        method: ``"magnitude"`` (rows are layers: module names) or ``"channels"`` (rows are channel groups).
        metric: the metric's name (``"accuracy"``, ``"loss"``, or the callable's name).
        higher_is_better: how :meth:`drop` reads the metric.
        baseline: the metric of the unpruned model.
        sparsities: the columns: fractions of each row's weights (or units) pruned.
        values: row -> the metric at each sparsity.
        sizes: row -> the parameters the row holds (a layer's weight; every tensor a group's units touch),
            the weights :func:`layer_targets_from_sensitivity` averages with.
        units: row -> what is pruned (``"weight"``, ``"channel"``, ``"head"``, ``"conv group"``).
    """

    method: str
    metric: str
    higher_is_better: bool
    baseline: float
    sparsities: tuple[float, ...]
    values: dict[str, list[float]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.values)

    def value(self, layer: str, sparsity: float) -> float:
        """The metric with ``layer`` pruned to ``sparsity`` (one of :attr:`sparsities`)."""
        return self.values[layer][self._column(sparsity)]

    def _column(self, sparsity: float) -> int:
        for i, s in enumerate(self.sparsities):
            if math.isclose(s, sparsity, abs_tol=1e-9):
                return i
        raise InvalidArgumentError(
            f"{sparsity} is not a scanned sparsity; the table has {list(self.sparsities)}.")

    def drop(self, layer: str) -> list[float]:
        """How much worse than :attr:`baseline` the metric is at each sparsity (positive = worse)."""
        sign = 1.0 if self.higher_is_better else -1.0
        return [sign * (self.baseline - v) for v in self.values[layer]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy (:meth:`from_dict` reads it back)."""
        return {"method": self.method, "metric": self.metric, "higher_is_better": self.higher_is_better,
                "baseline": self.baseline, "sparsities": list(self.sparsities),
                "values": {k: list(v) for k, v in self.values.items()}, "sizes": dict(self.sizes),
                "units": dict(self.units)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityTable:
        try:
            return cls(str(data["method"]), str(data["metric"]), bool(data["higher_is_better"]),
                       float(data["baseline"]), tuple(float(s) for s in data["sparsities"]),
                       {str(k): [float(x) for x in v] for k, v in data["values"].items()},
                       {str(k): int(v) for k, v in data.get("sizes", {}).items()},
                       {str(k): str(v) for k, v in data.get("units", {}).items()})
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidArgumentError(f"not a sensitivity table: {err!r}") from err

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> SensitivityTable:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def format(self, digits: int = 4) -> str:
        """A Markdown table: one row per layer, the metric at each sparsity, the unpruned metric above."""
        head = ["layer", "params", *(f"{s:g}" for s in self.sparsities)]
        lines = [f"{self.metric} with one {'layer' if self.method == 'magnitude' else 'channel group'} pruned"
                 f" ({self.method}); unpruned: {self.baseline:.{digits}f}", "",
                 "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for layer, row in self.values.items():
            cells = [f"`{layer}`", f"{self.sizes.get(layer, 0):,}", *(f"{v:.{digits}f}" for v in row)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Write a PNG heat map (rows = layers, columns = sparsities, colour = the metric's drop)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        drops = [self.drop(layer) for layer in self.layers]
        height = max(2.5, 0.28 * len(self.layers) + 1.5)
        fig, ax = plt.subplots(figsize=(1.1 * len(self.sparsities) + 4.5, height))
        worst = max([abs(d) for row in drops for d in row] + [1e-12])
        image = ax.imshow(drops, aspect="auto", cmap="RdYlGn_r", vmin=-worst, vmax=worst)
        ax.set_xticks(range(len(self.sparsities)), [f"{s:g}" for s in self.sparsities])
        ax.set_yticks(range(len(self.layers)), self.layers, fontsize=7)
        ax.set_xlabel("sparsity of that layer alone")
        for i, row in enumerate(self.values.values()):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=6)
        fig.colorbar(image, ax=ax, label=f"{self.metric} drop (unpruned {self.baseline:.4f})")
        ax.set_title(title or f"Sensitivity ({self.method}, {self.metric})", fontsize=9)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


# ---------------------------------------------------------------------------------------------- the scan
def _batches(dataloader: Iterable[Any], max_batches: int | None,
             model: nn.Module) -> list[tuple[Any, Tensor]]:
    out = []
    for i, batch in enumerate(dataloader):
        if max_batches is not None and i >= max_batches:
            break
        if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not isinstance(batch[1], Tensor):
            raise InvalidArgumentTypeError(
                f"batches must be (inputs, targets, ...) sequences, got {type(batch).__name__}. HINT: wrap"
                " the dataloader so that it yields (x, y).")
        out.append((like_model(batch[0], model), batch[1].to(_device(model))))
    if not out:
        raise InvalidArgumentError("the dataloader yielded no batch.")
    return out


def _device(model: nn.Module) -> torch.device:
    tensor = next((t for t in (*model.parameters(), *model.buffers())), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def _evaluate(model: nn.Module, batches: Sequence[tuple[Any, Tensor]],
              metric: Callable[[Tensor, Tensor], Any]) -> float:
    total, count = 0.0, 0
    for x, y in batches:
        logits, _ = output_logits(call_model(model, x))
        if logits is None:
            raise InvalidArgumentTypeError("the model's output holds no logits tensor.")
        value = metric(logits, y)
        n = int(y.shape[0]) if y.dim() else 1
        total += float(value) * n
        count += n
    return total / max(count, 1)


def _unit_scores(model: nn.Module, group: ChannelGroup) -> Tensor:
    """Per unit, the L2 norm of the weights that produce it (its filters' rows; the reading columns when no
    layer produces it)."""
    score = torch.zeros(group.size, dtype=torch.float32)  # the dtype magnitude_mask thresholds in
    for role, dim in (("out", 0), ("in", 1)):
        for sl in group.slices:
            if sl.role != role:
                continue
            weight = getattr(model.get_submodule(sl.module), "weight", None)
            if not isinstance(weight, Tensor):
                continue
            part = weight.detach().index_select(dim, torch.tensor(sl.channels, device=weight.device))
            sq = part.movedim(dim, 0).reshape(len(sl.channels), -1).float().pow(2).sum(dim=1).cpu()
            score.index_add_(0, torch.tensor(sl.units), sq)
        if bool(score.any()):
            break
    return score.sqrt()


def _keep_units(model: nn.Module, group: ChannelGroup, sparsity: float, criterion: str) -> Tensor:
    """The units of ``group`` that stay at ``sparsity`` (at least one)."""
    if criterion == "first_k":
        return torch.arange(group.size) >= group.size - kept_count(group.size, sparsity)
    scores = _unit_scores(model, group)
    keep = magnitude_mask(scores, sparsity)
    if not bool(keep.any()):
        keep[int(scores.argmax())] = True
    return keep


def _group_size(model: nn.Module, group: ChannelGroup) -> int:
    masks = unit_masks(model, [group], [torch.zeros(group.size, dtype=torch.bool)])
    return int(sum(int((~m).sum()) for m in masks.values()))


@torch.no_grad()
def _with_masks(model: nn.Module, masks: Mapping[str, Tensor], fn: Callable[[], float],
                handles: Sequence[Any] = ()) -> float:
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in masks}
    try:
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].device, params[name].dtype))
        return fn()
    finally:
        for handle in handles:
            handle.remove()
        for name, value in saved.items():
            params[name].copy_(value)


def sensitivity(
    model: nn.Module,
    dataloader: Iterable[Any],
    sparsities: Sequence[float] = (0.5, 0.75, 0.9, 0.95, 0.98),
    method: str = "magnitude",
    metric: str | Callable[[Tensor, Tensor], Any] = "accuracy",
    higher_is_better: bool | None = None,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    types: list[str | type] | None = None,
    channel_criterion: str = "l2",
    max_batches: int | None = None,
    input_size: Sequence[int] | None = None,
    heatmap: str | Path | None = None,
    progress: bool = True,
) -> SensitivityTable:
    """Prune each target layer alone to each sparsity, evaluate, restore: the per-layer sensitivity table.

    The model is evaluated in eval mode on the first ``max_batches`` batches of ``dataloader`` (held in memory
    for the whole scan, on the model's device), once unpruned and once per layer and sparsity; its weights,
    hooks and train/eval mode are as they were afterwards.

    Args:
        model: a timm model, any ``nn.Module``, or a LightningModule (called as ``model(inputs)``).
        dataloader: yields ``(inputs, targets, ...)``.
        sparsities: the fractions of each layer's weights (``"magnitude"``) or of each group's units
            (``"channels"``) to prune, each in [0, 1).
        method: ``"magnitude"``: a layer's smallest weights (the targets of the callbacks: every Conv/Linear
            but each timm model's first conv and classifier, narrowed by ``include``/``exclude``, widened by
            ``types``); ``"channels"``: a channel group's units of smallest L2 norm, with every tensor they
            touch (:func:`lightning_prune.graph.analyse_channels`: channels, residual streams, heads, conv
            groups).
        metric: ``"accuracy"`` (top-1), ``"loss"`` (cross-entropy), or ``fn(logits, targets) -> number``, the
            batch mean (averaged over the batches by their size).
        higher_is_better: how to read a callable ``metric`` (default True).
        include, exclude: globs over module names (``"channels"``: over the groups' producers).
        types: module types of the ``"magnitude"`` targets.
        channel_criterion: ``"l2"`` (the smallest filters go, Li et al. 2017) or ``"first_k"`` (the first
            units, the channel-pruning control).
        max_batches: evaluate on at most that many batches (default: all).
        input_size: ``(C, H, W)`` to trace the model with (``"channels"``; default: the first batch).
        heatmap: write a PNG heat map there.
        progress: show a progress bar of the layers done (stderr).

    Raises:
        InvalidArgumentError: a bad argument, an empty dataloader, no target layer.
        InvalidArgumentTypeError: batches or outputs of the wrong kind.

    Example::

        table = lp.sensitivity(timm_model, val_loader, sparsities=(0.5, 0.9), heatmap="sens.png")
        table.value("layer1.0.conv1", 0.9), table.drop("layer1.0.conv1")
    """
    error = InvalidArgumentError
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Sequence) or not sparsities:
        raise error(f"`sparsities` must be a non-empty sequence of fractions in [0, 1), got {sparsities!r}.")
    columns = tuple(sorted({check_fraction("sparsities", s, error=error) for s in sparsities}))
    method = check_choice("method", method, METHODS, error=error)
    channel_criterion = check_choice("channel_criterion", channel_criterion, CHANNEL_CRITERIA, error=error)
    if isinstance(metric, str):
        metric_name = check_choice("metric", metric, tuple(_METRICS), error=error)
        metric_fn, better = _METRICS[metric_name]
        if higher_is_better is not None and higher_is_better != better:
            raise error(f"`higher_is_better`={higher_is_better} contradicts metric {metric_name!r}.")
    elif callable(metric):
        metric_name, metric_fn = getattr(metric, "__name__", "metric"), metric
        better = True if higher_is_better is None else check_bool("higher_is_better", higher_is_better,
                                                                   error=error)
    else:
        raise InvalidArgumentTypeError(f"`metric` must be 'accuracy', 'loss' or a callable, got {metric!r}.")
    max_batches = check_optional(check_int, "max_batches", max_batches, 1, error=error)
    input_size = check_input_size("input_size", input_size, error=error)
    include_p, exclude_p = check_patterns("include", include, error=error), check_patterns("exclude", exclude,
                                                                                          error=error)
    types_t = check_types("types", types, error=error)
    check_bool("progress", progress, error=error)

    from tqdm import tqdm

    modes = module_modes(model)
    model.eval()
    try:
        batches = _batches(dataloader, max_batches, model)
        baseline = _evaluate(model, batches, metric_fn)
        table = SensitivityTable(method, metric_name, better, baseline, columns)
        evaluate = lambda: _evaluate(model, batches, metric_fn)  # noqa: E731
        if method == "magnitude":
            targets = resolve_targets(model, include_p, exclude_p, types=types_t)
            for target in tqdm(targets, desc="sensitivity (magnitude)", unit="layer", disable=not progress):
                param = target.param
                scores = block_magnitude(param)
                row = [_with_masks(model, {target.name: magnitude_mask(scores, s)}, evaluate)
                       for s in columns]
                table.values[target.module_name] = row
                table.sizes[target.module_name] = param.numel()
                table.units[target.module_name] = "weight"
        else:
            prefix, root = traced_root(model)
            example = (example_inputs_for(root, input_size) if input_size is not None
                       else _trace_example(batches[0][0]))
            analysis = analyse_channels(root, example, include_p or None, exclude_p or None, prefix=prefix)
            if not analysis.groups:
                raise error(f"no removable channel group in {type(model).__name__}"
                            f" (include={include_p or 'default'}, exclude={exclude_p}).")
            for group in tqdm(analysis.groups, desc="sensitivity (channels)", unit="group",
                              disable=not progress):
                row = []
                for s in columns:
                    keep = _keep_units(model, group, s, channel_criterion)
                    removed = {group.name: (~keep).nonzero().flatten().tolist()}
                    masks = unit_masks(model, [group], [keep])
                    handles = restricted_norm_hooks(model, [group], removed)
                    row.append(_with_masks(model, masks, evaluate, handles))
                table.values[group.name] = row
                table.sizes[group.name] = _group_size(model, group)
                table.units[group.name] = group.unit
    finally:
        restore_modes(model, modes)
    if heatmap is not None:
        table.plot(heatmap)
    return table


def _trace_example(inputs: Any) -> Any:
    """Two samples of the first batch: what the channel analysis traces the model with."""
    if isinstance(inputs, Tensor):
        return inputs[:2]
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_trace_example(v) for v in inputs)
    if isinstance(inputs, dict):
        return {k: _trace_example(v) for k, v in inputs.items()}
    return inputs


# ---------------------------------------------------------------------------------------------- allocation
def _curve(drops: Sequence[float], sparsities: Sequence[float]) -> tuple[list[float], list[float]]:
    """``(sparsity, drop)`` from (0, 0), the drop made non-decreasing (a running maximum)."""
    xs, ds, worst = [0.0], [0.0], 0.0
    for s, d in sorted(zip(sparsities, drops)):
        if s == 0.0:
            continue
        worst = max(worst, d)
        xs.append(s)
        ds.append(worst)
    return xs, ds


def _sparsity_within(xs: Sequence[float], ds: Sequence[float], allowed: float) -> float:
    """The largest sparsity whose (interpolated) drop stays within ``allowed``."""
    if ds[-1] <= allowed:
        return xs[-1]
    i = next(k for k, d in enumerate(ds) if d > allowed)
    x0, x1, d0, d1 = xs[i - 1], xs[i], ds[i - 1], ds[i]
    return x0 + (x1 - x0) * (allowed - d0) / (d1 - d0)


def layer_targets_from_sensitivity(
    table: SensitivityTable | Mapping[str, Any],
    target_sparsity: float,
    tolerance: float = 0.0,
) -> dict[str, float]:
    """Per-layer sparsities from a sensitivity table, averaging (by parameters) to ``target_sparsity``.

    Every layer is pruned as far as it can while its own drop of the metric -- measured with it pruned alone,
    interpolated between the scanned sparsities, made non-decreasing, less ``tolerance`` -- stays within one
    common allowance: the smallest allowance that reaches the target. Robust layers are pruned more, sensitive
    ones less. When the target costs nothing (the layers that lose at most ``tolerance`` reach it on their
    own), those layers share it in proportion to how far each could go and the others are left dense.

    The result is the ``layer_targets`` of :class:`~lightning_prune.GradualMagnitudePruning` (module name ->
    sparsity; the most specific names first, since its patterns also match dotted suffixes), or, for a
    ``"channels"`` table, the fraction of units to prune in each channel group: the ``group_targets`` of
    :class:`~lightning_prune.GroupLassoPruning` / :class:`~lightning_prune.L0Pruning`, or a plan for
    :func:`lightning_prune.compress` (:func:`channel_removal`).

    Args:
        table: what :func:`sensitivity` returned (or its :meth:`~SensitivityTable.to_dict`).
        target_sparsity: the global sparsity over the table's layers, in [0, 1).
        tolerance: a drop up to this (in the metric's units) counts as none -- the evaluation's noise: on
            ``n`` evaluation images one image is ``1 / n`` of accuracy.

    Raises:
        InvalidArgumentError: a bad argument; a target above what the scanned sparsities reach.

    Example::

        >>> t = SensitivityTable("magnitude", "accuracy", True, 0.9, (0.5, 0.9),
        ...                      {"a": [0.9, 0.9], "b": [0.8, 0.5]}, {"a": 100, "b": 100})
        >>> {k: round(v, 3) for k, v in layer_targets_from_sensitivity(t, 0.6).items()}
        {'a': 0.9, 'b': 0.3}
        >>> {k: round(v, 3) for k, v in layer_targets_from_sensitivity(t, 0.7, tolerance=0.1).items()}
        {'a': 0.9, 'b': 0.5}
    """
    error = InvalidArgumentError
    if isinstance(table, Mapping):
        table = SensitivityTable.from_dict(table)
    if not isinstance(table, SensitivityTable):
        raise InvalidArgumentTypeError(f"`table` must be a SensitivityTable, got {type(table).__name__}.")
    target = check_fraction("target_sparsity", target_sparsity, error=error,
                            hint="the fraction of the table's weights pruned overall, e.g. 0.95.")
    tolerance = check_nonnegative("tolerance", tolerance, error=error,
                                  hint="in the metric's units: 0.01 counts one accuracy point as none.")
    if not table.layers:
        raise error("the sensitivity table has no layer.")
    sizes = {layer: float(table.sizes.get(layer, 1)) for layer in table.layers}
    total = sum(sizes.values())
    curves = {layer: _curve([max(d - tolerance, 0.0) for d in table.drop(layer)], table.sparsities)
              for layer in table.layers}

    def allocation(allowed: float) -> dict[str, float]:
        return {layer: _sparsity_within(xs, ds, allowed) for layer, (xs, ds) in curves.items()}

    def mean(alloc: Mapping[str, float]) -> float:
        return sum(sizes[k] * v for k, v in alloc.items()) / total

    highest = max(ds[-1] for _, ds in curves.values())
    most = mean(allocation(highest))
    if target > most + 1e-12:
        raise error(f"`target_sparsity`={target} is more than the scan reaches ({most:.4f}, every layer at"
                    " its largest scanned sparsity). HINT: scan higher sparsities, e.g. up to 0.99.")
    free = allocation(0.0)
    if mean(free) >= target:
        scale = target / mean(free) if mean(free) > 0 else 0.0
        result = {k: v * scale for k, v in free.items()}
    else:
        lo, hi = 0.0, highest
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if mean(allocation(mid)) >= target:
                hi = mid
            else:
                lo = mid
        low, high = allocation(lo), allocation(hi)
        span = mean(high) - mean(low)
        share = (target - mean(low)) / span if span > 0 else 1.0
        result = {k: low[k] + share * (high[k] - low[k]) for k in low}
    cap = max(table.sparsities)
    ordered = sorted(result, key=lambda k: (-k.count("."), table.layers.index(k)))
    return {k: min(max(result[k], 0.0), cap) for k in ordered}


def channel_removal(
    model: nn.Module,
    ratios: Mapping[str, float],
    example_inputs: Any = None,
    input_size: Sequence[int] | None = None,
    criterion: str = "l2",
) -> tuple[list[ChannelGroup], dict[str, list[int]]]:
    """The channel groups of ``model`` and, per group named in ``ratios``, the units to remove: that fraction
    of its units, those of smallest L2 norm (``criterion="l2"``) or the first ones -- what
    :func:`lightning_prune.compress` takes as ``groups=`` and ``removed=``.

    Example::

        ratios = lp.layer_targets_from_sensitivity(channel_table, target_sparsity=0.5)
        groups, removed = channel_removal(model, ratios)
        # exactly these units (round_to=1); verify=False: they still compute, so the outputs change
        small = lp.compress(model, groups=groups, removed=removed, round_to=1, verify=False)
    """
    error = InvalidArgumentError
    criterion = check_choice("criterion", criterion, CHANNEL_CRITERIA, error=error)
    prefix, root = traced_root(model)
    example = example_inputs if example_inputs is not None else example_inputs_for(root, input_size)
    groups = analyse_channels(root, example, prefix=prefix).groups
    check_group_names("ratios", ratios, {g.name for g in groups}, type(model).__name__, error=error)
    removed = {}
    for group in groups:
        if group.name in ratios:
            ratio = check_fraction(f"ratios[{group.name!r}]", ratios[group.name], error=error)
            keep = _keep_units(model, group, ratio, criterion)
            removed[group.name] = (~keep).nonzero().flatten().tolist()
    return groups, removed
