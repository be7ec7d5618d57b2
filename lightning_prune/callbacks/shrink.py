"""Compression inside the fit: :func:`lightning_prune.compress` in ``trainer.fit``, optimizers carried over.

After :func:`lightning_prune.compress` replaces a layer's parameters by smaller ones, an optimizer still
points at the old tensors: the layer silently stops learning and its momentum, ``exp_avg`` and ``exp_avg_sq``
are lost (a known trap of torch-pruning and NNI). :func:`compress_in_fit` removes the units and then, for
every optimizer the LightningModule configured, swaps the new parameters in place of the old ones in their
param groups and cuts every per-parameter state tensor (momentum buffers, Adam moments; ``step`` counts are
kept) exactly as the parameter was cut. Param groups, learning rates and LR schedulers are untouched. Under
DDP the model is wrapped again so that gradients keep synchronising; every rank compresses identically at the
same step.

A checkpoint written after the compression holds the smaller shapes. :meth:`ShrinkSchedule.install_resume`
lets a fresh LightningModule take it: the callback's recorded plan (groups and removed units) is applied to
the model right before Lightning loads the weights. For inference, ``lp.load_compressed(ckpt_path,
fresh_module)`` does the same from a Lightning checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_prune.graph import (
    ChannelGroup,
    cut_like,
    example_inputs_for,
    frozen_names,
    module_modes,
    parameter_cuts,
    restore_modes,
)

__all__ = ["UNSUPPORTED_STRATEGIES", "ShrinkSchedule", "carry_optimizer_state", "check_strategy",
           "compress_exactly", "compress_in_fit", "compress_sharded_in_fit", "cut_saved_optimizer_states",
           "follow_replaced_parameters", "gather_network", "log_model_size", "others_follow_removal",
           "pad_to_dense", "recorded_removal", "refuse_frozen_conflicts", "refuse_removal_conflicts",
           "refuse_sharded_freezing", "refuse_spawn_freezing", "resize_sharded",
           "sharded_compression_problem"]

#: strategies whose sharded or wrapped parameters cannot be replaced inside a fit
#: (ModelParallelStrategy, FSDP2, is supported by compress_sharded_in_fit; tensor parallelism is refused by
#: callbacks.sharding.check_sharding)
UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "XLAStrategy", "XLAFSDPStrategy")


def check_strategy(trainer: pl.Trainer, who: str) -> None:
    """Raise when the Trainer's strategy cannot take parameters replaced inside the fit."""
    name = type(trainer.strategy).__name__
    if name in UNSUPPORTED_STRATEGIES:
        raise MisconfigurationException(
            f"{who} cannot remove channels inside the fit under {name}: its parameters are sharded or"
            " wrapped. HINT: use strategy='ddp' (or a single device) or ModelParallelStrategy("
            "data_parallel_size=<devices>, tensor_parallel_size=1) with fully_shard in configure_model"
            " (FSDP2), or set compress=False and call lp.compress on the trained model.")


@torch.no_grad()
def carry_optimizer_state(optimizers: Sequence[torch.optim.Optimizer], old: Mapping[int, str],
                          new: Mapping[str, nn.Parameter],
                          cuts: Mapping[str, Sequence[tuple[int, Tensor]]],
                          fresh: Collection[str] = ()) -> None:
    """Point ``optimizers`` at the new parameters and cut their per-parameter state like the parameters.

    A parameter that is gone (a frozen weight-standardised conv's ``gain``) leaves its optimizer; a new one
    (a frozen ``weight_norm`` Linear's ``weight``) joins the param group of the parameter it replaces (its
    ``parametrizations.weight.original*``; else of its module's old parameters), whose parameters then follow
    the model's order.

    Args:
        optimizers: the optimizers to update in place.
        old: ``id(old parameter)`` -> its name, taken before the compression.
        new: name -> the parameter now in the model.
        cuts: name -> ``[(dim, kept indices), ...]`` (:func:`lightning_prune.graph.parameter_cuts`).
        fresh: names whose state starts afresh (a frozen layer's weight: another quantity than before).
    """
    old_names = set(old.values())
    order = {id(p): i for i, p in enumerate(new.values())}  # the model's order of its parameters
    for optimizer in optimizers:
        state = {}
        held: dict[str, dict[str, Any]] = {}  # module name -> the param group that held its parameters
        replaced: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {}  # a parameter gone -> its group
        for group in optimizer.param_groups:
            params = []
            for param in group["params"]:
                name = old.get(id(param))
                if name is not None and name not in new:  # gone with its layer
                    held.setdefault(name.rpartition(".")[0], group)
                    replaced[name] = (group, tuple(param.shape))
                    continue
                replacement = new.get(name, param) if name is not None else param
                if name is not None:
                    held.setdefault(name.rpartition(".")[0], group)
                entry = optimizer.state.get(param) if name not in fresh else None
                if entry is not None:
                    shape = tuple(param.shape)
                    state[replacement] = {
                        key: cut_like(value, cuts.get(name, ()))
                        if isinstance(value, Tensor) and tuple(value.shape) == shape and name in cuts
                        else value
                        for key, value in entry.items()}
                params.append(replacement)
            group["params"] = params
        for name, param in new.items():
            if name in old_names:
                continue
            owner, _, attr = name.rpartition(".")
            group = _group_of_replaced(replaced, owner, attr, tuple(param.shape))
            if group is None:
                group = next((g for m, g in held.items() if m == owner or m.startswith(owner + ".")), None)
            if group is not None and not any(p is param for p in group["params"]):
                group["params"].append(param)
                # in the model's order, as an optimizer made afresh on the model lists them (a checkpoint's
                # optimizer state loads by position)
                group["params"].sort(key=lambda p: order.get(id(p), len(order)))
        optimizer.state.clear()
        optimizer.state.update(state)


def _group_of_replaced(replaced: Mapping[str, tuple[dict[str, Any], tuple[int, ...]]], owner: str, attr: str,
                       shape: tuple[int, ...]) -> dict[str, Any] | None:
    """The param group of the parameters a new ``owner.attr`` replaces: the originals of a parametrised
    ``attr`` (``parametrizations.<attr>.original*``; the old hooks' ``<attr>_orig``, ``<attr>_g``/``_v``),
    the one of ``shape`` first (a weight_norm's direction, not its magnitude)."""
    base = f"{owner}." if owner else ""
    found = [(g, s) for n, (g, s) in replaced.items()
             if n.startswith(f"{base}parametrizations.{attr}.original")
             or n in (f"{base}{attr}_orig", f"{base}{attr}_g", f"{base}{attr}_v")]
    return next((g for g, s in found if s == shape), found[0][0] if found else None)


def follow_replaced_parameters(trainer: pl.Trainer, pl_module: pl.LightningModule, old: Mapping[int, str],
                               fresh: Collection[str] = ()) -> None:
    """Layers of ``pl_module`` were replaced inside the fit (frozen, see
    :mod:`lightning_prune.graph.frozen`): every optimizer follows the new parameters (``fresh``: names whose
    state starts afresh), DDP is wrapped again. ``old``: ``id(parameter)`` -> name, taken before."""
    carry_optimizer_state(trainer.optimizers, old, dict(pl_module.named_parameters()), {}, fresh)
    _rewrap_ddp(trainer, pl_module)


def pad_to_dense(state: Mapping[str, Tensor], cuts: Mapping[str, Sequence[tuple[int, Tensor]]],
                 dense_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """The compressed ``state`` put back into the dense shapes, zeros where units were removed (undoing
    ``cuts``)."""
    out = {}
    for name, tensor in state.items():
        for dim, keep in reversed(list(cuts.get(name, ()))):
            shape = list(tensor.shape)
            shape[dim] = dense_shapes[name][dim]
            tensor = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device).index_copy_(
                dim, keep.to(tensor.device), tensor)
        out[name] = tensor
    return out


def _hand_back_dense_weights(trainer: pl.Trainer, pl_module: pl.LightningModule,
                             cuts: Mapping[str, Sequence[tuple[int, Tensor]]],
                             dense_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Under ``ddp_spawn`` the main process loads the workers' final weights into its own, dense module: hand
    it the compressed weights padded back to the dense shapes (zeros at the removed units) instead of a shape
    mismatch."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if (not isinstance(launcher, _MultiProcessingLauncher)
            or getattr(launcher, "_lightning_prune_pads", False)):
        return
    original = launcher._collect_rank_zero_results

    def collect(trainer_: pl.Trainer, results: Any) -> Any:
        output = original(trainer_, results)
        if output is not None and output.weights_path is not None:
            io = trainer_.strategy.checkpoint_io
            state = io.load_checkpoint(output.weights_path)
            io.save_checkpoint(pad_to_dense(state, cuts, dense_shapes), output.weights_path)
        return output

    launcher._collect_rank_zero_results = collect
    launcher._lightning_prune_pads = True


def _rewrap_ddp(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    if isinstance(getattr(strategy, "model", None), DistributedDataParallel):
        strategy.model = strategy._setup_model(pl_module)
        register = getattr(strategy, "_register_ddp_hooks", None)
        if callable(register):
            register()


@torch.no_grad()
def compress_exactly(pl_module: nn.Module, groups: Sequence[ChannelGroup],
                     removed: Mapping[str, Sequence[int]], example_inputs: Any,
                     compress: Callable[..., nn.Module] | None = None) -> dict[str, list[tuple[int, Tensor]]]:
    """Remove exactly ``removed`` units (group name -> units; names relative to ``pl_module``) in place and
    return the cuts made to each parameter and buffer (name -> ``[(dim, kept indices)]``,
    :func:`~lightning_prune.graph.parameter_cuts`), computed from the plan handed to the compression
    (``round_to=1``: nothing rounded back, nothing skipped) and checked against the new shapes: what the
    optimizer state and the other callbacks' masks are cut with."""
    from lightning_prune.core.compression import compress as compress_fn

    compress = compress or compress_fn
    plan = {g.name: list(removed.get(g.name, ())) for g in groups}
    cuts = parameter_cuts(pl_module, groups, plan)
    before = {k: tuple(v.shape) for k, v in pl_module.state_dict().items()}
    modes = module_modes(pl_module)
    compress(pl_module, example_inputs, groups=groups, removed=plan, round_to=1)  # (the plan is final)
    restore_modes(pl_module, modes)  # (a custom `compress` too)
    after = pl_module.state_dict()
    for name, name_cuts in cuts.items():
        if name not in before or name not in after:
            continue
        expected = list(before[name])
        for dim, keep in name_cuts:
            expected[dim] = len(keep)
        if tuple(after[name].shape) != tuple(expected):
            raise RuntimeError(
                f"The in-fit compression cut {name!r} from {before[name]} to {tuple(after[name].shape)},"
                f" not to {tuple(expected)} as planned; the optimizer state and the masks cannot follow it."
                " Please report this with the model.")
    return cuts


def refuse_removal_conflicts(trainer: pl.Trainer, owner: Any, who: str,
                             alternative: str | None = None) -> None:
    """Refuse, at setup and by name, every callback of the fit that cannot live through ``owner``'s in-fit
    removal of units: a pruning callback that does not say it follows the removal
    (``PruningCallback.follows_removal``), and any callback that gives a ``removal_refusal`` (its reason).
    ``who`` names the removing callback in the message, ``alternative`` what else to do."""
    from lightning_prune.callbacks.base import PruningCallback

    for cb in getattr(trainer, "callbacks", None) or []:
        pruning = isinstance(cb, PruningCallback)
        if cb is owner or (pruning and cb.follows_removal):
            continue
        why, hint = getattr(cb, "removal_refusal", None), ""
        if pruning and why is None:
            why = ("it does not say that it can follow the removal (its masks or other state may depend on"
                   " the old shapes)")
            hint = (f"; if {type(cb).__name__}'s masks stay right when cut like the parameters"
                    " (PruningCallback.follow_removal), set `follows_removal = True` on it")
        if why:
            todo = f"{alternative}, or run them" if alternative else "Run them"
            raise MisconfigurationException(
                f"{who} cannot share a fit with {type(cb).__name__}: the units removed inside the fit change"
                f" the parameters' shapes, and {why}. HINT: {todo} in separate fits{hint}.")


def refuse_frozen_conflicts(trainer: pl.Trainer | None, owner: Any, groups: Sequence[ChannelGroup] | None,
                            who: str) -> None:
    """Refuse, at fit start and by name, another pruning callback whose targets include a layer that
    ``owner``'s groups would freeze (:attr:`ChannelGroup.frozen`): frozen, the layer is replaced by a plain
    one holding its computed weight, so the other callback's masks would act on detached parameters (and a
    mask of the raw weight does not describe the computed one)."""
    from lightning_prune.callbacks.base import PruningCallback

    frozen = {name for g in groups or () for name in getattr(g, "frozen", ())}
    if not frozen:
        return
    for cb in getattr(trainer, "callbacks", None) or []:
        if cb is owner or not isinstance(cb, PruningCallback):
            continue
        hit = sorted({t.module_name for t in getattr(cb, "targets", None) or ()
                      if any(t.module_name == f or t.module_name.startswith(f + ".") for f in frozen)})
        if hit:
            raise MisconfigurationException(
                f"{who} cannot share a fit with {type(cb).__name__}: it targets {hit[:4]}, whose weight is"
                " computed in forward (weight standardisation, weight_norm); removing their input channels"
                " freezes them into plain layers holding the computed weight, which leaves"
                f" {type(cb).__name__}'s masks (of the raw weight) on parameters no longer in the model."
                f" HINT: `exclude` those layers from {type(cb).__name__}, or run the two in separate fits.")


def _frozen_readers(groups: Sequence[ChannelGroup] | None) -> tuple[list[str], list[str]] | None:
    """``(layers, producers)`` of the groups read by layers that compute their weight
    (:attr:`ChannelGroup.frozen`), sorted; ``None`` when no group is."""
    hit = [g for g in groups or () if getattr(g, "frozen", ())]
    if not hit:
        return None
    return sorted({n for g in hit for n in g.frozen}), sorted({p for g in hit for p in g.producers})


_FROZEN_WHY = ("which compute their weight in forward (weight standardisation, weight_norm): their input"
               " channels can only be masked, gated or removed once they are frozen into plain layers holding"
               " the computed weight")


def refuse_sharded_freezing(pl_module: nn.Module, groups: Sequence[ChannelGroup] | None, who: str) -> None:
    """Refuse, by name, groups read by layers that compute their weight (:attr:`ChannelGroup.frozen`) when
    ``pl_module``'s parameters are sharded (FSDP2): such a layer is frozen into a plain one holding the
    computed weight before its input channels are masked, gated or removed, which is not done on shards
    (masks or gates on the raw weight of a weight-standardised conv would be standardised away: another
    model, silently). The removal itself (gathered, :func:`compress_sharded_in_fit`) and a resume after it
    (:func:`resize_sharded`) freeze on the gathered network."""
    from lightning_prune.core.sharding import is_sharded

    readers = _frozen_readers(groups)
    if readers is None or not any(is_sharded(p) for p in pl_module.parameters()):
        return
    frozen, producers = readers
    raise MisconfigurationException(
        f"{who} cannot act under ModelParallelStrategy (FSDP2) on the groups read by {frozen[:4]},"
        f" {_FROZEN_WHY}, which is not done on sharded parameters. HINT: strategy='ddp', or `exclude` the"
        f" groups they read ({producers[:4]}).")


def refuse_spawn_freezing(trainer: pl.Trainer, groups: Sequence[ChannelGroup] | None, who: str) -> None:
    """Refuse, by name, groups read by layers that compute their weight (:attr:`ChannelGroup.frozen`) under a
    launcher that hands the workers' weights back to the main process (``ddp_spawn``, ``ddp_fork``,
    ``ddp_notebook``): the workers freeze such layers into plain ones, and the main process, where no hook of
    a callback runs, loads their state non-strictly into its own unfrozen layers -- the computed weights
    taken as raw ones, another model, silently. Refused at the start instead."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    readers = _frozen_readers(groups)
    launcher = getattr(trainer.strategy, "launcher", None)
    if readers is None or not isinstance(launcher, _MultiProcessingLauncher):
        return
    frozen, producers = readers
    raise MisconfigurationException(
        f"{who} cannot act under a spawning strategy ({type(trainer.strategy).__name__}, start method"
        f" {launcher._start_method!r}) on the groups read by {frozen[:4]}, {_FROZEN_WHY}, which the main"
        " process's model cannot take back at the end of the fit. HINT: strategy='ddp' (one process per rank,"
        f" launched from the script), or `exclude` the groups they read ({producers[:4]}).")


def others_follow_removal(trainer: pl.Trainer | None, owner: Any, pl_module: pl.LightningModule,
                          cuts: Mapping[str, Sequence[tuple[int, Tensor]]]) -> None:
    """After ``owner`` removed units: the other pruning callbacks of the fit that follow a removal cut their
    masks like the parameters (the others were refused at setup: :func:`refuse_removal_conflicts`)."""
    from lightning_prune.callbacks.base import PruningCallback

    for cb in getattr(trainer, "callbacks", None) or []:
        if cb is not owner and isinstance(cb, PruningCallback) and cb.follows_removal:
            cb.follow_removal(pl_module, cuts)


@torch.no_grad()
def compress_in_fit(trainer: pl.Trainer, pl_module: pl.LightningModule, groups: Sequence[ChannelGroup],
                    removed: Mapping[str, Sequence[int]], example_inputs: Any,
                    compress: Callable[..., nn.Module] | None = None) -> dict[str, list[tuple[int, Tensor]]]:
    """Remove ``removed`` units (group name -> units; names relative to ``pl_module``) in place inside a
    running fit: the model shrinks, every optimizer follows (parameters and state cut), DDP is re-wrapped.
    Returns the cuts made (:func:`compress_exactly`), for the other callbacks' masks."""
    old = {id(p): n for n, p in pl_module.named_parameters()}
    dense_shapes = {k: tuple(v.shape) for k, v in pl_module.state_dict().items()}
    before = set(frozen_names(pl_module))
    cuts = compress_exactly(pl_module, groups, removed, example_inputs, compress)
    fresh = {f"{n}.weight" for n in set(frozen_names(pl_module)) - before}  # frozen now: another weight
    carry_optimizer_state(trainer.optimizers, old, dict(pl_module.named_parameters()), cuts, fresh)
    _rewrap_ddp(trainer, pl_module)
    _hand_back_dense_weights(trainer, pl_module, cuts, dense_shapes)
    return cuts


def _fsdp_units(root: nn.Module) -> list[tuple[str, dict[str, Any]]]:
    """The submodules of ``root`` that ``fully_shard`` made FSDP units (names relative to ``root``, ``""`` =
    itself), innermost first (the order to shard them again), each with the ``fully_shard`` arguments to
    repeat (its mesh and mixed-precision policy)."""
    from torch.distributed.fsdp import FSDPModule

    units = []
    for name, module in root.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        kwargs: dict[str, Any] = {}
        param = next((p for p in module.parameters() if hasattr(p, "device_mesh")), None)
        if param is not None:
            kwargs["mesh"] = param.device_mesh
        state = getattr(module, "_get_fsdp_state", lambda: None)()
        policy = getattr(state, "_mp_policy", None)
        if policy is not None:
            kwargs["mp_policy"] = policy
        units.append((name, kwargs))
    return sorted(units, key=lambda u: -(u[0].count(".") + 1 if u[0] else 0))


def sharded_compression_problem(pl_module: pl.LightningModule, prefix: str) -> str | None:
    """Why the FSDP2 model cannot be compressed inside the fit by :func:`compress_sharded_in_fit`, or
    ``None``: the traced network must be a submodule (``pl_module.model``) that ``fully_shard`` made an FSDP
    unit, and no FSDP unit may lie outside it."""
    from torch.distributed.fsdp import FSDPModule

    if not prefix:
        return ("the network to compress is the LightningModule itself; hold it as a submodule (self.model)"
                " and apply fully_shard to it (and its blocks) in configure_model")
    root = pl_module.get_submodule(prefix)
    if not isinstance(root, FSDPModule):
        return (f"{prefix!r} is not an FSDP unit: apply fully_shard to it (after its blocks) in"
                " configure_model")
    outside = [n for n, m in pl_module.named_modules() if isinstance(m, FSDPModule)
               and not (n == prefix or n.startswith(prefix + "."))]
    if outside:
        return f"FSDP units outside {prefix!r} ({outside[:3]}): shard only the network"
    return None


@torch.no_grad()
def gather_network(pl_module: nn.Module, prefix: str, skeleton: nn.Module) -> nn.Module:
    """Put an unsharded copy of the FSDP2-sharded network ``pl_module.<prefix>`` in its place and return it:
    ``skeleton`` (the network's structure on the meta device, :func:`lightning_prune.graph.meta_copy` taken
    before ``fully_shard``) materialised with the gathered parameters (``DTensor.full_tensor``, a collective:
    call it on every rank) and the network's buffers. Every rank then holds the whole network."""
    from lightning_prune.core.sharding import is_sharded

    old_root = pl_module.get_submodule(prefix)
    full = {n: (p.full_tensor() if is_sharded(p) else p.detach()) for n, p in old_root.named_parameters()}
    buffers = dict(old_root.named_buffers())
    device = next(iter(full.values())).device if full else torch.device("cpu")
    new_root = copy.deepcopy(skeleton).to_empty(device=device)
    for name, param in new_root.named_parameters():
        param.copy_(full[name])
    for name, buffer in new_root.named_buffers():
        buffer.copy_(buffers[name])
    restore_modes(new_root, module_modes(old_root))
    parent_name, _, attr = prefix.rpartition(".")
    setattr(pl_module.get_submodule(parent_name) if parent_name else pl_module, attr, new_root)
    return new_root


@torch.no_grad()
def compress_sharded_in_fit(trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str,
                            skeleton: nn.Module, groups: Sequence[ChannelGroup],
                            removed: Mapping[str, Sequence[int]], input_size: Sequence[int] | None,
                            before: Callable[[], None] | None = None,
                            after: Callable[[], None] | None = None) -> None:
    """:func:`compress_in_fit` for a network sharded by FSDP2 (``fully_shard``) under ModelParallelStrategy.

    Every rank gathers the network's parameters whole (``DTensor.full_tensor``), loads them into a fresh
    unsharded copy of the network (``skeleton``: its structure on the meta device, taken at setup), puts it in
    place of ``pl_module.<prefix>``, compresses it (proved on a batch of ``input_size``; ``before()`` first,
    e.g. the restricted norms that let compress prove the outputs unchanged; ``after()`` on the compressed
    plain network), shards it again with ``fully_shard`` (the same FSDP units, meshes and mixed-precision
    policies) and carries every optimizer's state over: gathered, cut like its parameter, sharded like the new
    parameter. Call it on every rank at the same step (it is a sequence of collectives). Peak memory per rank:
    one dense copy of the network and of the optimizer state, for the duration of the call. Other callbacks
    that hold the network's old modules lose them (the network is a new module tree).
    """
    from torch.distributed.fsdp import fully_shard

    from lightning_prune.core.compression import compress as compress_fn
    from lightning_prune.core.sharding import full_copy, is_sharded, shard_like

    units = _fsdp_units(pl_module.get_submodule(prefix))
    old = {id(p): n for n, p in pl_module.named_parameters()}
    new_root = gather_network(pl_module, prefix, skeleton)
    was_frozen = set(frozen_names(pl_module))
    device = next(new_root.parameters()).device
    example_inputs = example_inputs_for(new_root, input_size)  # (what compress proves the outputs on)
    for optimizer in trainer.optimizers:  # the state whole, like the parameters
        for state in optimizer.state.values():
            for key, value in state.items():
                if is_sharded(value):
                    state[key] = full_copy(value).to(device)  # type: ignore[union-attr]
    if before is not None:
        before()
    cuts = parameter_cuts(pl_module, groups, removed)
    compress_fn(pl_module, example_inputs, groups=groups, removed=removed, round_to=1)  # (modes kept)
    if after is not None:
        after()
    for name, kwargs in units:
        fully_shard(new_root.get_submodule(name) if name else new_root, **kwargs)
    new = dict(pl_module.named_parameters())
    fresh = {f"{n}.weight" for n in set(frozen_names(pl_module)) - was_frozen}  # as compress_in_fit
    carry_optimizer_state(trainer.optimizers, old, new, cuts, fresh)
    for optimizer in trainer.optimizers:  # sharded like the new parameters again
        for param, state in optimizer.state.items():
            for key, value in state.items():
                same = isinstance(value, Tensor) and tuple(value.shape) == tuple(param.shape)
                if same and is_sharded(param):
                    state[key] = shard_like(value, param)


@torch.no_grad()
def resize_sharded(trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str, skeleton: nn.Module,
                   groups: Sequence[ChannelGroup], removed: Mapping[str, Sequence[int]],
                   frozen: Sequence[str] = ()) -> None:
    """Resume under FSDP2 after an in-fit removal: give the sharded network ``pl_module.<prefix>`` the smaller
    shapes a checkpoint holds, before the checkpoint is loaded into it. Every rank gathers the network into a
    plain copy (``skeleton``, as :func:`compress_sharded_in_fit`), freezes the layers the checkpoint holds
    frozen (``frozen``, names relative to ``pl_module``: the readers that compute their weight, frozen before
    the removal by a run under DDP, :func:`lightning_prune.graph.refreeze`), slices the removed units out (no
    proof: the checkpoint's values replace the weights; the readers of the groups losing units are frozen
    there too), shards it again with ``fully_shard`` (the same FSDP units) and puts the new parameters in the
    optimizers' param groups (their state is still empty: the checkpoint fills it). A sequence of
    collectives: call it on every rank."""
    from torch.distributed.fsdp import fully_shard

    from lightning_prune.graph import refreeze, slice_units

    units = _fsdp_units(pl_module.get_submodule(prefix))
    old = {id(p): n for n, p in pl_module.named_parameters()}
    new_root = gather_network(pl_module, prefix, skeleton)
    refreeze(pl_module, frozen, "the checkpoint")  # (as the single-process resume does, before the slicing)
    cuts = parameter_cuts(pl_module, groups, removed)
    slice_units(pl_module, groups, removed)
    for name, kwargs in units:
        fully_shard(new_root.get_submodule(name) if name else new_root, **kwargs)
    carry_optimizer_state(trainer.optimizers, old, dict(pl_module.named_parameters()), cuts)


def _checkpoint_callbacks(path: Any) -> Mapping[str, Any]:
    """The callbacks' states of a Lightning checkpoint without loading its weights into anything: a
    distributed checkpoint's metadata file (``meta.pt``), or a one-file checkpoint (memory-mapped)."""
    from pathlib import Path

    path = Path(str(path))
    if path.is_dir():
        meta = path / "meta.pt"
        state = torch.load(meta, map_location="cpu", weights_only=False) if meta.is_file() else {}
    else:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return state.get("callbacks", {}) if isinstance(state, Mapping) else {}


def recorded_removal(state: Mapping[str, Any], groups: Sequence[ChannelGroup]) -> dict[str, list[int]]:
    """The units a checkpointed callback state says were removed (group name -> units), checked against
    ``groups``: a checkpoint of another model, or of other include/exclude arguments, is refused by name."""
    removed = {str(k): [int(u) for u in v] for k, v in state["shrink"]["removed"].items()}
    unknown = sorted(set(removed) - {g.name for g in groups})
    if unknown:
        raise MisconfigurationException(
            f"The checkpoint removed units of groups {unknown[:4]} that this model does not have. HINT:"
            " resume with the same model and the same include/exclude (and prune_coupled) arguments.")
    return removed


@torch.no_grad()
def cut_saved_optimizer_states(states: Sequence[Mapping[str, Any]],
                               optimizers: Sequence[torch.optim.Optimizer], names: Mapping[int, str],
                               cuts: Sequence[Mapping[str, Sequence[tuple[int, Tensor]]]]) -> list[str]:
    """Resume: cut, in place, the per-parameter tensors of a checkpoint's optimizer states (``states``, as
    ``optimizer.state_dict()`` wrote them) that still have a parameter's shape from before the recorded
    removal, like the parameter was cut (``cuts``, one mapping per removal applied, in order); returns the
    names of the parameters whose state was cut.

    A checkpoint holds compressed weights with such state when it was written after a removal that left the
    optimizers behind (older versions' removal at the end of training, ``compress_step=1.0``): its resume
    failed in the optimizer's step (momentum of 16 channels, gradient of 9). The saved state of each index
    belongs to the parameter at that position of ``optimizers`` (built by ``configure_optimizers`` on the
    model already cut: ``names`` maps ``id(parameter)`` to its name); a tensor already of the parameter's
    shape, or one the cuts do not bring to it, is left alone."""
    from lightning_prune.graph import cut_like

    done = []
    for optimizer, saved in zip(optimizers, states):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        indices = [i for group in saved.get("param_groups") or () for i in group.get("params", ())]
        entries = saved.get("state") or {}
        for index, param in zip(indices, params):
            entry, name = entries.get(index), names.get(id(param))
            if not isinstance(entry, dict) or name is None or not any(name in c for c in cuts):
                continue
            for key, value in list(entry.items()):
                if not isinstance(value, Tensor) or value.dim() == 0 or value.shape == param.shape:
                    continue
                cut = value
                try:
                    for removal in cuts:
                        cut = cut_like(cut, removal.get(name, ()))
                except (IndexError, RuntimeError):  # not the parameter's dense shape: left to fail as it is
                    continue
                if cut.shape == param.shape:
                    entry[key] = cut
                    done.append(name)
    return sorted(set(done))


def log_model_size(trainer: pl.Trainer, pl_module: pl.LightningModule, input_size: Sequence[int] | None,
                   owner: str, verbose: bool) -> None:
    """Log ``prune/params`` and ``prune/flops`` of the model as it is now (absolute numbers)."""
    from lightning_prune.callbacks.logging import PREFIX, log_scalars
    from lightning_prune.graph import count_ops_and_params, example_inputs_for, traced_root

    _, root = traced_root(pl_module)
    flops, params = count_ops_and_params(root, example_inputs_for(root, input_size))  # (modes kept)
    log_scalars(trainer, {f"{PREFIX}/params": float(params), f"{PREFIX}/flops": float(flops)})
    if verbose:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"[{owner}] compressed at step {trainer.global_step}: {params:,.0f} parameters,"
                       f" {flops / 1e6:.1f} MFLOPs; training continues on the smaller model")


class ShrinkSchedule:
    """When a callback removes its pruned units inside the fit, and what it removed (for resume).

    ``compress=True`` removes them right after the units are decided (the default position), or at
    ``compress_step`` / ``compress_epoch`` (optimizer steps / epochs, or a fraction of the whole training;
    ``1.0`` = at the end of training). The removed units are kept (:attr:`removed`) and written to the
    callback's checkpoint state, so a fresh LightningModule takes a checkpoint of the smaller model
    (:meth:`install_resume`).

    Example::

        self.shrink = ShrinkSchedule(compress, compress_step, compress_epoch, type(self).__name__)
    """

    def __init__(self, compress: bool, compress_step: int | float | None, compress_epoch: int | float | None,
                 owner: str) -> None:
        from lightning_prune.validation import check_bool, check_exclusive, check_position

        self.enabled = check_bool("compress", compress)
        hint = ("compress_step=0.8 removes the pruned units after 80% of training;"
                " by default right after pruning.")
        check_exclusive(compress_step=compress_step, compress_epoch=compress_epoch, hint=hint)
        self.compress_step = check_position("compress_step", compress_step, allow_none=True, hint=hint)
        self.compress_epoch = check_position("compress_epoch", compress_epoch, allow_none=True, hint=hint)
        if not self.enabled and (self.compress_step is not None or self.compress_epoch is not None):
            raise MisconfigurationException(
                f"`compress_step`/`compress_epoch` of {owner} need `compress=True`. HINT: compress=True"
                " removes the pruned units physically; the position says when.")
        self.owner = owner
        self.at_step: int | None = None  # resolved position; None = right after pruning (or at the end)
        self.removed: dict[str, list[int]] | None = None  # what was removed, once it was
        self.frozen: list[str] = []  # layers frozen into plain ones (lightning_prune.graph.frozen)

    @property
    def at_end(self) -> bool:
        from lightning_prune.callbacks.schedules import until_the_end

        return until_the_end(self.compress_step) or until_the_end(self.compress_epoch)

    @property
    def explicit(self) -> bool:
        return self.compress_step is not None or self.compress_epoch is not None

    def resolve(self, trainer: pl.Trainer) -> None:
        from lightning_prune.callbacks.schedules import resolve_step

        if self.enabled and self.explicit and not self.at_end and self.at_step is None:
            name = "compress_epoch" if self.compress_epoch is not None else "compress_step"
            self.at_step = resolve_step(name, getattr(self, name), trainer)

    def due(self, step: int, decided: bool) -> bool:
        """Whether to compress now: enabled, not done, the units decided, and the position reached."""
        if not self.enabled or self.removed is not None or not decided or self.at_end:
            return False
        return self.at_step is None or step >= self.at_step

    def state_dict(self) -> dict[str, Any]:
        return {"at_step": self.at_step, "removed": self.removed, "frozen": list(self.frozen)}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        state = state or {}
        self.at_step = state.get("at_step", self.at_step)
        removed = state.get("removed")
        self.removed = ({str(k): [int(u) for u in v] for k, v in removed.items()}
                        if removed is not None else None)
        self.frozen = [str(n) for n in state.get("frozen") or ()]

    def install_resume(self, trainer: pl.Trainer, state_key: str,
                       apply: Callable[[Mapping[str, Any]], Mapping[str, Any] | None]) -> None:
        """Before Lightning loads a checkpoint's weights into the model, ``apply(callback_state)`` (when the
        state says units were removed): the model takes the smaller shapes first. Under ModelParallelStrategy
        (FSDP2), whose ``load_checkpoint`` loads the weights and optimizer states itself (into the model
        sharded in ``configure_model``), the callbacks' states are read from the checkpoint first (a
        distributed checkpoint's metadata file, a full-state file memory-mapped) and applied before it.

        ``apply`` returns the cuts it made (:func:`~lightning_prune.graph.parameter_cuts`), or ``None``:
        before Lightning loads the optimizer states, a saved state tensor that still has a parameter's shape
        from before the removal is cut like the parameter (:func:`cut_saved_optimizer_states`, with a
        warning): a checkpoint written after a removal that left the optimizers behind resumes."""
        from lightning_prune.core.compression import RESUME_REGISTRY

        strategy = trainer.strategy
        registry = getattr(strategy, RESUME_REGISTRY, None)
        if registry is None:
            registry = {}
            setattr(strategy, RESUME_REGISTRY, registry)
            strategy._lightning_prune_resume_cuts = []
            original = strategy.load_model_state_dict

            def apply_all(callbacks: Mapping[str, Any]) -> None:
                strategy._lightning_prune_resume_cuts = []
                for key, fn in list(registry.items()):
                    state = callbacks.get(key)
                    shrink = state.get("shrink") if isinstance(state, Mapping) else None
                    if isinstance(shrink, Mapping) and (shrink.get("removed") or shrink.get("frozen")):
                        cuts = fn(state)
                        if cuts:
                            strategy._lightning_prune_resume_cuts.append(cuts)

            def load_model_state_dict(checkpoint: Mapping[str, Any], strict: bool = True,
                                      **kwargs: Any) -> Any:
                apply_all(checkpoint.get("callbacks", {}))
                return original(checkpoint, strict=strict, **kwargs)

            strategy.load_model_state_dict = load_model_state_dict
            original_optimizers = strategy.load_optimizer_state_dict

            def load_optimizer_state_dict(checkpoint: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
                cuts = strategy._lightning_prune_resume_cuts
                module = strategy.lightning_module
                if cuts and module is not None and checkpoint.get("optimizer_states"):
                    names = {id(p): n for n, p in module.named_parameters()}
                    done = cut_saved_optimizer_states(checkpoint["optimizer_states"], strategy.optimizers,
                                                      names, cuts)
                    if done:
                        from lightning.pytorch.utilities import rank_zero_warn

                        rank_zero_warn(
                            f"The checkpoint holds the compressed model but optimizer state of the shapes"
                            f" before the removal ({len(done)} parameters, e.g. {done[0]!r}); it was cut like"
                            " the parameters (written after a removal at the end of training by an older"
                            " lightning-prune).")
                return original_optimizers(checkpoint, *args, **kwargs)

            strategy.load_optimizer_state_dict = load_optimizer_state_dict
            if type(strategy).__name__ == "ModelParallelStrategy":
                original_load = strategy.load_checkpoint

                def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
                    path = strategy.broadcast(checkpoint_path)  # (rank 0's path, as Lightning reads it)
                    apply_all(_checkpoint_callbacks(path))
                    return original_load(checkpoint_path, *args, **kwargs)

                strategy.load_checkpoint = load_checkpoint
        registry[state_key] = apply
