"""The baselines' callbacks warn at setup when the Trainer keeps them from acting (the shared check)."""

from __future__ import annotations

import pytest
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_prune.testing import fit_tiny
from lightning_prune_baselines import FirstKChannels, RandomChannels, RandomUnstructured

#: a single-device strategy that the checks take for a sharded one (FSDP needs several processes or a GPU)
ShardedLookalike = type("FSDPStrategy", (SingleDeviceStrategy,), {})


@pytest.mark.parametrize("make", [lambda: FirstKChannels(0.5, verbose=False),
                                  lambda: RandomChannels(0.5, verbose=False),
                                  lambda: RandomUnstructured(0.5, verbose=False)],
                         ids=["first_k", "random_channels", "random_unstructured"])
def test_every_baseline_warns_at_setup_under_a_sharded_strategy(make, tmp_path):
    with pytest.warns(UserWarning, match=r"prunes whole weight tensors .* under FSDPStrategy"):
        fit_tiny([make()], tmp_path, strategy=ShardedLookalike(device="cpu"), max_epochs=1,
                 limit_train_batches=1, limit_val_batches=0)
