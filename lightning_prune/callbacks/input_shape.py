"""The input shape the channel callbacks trace the model at: where the model trains.

Without ``input_size``, the channel callbacks (``GroupLassoPruning``, ``L0Pruning``, the baselines' channel
callbacks) count FLOPs and prove their groups exact on a batch of the shape of the first training batch,
not at timm's ``pretrained_cfg["input_size"]`` (at 224x224, a model that trains on 32x32 digits was said to
have 451 MFLOPs where it runs 9.2). An explicit ``input_size`` and the LightningModule's
``example_input_array`` still come first; with no training data in sight (a bare ``Trainer``) timm's size
remains the fallback.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

__all__ = ["batch_input", "first_batch_input_size", "traced_input_size", "train_batch_size"]

_INPUT_KEYS = ("image", "images", "input", "inputs", "x", "pixel_values")


def batch_input(batch: Any) -> Tensor | None:
    """The model input of a training batch: the batch itself, its first element (``(x, y)``), or the
    ``image``/``input``/``x``... entry of a dict (else its first tensor)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch:
        return batch_input(batch[0])
    if isinstance(batch, Mapping):
        for key in _INPUT_KEYS:
            if isinstance(batch.get(key), Tensor):
                return batch[key]
        return next((v for v in batch.values() if isinstance(v, Tensor)), None)
    return None


def _train_loader(trainer: pl.Trainer) -> Any:
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    if source is not None and source.is_defined():
        return source.dataloader()
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        return datamodule.train_dataloader()
    return None


def first_batch_input_size(trainer: pl.Trainer | None) -> tuple[int, ...] | None:
    """``(C, H, W)`` of the first training batch the ``trainer`` will see (``None`` when it has no training
    data). A map-style dataset gives its first sample through the loader's ``collate_fn``; other loaders give
    their first batch. Either way under a forked RNG state, so the seeded run is not changed by looking."""
    if trainer is None:
        return None
    try:
        loader = _train_loader(trainer)
        if loader is None:
            return None
        if isinstance(loader, Mapping):  # CombinedLoader-style {name: loader}: the first one
            loader = next(iter(loader.values()))
        elif isinstance(loader, (list, tuple)):
            loader = loader[0]
        state = random.getstate()
        np_state = _numpy_state()
        with torch.random.fork_rng(devices=[]):
            try:
                dataset = getattr(loader, "dataset", None)
                collate = getattr(loader, "collate_fn", None)
                if (dataset is not None and collate is not None and hasattr(dataset, "__getitem__")
                        and hasattr(dataset, "__len__")
                        and not isinstance(dataset, torch.utils.data.IterableDataset)
                        and len(dataset) > 0):
                    batch = collate([dataset[0]])
                else:
                    batch = next(iter(loader))
            finally:
                random.setstate(state)
                _set_numpy_state(np_state)
    except Exception:  # noqa: BLE001 - the shape is a convenience: any failure falls back to timm's size
        return None
    x = batch_input(batch)
    if x is None or x.dim() < 2 or x.is_complex() or not x.is_floating_point():
        return None
    return tuple(int(s) for s in x.shape[1:])


def train_batch_size(trainer: pl.Trainer | None) -> int | None:
    """The batch size of the ``trainer``'s training loader (its ``batch_size``, or its batch sampler's),
    ``None`` when it has none."""
    if trainer is None:
        return None
    try:
        loader = _train_loader(trainer)
        if isinstance(loader, Mapping):
            loader = next(iter(loader.values()))
        elif isinstance(loader, (list, tuple)):
            loader = loader[0]
        size = getattr(loader, "batch_size", None)
        if size is None:
            size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    except Exception:  # noqa: BLE001 - a convenience: the caller falls back
        return None
    return int(size) if isinstance(size, int) and size > 0 else None


def _numpy_state() -> Any:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    return np.random.get_state()


def _set_numpy_state(state: Any) -> None:
    if state is not None:
        import numpy as np

        np.random.set_state(state)


def traced_input_size(input_size: Sequence[int] | None, trainer: pl.Trainer | None,
                      pl_module: pl.LightningModule, owner: str,
                      verbose: bool = True) -> tuple[int, ...] | None:
    """The ``input_size`` a channel callback traces ``pl_module`` with: ``input_size`` when given; ``None``
    (the module's ``example_input_array``) when the traced module has one; else the shape of the first
    training batch (logged once), else ``None`` (timm's ``pretrained_cfg["input_size"]``)."""
    from lightning_prune.graph import traced_root

    if input_size is not None:
        return tuple(input_size)
    _, root = traced_root(pl_module)
    if getattr(root, "example_input_array", None) is not None:
        return None
    size = first_batch_input_size(trainer)
    if size is not None and verbose:
        rank_zero_info(f"[{owner}] traced at the input shape of the first training batch, {tuple(size)}"
                       " (pass `input_size=(C, H, W)` to choose another)")
    return size
