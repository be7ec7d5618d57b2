"""The analysis: raw groups from the dependency graph, described, filtered and proven exact."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.core.targets import as_patterns, matches
from lightning_prune.core.threads import analysis_threads
from lightning_prune.errors import InvalidArgumentError
from lightning_prune.graph.budget import DEFAULT_ANALYSIS_TIME_LIMIT_S, analysis_deadline
from lightning_prune.graph.dependencies import (
    build_dependency_graph,
    describe_raw_group,
    grouped_slices,
    module_names_by_id,
    raw_groups,
)
from lightning_prune.graph.inputs import call_model, evaluating
from lightning_prune.graph.layers import PRODUCER_TYPES
from lightning_prune.graph.proof import check_removal, exact_subsets, proof_copies
from lightning_prune.graph.types import (
    ChannelAnalysis,
    ChannelGroup,
    GraphTimeoutError,
    ModelInputError,
    code_location,
    failure_reason,
    localised_group,
    prefixed_name,
    strip_prefix,
)
from lightning_prune.validation import check_optional, check_positive

__all__ = ["analyse_channels"]


def analyse_channels(
    model: nn.Module,
    example_inputs: Any,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    prune_coupled: bool = True,
    prefix: str = "",
    analysis_time_limit_s: float | None = DEFAULT_ANALYSIS_TIME_LIMIT_S,
    rtol: float = 1e-6,
    engine: str = "traced",
) -> ChannelAnalysis:
    """The exactly removable channel groups of ``model``, and why the others are left alone.

    Never raises for what the model or the dependency graph does: a producer whose channels cannot be followed
    is skipped with the reason; a model that cannot be traced at all is analysed submodule by submodule (each
    proven on its own inputs), the model's own entry in :attr:`ChannelAnalysis.skipped` saying why.

    Args:
        model: the module to trace (a timm model, or a LightningModule with ``example_input_array``).
        example_inputs: what ``model`` is called with while tracing.
        include: globs over module names; only the groups with a producer that matches are considered.
        exclude: globs; a group with a producer that matches is left alone.
        prune_coupled: also the coupled groups (residual streams: several producers, one gate per channel).
        prefix: prepended to every module name (where ``model`` sits inside the LightningModule).
        analysis_time_limit_s: CPU seconds (:func:`time.process_time`) the analysis may use before it stops
            with :class:`GraphTimeoutError` (``None``: no limit). Checked cooperatively: no signal, no timer.
        rtol: the largest relative difference between masked and sliced outputs a group may cause.
        engine: ``"traced"`` (default): unit labels on the operator graph of ``torch.export``
            (:mod:`lightning_prune.graph.labels`), falling back to torch-pruning's dependency graph when the
            model cannot be exported; ``"torch-pruning"``: the dependency graph only.

    Raises:
        GraphTimeoutError: the analysis used more than ``analysis_time_limit_s`` of CPU time.
        InvalidArgumentError: a bad ``analysis_time_limit_s``.
        ModelInputError: ``model`` raises when called on ``example_inputs`` (an ``InvalidArgumentError``
            naming the model's exception and the line that raised it).
    """
    if engine not in ("traced", "torch-pruning"):
        raise InvalidArgumentError(f"`engine` must be 'traced' or 'torch-pruning', got {engine!r}.")
    check_optional(check_positive, "analysis_time_limit_s", analysis_time_limit_s, error=InvalidArgumentError,
                   hint="CPU seconds the channel analysis may use, e.g. 300; None for no limit.")
    include_p, exclude_p = as_patterns(include), as_patterns(exclude)
    start = time.monotonic()
    analysis = ChannelAnalysis()
    full = functools.partial(prefixed_name, prefix)
    outputs = _output_modules(model, example_inputs)
    for name, module in model.named_modules():
        if isinstance(module, PRODUCER_TYPES) and id(module) not in outputs:
            analysis.weights[full(name)] = module.weight.numel()
            analysis._out_sizes[full(name)] = module.weight.shape[0]
    with analysis_threads(), proof_copies(), \
            analysis_deadline(analysis_time_limit_s, type(model).__name__, model) as budget:
        opts = _Options(include_p, exclude_p, prune_coupled, rtol, budget, engine)
        if engine != "traced" or not _analyse_traced(model, example_inputs, opts, prefix, analysis, outputs):
            _analyse(model, example_inputs, opts, prefix, analysis)
    analysis.seconds = time.monotonic() - start
    analysis.cpu_seconds = budget.used()
    return analysis


@dataclass
class _Options:
    include: list[str]
    exclude: list[str]
    prune_coupled: bool
    rtol: float
    check: Callable[[], None]
    engine: str = "traced"


def _analyse_traced(model: nn.Module, example: Any, opts: _Options, prefix: str, analysis: ChannelAnalysis,
                    outputs: set[int]) -> bool:
    """Add the groups found on the traced operator graph; False (nothing added) when the model cannot be
    exported, so that the dependency graph is tried instead."""
    from lightning_prune.graph.labels import trace_labels

    names = {id(m): n for n, m in model.named_modules()}
    try:
        output_names = {names[i] for i in outputs if i in names}
        candidates, skipped, hints, variants = trace_labels(model, example, prefix, output_names, opts.check)
    except GraphTimeoutError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever export raises: the dependency graph instead
        analysis.skipped[f"{prefix or type(model).__name__} (operator graph)"] = failure_reason(
            "exporting it with torch.export", error)
        return False
    analysis.skipped.update(skipped)
    kept = []
    for group in candidates:
        if opts.include and not any(matches(p, opts.include) for p in group.producers):
            continue
        if opts.exclude and any(matches(p, opts.exclude) for p in group.producers):
            continue
        if group.coupled and not opts.prune_coupled:
            analysis.skipped[group.name] = "coupled channels (set prune_coupled=True to gate them together)"
            continue
        kept.append(group)
    local = [localised_group(g, prefix) for g in kept]
    failures: dict[str, str] = {}
    suspects = {mine.name for g, mine in zip(kept, local) if g.name in hints or g.name in variants}
    good, _bad = exact_subsets(model, example, local, opts.rtol, opts.check, failures, suspects)
    good_names = {g.name for g in good}
    chosen: list[ChannelGroup] = []
    for group in kept:
        if strip_prefix(group.name, prefix) in good_names or (not prefix and group.name in good_names):
            analysis.groups.append(group)
            continue
        for variant in variants.get(group.name, ()):  # one size in several attributes: update one of them
            if exact_subsets(model, example, [localised_group(variant, prefix)], opts.rtol, opts.check)[0]:
                chosen.append(variant)
                break
        else:
            why = "removing these channels changes the outputs (checked on a copy)"
            detail = failures.get(strip_prefix(group.name, prefix)) or failures.get(group.name)
            why = f"{why}: {detail}" if detail else why
            analysis.skipped[group.name] = f"{why}; {hints[group.name]}" if group.name in hints else why
    together = [localised_group(g, prefix) for g in analysis.groups + chosen]
    if chosen and check_removal(model, example, together, opts.rtol) is not None:
        for group in chosen:
            analysis.skipped[group.name] = ("removing these channels changes the outputs (checked on a copy):"
                                            " exact alone, not together with the other groups")
        chosen = []
    analysis.groups.extend(chosen)
    return True


def _analyse(model: nn.Module, example: Any, opts: _Options, prefix: str, analysis: ChannelAnalysis,
             top: bool = True) -> None:
    """Add the groups of ``model`` (called with ``example``; names under ``prefix``; ``top``: the model the
    caller passed) to ``analysis``."""
    full = functools.partial(prefixed_name, prefix)
    check = opts.check
    try:
        graph = build_dependency_graph(model, example)
        check()
        names = module_names_by_id(model, graph)
        raws, failed = raw_groups(model, graph, check)
    except GraphTimeoutError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever tracing raises: analyse the parts
        _analyse_children(model, example, opts, prefix, analysis, failure_reason("tracing it", error), top)
        return
    for name, why in failed.items():
        analysis.skipped[full(name)] = why
    candidates: list[ChannelGroup] = []
    for raw in raws:
        gname = full(raw.name)
        try:
            sites, slices, producers, blocked = describe_raw_group(raw, graph, names, prefix)
            blocked = raw.blocked or blocked
            if raw.unit == "conv group" and blocked is None:
                slices = grouped_slices(raw, graph, names, prefix, slices)
        except GraphTimeoutError:
            raise
        except Exception as error:  # noqa: BLE001 - a group the dependency graph cannot describe is skipped
            analysis.skipped[gname] = failure_reason("describing the group", error)
            continue
        if opts.include and not any(matches(p, opts.include) for p in producers):
            continue
        if opts.exclude and any(matches(p, opts.exclude) for p in producers):
            continue
        if blocked is None and not sites:
            blocked = "no layer reads these channels (model output)"
        if blocked is None and raw.size < 2:
            blocked = "a single unit"
        coupled = len(producers) > 1
        if blocked is None and coupled and not opts.prune_coupled:
            blocked = "coupled channels (set prune_coupled=True to gate them together)"
        if blocked is not None:
            analysis.skipped[gname] = blocked
            continue
        candidates.append(ChannelGroup(gname, raw.size, raw.unit, raw.width, tuple(sites), tuple(slices),
                                       tuple(producers), coupled,
                                       tuple((full(m), a, k) for m, a, k in raw.attrs)))
    local = [localised_group(g, prefix) for g in candidates]
    good, bad = exact_subsets(model, example, local, opts.rtol, check)
    good_names = {g.name for g in good}
    for group in candidates:
        if strip_prefix(group.name, prefix) in good_names or (not prefix and group.name in good_names):
            analysis.groups.append(group)
        else:
            analysis.skipped[group.name] = ("removing these channels changes the outputs"
                                            " (checked on a copy)")


def _analyse_children(model: nn.Module, example: Any, opts: _Options, prefix: str, analysis: ChannelAnalysis,
                      reason: str, top: bool) -> None:
    """``model`` cannot be traced: analyse each child holding a Conv/Linear on the inputs it receives in one
    forward of ``model`` (a group inside a child is proven on the child's outputs; what leaves the child is
    left alone). A child called more than once per forward is left alone."""
    key = prefix or type(model).__name__
    children = [(n, c) for n, c in model.named_children()
                if any(isinstance(m, PRODUCER_TYPES) for m in c.modules())]
    if not children:
        analysis.skipped[key] = reason
        return
    calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {}

    def record(name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.setdefault(name, []).append((args, kwargs))

    handles = [c.register_forward_pre_hook(functools.partial(record, n), with_kwargs=True)
               for n, c in children]
    try:
        with torch.no_grad(), evaluating(model):
            call_model(model, example)
    except GraphTimeoutError:
        raise
    except Exception as error:
        if top:  # the model does not run on its example: the caller's input, not the analysis
            where = code_location(error)
            raise ModelInputError(
                f"{type(model).__name__} raised {type(error).__name__} on the example input"
                f"{' at ' + where if where else ''}: {' '.join(str(error).split())[:200] or 'no message'}."
                " HINT: analyse the model with an input it accepts (its own input size: timm's"
                " `pretrained_cfg['input_size']`).") from error
        analysis.skipped[key] = f"{reason}; {failure_reason('running it', error)}"
        return
    finally:
        for handle in handles:
            handle.remove()
    analysis.skipped[key] = f"{reason}; its submodules were analysed one by one"
    for name, child in children:
        opts.check()
        got = calls.get(name, [])
        where = prefixed_name(prefix, name)
        if len(got) != 1:
            if got:
                analysis.skipped[where] = f"{reason}; and `{where}` runs {len(got)} times per forward"
            continue
        args, kwargs = got[0]
        if args and kwargs:
            analysis.skipped[where] = f"{reason}; and `{where}` takes keyword arguments"
            continue
        child_example = kwargs if kwargs else (args[0] if len(args) == 1 and isinstance(args[0], Tensor)
                                               else args)
        _analyse(child, child_example, opts, where, analysis, top=False)


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
