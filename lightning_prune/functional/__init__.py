"""Pure functions the callbacks and users share: importance scores, thresholds, gate math."""

from lightning_prune.functional.channels import (
    capture_mask,
    channel_view,
    fold_scale,
    gate_l1_penalty,
    gate_l1_subgradient,
    keep_mask,
    zero_channels,
)
from lightning_prune.functional.magnitude import (
    block_magnitude,
    kept_count,
    kth_largest,
    magnitude_mask,
    threshold_mask,
)

__all__ = [
    "block_magnitude",
    "capture_mask",
    "channel_view",
    "fold_scale",
    "gate_l1_penalty",
    "gate_l1_subgradient",
    "keep_mask",
    "kept_count",
    "kth_largest",
    "magnitude_mask",
    "threshold_mask",
    "zero_channels",
]
