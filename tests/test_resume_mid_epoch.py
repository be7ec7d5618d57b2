"""Resume from a checkpoint taken in the middle of an epoch is exact, for every registered callback."""

import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.utils.data import TensorDataset

import lightning_prune as lp
from lightning_prune.testing import check_mid_epoch_resume
from lightning_prune.training.data import EpochShuffleSampler, ResumableDataLoader

REGISTERED = sorted(lp.list_callbacks())

#: arguments that make each callback act before and after the resume point (step 6 of a 12-step fit:
#: 3 epochs of 4 batches)
ACTIVE = {
    "magnitude": {"every_n_steps": 2, "sparsity_end_step": 10},
    "lottery_ticket": {"rounds": 2, "rewind_step": 2},
    "group_lasso": {"finalize_step": 9, "lam": 0.01},
    "l0": {"finalize_step": 9},
    "activation_decay": {"begin_step": 2, "end_step": 10},
    "evolution": {"every_n_steps": 4, "population": 4, "fitness_batches": 1},
    "first_k": {"prune_step": 8},
    "one_shot": {"method": "wanda", "prune_step": 8, "calibration_batches": 2},
    "random_channels": {"every_n_steps": 2, "sparsity_end_step": 10},
    "random_unstructured": {"every_n_steps": 2, "sparsity_end_step": 10},
}


def test_every_registered_callback_has_active_arguments():
    assert set(REGISTERED) - {"distill"} <= set(ACTIVE), "give the new callback arguments in ACTIVE"


@pytest.mark.parametrize("name", REGISTERED)
def test_mid_epoch_resume_is_exact(name, tmp_path):
    kwargs = ACTIVE.get(name, {})
    check_mid_epoch_resume(lambda: lp.create_callback(name, verbose=False, **kwargs), tmp_path, max_epochs=3,
                           resume_step=6)


def _loader(num_workers=0):
    data = TensorDataset(torch.arange(10))
    return ResumableDataLoader(data, batch_size=3, sampler=EpochShuffleSampler(10, seed=1),
                               num_workers=num_workers)


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [b[0].tolist() for b in loader]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_resumes_the_same_epoch_after_the_batches_served(num_workers):
    full = _epoch(_loader(), 1)
    first = _loader(num_workers)
    first.sampler.set_epoch(1)
    it = iter(first)
    served = [next(it)[0].tolist() for _ in range(2)]
    assert served == full[:2]
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    resumed = _loader(num_workers)
    resumed.load_state_dict(state)
    assert _epoch(resumed, 1) == full[2:]
    assert resumed.state_dict() == {"epoch": 1, "batches": len(full)}
    assert _epoch(resumed, 1) == full  # the skip applies once


def test_loader_state_of_a_finished_epoch_does_not_skip_the_next():
    loader = _loader()
    _epoch(loader, 0)
    resumed = _loader()
    resumed.load_state_dict(loader.state_dict())  # saved at the end of epoch 0
    assert _epoch(resumed, 1) == _epoch(_loader(), 1)


def test_loader_loads_an_empty_state():
    loader = _loader()
    loader.load_state_dict({})
    assert len(_epoch(loader, 0)) == 4


#: schedules that are over before the resume point (step 6): nothing may be recomputed from the resumed step
FINISHED = {
    "magnitude": {"every_n_steps": 2, "end_step": 4, "sparsity_end_step": 4},
    "random_unstructured": {"every_n_steps": 2, "end_step": 4, "sparsity_end_step": 4},
    "lottery_ticket": {"rounds": 1, "epochs_per_round": 1},  # pruned at step 4, the ticket trains on
    "group_lasso": {"finalize_step": 4, "lam": 0.01},
    "l0": {"finalize_step": 4, "temperature_final": 0.3},
}


@pytest.mark.parametrize("name", sorted(FINISHED))
def test_mid_epoch_resume_after_the_schedule_ended_is_exact(name, tmp_path):
    check_mid_epoch_resume(lambda: lp.create_callback(name, verbose=False, **FINISHED[name]), tmp_path,
                           max_epochs=3, resume_step=6)


class _OneCycle(lp.ImageClassifier):
    """Asks for ``trainer.estimated_stepping_batches`` before the loops are restored, as OneCycleLR users do:
    Lightning then skips its own restore of the loader's position (Lightning issue #20550)."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05)
        total = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=total),
            "interval": "step"}}


def test_mid_epoch_resume_is_exact_when_the_steps_are_estimated_before_the_restore(tmp_path):
    check_mid_epoch_resume(
        lambda: lp.GradualMagnitudePruning(every_n_steps=2, sparsity_end_step=10, verbose=False), tmp_path,
        make_model=lambda: _OneCycle("test_resnet", num_classes=10, optimizer="sgd", scheduler="none"))


class _RestoresAfterSetup(SingleDeviceStrategy):
    """One CPU device that restores the checkpoint after ``on_fit_start``, as ModelParallelStrategy (FSDP2)
    does: the callbacks resolve their schedules there from the training loader's length, so the loader is
    built before the loops (and its saved position) are restored."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


@pytest.mark.parametrize("name", ["group_lasso", "l0", "magnitude"])
def test_mid_epoch_resume_is_exact_when_the_strategy_restores_after_on_fit_start(name, tmp_path):
    """Before: GroupLassoPruning and L0Pruning resumed under ModelParallelStrategy trained the resumed steps
    on the first batches of the epoch again (the loader's saved position never loaded; the 2-rank FSDP2
    case is test_sharded's test_gates_resume_mid_epoch_exactly_under_fsdp2)."""
    check_mid_epoch_resume(lambda: lp.create_callback(name, verbose=False, **ACTIVE[name]), tmp_path,
                           max_epochs=2, resume_step=6, make_strategy=lambda: _RestoresAfterSetup("cpu"))


def test_the_loader_position_fix_warns_when_the_fit_loop_lacks_an_attribute_it_uses(monkeypatch):
    """The fix above relies on private attributes of Lightning's fit loop: a Lightning without one of them
    gets a warning (a mid-epoch resume may restart the epoch's batches) and an unwrapped loop, not a silent
    no-op."""
    import lightning.pytorch as pl

    from lightning_prune.callbacks._resume import LOADER_STATE_ATTRIBUTES, resume_loader_position

    loop = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False).fit_loop
    monkeypatch.delattr(loop, "_data_fetcher")
    with pytest.warns(UserWarning, match=r"fit loop has no _data_fetcher\. A mid-epoch resume may restart the"
                      r" epoch's batches \(Lightning #20550\)"):
        resume_loader_position(loop.trainer)
    assert "load_state_dict" not in vars(loop)  # (nothing wrapped)
    fresh = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert all(hasattr(fresh.fit_loop, name) for name in LOADER_STATE_ATTRIBUTES)  # (this Lightning: wrapped)
    resume_loader_position(fresh)
    assert "load_state_dict" in vars(fresh.fit_loop)
