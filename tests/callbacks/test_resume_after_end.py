"""A checkpoint written after a channel callback removed its units at the end of training
(``compress_step=1.0``, or units decided only at the end): it holds the compressed weights, and the optimizer
state must have their shapes too -- a fit resumed from it (more epochs, ``ckpt_path=<file>`` or ``"last"``)
trains on, and a user who loads it for inference gets the compressed model.

Lightning writes such a checkpoint after the callbacks' ``on_train_end``: ``trainer.save_checkpoint`` after
the fit, or ``ModelCheckpoint(save_last=True)`` when none of its saves fell in the fit (``save_top_k=0``, an
``every_n_epochs`` longer than the fit): Lightning runs ModelCheckpoint's hooks after every other
callback's."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import lightning_prune as lp
from lightning_prune.testing import fit_tiny, tiny_classifier
from lightning_prune_baselines import FirstKChannels
from tests.helpers import Spy, eval_logits

SIZE = (3, 32, 32)
X = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(0))
ONE_EPOCH = {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 0}


class _TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.features(x))


def _module():
    module = tiny_classifier(momentum=0.9)  # SGD with momentum buffers of every parameter's shape
    module.model = _TinyCNN()
    module.example_input_array = torch.zeros(1, *SIZE)  # (what load_compressed traces the fresh module with)
    return module


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


CALLBACKS = {
    "group_lasso-compress_step=1.0": lambda: lp.GroupLassoPruning(
        target_flops=0.5, finalize_step=1, round_to=1, compress=True, compress_step=1.0, input_size=SIZE,
        verbose=False),
    "l0-decided_at_the_end": lambda: lp.L0Pruning(  # finalises (and compresses) at the end by default
        target_flops=0.5, round_to=1, compress=True, input_size=SIZE, verbose=False),
    "first_k-compress_step=1.0": lambda: FirstKChannels(
        target_sparsity=0.5, compress=True, compress_step=1.0, input_size=SIZE, verbose=False),
}


def _optimizer_follows(trainer, module, hook=None):
    """Every optimizer holds the model's parameters, each momentum buffer of its parameter's shape."""
    held = {id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]}
    assert held == {id(p) for p in module.parameters()}, hook
    for optimizer in trainer.optimizers:
        for param, state in optimizer.state.items():
            assert state["momentum_buffer"].shape == param.shape, hook


@pytest.mark.parametrize("make", list(CALLBACKS.values()), ids=list(CALLBACKS))
def test_a_checkpoint_written_after_the_end_compression_resumes(make, tmp_path):
    """``trainer.save_checkpoint`` after the fit: the compressed weights with the optimizer state cut like
    them; the resumed fit (one epoch more) trains the small model on, with the carried momentum."""
    cb = make()
    trainer, model = fit_tiny([cb], tmp_path / "a", model=_module(), **ONE_EPOCH)
    assert cb.shrink.removed and any(cb.shrink.removed.values())
    small = _params(model)
    assert small < _params(_module())
    _optimizer_follows(trainer, model)
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    saved = torch.load(tmp_path / "after.ckpt", weights_only=False)
    shapes = [tuple(s["momentum_buffer"].shape) for s in saved["optimizer_states"][0]["state"].values()]
    assert shapes == [tuple(p.shape) for p in model.parameters()]

    resumed = make()
    spy = Spy(_optimizer_follows, ("on_train_batch_end",))
    trainer2, model2 = fit_tiny([resumed, spy], tmp_path / "b", model=_module(),
                                ckpt_path=tmp_path / "after.ckpt", **{**ONE_EPOCH, "max_epochs": 2})
    assert trainer2.global_step == 4 and resumed.shrink.removed == cb.shrink.removed
    assert _params(model2) == small
    _optimizer_follows(trainer2, model2)


def test_model_checkpoint_last_written_at_the_end_resumes_with_last(tmp_path):
    """``ModelCheckpoint(save_last=True, save_top_k=0)`` writes ``last.ckpt`` in its ``on_train_end``, after
    the removal: ``ckpt_path="last"`` resumes from it; it loads for inference onto a fresh module, compressed
    (``lp.load_compressed``, ``lp.restore_run``), with the trained model's outputs."""
    make = CALLBACKS["group_lasso-compress_step=1.0"]
    cb = make()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    _, model = fit_tiny([cb, saver], tmp_path, model=_module(), **ONE_EPOCH)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["last.ckpt"]
    small = _params(model)
    expected = eval_logits(model, X)

    fresh = lp.load_compressed(tmp_path / "ckpt" / "last.ckpt", _module(), weights_only=False)
    assert _params(fresh) == small
    torch.testing.assert_close(eval_logits(fresh, X), expected)
    run = lp.restore_run(tmp_path / "ckpt" / "last.ckpt", _module(), [make()], weights_only=False)
    assert _params(run.module) == small
    torch.testing.assert_close(eval_logits(run.module, X), expected)

    resumed = make()
    saver2 = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer2, model2 = fit_tiny([resumed, saver2, Spy(_optimizer_follows, ("on_train_batch_end",))], tmp_path,
                                model=_module(), ckpt_path="last", **{**ONE_EPOCH, "max_epochs": 2})
    assert trainer2.global_step == 4 and _params(model2) == small


def test_an_older_checkpoint_with_the_dense_optimizer_state_resumes_with_it_cut(tmp_path):
    """A checkpoint an older version wrote after the end removal (the optimizers left behind: momentum of the
    dense shapes beside the compressed weights): on resume the saved state is cut like the parameters, with a
    warning -- the resumed fit starts from the momentum the removal carries now."""
    make = CALLBACKS["first_k-compress_step=1.0"]
    torch.manual_seed(0)
    trainer, model = fit_tiny([make()], tmp_path / "new", model=_module(), **ONE_EPOCH)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    old = make()
    compress_now = old.compress_now
    old.compress_now = lambda trainer, module, in_fit=True: compress_now(trainer, module, in_fit=False)
    torch.manual_seed(0)  # (the same initial weights: the same training)
    trainer, model = fit_tiny([old], tmp_path / "old", model=_module(), **ONE_EPOCH)
    trainer.save_checkpoint(tmp_path / "old.ckpt")
    saved = torch.load(tmp_path / "old.ckpt", weights_only=False)
    dense = [tuple(s["momentum_buffer"].shape) for s in saved["optimizer_states"][0]["state"].values()]
    assert dense != [tuple(p.shape) for p in model.parameters()]  # what the older version wrote

    loaded = []

    def momentum(trainer, module, hook):
        if not loaded:
            loaded.extend(s["momentum_buffer"].clone() for s in trainer.optimizers[0].state.values())

    with pytest.warns(UserWarning, match=r"optimizer state of the shapes before the removal"):
        trainer2, model2 = fit_tiny([make(), Spy(momentum, ("on_train_batch_start",))], tmp_path / "b",
                                    model=_module(), ckpt_path=tmp_path / "old.ckpt",
                                    **{**ONE_EPOCH, "max_epochs": 2})
    assert trainer2.global_step == 4 and _params(model2) == _params(model)
    _optimizer_follows(trainer2, model2)
    carried = torch.load(tmp_path / "new.ckpt", weights_only=False)["optimizer_states"][0]["state"]
    assert len(loaded) == len(carried)
    for buffer, state in zip(loaded, carried.values()):
        torch.testing.assert_close(buffer, state["momentum_buffer"])


def test_inference_loads_get_the_compressed_model_or_are_told_why_not(tmp_path):
    """``ImageClassifier.load_from_checkpoint`` of a checkpoint written after the removal gives the compressed
    model (its outputs); ``last.ckpt`` of the epochs' ModelCheckpoint saves, written before the end removal,
    loads dense with a warning that names the callback and ``lp.restore_run``, which compresses it."""
    make = CALLBACKS["first_k-compress_step=1.0"]
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer, model = fit_tiny([make(), saver], tmp_path, model=tiny_classifier(),
                              **{**ONE_EPOCH, "limit_val_batches": 1})
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    small, dense = _params(model), _params(tiny_classifier())
    assert small < dense

    loaded = lp.ImageClassifier.load_from_checkpoint(tmp_path / "after.ckpt", weights_only=False)
    assert _params(loaded) == small
    torch.testing.assert_close(eval_logits(loaded, X), eval_logits(model, X))

    with pytest.warns(UserWarning, match=r"FirstKChannels had chosen its units .* lp.restore_run"):
        before = lp.load_compressed(tmp_path / "ckpt" / "last.ckpt", tiny_classifier(), weights_only=False)
    assert _params(before) == dense
    run = lp.restore_run(tmp_path / "ckpt" / "last.ckpt", tiny_classifier(), [make()], weights_only=False)
    assert _params(run.module) == small


@pytest.mark.slow
def test_the_end_removal_under_ddp_spawn_hands_the_main_process_the_dense_shapes(tmp_path):
    """``ddp_spawn``: the main process loads the workers' final weights into its own dense module; after the
    end removal they come back padded to the dense shapes, zeros at the removed units (as after an in-fit
    removal), instead of failing to load."""
    cb = CALLBACKS["first_k-compress_step=1.0"]()
    _, model = fit_tiny([cb], tmp_path, model=_module(), strategy="ddp_spawn", devices=2,
                        use_distributed_sampler=False, **ONE_EPOCH)
    assert _params(model) == _params(_module())
    rows = model.model.features[0].weight.flatten(1).abs().sum(1)
    assert int((rows == 0).sum()) == 8  # half of the first conv's 16 channels
