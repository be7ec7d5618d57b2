"""Pure functions the callbacks and users share: importance scores, thresholds, gate math."""

from lightning_prune.functional.magnitude import (
    block_magnitude,
    kept_count,
    kth_largest,
    magnitude_mask,
    threshold_mask,
)

__all__ = ["block_magnitude", "kept_count", "kth_largest", "magnitude_mask", "threshold_mask"]

from lightning_prune.functional.lottery import (  # noqa: E402
    prune_by_percent,
    prune_count,
    remaining_fraction,
    shuffle_like,
)

__all__ += ["prune_by_percent", "prune_count", "remaining_fraction", "shuffle_like"]
