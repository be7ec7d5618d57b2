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
from lightning_prune.functional.hard_concrete import (
    expected_l0,
    hard_concrete_gate,
    hard_concrete_mean,
    hard_concrete_sample,
    hard_sigmoid_l0,
    log_alpha_from_droprate,
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
    "expected_l0",
    "fold_scale",
    "gate_l1_penalty",
    "gate_l1_subgradient",
    "hard_concrete_gate",
    "hard_concrete_mean",
    "hard_concrete_sample",
    "hard_sigmoid_l0",
    "keep_mask",
    "kept_count",
    "kth_largest",
    "log_alpha_from_droprate",
    "magnitude_mask",
    "threshold_mask",
    "zero_channels",
]
