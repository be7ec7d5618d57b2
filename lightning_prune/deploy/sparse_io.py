"""Sparse checkpoints: every mostly-zero weight stored as a bitmask of its non-zeros plus their values.

A masked model keeps the shapes of the dense one, so its ``state_dict`` costs as much disk as the dense
model's. :func:`save_sparse` writes each floating-point tensor for which it is smaller as

* ``bitmask``: one bit per element, set where the element is non-zero (``uint8``, 8 elements a byte);
* ``values``: the non-zero elements in order, in the tensor's own dtype (bits copied, NaN and inf included);
* ``zero_signs``: only when some zeros are ``-0.0`` (what ``weight * mask`` leaves for a negative weight):
  one bit per zero, so that :func:`load_sparse` gives back the tensors **bit for bit**;

and every other tensor (dense weights, BatchNorm statistics, integer buffers) as it is. A 90%-sparse float32
layer takes 1 + 0.9 + 3.2 bits per weight instead of 32. A tensor that ``state_dict`` lists under several
names (tied weights) is stored once and loads back shared, as ``torch.save`` does. The file holds only
tensors, strings and integers: it loads with ``torch.load(weights_only=True)``. Models whose channels were
removed (:func:`~lightning_prune.compress`) save their layers' channel counts too, so a fresh model of the
original architecture takes the smaller shapes when it loads.

Example::

    lp.save_sparse(model, "model.sparse.pt")                     # a module, LightningModule or state_dict
    model = lp.load_sparse("model.sparse.pt", timm.create_model("resnet18", num_classes=10))
    state = lp.load_sparse("model.sparse.pt")                    # just the dense state_dict
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.checkpoint_io import load_file
from lightning_prune.core.compression import compressed_structure, take_structure
from lightning_prune.errors import InvalidArgumentError, InvalidArgumentTypeError
from lightning_prune.graph import FROZEN_MARKER

__all__ = ["FORMAT", "SparseFile", "decode_tensor", "encode_tensor", "load_sparse", "pack_bits",
           "save_sparse", "unpack_bits"]

FORMAT = "lightning_prune.sparse/1"
_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


@dataclass(frozen=True)
class SparseFile:
    """What :func:`save_sparse` wrote: the file's size, the bytes the same tensors take dense, and how many
    tensors were stored as bitmask + values (and their sparsity)."""

    path: str
    file_bytes: int
    dense_bytes: int
    sparse_tensors: int
    dense_tensors: int
    sparsity: float  #: zeros among the elements of the tensors stored sparse

    @property
    def ratio(self) -> float:
        """Dense bytes over file bytes (how many times smaller)."""
        return self.dense_bytes / max(self.file_bytes, 1)


def pack_bits(bits: Tensor) -> Tensor:
    """A bool tensor as ``uint8`` bytes, 8 elements each, the first element in the highest bit.

    Example::

        >>> pack_bits(torch.tensor([True, False, False, False, False, False, False, True, True])).tolist()
        [129, 128]
    """
    flat = bits.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    return (flat.view(-1, 8) << _SHIFTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, count: int) -> Tensor:
    """The first ``count`` bits of :func:`pack_bits`' bytes, as a flat bool tensor."""
    bits = (packed.reshape(-1, 1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:count].bool()


def encode_tensor(tensor: Tensor) -> dict[str, Any] | None:
    """``{"shape", "bitmask", "values"[, "zero_signs"]}`` for a floating-point tensor when that is smaller
    than the tensor itself, else ``None``."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    flat = tensor.detach().reshape(-1)
    nonzero = flat != 0
    values = flat[nonzero]
    zeros = flat[~nonzero]
    negative = torch.signbit(zeros)
    size = math.ceil(flat.numel() / 8) + values.numel() * values.element_size()
    if bool(negative.any()):
        size += math.ceil(zeros.numel() / 8)
    if size >= flat.numel() * flat.element_size():
        return None
    entry: dict[str, Any] = {"shape": list(tensor.shape), "bitmask": pack_bits(nonzero).cpu(),
                             "values": values.cpu().clone()}
    if bool(negative.any()):
        entry["zero_signs"] = pack_bits(negative).cpu()
    return entry


def decode_tensor(entry: Mapping[str, Any], device: Any = "cpu") -> Tensor:
    """The tensor :func:`encode_tensor` encoded, bit for bit."""
    shape = [int(s) for s in entry["shape"]]
    values = entry["values"].to(device)
    numel = math.prod(shape)
    nonzero = unpack_bits(entry["bitmask"].to(device), numel)
    if int(nonzero.sum()) != values.numel():
        raise InvalidArgumentError(
            f"A sparse tensor of shape {shape} has {int(nonzero.sum())} bits set but {values.numel()} values:"
            " the file is damaged.")
    out = torch.zeros(numel, dtype=values.dtype, device=device)
    out[nonzero] = values
    if "zero_signs" in entry:
        negative = unpack_bits(entry["zero_signs"].to(device), numel - values.numel())
        zeros = torch.zeros(negative.numel(), dtype=values.dtype, device=device)
        zeros[negative] = -0.0
        out[~nonzero] = zeros
    return out.reshape(shape)


def _state_of(model: nn.Module | Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if isinstance(model, nn.Module):
        return dict(model.state_dict()), compressed_structure(model)
    if isinstance(model, Mapping) and all(isinstance(v, Tensor) for v in model.values()):
        return dict(model), {"attributes": {}}
    raise InvalidArgumentTypeError(
        f"`model` must be an nn.Module (a timm model, a LightningModule) or a state_dict of tensors, got"
        f" {type(model).__name__}. HINT: for a Lightning checkpoint pass torch.load(path)['state_dict'].")


def save_sparse(model: nn.Module | Mapping[str, Tensor], path: str | Path) -> SparseFile:
    """Save ``model``'s ``state_dict`` with every tensor that is mostly zeros as bitmask + non-zero values.

    Args:
        model: a module (its ``state_dict`` and, for a compressed model, its layers' channel counts) or a
            ``state_dict``.
        path: where to write; loads back with :func:`load_sparse` (``torch.load(weights_only=True)`` works).

    Returns:
        a :class:`SparseFile` with the file's size and the dense size of the same tensors.

    Raises:
        InvalidArgumentTypeError: ``model`` is neither a module nor a ``state_dict``.

    Example::

        info = lp.save_sparse(pruned, "pruned.sparse.pt")
        print(f"{info.file_bytes / 1e6:.1f} MB, {info.ratio:.1f}x smaller than dense")
    """
    state, structure = _state_of(model)
    dense: dict[str, Tensor] = {}
    sparse: dict[str, dict[str, Any]] = {}
    aliases: dict[str, str] = {}  # a tied tensor's other names -> the name it is stored under
    seen: dict[tuple[Any, ...], str] = {}
    zeros = elements = dense_bytes = 0
    for key, tensor in state.items():
        view = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.dtype,
                tuple(tensor.shape), tensor.stride())
        if tensor.numel() and view in seen:
            aliases[key] = seen[view]
            continue
        seen[view] = key
        dense_bytes += tensor.numel() * tensor.element_size()
        entry = encode_tensor(tensor)
        if entry is None:
            dense[key] = tensor.detach().cpu()
        else:
            sparse[key] = entry
            elements += tensor.numel()
            zeros += tensor.numel() - entry["values"].numel()
    payload = {"format": FORMAT, "keys": list(state), "dense": dense, "sparse": sparse, "aliases": aliases,
               **structure}
    torch.save(payload, str(path))
    return SparseFile(str(path), Path(path).stat().st_size, dense_bytes, len(sparse), len(dense),
                      zeros / elements if elements else 0.0)


@torch.no_grad()
def load_sparse(path: str | Path, model: nn.Module | None = None, map_location: Any = "cpu",
                strict: bool = True) -> Any:
    """Load what :func:`save_sparse` wrote: into ``model`` (returned), or, without one, as a ``state_dict``.

    The tensors are bit-identical to those saved (signed zeros included); tied ones are one tensor. A model
    whose channels were removed before saving gives a fresh ``model`` of the same architecture its smaller
    shapes first.

    Raises:
        FileNotFoundError: no file at ``path``.
        InvalidArgumentError: ``path`` was not written by :func:`save_sparse`, is damaged, or (``strict``)
            its keys are not ``model``'s.
    """
    payload = load_file(path, map_location=map_location)  # save_sparse writes plain data only
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InvalidArgumentError(
            f"{path} was not written by lightning_prune.save_sparse (format {FORMAT!r}). HINT: a plain"
            " state_dict loads with torch.load; a compressed model's file with lp.load_compressed.")
    device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
    tensors = {**payload["dense"], **{k: decode_tensor(e, device) for k, e in payload["sparse"].items()}}
    aliases = payload.get("aliases") or {}
    state = {key: tensors[aliases.get(key, key)] for key in payload["keys"]}
    if model is None:
        return state
    hint = "HINT: load it into a fresh model of the architecture that was saved"

    def take() -> None:
        try:
            take_structure(model, state, payload, path)
        except (AttributeError, KeyError, ValueError, RuntimeError) as err:
            raise InvalidArgumentError(f"{path} does not fit {type(model).__name__}: {err}. {hint}.") from err

    replaced = payload.get("frozen") or payload.get("along_units")
    if replaced:  # (before the keys are compared: a frozen layer, a conv at the dense width have other keys)
        take()
    # (a frozen layer takes a state without its marker: a file written before the marker existed)
    expected = {k for k in model.state_dict() if k in state or not k.endswith("." + FROZEN_MARKER)}
    if strict and set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise InvalidArgumentError(
            f"{path} does not fit {type(model).__name__}: missing keys {missing[:4]}, unexpected keys"
            f" {unexpected[:4]}. {hint} (or pass strict=False).")
    if not replaced and (payload.get("attributes") or payload.get("buffers")):
        take()
    model.load_state_dict(state, strict=strict)
    return model
