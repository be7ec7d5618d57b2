"""Sharded parameters (PyTorch's ``DTensor``, what FSDP2's ``fully_shard`` makes): their local shards, full
tensors sliced like them, and sums over the processes that hold them.

A mask of a sharded weight is held as a plain ``bool`` tensor aligned with the weight's local shard (mask
memory per rank ~ 1/world of the dense masks). Selections over all shards (a global magnitude threshold)
combine per-rank histograms with :func:`shard_reduce`, never the weights themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Reduce",
    "edit_full_",
    "full_copy",
    "gather_full",
    "is_sharded",
    "local_slice",
    "local_tensor",
    "reshard",
    "shard_like",
    "shard_position",
    "shard_reduce",
    "sharding_problem",
]

#: ``reduce(tensor, op)`` combines a tensor over the processes holding the shards (``op`` "sum" or "max");
#: a "sum" counts every element of the full tensors exactly once
Reduce = Callable[[Tensor, str], Tensor]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter sharded by ``fully_shard`` or tensor parallelism)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (the very storage the optimizer updates), else ``tensor`` itself."""
    if is_sharded(tensor):
        with torch.no_grad():
            return tensor.to_local()  # type: ignore[attr-defined]
    return tensor


def sharding_problem(tensor: Tensor) -> str | None:
    """Why masks cannot be held on ``tensor``'s shards, or ``None``: every mesh dimension must shard a
    dimension (``Shard(d)``, FSDP2) or replicate (``Replicate``, HSDP); partial sums are not weights."""
    if not is_sharded(tensor):
        return None
    for placement in tensor.placements:  # type: ignore[attr-defined]
        if not (placement.is_shard() or placement.is_replicate()):
            return f"placement {placement} (a partial value) cannot hold a mask"
    return None


def local_slice(full: Tensor, like: Tensor) -> Tensor:
    """The part of ``full`` (shaped like ``like``'s full tensor) that ``like``'s local shard holds on this
    rank. ``Shard(d)`` cuts as ``torch.chunk`` does (the DTensor rule); ``Replicate`` keeps everything."""
    if not is_sharded(like):
        return full
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"a full tensor of shape {tuple(full.shape)} for a parameter of {tuple(like.shape)}")
    mesh = like.device_mesh  # type: ignore[attr-defined]
    coords = mesh.get_coordinate()
    out = full
    for mesh_dim, placement in enumerate(like.placements):  # type: ignore[attr-defined]
        if placement.is_shard():
            chunks = torch.chunk(out, mesh.size(mesh_dim), dim=placement.dim)
            index = coords[mesh_dim]
            if index < len(chunks):
                out = chunks[index]
            else:
                shape = list(out.shape)
                shape[placement.dim] = 0
                out = out.new_empty(shape)
    local = local_tensor(like)
    if tuple(out.shape) != tuple(local.shape):  # pragma: no cover - a layout the chunk rule does not describe
        raise ValueError(
            f"the local shard has shape {tuple(local.shape)}, the chunk rule gives {tuple(out.shape)}")
    return out


def gather_full(local: Tensor, like: Tensor) -> Tensor:
    """The full tensor whose shards on every rank are ``local`` (aligned with ``like``'s local shard), on
    every rank (a collective). ``bool`` travels as ``uint8`` (gloo has no ``bool``)."""
    if not is_sharded(like):
        return local
    from torch.distributed.tensor import DTensor

    dtype = local.dtype
    payload = local.to(torch.uint8) if dtype == torch.bool else local
    payload = payload.to(like.device_mesh.device_type)  # type: ignore[attr-defined]
    full = DTensor.from_local(payload, like.device_mesh, like.placements,  # type: ignore[attr-defined]
                              run_check=False, shape=like.shape, stride=like.stride()).full_tensor()
    return full.to(dtype)


def _counts_once(tensors: Iterable[Tensor]) -> bool:
    """Whether this rank's shards count in a sum over all ranks: it is at coordinate 0 of every mesh
    dimension that replicates (for plain, replicated tensors: global rank 0)."""
    for t in tensors:
        if is_sharded(t):
            coords = t.device_mesh.get_coordinate()  # type: ignore[attr-defined]
            placements = t.placements  # type: ignore[attr-defined]
            return all(c == 0 for c, p in zip(coords, placements) if p.is_replicate())
    return dist.get_rank() == 0


def shard_reduce(tensors: Iterable[Tensor]) -> Reduce | None:
    """A :data:`Reduce` over the default process group for a selection over ``tensors``' shards (which share
    one device mesh), or ``None`` when none of them is sharded (every rank holds the whole tensors)."""
    tensors = list(tensors)
    if not any(is_sharded(t) for t in tensors) or not (dist.is_available() and dist.is_initialized()):
        return None
    weight = 1 if _counts_once(tensors) else 0

    def reduce(value: Tensor, op: str) -> Tensor:
        # gloo needs CPU tensors, nccl CUDA ones: the device of the shards
        device = next(local_tensor(t).device for t in tensors)
        out = value.to(device).clone()
        if op == "sum":
            out.mul_(weight)
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        elif op == "max":
            dist.all_reduce(out, op=dist.ReduceOp.MAX)
        else:  # pragma: no cover
            raise ValueError(f"unknown reduction {op!r}")
        return out.to(value.device)

    return reduce


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` as a ``DTensor`` sharded like ``like`` (this rank keeps its part; no communication)."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import DTensor

    local = local_slice(full.to(local_tensor(like).device), like).contiguous()
    return DTensor.from_local(local, like.device_mesh, like.placements,  # type: ignore[attr-defined]
                              run_check=False, shape=like.shape, stride=like.stride())


def shard_position(like: Tensor) -> tuple[int, int] | None:
    """``(position, positions)`` of this rank's shard of ``like`` in the full tensor's row order when ``like``
    is cut along dim 0 on a one-dimensional mesh (FSDP2's default), else ``None``."""
    if not is_sharded(like):
        return None
    placements = like.placements  # type: ignore[attr-defined]
    if len(placements) != 1 or not placements[0].is_shard(0):
        return None
    mesh = like.device_mesh  # type: ignore[attr-defined]
    return int(mesh.get_coordinate()[0]), int(mesh.size(0))


@torch.no_grad()
def edit_full_(param: Tensor, fn: Callable[[Tensor], None], dims: Iterable[int] | None = None) -> None:
    """Apply the in-place edit ``fn`` to ``param``'s full tensor, keeping this rank's part of the result.

    ``dims`` (when given) are the dimensions ``fn`` indexes: a shard cut along none of them is edited where it
    lies (no communication, ``fn`` sees the local shard); otherwise the full tensor is gathered (a collective
    on every rank: call it on every rank in the same order), edited, and this rank's part written back."""
    if not is_sharded(param):
        fn(param.data)
        return
    local = local_tensor(param)
    if dims is not None:
        cut = {p.dim % param.dim() for p in param.placements if p.is_shard()}  # type: ignore[attr-defined]
        if not cut & {d % param.dim() for d in dims}:
            fn(local)
            return
    full = param.full_tensor()  # type: ignore[attr-defined]
    fn(full)
    local.copy_(local_slice(full, param))


def full_copy(value: object) -> object:
    """``value`` (nested dicts, lists, tuples) with every ``DTensor`` gathered whole on the CPU (a collective
    on every rank); other values as they are."""
    if is_sharded(value):
        return value.full_tensor().cpu()  # type: ignore[attr-defined]
    if isinstance(value, dict):
        return {k: full_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [full_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(full_copy(v) for v in value)
    return value


def reshard(module: torch.nn.Module) -> None:
    """Free the all-gathered parameters of every FSDP2 unit in ``module``, so that the next forward gathers
    the shards again. Needed after writing shards in place outside a training step: FSDP2 keeps the root
    unit's parameters gathered after a forward (its backward would need them at once), and a later forward
    would run on that stale copy instead of the written shards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()
