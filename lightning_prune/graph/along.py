"""Convolutions that slide along a unit dimension, run at the dense width once some of its units are gone.

ECA's attention (timm's ``EcaModule``: ``nn.Conv1d(1, 1, k, padding=(k - 1) // 2)`` over the pooled channel
vector viewed as ``(B, 1, C)``) convolves *along* the channels: its kernel mixes each unit with its
neighbours. Slicing the units out would make other channels neighbours; the exact removal keeps the conv as
it is and runs it at the dense width: the input is scattered back to the dense positions (zeros at the
removed ones -- what the masked model, which zeroes the removed units where this conv reads them, has there),
the conv runs, and the kept positions of its output are gathered. The masked-vs-sliced proof of
:mod:`lightning_prune.graph.proof` is the judge, as for every group.

The layer is turned into its *along-units* class in place (:class:`AlongUnitsConv1d` ...: the same module
object, the same parameter objects, so optimizers, hooks and names are unaffected), which holds the kept
positions in a persistent buffer ``kept_index`` (saved with the ``state_dict``), the dim (``unit_dim``) and
the dense size (``dense_size``). A second removal composes the positions (``kept_index[local kept]``).
:func:`along_units_layers` lists such layers (what :func:`lightning_prune.save_compressed` records, under
``"along_units"``) and :func:`rewrap_along_units` turns a fresh model's layers into them again before its
shapes are taken. A compressed model stays a plain module: ``index_copy``, a conv and ``index_select``, which
``torch.jit.trace`` and ``torch.export`` take.

A convolution whose kernel is 1 along the unit dim (stride 1, no padding there: timm's ``LambdaLayer`` runs
``nn.Conv3d(1, K, (r, r, 1))`` over ``v`` viewed as ``(B, 1, H, W, V)``) mixes nothing along it: the units
pass through to the same dim of its output, and nothing is replaced.
"""

# (no ``from __future__ import annotations``: torch.jit.script reads the forward's annotations as objects)
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ALONG_TYPES", "AlongUnitsConv1d", "AlongUnitsConv2d", "AlongUnitsConv3d", "along_units",
           "along_units_layers", "rewrap_along_units"]


class _AlongUnits:
    """A conv run at the dense width ``dense_size`` along ``unit_dim``: its input holds the positions
    ``kept_index`` of that width (zeros elsewhere), its output the same positions."""

    unit_dim: int
    dense_size: int
    kept_index: Tensor

    def forward(self, x: Tensor) -> Tensor:
        d = self.unit_dim
        shape = list(x.shape)
        shape[d] = self.dense_size
        full = x.new_zeros(shape).index_copy(d, self.kept_index, x)
        # (zero padding_mode only, see along_units_reason: the conv itself; TorchScript takes no super())
        y = self._conv_forward(full, self.weight, self.bias)  # type: ignore[attr-defined]
        return y.index_select(d, self.kept_index)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, unit_dim={self.unit_dim}, kept {self.kept_index.numel()}"  # type: ignore[misc]
                f" of {self.dense_size}")


class AlongUnitsConv1d(_AlongUnits, nn.Conv1d):
    """``nn.Conv1d`` run at the dense width along its unit dim (see the module docstring)."""


class AlongUnitsConv2d(_AlongUnits, nn.Conv2d):
    """``nn.Conv2d`` run at the dense width along its unit dim (see the module docstring)."""


class AlongUnitsConv3d(_AlongUnits, nn.Conv3d):
    """``nn.Conv3d`` run at the dense width along its unit dim (see the module docstring)."""


ALONG_TYPES = (AlongUnitsConv1d, AlongUnitsConv2d, AlongUnitsConv3d)
_CLASSES = {nn.Conv1d: AlongUnitsConv1d, nn.Conv2d: AlongUnitsConv2d, nn.Conv3d: AlongUnitsConv3d}


def along_units_reason(module: nn.Module) -> str | None:
    """None when ``module`` can run at the dense width along a unit dim (a plain torch conv with zero
    padding, or one already doing so); else why not."""
    if isinstance(module, ALONG_TYPES):
        return None
    if type(module) not in _CLASSES:
        return f"its class {type(module).__name__} is no plain torch conv"
    if getattr(module, "padding_mode", "zeros") != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    return None


def along_units(module: nn.Module, dim: int, size: int) -> nn.Module:
    """Turn the conv ``module`` (in place) into its along-units class at dense width ``size`` along ``dim``
    (every position kept); a module already of that class is left as it is. Returns it.

    Raises:
        ValueError: ``module`` runs at the dense width along another dim already.
    """
    if isinstance(module, ALONG_TYPES):
        if _dim(module, module.unit_dim) != _dim(module, dim):
            raise ValueError(f"{type(module).__name__} runs at the dense width along its dim"
                             f" {module.unit_dim} already, not along {dim}")
        return module
    why = along_units_reason(module)
    if why is not None:
        raise ValueError(f"cannot run {type(module).__name__} at the dense width along its units: {why}")
    weight = module.weight
    module.__class__ = _CLASSES[type(module)]
    module.unit_dim = int(dim)
    module.dense_size = int(size)
    module.register_buffer("kept_index", torch.arange(int(size), device=weight.device), persistent=True)
    return module


def _dim(module: nn.Module, dim: int) -> int:
    """``dim`` of the conv's input counted from 0 (its input has as many dims as its weight)."""
    return int(dim) % module.weight.dim()


def keep_positions(module: nn.Module, dim: int, size: int, dead: Iterable[int]) -> None:
    """Remove the input positions ``dead`` (indices of what the module reads now) along ``dim`` of the conv
    ``module``, which reads ``size`` positions there: it runs at the dense width from now on (a second
    removal composes the kept positions).

    Raises:
        ValueError: ``module`` runs at the dense width along another dim already.
    """
    dead = {int(c) for c in dead}
    along_units(module, dim, size)
    current = module.kept_index
    local = torch.tensor([i for i in range(current.numel()) if i not in dead], dtype=torch.long,
                         device=current.device)
    module.kept_index = current.index_select(0, local)


def along_units_layers(model: nn.Module) -> dict[str, list[int]]:
    """``{name: [unit dim, dense size]}`` of ``model``'s layers run at the dense width along their units."""
    return {n: [int(m.unit_dim), int(m.dense_size)] for n, m in model.named_modules()
            if isinstance(m, ALONG_TYPES)}


def rewrap_along_units(model: nn.Module, layers: Mapping[str, Any], source: str) -> list[str]:
    """Turn the layers ``layers`` (:func:`along_units_layers` of a compressed model) of a fresh ``model``
    into their along-units classes again (the kept positions come with the ``state_dict``); returns the
    names turned now.

    Raises:
        InvalidArgumentError: a name is no plain conv of ``model``.
    """
    from lightning_prune.errors import InvalidArgumentError

    done = []
    for name, (dim, size) in layers.items():
        try:
            module = model.get_submodule(str(name))
        except AttributeError:
            module = None
        why = "no such layer" if module is None else along_units_reason(module)
        if why is not None or not name:
            raise InvalidArgumentError(
                f"{source} holds `{name}` run at the dense width along its units, but"
                f" {type(model).__name__}'s `{name}` cannot be ({why}). HINT: pass a fresh model of the"
                " architecture that was compressed.")
        if not isinstance(module, ALONG_TYPES):
            along_units(module, int(dim), int(size))
            done.append(str(name))
    return done
