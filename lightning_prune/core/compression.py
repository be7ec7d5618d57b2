"""``compress``: remove pruned channels, heads and conv groups from a model (checked); save/load the result.

:func:`compress` removes units of the groups that :func:`lightning_prune.graph.analyse_channels` proves
exactly removable: the units a gate callback pruned (``removed=``), or, on any model, the **dead** units --
those no layer reads, because every Conv/Linear reading them has zero weight columns there (what masks leave;
:func:`dead_units`), and those whose output is identically zero, because every BatchNorm on them has zero
weight and bias (network slimming's L1 on BatchNorm scales) or every Conv/Linear producing them has a zero
row and bias (:func:`silent_units`).
The result is a plain ``nn.Module`` with smaller layers (``num_heads``, ``groups`` and channel counts updated,
no hooks, no wrappers) whose eval outputs equal the model's before removal (checked on ``example_inputs``). A
dead unit of a LayerNorm-normalised stream changes the LayerNorm's statistics unless the model computes them
over the kept channels already (the gate callbacks do so once they have finalised); if it does not, such
groups are left as they are.

Save the result with :func:`save_compressed` and load it back onto a freshly created model of the same
architecture in one line::

    model = lp.load_compressed("small.pt", timm.create_model("resnet18", num_classes=10))
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_info  # the function lightning.pytorch re-exports
from torch import Tensor, nn

from lightning_prune.checkpoint_io import load_file
from lightning_prune.errors import CompressionError, InvalidArgumentError
from lightning_prune.graph import (
    DEFAULT_ANALYSIS_TIME_LIMIT_S,
    ChannelGroup,
    along_units_layers,
    analyse_channels,
    call_model,
    drop_cached_tensors,
    effective_weight,
    example_inputs_for,
    frozen_in_state,
    frozen_names,
    module_modes,
    refreeze,
    restore_modes,
    rewrap_along_units,
    slice_units,
    traced_root,
)
from lightning_prune.validation import check_bool, check_int, check_optional, check_positive

__all__ = ["CompressionError", "compress", "compressed_structure", "dead_units", "has_state_structure",
           "load_compressed", "round_kept", "save_compressed", "shape_attributes", "silent_units",
           "take_recorded_removal", "take_shapes", "take_structure"]


@torch.no_grad()
def dead_units(model: nn.Module, groups: Sequence[ChannelGroup]) -> dict[str, list[int]]:
    """Per group, the units no layer reads: at every input site the reader's weight columns are zero."""
    dead: dict[str, list[int]] = {}
    for group in groups:
        alive = torch.zeros(group.size, dtype=torch.bool)
        for site in group.input_sites():
            if site.module in getattr(group, "frozen", ()):  # a layer computing its weight: that weight
                weight = effective_weight(model.get_submodule(site.module)).detach()
            else:
                weight = model.get_parameter(site.weight_name).detach()
            index, units = site.column_units()
            columns = weight.index_select(1, torch.tensor(index, device=weight.device))
            used = columns.transpose(0, 1).reshape(len(index), -1).ne(0).any(dim=1).cpu()
            if used.any():
                alive.index_fill_(0, torch.tensor(units)[used], True)
        _add_units(dead, group, (~alive).nonzero().flatten().tolist())
    return dead


def _add_units(plan: dict[str, list[int]], group: ChannelGroup, units: Sequence[int]) -> None:
    """``plan[group.name]`` gains ``units``, keeping at least one unit (a layer needs a channel)."""
    gone = sorted(set(plan.get(group.name, ())) | set(units))
    if len(gone) >= group.size:
        gone = gone[1:]
    if gone:
        plan[group.name] = gone


@torch.no_grad()
def silent_units(model: nn.Module, groups: Sequence[ChannelGroup], example_inputs: Any
                 ) -> dict[str, list[int]]:
    """Per group, the units whose output is identically zero: every BatchNorm on the unit has zero weight and
    bias, or every Conv/Linear producing it has a zero row and bias -- and, on ``example_inputs`` (``model``
    in eval mode), every layer reading the unit sees exactly zero there.

    The first condition makes the unit's value a constant (a BatchNorm with zero affine outputs 0 whatever it
    is given; a zero row and bias outputs 0); the second shows that the constant reaching the readers is zero
    (``ReLU(0)``, ``GELU(0)`` and a squeeze-excite product keep it zero; ``sigmoid(0) = 0.5`` or a BatchNorm's
    shift after a zero conv row do not, and such a unit stays), and that no other path (a residual branch, a
    concatenation) adds to it. Removing such a unit is what zeroing its reader columns would be.

    Example::

        groups = analyse_channels(model, x).groups
        silent_units(model.eval(), groups, x)   # {"layer1.0.conv1": [3, 7], ...}
    """
    candidates = {g.name: units for g in groups if (units := _constant_units(model, g))}
    if not candidates:
        return {}
    chosen = [g for g in groups if g.name in candidates]
    seen_nonzero: dict[str, Tensor] = {g.name: torch.zeros(g.size, dtype=torch.bool) for g in chosen}
    handles = []
    for group in chosen:
        for site in group.input_sites() + group.norm_sites() + group.slide_sites():
            handles.append(model.get_submodule(site.module).register_forward_pre_hook(
                functools.partial(_record_nonzero, seen_nonzero[group.name], site)))
    try:
        call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    silent: dict[str, list[int]] = {}
    for group in chosen:
        _add_units(silent, group, [u for u in candidates[group.name] if not seen_nonzero[group.name][u]])
    return silent


def _constant_units(model: nn.Module, group: ChannelGroup) -> list[int]:
    """The units of ``group`` that every BatchNorm silences (zero weight and bias) or every producer silences
    (zero output row and bias)."""
    norms = [sl for sl in group.slices if sl.role == "channel"
             and isinstance(model.get_submodule(sl.module), nn.modules.batchnorm._BatchNorm)]
    producers = [sl for sl in group.slices if sl.role in ("out", "group")]
    by_norms = _all_zero(model, group, norms, ("weight", "bias")) if norms else None
    by_producers = _all_zero(model, group, producers, ("weight", "bias")) if producers else None
    zero = torch.zeros(group.size, dtype=torch.bool)
    for found in (by_norms, by_producers):
        if found is not None:
            zero |= found
    return zero.nonzero().flatten().tolist()


def _all_zero(model: nn.Module, group: ChannelGroup, slices: Sequence[Any], names: Sequence[str]) -> Tensor:
    """Per unit: at every slice, the named parameters (those the module has) are zero along dim 0 there."""
    zero = torch.ones(group.size, dtype=torch.bool)
    for sl in slices:
        module = model.get_submodule(sl.module)
        for name in names:
            param = getattr(module, name, None)
            if not isinstance(param, Tensor):
                if name == "weight":  # an affine-free BatchNorm silences nothing
                    return torch.zeros(group.size, dtype=torch.bool)
                continue
            rows = param.detach().index_select(0, torch.tensor(sl.channels, device=param.device))
            nonzero = rows.reshape(len(sl.channels), -1).ne(0).any(dim=1).cpu()
            zero.index_fill_(0, torch.tensor(sl.units)[nonzero], False)
    return zero


def _record_nonzero(seen: Tensor, site: Any, module: nn.Module, args: tuple[Any, ...]) -> None:
    if not args or not isinstance(args[0], Tensor):
        seen.fill_(True)  # a reader we cannot watch: nothing is shown silent there
        return
    x = args[0].detach()
    columns = x.movedim(site.dim, 0).index_select(0, torch.tensor(site.channels, device=x.device))
    nonzero = columns.reshape(len(site.channels), -1).ne(0).any(dim=1).cpu()
    seen.index_fill_(0, torch.tensor(site.units)[nonzero], True)


def round_kept(group: ChannelGroup, removed: Sequence[int], round_to: int, order: Sequence[int] | None = None
               ) -> list[int]:
    """``removed`` made feasible (:meth:`~lightning_prune.graph.ChannelGroup.feasible`: a removal never takes
    a whole floor) and trimmed so that the kept channel count is a multiple of ``round_to`` (channel groups
    only; heads and conv groups are whole units). Units are put back in ``order`` (default: as given, last
    first). Every plan goes through here, so that its masks, refit and FLOPs describe the same removal."""
    feasible = group.feasible(removed)
    removed = [u for u in removed if u in feasible]
    if round_to <= 1 or group.unit != "channel" or not removed:
        return removed
    kept = group.size - len(removed)
    target = min(-(-kept // round_to) * round_to, group.size)
    back = target - kept
    if back <= 0:
        return list(removed)
    ranked = list(order) if order is not None else list(reversed(removed))
    restore = set(ranked[:back])
    return [u for u in removed if u not in restore]


def compress(
    model: nn.Module,
    example_inputs: Any = None,
    input_size: Sequence[int] | None = None,
    inplace: bool = True,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    round_to: int = 8,
    groups: Sequence[ChannelGroup] | None = None,
    removed: Mapping[str, Sequence[int]] | None = None,
    analysis_time_limit_s: float | None = DEFAULT_ANALYSIS_TIME_LIMIT_S,
) -> nn.Module:
    """Compress ``model``: remove its pruned units; returns the smaller model.

    Args:
        model: a timm model, any ``nn.Module``, or a LightningModule holding a timm model (compressed in place
            inside it).
        example_inputs: what the traced model is called with; default: ``example_input_array``, or a random
            batch at timm's ``pretrained_cfg["input_size"]`` (or ``input_size``).
        input_size: ``(C, H, W)`` of the random example.
        inplace: modify ``model`` (default) or a deep copy.
        verify: compare eval outputs before and after on ``example_inputs``; raise if they differ.
        atol, rtol: tolerances of that comparison.
        round_to: keep enough dead channels that every pruned channel width stays a multiple of ``round_to``
            (default 8, as the callbacks; heads and conv groups stay whole; 1 = remove every dead unit);
            outputs are unchanged. A given plan is rounded too: ``round_to=1`` removes exactly ``removed``.
        groups, removed: the groups (names relative to ``model``) and, per group name, the units to remove
            (what a gate callback decided); default: every dead unit of the groups found by
            :func:`~lightning_prune.graph.analyse_channels`.
        analysis_time_limit_s: CPU seconds the channel analysis may use (``None``: no limit); past it,
            :class:`~lightning_prune.graph.GraphTimeoutError`.

    Raises:
        CompressionError: the outputs changed.
        GraphTimeoutError: the channel analysis used more than ``analysis_time_limit_s`` of CPU time.
        InvalidArgumentError: a bad argument.

    Example::

        small = lp.compress(trained_model, input_size=(3, 32, 32), round_to=8)
        lp.save_compressed(small, "small.pt")
    """
    check_bool("inplace", inplace, error=InvalidArgumentError)
    check_bool("verify", verify, error=InvalidArgumentError)
    check_positive("atol", atol, error=InvalidArgumentError)
    check_positive("rtol", rtol, error=InvalidArgumentError)
    check_int("round_to", round_to, 1, hint="8 keeps widths multiples of 8.", error=InvalidArgumentError)
    check_optional(check_positive, "analysis_time_limit_s", analysis_time_limit_s, error=InvalidArgumentError,
                   hint="CPU seconds the channel analysis may use, e.g. 300; None for no limit.")
    if (groups is None) != (removed is None):
        raise InvalidArgumentError("Pass `groups` and `removed` together, or neither.")
    if not inplace:
        model = copy.deepcopy(model)
    prefix, root = traced_root(model)
    example = example_inputs if example_inputs is not None else example_inputs_for(root, input_size)
    modes = module_modes(model)
    model.eval()
    try:
        before_params = sum(p.numel() for p in root.parameters())
        with torch.no_grad():
            reference = call_model(root, example) if verify else None
        if groups is None:
            analysed = analyse_channels(root, example, analysis_time_limit_s=analysis_time_limit_s).groups
            target = root
            plan = dead_units(root, analysed)
            for name, units in silent_units(root, analysed, example).items():
                _add_units(plan, next(g for g in analysed if g.name == name), units)
            plan = {g.name: round_kept(g, plan[g.name], round_to) for g in analysed if g.name in plan}
        else:
            analysed, target = list(groups), model
            plan = {g.name: round_kept(g, list(removed.get(g.name, ())), round_to) for g in analysed}  # type: ignore[union-attr]
        if groups is None and verify:
            plan = _exact_plan(root, example, analysed, plan, reference, atol, rtol)
        removed_units = slice_units(target, analysed, plan)
        if verify and removed_units:
            with torch.no_grad():
                after = call_model(root, example)
            _check_same(reference, after, atol, rtol)
        after_params = sum(p.numel() for p in root.parameters())
        rank_zero_info(f"[compress] removed {removed_units} units in {sum(1 for v in plan.values() if v)}"
                       f" groups: parameters {before_params:,} -> {after_params:,}")
    finally:
        restore_modes(model, modes)  # (every module's, a frozen layer's as the layer's it replaced)
    return model


def _exact_plan(root: nn.Module, example: Any, groups: Sequence[ChannelGroup], plan: dict[str, list[int]],
                reference: Any, atol: float, rtol: float) -> dict[str, list[int]]:
    """The plan, without the groups whose norm sites would change their statistics (a plain masked model whose
    LayerNorms still count the removed channels) or whose slide sites would see zeros where they saw the dead
    channels (a conv sliding along them, ECA's), when removing everything would change the outputs."""
    trial = copy.deepcopy(root)
    slice_units(trial, groups, plan)
    with torch.no_grad():
        if _same(reference, call_model(trial, example), atol, rtol):
            return plan
    by_name = {g.name: g for g in groups}
    safe = {name: units for name, units in plan.items()
            if not (by_name[name].norm_sites() or by_name[name].slide_sites())}
    if len(safe) < len(plan):
        rank_zero_info(f"[compress] left {len(plan) - len(safe)} LayerNorm-normalised (or ECA-read) groups as"
                       " they are: their norms (or a conv sliding along them) read the dead channels"
                       " (compress through the callback to remove them).")
    return safe


def _same(reference: Any, after: Any, atol: float, rtol: float) -> bool:
    try:
        _check_same(reference, after, atol, rtol)
    except CompressionError:
        return False
    return True


def _check_same(reference: Any, after: Any, atol: float, rtol: float) -> None:
    """Raise :class:`CompressionError` unless ``after`` is ``reference`` within ``atol + rtol * scale``, the
    scale being the largest finite magnitude of each output tensor. The scale is the whole tensor's, not each
    element's: slicing changes the order of float sums, whose rounding grows with the largest activations, so
    a model whose activations have grown large (a diverging fit) differs by ``rtol`` of its largest output at
    its small ones; a wrong removal changes the outputs by a share of that scale. Where the reference itself
    is not finite (the masked model overflowed, or multiplied an overflowed dead channel by zero) there is no
    value to keep, and only the finite outputs are compared."""
    hint = (" HINT: a LayerNorm counts removed channels in its statistics, or a layer outside the analysed"
            " groups reads them; call compress(..., verify=False) to keep the result anyway.")
    if isinstance(reference, Tensor):
        if not isinstance(after, Tensor) or reference.shape != after.shape:
            shape = tuple(after.shape) if isinstance(after, Tensor) else type(after).__name__
            raise CompressionError(f"Removing the dead channels changed the output's shape"
                                   f" ({tuple(reference.shape)} -> {shape}).{hint}")
        if not reference.is_floating_point():
            if not torch.equal(reference, after):
                raise CompressionError(f"Removing the dead channels changed the (integer) outputs.{hint}")
            return
        ref, new = reference.detach().double(), after.detach().to(reference.device).double()
        finite = ref.isfinite()
        if not bool(finite.any()):
            return
        ref, new = ref[finite], new[finite]
        scale = float(ref.abs().max())
        diff = float((ref - new).abs().max()) if bool(new.isfinite().all()) else math.inf
        if not diff <= atol + rtol * scale:
            raise CompressionError(f"Removing the dead channels changed the outputs (max abs difference"
                                   f" {diff:.3g}, outputs up to {scale:.3g}).{hint}")
    elif isinstance(reference, (list, tuple)):
        for a, b in zip(reference, after):
            _check_same(a, b, atol, rtol)
    elif isinstance(reference, dict):
        for key in reference:
            _check_same(reference[key], after[key], atol, rtol)


_SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                "normalized_shape", "num_channels", "num_groups", "num_heads", "attn_dim")
FORMAT = "lightning_prune.compressed/1"


def _sizes(value: Any) -> bool:
    """An int, or a non-empty list/tuple of ints (a size or a list of sizes the model's code uses)."""
    return type(value) is int or (isinstance(value, (list, tuple)) and len(value) > 0
                                  and all(type(x) is int for x in value))


def shape_attributes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The channel counts (``in_channels``, ``num_heads``, ...) of every layer, what :func:`take_shapes` needs
    to give a fresh model the shapes of a compressed one: besides the layers' own, every integer (or list of
    integers) instance attribute, since the channel analysis updates the sizes a model's code splits, slices
    and reshapes with (``width``, ``num_1x1_c``, ``splits``) wherever it finds them."""
    attributes = {}
    for name, module in model.named_modules():
        found = {k: v for k, v in vars(module).items()  # instance attributes only
                 if k in _SHAPE_ATTRS or (not k.startswith("_") and _sizes(v))}
        if found:
            attributes[name] = found
    return attributes


def non_persistent_buffers(model: nn.Module) -> dict[str, Tensor]:
    """The buffers ``state_dict`` leaves out (registered with ``persistent=False``), by full name: the
    analysis slices them with the units (BEiT's and EVA's zero ``k_bias``), so a fresh model needs their
    values too."""
    return {f"{name}.{key}" if name else key: buffer for name, module in model.named_modules()
            for key, buffer in module._buffers.items()
            if key in module._non_persistent_buffers_set and isinstance(buffer, Tensor)}


def take_shapes(model: nn.Module, state: Mapping[str, Tensor], attributes: Mapping[str, Mapping[str, Any]],
                buffers: Mapping[str, Tensor] | None = None) -> nn.Module:
    """Give ``model`` the parameter and buffer shapes of ``state`` and the channel counts of ``attributes``
    (what :func:`shape_attributes` recorded), so that ``model.load_state_dict(state)`` loads strictly;
    ``buffers``: the non-persistent buffers (:func:`non_persistent_buffers`) to set (on the device of the
    buffer they replace, in its dtype when both are floating)."""
    for key, value in (buffers or {}).items():
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if attr in module._buffers:
            current = module._buffers[attr]
            if isinstance(current, Tensor):  # the model's device, and its dtype when floating (a .double())
                dtype = current.dtype if current.is_floating_point() and value.is_floating_point() else None
                value = value.to(device=current.device, dtype=dtype)
            module._buffers[attr] = value
    for key, value in state.items():
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        current = getattr(module, attr, None)
        if isinstance(current, Tensor) and current.shape != value.shape:
            fresh = torch.empty(value.shape, dtype=current.dtype, device=current.device)
            if isinstance(current, nn.Parameter):
                setattr(module, attr, nn.Parameter(fresh, requires_grad=current.requires_grad))
            else:
                setattr(module, attr, fresh)
    for name, attrs in attributes.items():
        module = model.get_submodule(name) if name else model
        for key, value in attrs.items():
            setattr(module, key, value)
    drop_cached_tensors(model)  # a fresh model that already ran in eval mode cached its old shapes
    return model


def save_compressed(model: nn.Module, path: str | Path) -> None:
    """Save a compressed model: its ``state_dict`` plus the channel counts of its resized layers.

    The file holds only tensors and Python scalars (it loads with ``torch.load(weights_only=True)``). Layers
    that were frozen (a weight-standardised conv whose input channels went, see
    :mod:`lightning_prune.graph.frozen`) are listed under ``"frozen"``: loading freezes them again.
    """
    torch.save({"format": FORMAT, "state_dict": model.state_dict(), **compressed_structure(model)}, str(path))


def compressed_structure(model: nn.Module) -> dict[str, Any]:
    """What a fresh model of the same architecture needs, beside the ``state_dict``, to take a compressed
    model's structure (:func:`take_structure`): the channel counts of its resized layers (``"attributes"``),
    the layers frozen into plain ones (``"frozen"``, :mod:`lightning_prune.graph.frozen`), the convs run at
    the dense width along their units (``"along_units"``: ``{name: [dim, dense size]}``,
    :mod:`lightning_prune.graph.along`) and the buffers
    ``state_dict`` leaves out (``"buffers"``). Plain data and tensors only."""
    return {"attributes": shape_attributes(model), "frozen": frozen_names(model),
            "along_units": along_units_layers(model), "buffers": non_persistent_buffers(model)}


def take_structure(model: nn.Module, state: Mapping[str, Tensor], structure: Mapping[str, Any],
                   path: str | Path) -> nn.Module:
    """Give a fresh ``model`` the structure :func:`compressed_structure` recorded (files written before a
    key existed lack it): the frozen layers frozen again, the convs run at the dense width along their
    units made so again, then the shapes of ``state`` and the recorded
    channel counts and buffers, so that ``model.load_state_dict(state)`` loads strictly."""
    frozen = [*(structure.get("frozen") or ()), *frozen_in_state(state)]  # (a frozen layer's key marks it)
    refreeze(model, dict.fromkeys(frozen), str(path))  # the plain layers of weight-computing ones
    # convs sliding along units that lost some: run at the dense width (their kept positions: a buffer)
    rewrap_along_units(model, structure.get("along_units") or {}, str(path))
    return take_shapes(model, state, structure.get("attributes") or {}, structure.get("buffers"))


@torch.no_grad()
def load_compressed(path: str | Path, model: nn.Module, map_location: Any = "cpu", *,
                    weights_only: bool = True) -> nn.Module:
    """Load a compressed model onto a fresh model of the same architecture; returns it.

    ``path`` is what :func:`save_compressed` wrote (every resized parameter and buffer takes the saved shape,
    the layers' channel counts are set, the state is loaded strictly), or a Lightning checkpoint written after
    a callback compressed the model inside the fit: then ``model`` is a fresh LightningModule, the callback's
    recorded plan removes the same units from it, and the checkpoint's weights load strictly.

    The file is read with ``torch.load(weights_only=True)``: a file that holds other Python objects (a
    checkpoint whose hyperparameters are objects) is refused with :class:`~lightning_prune.UnsafeFileError`
    unless you pass ``weights_only=False``, which runs the code the file holds -- only for files you trust.

    Example::

        model = lp.load_compressed("small.pt", timm.create_model("resnet18", num_classes=10))
        module = lp.load_compressed("last.ckpt", lp.ImageClassifier("resnet18", num_classes=10))
    """
    payload = load_file(path, weights_only=weights_only, map_location=map_location)
    if isinstance(payload, dict) and "callbacks" in payload and "state_dict" in payload:
        return _load_lightning_checkpoint(payload, model, path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InvalidArgumentError(f"{path} was not written by lightning_prune.save_compressed.")
    state = payload["state_dict"]
    take_structure(model, state, payload, path)
    model.load_state_dict(state, strict=True)
    return model


def _load_lightning_checkpoint(payload: dict[str, Any], module: nn.Module, path: str | Path) -> nn.Module:
    take_recorded_removal(module, payload, path)
    module.load_state_dict(payload["state_dict"], strict=True)
    return module


#: the attribute of a Lightning strategy where channel callbacks register the resume that gives the model a
#: checkpoint's recorded structure before its weights load
#: (``callbacks.shrink.ShrinkSchedule.install_resume``): a dict from the callback's state key to its resume
RESUME_REGISTRY = "_lightning_prune_resume"


def resuming_state_keys(strategy: Any) -> set[str]:
    """The checkpoint state keys of the callbacks that take a checkpoint's recorded structure on
    ``strategy`` (empty when none installed its resume)."""
    return set(getattr(strategy, RESUME_REGISTRY, None) or {})


def has_state_structure(module: nn.Module, state_dict: Mapping[str, Any]) -> bool:
    """Whether ``module``'s state dict has the names of ``state_dict`` and its tensors' shapes (false for a
    fresh, dense module against a checkpoint of the compressed or frozen model)."""
    own = module.state_dict()
    return set(own) == set(state_dict) and all(
        not isinstance(v, Tensor) or tuple(own[k].shape) == tuple(v.shape) for k, v in state_dict.items())


def take_recorded_removal(module: nn.Module, checkpoint: Mapping[str, Any], path: str | Path) -> bool:
    """Give a fresh ``module`` the structure a Lightning checkpoint's callbacks recorded (``"shrink"`` in
    their states): the layers they froze into plain ones frozen again, the units they removed inside the fit
    sliced out, so that ``module.load_state_dict(checkpoint["state_dict"])`` loads strictly. Returns whether
    anything was recorded. A callback that had chosen its units with ``compress=True`` but not removed them
    when the checkpoint was written (a removal later in the fit, or at its end: ``compress_step=1.0``) is
    named in a warning: the module stays dense."""
    states = [s for s in (checkpoint.get("callbacks") or {}).items() if isinstance(s[1], Mapping)]
    plans = [state["shrink"]["removed"] for _, state in states
             if isinstance(state.get("shrink"), Mapping) and state["shrink"].get("removed")]
    # layers frozen into plain ones (weight standardisation): recorded by a callback, or by anything else
    # (a frozen layer's key marks it), frozen again as take_structure does
    frozen = [n for _, state in states if isinstance(state.get("shrink"), Mapping)
              for n in state["shrink"].get("frozen") or ()]
    frozen += frozen_in_state(checkpoint.get("state_dict") or {})
    refreeze(module, dict.fromkeys(frozen), str(path))
    recorded = bool(plans or frozen)
    if plans:
        prefix, root = traced_root(module)
        groups = analyse_channels(root, example_inputs_for(root), prefix=prefix).groups
        for removed in plans:
            unknown = sorted(set(removed) - {g.name for g in groups})
            if unknown:
                raise InvalidArgumentError(
                    f"{path} removed units of groups {unknown[:4]} that {type(module).__name__}"
                    " does not have. HINT: pass a fresh instance of the LightningModule the checkpoint was"
                    " trained with.")
            slice_units(module, groups, removed)
    _warn_not_yet_removed(states, path)
    return recorded


def _warn_not_yet_removed(states: Sequence[tuple[str, Mapping[str, Any]]], path: str | Path) -> None:
    from lightning_utilities.core.rank_zero import rank_zero_warn

    from lightning_prune._registry import class_of_key

    for key, state in states:
        shrink, keep = state.get("shrink"), state.get("keep")
        if (not isinstance(shrink, Mapping) or shrink.get("removed") is not None
                or not (state.get("config") or {}).get("compress") or not keep
                or all(bool(torch.as_tensor(k).all()) for k in keep)):
            continue
        rank_zero_warn(
            f"{path}: {class_of_key(key)} had chosen its units (compress=True) but had not removed them when"
            " the checkpoint was written (its compress_step/compress_epoch came later: with 1.0, at the end"
            " of training, after the last ModelCheckpoint save of the epochs): the model loads with all its"
            " units. HINT: lp.restore_run(ckpt, fresh_module, [the callback as configured]) removes them with"
            " its plan; a checkpoint written after the fit (trainer.save_checkpoint, or ModelCheckpoint("
            "save_last=True, save_top_k=0)) holds the compressed model.")
