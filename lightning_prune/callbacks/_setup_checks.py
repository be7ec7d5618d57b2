"""What every channel callback checks at setup: can it act under this Trainer at all?

The schedules warn when a position falls after the end of the fit
(:func:`~lightning_prune.callbacks.schedules.warn_if_after_training`); these checks warn when the Trainer's
precision plugin or the model's mode keep a callback from acting at all, so that nothing is silently a no-op.
Sharded strategies are refused at setup (:mod:`lightning_prune.callbacks.sharding`).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["LAYER_REPLACING_PRECISIONS", "cannot_act_reasons", "warn_if_cannot_act"]

#: precision plugins whose ``convert_module`` swaps the model's Linear layers for their own after the
#: callbacks' setup (the masks and gate hooks stay on the layers that were swapped out)
LAYER_REPLACING_PRECISIONS = ("BitsandbytesPrecision", "TransformerEnginePrecision")


def cannot_act_reasons(trainer: Any, pl_module: Any, owner: str, sampled_in_training: bool = False
                       ) -> list[str]:
    """Why ``owner`` (a channel callback) cannot act in this fit, one message per reason (empty: it can).

    Args:
        trainer: the Trainer (its ``precision_plugin`` is read).
        pl_module: the LightningModule, in the mode the user left it.
        owner: the callback's class name, as the messages start.
        sampled_in_training: the callback's gates are random in train mode only (L0's hard-concrete gates).
    """
    reasons = []
    precision = type(getattr(trainer, "precision_plugin", None)).__name__
    if precision in LAYER_REPLACING_PRECISIONS:
        reasons.append(
            f"{owner} cannot prune under {precision}: it replaces the model's Linear layers after the"
            " callbacks' setup, so the masks and gates stay on layers that are no longer in the model."
            " HINT: prune with precision '32-true', '16-mixed' or 'bf16-mixed' and quantise the pruned model"
            " afterwards.")
    if sampled_in_training and pl_module is not None and not pl_module.training:
        reasons.append(
            f"{owner}: the LightningModule is in eval mode at the start of the fit and Lightning keeps it"
            " there; the hard-concrete gates are sampled only in train mode, so they would stay at their"
            " test-time value and never learn which units to close. HINT: call model.train() before"
            " trainer.fit.")
    return reasons


def warn_if_cannot_act(trainer: Any, pl_module: Any, owner: str, sampled_in_training: bool = False
                       ) -> list[str]:
    """Warn (rank zero) for every reason of :func:`cannot_act_reasons`; returns them."""
    reasons = cannot_act_reasons(trainer, pl_module, owner, sampled_in_training)
    for reason in reasons:
        rank_zero_warn(reason, category=UserWarning)
    return reasons
