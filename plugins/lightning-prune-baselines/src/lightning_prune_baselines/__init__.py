"""lightning-prune-baselines: control baselines for lightning-prune, shipped as a third-party plugin.

Installing this distribution registers three callbacks in the ``lightning_prune.callbacks`` entry-point
group; nothing in lightning-prune itself names them::

    pip install plugins/lightning-prune-baselines
    lightning-prune list                                   # first_k, random_channels, random_unstructured
    lightning_prune.create_callback("first_k", target_sparsity=0.5)

The one-shot mask helpers (:func:`first_k_channel_masks`, :func:`random_channel_masks`) work on any
``nn.Module`` and are what the channel-pruning benchmarks compare against.
"""

from lightning_prune_baselines.__about__ import __version__
from lightning_prune_baselines.channels import (
    apply_channel_masks,
    channel_groups,
    first_k_channel_masks,
    first_k_keep,
    first_k_pruned,
    nested_random_keep,
    random_channel_masks,
)
from lightning_prune_baselines.first_k import FirstKChannels, FirstKImportance
from lightning_prune_baselines.random_channels import RandomChannels
from lightning_prune_baselines.random_unstructured import RandomUnstructured

__all__ = [
    "FirstKChannels",
    "FirstKImportance",
    "RandomChannels",
    "RandomUnstructured",
    "__version__",
    "apply_channel_masks",
    "channel_groups",
    "first_k_channel_masks",
    "first_k_keep",
    "first_k_pruned",
    "nested_random_keep",
    "random_channel_masks",
]
