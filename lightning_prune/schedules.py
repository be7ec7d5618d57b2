"""Sparsity and coefficient schedules: pure functions of the training step."""

from __future__ import annotations

import math

__all__ = ["is_update_step", "polynomial_sparsity", "ramp"]


def polynomial_sparsity(
    step: int,
    initial_sparsity: float,
    target_sparsity: float,
    begin_step: int,
    end_step: int,
    exponent: float = 3.0,
) -> float:
    """Zhu & Gupta's schedule, as TensorFlow's ``model_pruning`` computes it.

    ``p = clip((step - begin) / (end - begin), 0, 1)`` and
    ``s = target + (initial - target) * (1 - p) ** exponent``.

    Example::

        >>> round(polynomial_sparsity(25, 0.0, 0.9, 0, 100), 4)
        0.5203
    """
    span = end_step - begin_step
    p = 1.0 if span <= 0 else min(max((step - begin_step) / span, 0.0), 1.0)
    return target_sparsity + (initial_sparsity - target_sparsity) * (1.0 - p) ** exponent


def is_update_step(step: int, begin_step: int, end_step: int, frequency: int, last_update: int) -> bool:
    """TensorFlow's mask-update condition.

    ``begin <= step`` and (``step <= end`` or ``end < 0``) and ``last_update + frequency <= step``;
    ``last_update`` starts at 0, so with ``begin=0`` and ``frequency=10`` the first update is at step 10.
    """
    in_window = begin_step <= step and (end_step < 0 or step <= end_step)
    return in_window and last_update + frequency <= step


def ramp(progress: float, kind: str = "linear") -> float:
    """A 0 -> 1 ramp of ``progress`` (clipped to [0, 1]): ``"linear"`` or ``"cosine"`` (0.5(1 - cos(pi p)))."""
    p = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return p
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * p))
    raise ValueError(f"Unknown ramp {kind!r}; expected 'linear' or 'cosine'.")
