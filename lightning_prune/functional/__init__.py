"""Pure functions the callbacks and users share: importance scores, thresholds, gate math."""

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
    "expected_l0",
    "hard_concrete_gate",
    "hard_concrete_mean",
    "hard_concrete_sample",
    "hard_sigmoid_l0",
    "log_alpha_from_droprate",
    "block_magnitude",
    "kept_count",
    "kth_largest",
    "magnitude_mask",
    "threshold_mask",
]

from lightning_prune.functional.evolution import (  # noqa: E402
    add_perturbation_,
    centered_ranks,
    es_update_,
    es_weights,
    normalized_fitness,
    offspring_seed,
    perturbation,
)

__all__ += ["add_perturbation_", "centered_ranks", "es_update_", "es_weights", "normalized_fitness",
            "offspring_seed", "perturbation"]
