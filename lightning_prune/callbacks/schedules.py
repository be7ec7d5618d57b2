"""Sparsity and coefficient schedules: pure functions of the training step."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["is_update_step", "polynomial_sparsity", "ramp", "resolve_step", "steps_per_epoch",
           "training_steps", "until_the_end", "warn_if_after_training"]


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
    """A 0 -> 1 ramp of ``progress`` (clipped to [0, 1]): ``"linear"`` or ``"cosine"`` (0.5(1 - cos(pi p))).
    """
    p = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return p
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * p))
    raise ValueError(f"Unknown ramp {kind!r}; expected 'linear' or 'cosine'.")


# ---------------------------------------------------------------------------------------------- positions
def training_steps(trainer: Any) -> int | None:
    """The optimizer steps of the whole fit (``trainer.estimated_stepping_batches``); None without an end."""
    total = float(trainer.estimated_stepping_batches)
    return int(total) if math.isfinite(total) else None


def steps_per_epoch(trainer: Any) -> int | None:
    """Optimizer steps in one training epoch (batches / gradient accumulation, rounded up), or None when the
    training dataloader has no length."""
    trainer.estimated_stepping_batches  # noqa: B018  (makes Lightning load the training dataloader)
    batches = float(trainer.num_training_batches)
    if not math.isfinite(batches):
        return None
    return max(math.ceil(int(batches) / max(int(trainer.accumulate_grad_batches), 1)), 1)


def until_the_end(value: int | float | None) -> bool:
    """Whether a when-argument is the float ``1.0``: the end of training, i.e. "never stop" (a step count
    estimated from the Trainer would undercount manual optimisation with several steps per batch)."""
    return isinstance(value, float) and value == 1.0


def resolve_step(name: str, value: int | float | None, trainer: Any) -> int | None:
    """The optimizer step a when-argument means: ``*_step`` ints are steps, ``*_epoch`` ints are epochs (the
    step at which that epoch starts), and a float in [0, 1] is that fraction of the whole training.

    Raises:
        MisconfigurationException: a fraction on a Trainer without an end, or epochs without a sized
            dataloader.

    Example::

        resolve_step("finalize_step", 0.75, trainer)   # 75% of trainer.estimated_stepping_batches
        resolve_step("finalize_epoch", 3, trainer)     # 3 * steps per epoch
    """
    if value is None:
        return None
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    if isinstance(value, float):
        if value > 1.0 and value.is_integer():
            value = int(value)  # a config parser's `3.0`
        else:
            total = training_steps(trainer)
            if total is None:
                raise MisconfigurationException(
                    f"`{name}`={value!r} is a fraction of training, but this Trainer has no end"
                    f" (max_epochs=-1 and max_steps=-1). HINT: give `{name}` as an int, or set"
                    " max_epochs/max_steps.")
            return int(round(value * total))
    if name.endswith("_epoch") or name.endswith("_epochs"):
        per_epoch = steps_per_epoch(trainer)
        if per_epoch is None:
            raise MisconfigurationException(
                f"`{name}`={value!r} counts epochs, but the training dataloader has no length."
                f" HINT: give the position in optimizer steps instead (a `*_step` argument).")
        return int(value) * per_epoch
    return int(value)


def warn_if_after_training(owner: str, trainer: Any, name: str, value: Any, step: int | None,
                           consequence: str, hint: str | None = None) -> bool:
    """At setup: warn (rank zero) when a position falls after the last step of this fit, so the callback
    would never act there -- a recipe shortened with ``--trainer.max_epochs 2`` whose positions are counts.

    Args:
        owner: the callback's class name, as the message starts.
        name, value: the argument and its configured value (named in the message, as what to change).
        step: the 0-based optimizer step at which the action first happens (``None``: not resolved).
        consequence: what then does not happen, e.g. ``"no mask is ever computed"``.
        hint: what to do instead (default: give ``name`` as a fraction of training, or train longer).

    Returns:
        Whether it warned. Nothing is said when the fit has no known end, or ``value`` is ``1.0`` (the end).
    """
    total = training_steps(trainer)
    if total is None or step is None or until_the_end(value) or step < total:
        return False
    from lightning.pytorch.utilities import rank_zero_warn

    per_epoch = steps_per_epoch(trainer)
    epochs = trainer.max_epochs
    budget = (f" ({epochs} epochs of {per_epoch})"
              if per_epoch and epochs and epochs > 0 and total == epochs * per_epoch else "")
    rank_zero_warn(
        f"{owner}: `{name}`={value!r} is optimizer step {step}, but this fit has {total} steps{budget}:"
        f" {consequence}. HINT: " + (hint or f"give `{name}` as a fraction of training (a float in (0, 1),"
                                     " the same share of any run) or train longer."))
    return True
