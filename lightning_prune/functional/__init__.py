"""Pure functions the callbacks and users share: importance scores, thresholds, gate math."""

from lightning_prune.functional.magnitude import (
    block_magnitude,
    kept_count,
    kth_largest,
    magnitude_mask,
    threshold_mask,
)

__all__ = ["block_magnitude", "kept_count", "kth_largest", "magnitude_mask", "threshold_mask"]
