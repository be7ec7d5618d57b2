"""Sparsity metrics to every attached Lightning logger; images, histograms and tables to W&B.

Scalars go to ``trainer.loggers`` under ``prune/...`` from rank zero only. W&B media are sent only when a
``WandbLogger`` is attached and ``wandb`` imports; nothing here prints.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

__all__ = [
    "counted",
    "PREFIX",
    "log_histograms",
    "log_images",
    "log_scalars",
    "log_table",
    "mask_image",
    "wandb_loggers",
]

PREFIX = "prune"


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``"1 group"``, ``"2 groups"``, ``"1,024 units"``: a count with its noun in the right number."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def _step(trainer: Trainer) -> int:
    return int(trainer.global_step)


@rank_zero_only
def log_scalars(trainer: Trainer, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Send ``metrics`` (already prefixed) to every logger of the trainer, from rank zero."""
    if not metrics:
        return
    values = {k: float(v.item() if isinstance(v, Tensor) else v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=_step(trainer) if step is None else step)


def wandb_loggers(trainer: Trainer) -> list[Logger]:
    """The trainer's ``WandbLogger`` instances; empty when none is attached or wandb is missing."""
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - always present in lightning
        return []
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def _wandb():
    try:
        import wandb
    except ImportError:  # optional at run time, even though it is a dependency
        return None
    return wandb


def mask_image(mask: Tensor, max_side: int = 1024) -> Tensor:
    """A 2-D uint8 picture of a mask (white = kept): conv filters as rows of ``in * kh * kw`` pixels."""
    image = mask.detach().reshape(mask.shape[0], -1) if mask.dim() > 1 else mask.detach().reshape(1, -1)
    rows, cols = image.shape
    step_r, step_c = max(1, -(-rows // max_side)), max(1, -(-cols // max_side))
    image = image[::step_r, ::step_c]
    return image.to(torch.uint8).cpu() * 255


@rank_zero_only
def log_images(trainer: Trainer, images: Mapping[str, Tensor], caption: str = "") -> None:
    """Log 2-D tensors as W&B images under their keys (uint8 or floats in [0, 1])."""
    wandb = _wandb()
    if wandb is None:
        return
    for logger in wandb_loggers(trainer):
        payload = {k: wandb.Image(v.cpu().numpy(), caption=caption or k) for k, v in images.items()}
        logger.experiment.log({**payload, "trainer/global_step": _step(trainer)})


@rank_zero_only
def log_histograms(trainer: Trainer, values: Mapping[str, Tensor]) -> None:
    """Log tensors as W&B histograms under their keys."""
    wandb = _wandb()
    if wandb is None or not wandb_loggers(trainer):
        return
    import numpy as np

    payload = {}
    for key, value in values.items():
        flat = value.detach().float().cpu().reshape(-1).numpy()
        if flat.size:  # np.histogram copes with constant values, where wandb's own binning fails
            payload[key] = wandb.Histogram(np_histogram=np.histogram(flat, bins=64))
    if not payload:
        return
    for logger in wandb_loggers(trainer):
        logger.experiment.log({**payload, "trainer/global_step": _step(trainer)})


@rank_zero_only
def log_table(trainer: Trainer, key: str, columns: list[str], rows: list[list[object]]) -> None:
    """Log a W&B table (one per call) under ``key``."""
    wandb = _wandb()
    if wandb is None:
        return
    for logger in wandb_loggers(trainer):
        logger.log_table(key=key, columns=columns, data=rows, step=None)
