"""The analysis: raw groups from the dependency graph, described, filtered and proven exact."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from typing import Any

from torch import nn

from lightning_prune.graph.budget import GRAPH_TIME_LIMIT_S, _deadline
from lightning_prune.graph.dependencies import _build_graph, _describe, _grouped_slices, _names, _raw_groups
from lightning_prune.graph.layers import PRODUCER_TYPES
from lightning_prune.graph.proof import _exact_subsets
from lightning_prune.graph.types import ChannelAnalysis, ChannelGroup, _localised, _prefixed, _strip
from lightning_prune.targets import as_patterns, matches

__all__ = ["analyse_channels"]


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
    with _deadline(time_limit_s, type(model).__name__) as check:
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
