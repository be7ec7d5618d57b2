"""Pure functions the callbacks and users share: importance scores, thresholds, gate math."""

from lightning_prune.functional.fusion import (
    expand_groups,
    fold_bn,
    fuse_1x1_kxk,
    fuse_conv_1x1,
    fuse_kxk_kxk,
    identity_kernel,
    pad_kernel,
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
    "kept_count",
    "kth_largest",
    "magnitude_mask",
    "threshold_mask",
    # fusion (activation decay / reparameterisation)
    "expand_groups",
    "fold_bn",
    "fuse_1x1_kxk",
    "fuse_conv_1x1",
    "fuse_kxk_kxk",
    "identity_kernel",
    "pad_kernel",
]
