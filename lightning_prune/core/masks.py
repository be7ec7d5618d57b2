"""Boolean masks over named parameters, applied in place with one fused op per device and dtype.

A :class:`MaskSet` holds one ``torch.bool`` mask per parameter (1 byte per parameter, no copy of the
weights) and multiplies the parameters by their masks in place, so pruned weights are exact zeros in
the model's own ``state_dict`` and the model keeps its ordinary keys.

Each mask has its parameter's memory layout (a channels-last weight gets a channels-last mask, a transposed
weight a transposed mask), so the fused multiply walks both in the same order; the ``uint8`` view it
multiplies by is taken only of a mask with exactly its parameter's strides. The parameters are held as
themselves, not as ``param.data`` snapshots: when the model is converted after the masks were made
(``model.to(memory_format=torch.channels_last)``, ``.to(device)``), the next :meth:`MaskSet.apply_` notices
the new storage, re-lays the masks and zeros the weights the model really uses.

Sharded parameters (``DTensor``, FSDP2's ``fully_shard``) get masks of their local shard only, as plain
``bool`` tensors aligned with it (mask memory per rank ~ 1/world), applied to the shard in place;
:meth:`MaskSet.update` and :meth:`MaskSet.load_state_dict` take full masks (sliced to the shard) or local
ones, :meth:`MaskSet.state_dict` gathers full masks, and the counts are those of the full tensors.
:meth:`MaskSet.rebind` follows parameters that ``fully_shard`` replaced after the masks were made.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from lightning_prune.core.sharding import gather_full, is_sharded, local_slice, local_tensor, shard_reduce
from lightning_prune.core.targets import Target

__all__ = ["MaskSet"]


class MaskSet:
    """One boolean mask per named parameter (``True`` = kept).

    Example::

        masks = MaskSet.for_targets(resolve_targets(model))
        masks.update({"layer1.0.conv1.weight": new_mask})
        masks.apply_()            # pruned weights become exact zeros
        masks.sparsity()          # fraction of masked weights that are pruned
    """

    def __init__(self) -> None:
        self._params: dict[str, nn.Parameter] = {}
        self._masks: dict[str, Tensor] = {}
        self._groups: list[tuple[list[Tensor], list[Tensor]]] | None = None
        self._storage: list[int] = []  # data_ptr() of every parameter when the groups were built

    @classmethod
    def for_targets(cls, targets: Iterable[Target]) -> MaskSet:
        masks = cls()
        for target in targets:
            masks.add(target.name, target.param)
        return masks

    def add(self, name: str, param: nn.Parameter, mask: Tensor | None = None) -> None:
        """Track ``param`` under ``name``, all kept unless ``mask`` is given."""
        self._params[name] = param
        self._masks[name] = torch.ones_like(local_tensor(param), dtype=torch.bool)  # (the parameter's layout)
        if mask is not None:
            self.update({name: mask})
        self._groups = None

    # ------------------------------------------------------------------ access
    def __contains__(self, name: object) -> bool:
        return name in self._masks

    def __getitem__(self, name: str) -> Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def names(self) -> list[str]:
        return list(self._masks)

    def param(self, name: str) -> nn.Parameter:
        return self._params[name]

    def local(self, name: str) -> Tensor:
        """The parameter's local shard (the parameter itself when it is not sharded): what its mask covers."""
        return local_tensor(self._params[name])

    @property
    def sharded(self) -> bool:
        """Whether any masked parameter is a ``DTensor`` (the masks then cover local shards)."""
        return any(is_sharded(p) for p in self._params.values())

    def rebind(self, params: dict[str, nn.Parameter]) -> None:
        """Follow parameters replaced since the masks were made (``fully_shard`` in ``configure_model`` swaps
        every parameter for a sharded one): a full mask of a now sharded parameter keeps its shard's part."""
        for name, param in params.items():
            if name not in self._params or self._params[name] is param:
                continue
            mask = self._masks[name]
            local = local_tensor(param)
            if is_sharded(param) and tuple(mask.shape) == tuple(param.shape):
                mask = local_slice(mask.to(local.device), param)
            elif tuple(mask.shape) != tuple(local.shape):
                raise ValueError(f"{name!r} was replaced by a parameter of shape {tuple(param.shape)};"
                                 f" its mask has {tuple(mask.shape)}")
            self._params[name] = param
            self._masks[name] = _laid_out_like(local, mask)
        self._groups = None

    def items(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self._masks.items())

    # ------------------------------------------------------------------ change
    @torch.no_grad()
    def update(self, new_masks: dict[str, Tensor], apply: bool = True) -> None:
        """Replace masks by name; shapes must match the parameters. Applies them unless ``apply=False``."""
        for name, mask in new_masks.items():
            if name not in self._params:
                raise KeyError(f"No parameter named {name!r} is masked. Masked: {', '.join(self._masks)}")
            param = self._params[name]
            local = local_tensor(param)
            if is_sharded(param) and tuple(mask.shape) == tuple(param.shape):
                mask = local_slice(mask.to(local.device), param)  # a full mask: this rank's part
            elif tuple(mask.shape) != tuple(local.shape):
                raise ValueError(
                    f"Mask for {name!r} has shape {tuple(mask.shape)}, parameter {tuple(param.shape)}")
            self._masks[name] = _laid_out_like(local, mask)
        self._groups = None
        if apply:
            self.apply_()

    def _fused_groups(self) -> list[tuple[list[Tensor], list[Tensor]]]:
        storage = [local_tensor(p).data_ptr() for p in self._params.values()]
        if self._groups is not None and self._storage != storage:
            self._groups = None  # a parameter got new storage (moved, converted, replaced) since
        if self._groups is None:
            grouped: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = defaultdict(
                lambda: ([], [])
            )
            for name, shared in self._params.items():
                param = local_tensor(shared)  # a sharded parameter: its local shard, in place
                mask = self._masks[name]
                if mask.device != param.device or mask.stride() != param.stride():
                    # the model moved or changed layout after the masks were made
                    mask = self._masks[name] = _laid_out_like(param, mask)
                params, masks = grouped[(param.device, param.dtype)]
                params.append(param)
                masks.append(_uint8_view(mask, param))
            self._groups = list(grouped.values())
            self._storage = [local_tensor(p).data_ptr() for p in self._params.values()]
        return self._groups

    @torch.no_grad()
    def apply_(self) -> None:
        """Zero the pruned weights in place: one fused multiply per (device, dtype) group."""
        for params, masks in self._fused_groups():
            torch._foreach_mul_(params, masks)

    def invalidate(self) -> None:
        """Forget the cached groups (call after parameters were replaced or moved)."""
        self._groups = None

    @torch.no_grad()
    def mask_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero optimizer state (momentum, Adam moments) at pruned positions, so nothing carries them."""
        by_param = {id(p): self._masks[n] for n, p in self._params.items()}
        for param, state in optimizer.state.items():
            mask = by_param.get(id(param))
            if mask is None:
                continue
            for value in state.values():
                value = local_tensor(value) if isinstance(value, Tensor) else value  # sharded like the weight
                if isinstance(value, Tensor) and value.shape == mask.shape:
                    value.mul_(mask.to(value.device))

    # ------------------------------------------------------------------ statistics
    def pruned_counts(self) -> dict[str, tuple[int, int]]:
        """``{name: (pruned, total)}`` per mask (of the full tensors; sharded: a collective on every rank)."""
        if not self._masks:
            return {}
        kept = torch.stack([m.sum().cpu() for m in self._masks.values()]).to(torch.int64)
        reduce = shard_reduce(self._params.values())
        if reduce is not None:
            kept = reduce(kept, "sum")
        return {n: (int(p.numel() - k), p.numel()) for (n, p), k in zip(self._params.items(), kept.tolist())}

    def layer_sparsity(self) -> dict[str, float]:
        return {n: pruned / max(total, 1) for n, (pruned, total) in self.pruned_counts().items()}

    def sparsity(self) -> float:
        """Fraction of all masked parameters that are pruned."""
        counts = self.pruned_counts().values()
        total = sum(t for _, t in counts)
        return sum(p for p, _ in counts) / total if total else 0.0

    def memory_bytes(self) -> int:
        """The bytes of the masks this process holds (local shards when sharded)."""
        return sum(m.numel() * m.element_size() for m in self._masks.values())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Tensor]:
        """Full masks on the CPU (sharded: gathered, a collective on every rank)."""
        return {n: gather_full(m.detach(), self._params[n]).cpu().clone() for n, m in self._masks.items()}

    def load_state_dict(self, state: dict[str, Tensor], apply: bool = True) -> None:
        unknown = sorted(set(state) - set(self._params))
        if unknown:
            raise KeyError(
                f"The checkpoint has masks for parameters this model does not target: {unknown[:5]}."
                " HINT: resume with the same model and the same include/exclude patterns."
            )
        self.update(dict(state), apply=apply)


def _laid_out_like(param: Tensor, mask: Tensor) -> Tensor:
    """A fresh ``bool`` copy of ``mask`` on ``param``'s device, with ``param``'s strides when ``param`` is
    dense (channels-last, transposed), else contiguous. Never an alias of the caller's tensor."""
    out = torch.empty_like(param, dtype=torch.bool)  # preserve_format: the same strides for a dense tensor
    out.copy_(mask)
    return out


def _uint8_view(mask: Tensor, param: Tensor) -> Tensor:
    """The mask's bytes as ``uint8`` (PyTorch's mixed-dtype multiply is ~2x faster from ``uint8`` than from
    ``bool``). Taken only of a mask laid out exactly like its parameter; anything else (a broadcast, an
    overlapping or a differently strided mask) is copied first rather than reinterpreted."""
    if mask.dtype != torch.bool or mask.shape != param.shape or mask.stride() != param.stride():
        mask = _laid_out_like(param, mask)
    return mask.view(torch.uint8)
