"""The baselines' callbacks warn at setup when the Trainer keeps them from acting (the shared check)."""

from __future__ import annotations

import pytest
from lightning.pytorch.plugins.precision import Precision

from lightning_prune.testing import fit_tiny
from lightning_prune_baselines import FirstKChannels, RandomChannels, RandomUnstructured

#: a plain precision plugin that the checks take for bitsandbytes (which needs its package and a GPU)
SwappingLookalike = type("BitsandbytesPrecision", (Precision,), {})


@pytest.mark.parametrize("make", [lambda: FirstKChannels(0.5, verbose=False),
                                  lambda: RandomChannels(0.5, verbose=False),
                                  lambda: RandomUnstructured(0.5, verbose=False)],
                         ids=["first_k", "random_channels", "random_unstructured"])
def test_every_baseline_warns_at_setup_under_a_layer_swapping_precision(make, tmp_path):
    with pytest.warns(UserWarning, match=r"cannot prune under BitsandbytesPrecision"):
        fit_tiny([make()], tmp_path, plugins=[SwappingLookalike()], max_epochs=1,
                 limit_train_batches=1, limit_val_batches=0)
