"""A NaN or inf in a weight at a mask update raises, naming the layer and the step; the masks stay as they
were (magnitude, lottery ticket, the baselines)."""

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_prune as lp
from lightning_prune.testing import assert_state_equal, fit_tiny

LAYER = "model.layer1.0.conv1.weight"


class Inject(Callback):
    """Writes ``value`` into one weight of ``LAYER`` at the end of step ``step`` (before the pruning callback
    listed after it sees the batch end) and keeps the pruning callback's state of that moment."""

    def __init__(self, pruner, value, step=None, epoch_end=None):
        self.pruner, self.value, self.step, self.epoch_end = pruner, value, step, epoch_end
        self.state_before = None

    def _inject(self, pl_module):
        self.state_before = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                             for k, v in _copy(self.pruner.state_dict()).items()}
        with torch.no_grad():
            dict(pl_module.named_parameters())[LAYER].view(-1)[3] = self.value

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.step is not None and trainer.global_step == self.step:
            self._inject(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.epoch_end is not None and trainer.current_epoch == self.epoch_end:
            self._inject(pl_module)


def _copy(state):
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: _copy(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_copy(v) for v in state]
    return state


def _state_without_rewind_point(state):
    return {k: v for k, v in state.items() if k != "rewind_state"}


CASES = {
    "magnitude": ({"every_n_steps": 2, "sparsity_end_step": 10}, {"step": 4}, 4),
    # the baselines update at steps 1, 3, 5, ...
    "random_unstructured": ({"every_n_steps": 2, "sparsity_end_step": 10}, {"step": 5}, 5),
    "random_channels": ({"every_n_steps": 2, "sparsity_end_step": 10}, {"step": 5}, 5),
    "first_k": ({"prune_step": 4}, {"step": 4}, 4),
    "lottery_ticket": ({"rounds": 2}, {"epoch_end": 0}, 4),
}


@pytest.mark.parametrize(("name", "value"), [
    ("magnitude", math.nan), ("magnitude", math.inf), ("lottery_ticket", math.nan),
    ("lottery_ticket", math.inf), ("random_unstructured", math.inf), ("random_channels", math.nan),
    ("first_k", math.nan),
])
def test_nonfinite_weight_at_a_mask_update_raises_and_keeps_the_masks(name, value, tmp_path):
    kwargs, when, step = CASES[name]
    pruner = lp.create_callback(name, verbose=False, **kwargs)
    inject = Inject(pruner, value, **when)
    expected = (rf"\[{type(pruner).__name__}\] non-finite weights at the mask update of step {step}:"
                rf" '{LAYER}' \({int(math.isnan(value))} NaN, {int(math.isinf(value))} inf")
    with pytest.raises(lp.NonFiniteWeightError, match=expected):
        fit_tiny([inject, pruner], tmp_path, max_epochs=3, limit_train_batches=4, limit_val_batches=1)
    assert inject.state_before is not None, "the fault was never injected"
    assert_state_equal(_state_without_rewind_point(inject.state_before),
                       _state_without_rewind_point(pruner.state_dict()))


def test_the_check_passes_finite_weights_and_names_every_bad_layer(tmp_path):
    pruner = lp.GradualMagnitudePruning(every_n_steps=2, verbose=False)
    fit_tiny([pruner], tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    pruner.check_finite_weights(7)  # finite: no error
    names = list(pruner.masks)
    with torch.no_grad():
        for n in names[:6]:
            pruner.masks.param(n).view(-1)[0] = math.nan
    with pytest.raises(lp.NonFiniteWeightError, match=r"step 7: .* and 2 more\. The masks were left"):
        pruner.check_finite_weights(7)
