"""Shrink while training: compression inside the fit, the optimizer carried over, resume, DDP, logging."""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_prune as lp
from lightning_prune.callbacks.group_lasso import GroupLassoPruning
from lightning_prune.callbacks.shrink import check_strategy
from lightning_prune.graph import slice_units
from lightning_prune.testing import (
    assert_state_equal,
    check_callback_conformance,
    check_mid_epoch_resume,
    fit_tiny,
    tiny_classifier,
    tiny_datamodule,
)
from tests.helpers import Spy, eval_logits

FAST = {"max_epochs": 4, "limit_train_batches": 4, "limit_val_batches": 1}
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
# gates close within two epochs; the units are decided at step 8 (the end of epoch 1)
# (the last stage of each family is shielded, so that the model keeps a real width)
SHIELD = {"*layer4*": 0.0, "*blocks.4*": 0.0, "*blocks.5*": 0.0, "*conv1.*": 0.0}
STRONG = {"lam": 0.3, "gate_lr": 0.2, "capture_threshold": 0.02, "prune_threshold": 0.3, "finalize_step": 8,
          "round_to": 1, "group_lam": SHIELD, "verbose": False}


# equal up to float64 rounding (float32 would part by ~1e-4 after a few steps, differently on every CPU)
EXACT64 = {"atol": 1e-10, "rtol": 1e-8}


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


#: momentum through a convnet's channels and Adam's moments through a ViT's heads and qkv; every optimizer's
#: state on the kept units: tests/callbacks/test_shrink.py::test_every_optimizer_state_follows_the_kept_units;
#: the other two pairs run with -m slow
@pytest.mark.parametrize(("name", "optimizer"), [
    ("test_resnet", "sgd"), ("test_vit", "adamw"),
    pytest.param("test_resnet", "adamw", marks=pytest.mark.slow),
    pytest.param("test_vit", "sgd", marks=pytest.mark.slow),
])
def test_training_after_compression_equals_the_masked_model(name, optimizer, tmp_path):
    """Same seed, same data: the fit that compresses right after finalisation and trains on the small model
    ends where the masked, uncompressed fit ends (compressed the same way afterwards) -- momentum / Adam
    moments went with the kept channels. In float64: the claim is exactness, and float32 trajectories part
    by 1e-4 after a few steps on another CPU's kernels."""
    kwargs = {"optimizer": optimizer, "lr": 0.05 if optimizer == "sgd" else 3e-3, "momentum": 0.9,
              "weight_decay": 1e-3}
    sizes = []
    pl.seed_everything(0, verbose=False)
    small = tiny_classifier(name, **kwargs)
    shrinking = GroupLassoPruning(compress=True, **STRONG)
    fit_tiny([shrinking, Spy(lambda t, m, h: sizes.append(_params(m)), ("on_train_batch_start",))],
             tmp_path / "a", model=small, precision="64-true", **FAST)
    pl.seed_everything(0, verbose=False)
    masked = tiny_classifier(name, **kwargs)
    reference = GroupLassoPruning(**STRONG)
    fit_tiny([reference], tmp_path / "b", model=masked, precision="64-true", **FAST)
    # shrank at step 8
    assert sizes[:8] == [sizes[0]] * 8 and sizes[8] < 0.8 * sizes[0] and sizes[-1] == sizes[8]
    assert shrinking.shrink.removed == {g.name: (~k).nonzero().flatten().tolist()
                                        for g, k in zip(reference.groups, reference.keep)}
    reference.gateset.restrict_norms(masked, reference.keep)
    expected = eval_logits(masked, X.double())
    slice_units(masked, reference.groups, shrinking.shrink.removed)
    reference.gateset.release_norms()
    state = small.state_dict()
    for key, value in masked.state_dict().items():
        # the k part of a qkv bias has a zero gradient (softmax is shift-invariant): Adam turns its float
        # noise into lr-sized steps in both runs alike, so it is compared through the outputs only
        if value.is_floating_point() and not (optimizer == "adamw" and key.endswith("attn.qkv.bias")):
            torch.testing.assert_close(state[key], value, **EXACT64, msg=lambda m, key=key: f"{key}: {m}")
    torch.testing.assert_close(eval_logits(small, X.double()), expected, **EXACT64)


def test_compress_step_later_logs_absolute_size_and_shows_params_in_the_progress_bar(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    seen = {}
    cb = GroupLassoPruning(compress=True, compress_step=11, **STRONG)
    model = tiny_classifier()
    dense = _params(model)

    def spy(trainer, module, hook):
        seen[trainer.global_step] = (_params(module), trainer.progress_bar_metrics.get("prune/params"))

    fit_tiny([cb, Spy(spy, ("on_train_batch_end",))], tmp_path, model=model, logger=logger,
             log_every_n_steps=1, **FAST)
    assert all(n == dense for step, (n, _) in seen.items() if step < 11)
    assert all(n < dense for step, (n, _) in seen.items() if step >= 11)
    # the progress bar: the parameter count at that batch
    assert seen[12][1] == pytest.approx(float(seen[11][0]))
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("prune/params")]
    assert len(rows) == 1 and int(rows[0]["step"]) == 11
    assert float(rows[0]["prune/params"]) == pytest.approx(_params(model.model))
    assert float(rows[0]["prune/flops"]) > 0


def test_checkpoint_after_compression_resumes_onto_a_fresh_module(tmp_path):
    """A checkpoint of the smaller model: a fresh module resumes from it to the uninterrupted run's weights
    and state (the callback takes the recorded shapes before Lightning loads the weights)."""
    state = check_callback_conformance(lambda: GroupLassoPruning(compress=True, **STRONG), tmp_path,
                                       max_epochs=4, resume_epoch=3, plain_model=False)
    assert state["shrink"]["removed"]


def test_a_checkpoint_after_compression_loads_for_inference(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = tiny_classifier()
    fit_tiny([GroupLassoPruning(compress=True, **STRONG), saver], tmp_path, model=model, **FAST)
    fresh = lp.load_compressed(tmp_path / "ckpt" / "last.ckpt", tiny_classifier())
    assert _params(fresh) == _params(model) < _params(tiny_classifier())
    torch.testing.assert_close(eval_logits(fresh, X), eval_logits(model, X))


#: a gate callback and a one-shot removal, both removing units inside the fit
COMPRESSING_CALLBACKS = pytest.mark.parametrize("make", [
    lambda: GroupLassoPruning(compress=True, **STRONG),
    lambda: lp.OneShotPruning("channels", target_flops=0.5, prune_step=2, calibration_batches=1,
                              verbose=False),
], ids=["group_lasso", "one_shot"])


def _no_pruning_callback_warning(record) -> None:
    texts = [str(w.message) for w in record]
    assert not [t for t in texts if "pruning state of" in t or "size mismatch" in t], texts


@COMPRESSING_CALLBACKS
def test_a_compressed_checkpoint_loads_in_trainer_test_validate_and_a_fit_onto_a_fresh_module(make, tmp_path):
    """``trainer.test(fresh_module, ckpt_path=...)`` of a checkpoint written after the units were removed
    inside the fit: with or without the pruning callback in the Trainer, the fresh module takes the smaller
    shapes before Lightning loads the weights (no size mismatch), and tests as the trained model; a fit from
    it without the callback goes on training the smaller model."""
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = tiny_classifier()
    fit_tiny([make(), saver], tmp_path, model=model, **FAST)
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    data = tiny_datamodule()
    options = {"logger": False, "enable_progress_bar": False, "default_root_dir": str(tmp_path)}
    expected = pl.Trainer(**options).test(model, datamodule=data, verbose=False)[0]["test/acc"]
    for callbacks in ([], [make()]):
        fresh = tiny_classifier()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            got = pl.Trainer(callbacks=callbacks, **options).test(fresh, datamodule=data, ckpt_path=ckpt,
                                                                   verbose=False)
            pl.Trainer(callbacks=callbacks, **options).validate(fresh, datamodule=data, ckpt_path=ckpt,
                                                                verbose=False)
        _no_pruning_callback_warning(record)
        assert _params(fresh) == _params(model) < _params(tiny_classifier())
        assert got[0]["test/acc"] == pytest.approx(expected)
    fresh = tiny_classifier()
    fit_tiny([], tmp_path / "plain", model=fresh, ckpt_path=ckpt, **{**FAST, "max_epochs": 5})
    assert _params(fresh) == _params(model)


@COMPRESSING_CALLBACKS
def test_the_trainer_that_compressed_a_module_tests_a_fresh_one_from_the_checkpoint(make, tmp_path):
    """The Trainer (and callback) of the fit that removed the units takes a *different* fresh module in
    ``trainer.test(fresh, ckpt_path=...)``: the callback leaves the module it compressed and starts again as
    constructed, so the fresh module takes the checkpoint's smaller shapes and tests as the trained model;
    back on the first module, the callback tests it as it is."""
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model, data = tiny_classifier(), tiny_datamodule()
    trainer = pl.Trainer(callbacks=[make(), saver], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), **FAST)
    trainer.fit(model, datamodule=data)
    expected = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
    fresh = tiny_classifier()
    got = trainer.test(fresh, datamodule=data, ckpt_path=tmp_path / "ckpt" / "last.ckpt", verbose=False)
    assert _params(fresh) == _params(model) < _params(tiny_classifier())
    assert got[0]["test/acc"] == pytest.approx(expected)
    assert trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"] == pytest.approx(expected)


@pytest.mark.slow
def test_a_compressed_checkpoint_loads_in_trainer_test_under_ddp_spawn(tmp_path):
    """The same as above on two spawned processes: each worker's fresh module takes the checkpoint's
    smaller shapes (the callback's resume, or the module's own without it) and the ranks test the trained
    model."""
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = tiny_classifier()
    fit_tiny([GroupLassoPruning(compress=True, **STRONG), saver], tmp_path, model=model, **FAST)
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    data = tiny_datamodule()
    options = {"logger": False, "enable_progress_bar": False, "default_root_dir": str(tmp_path),
               "accelerator": "cpu"}
    expected = pl.Trainer(**options).test(model, datamodule=data, verbose=False)[0]["test/loss"]
    for callbacks in ([], [GroupLassoPruning(compress=True, **STRONG)]):
        got = pl.Trainer(callbacks=callbacks, strategy="ddp_spawn", devices=2, **options).test(
            tiny_classifier(), datamodule=data, ckpt_path=ckpt, verbose=False)
        assert got[0]["test/loss"] == pytest.approx(expected, rel=1e-4)  # (both halves of the test set)


def test_the_optimizer_holds_the_new_parameters(tmp_path):
    def check(trainer, module, hook):
        if cb.shrink.removed is not None:
            held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            assert held == {id(p) for p in module.parameters()}
            for p, st in trainer.optimizers[0].state.items():
                assert st["momentum_buffer"].shape == p.shape

    cb = GroupLassoPruning(compress=True, **STRONG)
    model = tiny_classifier(momentum=0.9)
    fit_tiny([cb, Spy(check, ("on_train_batch_end",))], tmp_path, model=model, **FAST)
    assert cb.shrink.removed


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"compress_step": 10}, r"`compress_step`/`compress_epoch` of GroupLassoPruning need `compress=True`"),
    ({"compress": True, "compress_step": 10, "compress_epoch": 1}, r"Pass only one of `compress_step`"),
    ({"compress": True, "compress_step": -2}, r"`compress_step` must be optimizer steps"),
    ({"compress": 1}, r"`compress` must be True or False"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        GroupLassoPruning(**kwargs)


def test_compressing_before_finalisation_is_refused(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"resolves to step 2, before finalisation at step 8"):
        fit_tiny([GroupLassoPruning(compress=True, compress_step=2, **STRONG)], tmp_path, **FAST)


def test_sharded_strategies_are_refused_with_their_name():
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    for strategy in (FSDPStrategy, DeepSpeedStrategy):
        fake = SimpleNamespace(strategy=strategy.__new__(strategy))
        with pytest.raises(MisconfigurationException, match=f"under {strategy.__name__}"):
            check_strategy(fake, "GroupLassoPruning")


def _rank_dump(trainer, module, hook):
    out = Path(os.environ["LP_TEST_DDP_DIR"]) / f"rank{trainer.global_rank}.pt"
    # (BN statistics are rank-local)
    torch.save({k: v.detach().cpu() for k, v in module.named_parameters()}, out)


@pytest.mark.slow
def test_ddp_compresses_on_every_rank_and_keeps_synchronising(tmp_path, monkeypatch):
    monkeypatch.setenv("LP_TEST_DDP_DIR", str(tmp_path))
    cb = GroupLassoPruning(compress=True, **STRONG)
    fit_tiny([cb, Spy(_rank_dump, ("on_train_end",))], tmp_path, strategy="ddp_spawn", devices=2,
             model=tiny_classifier(momentum=0.9), max_epochs=3, limit_train_batches=4, limit_val_batches=0)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    dense = dict(tiny_classifier().named_parameters())
    assert any(r0[k].shape != dense[k].shape for k in r0)  # compressed
    assert_state_equal(r0, r1)  # identical after 8 further synchronised steps
    assert cb.shrink.removed is None  # (the main process's copy of the callback never ran: spawn)


OPTIMIZERS = {
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=3e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.05),
    # (centered=True divides by a variance that cancels to ~0 over a few steps:
    # float noise, not a slicing error)
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
    "nadam": lambda p: torch.optim.NAdam(p, lr=3e-3),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_every_optimizer_state_follows_the_kept_units(optimizer):
    """Masked for 4 steps vs masked for 2, compressed (carry_optimizer_state), 2 more: the same weights,
    whatever state the optimizer keeps (momentum, exp_avg/exp_avg_sq, square_avg/grad_avg, sum, step
    counts). In float64 (an exactness claim; float32 parts by 3e-4 on some CPUs' kernels)."""
    import timm

    from lightning_prune.callbacks.shrink import carry_optimizer_state
    from lightning_prune.core.gates import unit_masks
    from lightning_prune.core.masks import MaskSet
    from lightning_prune.graph import analyse_channels, parameter_cuts

    data = [(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i), dtype=torch.float64),
             torch.tensor([0, 1, 2, 3]))
            for i in range(4)]

    def run(compress_after: int | None):
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=4).double()
        groups = analyse_channels(model, data[0][0]).groups
        removed = {g.name: list(range(g.size // 2)) for g in groups}
        keep = [torch.arange(g.size) >= g.size // 2 for g in groups]
        masks = MaskSet()
        for name, mask in unit_masks(model, groups, keep).items():
            masks.add(name, model.get_parameter(name), mask)
        masks.apply_()
        opt = OPTIMIZERS[optimizer](model.parameters())
        for step, (x, y) in enumerate(data):
            if step == compress_after:
                old = {id(p): n for n, p in model.named_parameters()}
                cuts = parameter_cuts(model, groups, removed)
                slice_units(model, groups, removed)
                carry_optimizer_state([opt], old, dict(model.named_parameters()), cuts)
                masks = None
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if masks is not None:
                masks.apply_()
        return model, opt, groups, removed

    masked, _, groups, removed = run(None)
    small, opt, _, _ = run(2)
    slice_units(masked, groups, removed)
    for key, value in masked.state_dict().items():
        torch.testing.assert_close(small.state_dict()[key], value, **EXACT64,
                                   msg=lambda m, key=key: f"{key}: {m}")
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in small.parameters()}
    # every state tensor has the new parameter's shape (step counts and NAdam's mu_product kept)
    for p in held:
        for key, value in opt.state[p].items():
            assert value.ndim == 0 or value.shape == p.shape, (key, tuple(value.shape), tuple(p.shape))


def test_a_model_in_another_dtype_is_traced_and_measured_in_its_dtype(tmp_path):
    """precision="64-true" (like "bf16-true" on a GPU) converts the model after the callbacks' setup: the
    example inputs of the analysis, the size measurement and the compression follow the model's dtype."""
    cb = GroupLassoPruning(compress=True, target_flops=0.5, **{k: v for k, v in STRONG.items() if k != "lam"})
    _, model = fit_tiny([cb], tmp_path, model=tiny_classifier(), precision="64-true", **FAST)
    assert cb.shrink.removed and next(model.parameters()).dtype == torch.float64
    assert _params(model) < _params(tiny_classifier())


# ------------------------------------------------------------------------ a mask callback beside the removal
def _beside(compress_at: int = 4):
    """GradualMagnitudePruning (masks final at step 2) beside GroupLassoPruning removing units at step 4."""
    gmp = lp.GradualMagnitudePruning(target_sparsity=0.5, every_n_steps=1, sparsity_end_step=2, verbose=False)
    gl = GroupLassoPruning(compress=True, lam=0.05, gate_lr=1.0, target_flops=0.5, round_to=1,
                           finalize_step=compress_at, verbose=False)
    return gmp, gl


class _MasksBefore(pl.Callback):
    """The other callback's masks after step 3 (the last step before the removal)."""

    def __init__(self, gmp):
        self.gmp, self.before = gmp, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            self.before = self.gmp.masks.state_dict()


def _assert_masks_follow(gmp, module, before, after=None):
    after = after if after is not None else gmp.masks.state_dict()
    params = dict(module.named_parameters())
    shrunk = 0
    for name, mask in after.items():
        live = params[name]
        assert gmp.masks.param(name) is live and mask.shape == live.shape, name  # bound to the live weights
        assert torch.all(live.detach()[~mask] == 0), name  # the pruned weights stay pruned
        shrunk += mask.shape != before[name].shape
        assert 0 < int((~mask).sum()) <= int((~before[name]).sum()), name  # cut, not reset
    assert shrunk > 3


def test_a_mask_callback_beside_an_in_fit_removal_cuts_its_masks(tmp_path):
    """GradualMagnitudePruning beside GroupLassoPruning(compress=True): after the removal at step 4 its masks
    are its step-3 masks cut like the parameters, bound to the compressed weights and applied (before: they
    kept the dense shapes on the old parameters, and the compressed weights trained on unmasked: 0% zeros)."""
    gmp, gl = _beside()
    probe = _MasksBefore(gmp)
    _, model = fit_tiny([gmp, gl, probe], tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=0)
    assert gl.shrink.removed and any(gl.shrink.removed.values())
    _assert_masks_follow(gmp, model, probe.before)


def test_a_mask_callback_resumes_mid_epoch_after_an_in_fit_removal(tmp_path):
    """The checkpoint of step 6 (after the removal at step 4) holds the cut masks; the resumed fit takes the
    smaller shapes first, the other callback follows them, then loads its masks: the uninterrupted run."""
    check_mid_epoch_resume(lambda: _beside(), tmp_path, max_epochs=2, resume_step=6)


def _beside_one_shot():
    """GradualMagnitudePruning (masks final at step 2) beside OneShotPruning('channels') removing units at
    step 4."""
    gmp = lp.GradualMagnitudePruning(target_sparsity=0.5, every_n_steps=1, sparsity_end_step=2, verbose=False)
    one_shot = lp.OneShotPruning("channels", target_flops=0.5, prune_step=4, calibration_batches=1,
                                 verbose=False)
    return gmp, one_shot


def test_a_mask_callback_beside_a_one_shot_channel_removal_cuts_its_masks(tmp_path):
    """OneShotPruning('channels') removes units inside the fit as GroupLassoPruning(compress=True) does: the
    other mask callbacks cut their masks like the parameters (before: they kept the dense masks,
    unapplied)."""
    gmp, one_shot = _beside_one_shot()
    probe = _MasksBefore(gmp)
    _, model = fit_tiny([gmp, one_shot, probe], tmp_path, max_epochs=2, limit_train_batches=4,
                        limit_val_batches=0)
    assert one_shot.shrink.removed and any(one_shot.shrink.removed.values())
    _assert_masks_follow(gmp, model, probe.before)


def test_a_mask_callback_resumes_mid_epoch_after_a_one_shot_channel_removal(tmp_path):
    check_mid_epoch_resume(_beside_one_shot, tmp_path, max_epochs=2, resume_step=6)


def test_a_one_shot_channel_removal_refuses_what_cannot_follow_it(tmp_path):
    """The same refusals as GroupLassoPruning(compress=True)'s, at the one-shot callback's setup, by name."""
    with pytest.raises(MisconfigurationException, match=r"OneShotPruning\(method='channels'\) cannot share a"
                       r" fit with LotteryTicket: .*its rewind snapshot.*HINT: Run them in separate fits"):
        fit_tiny([lp.LotteryTicket(), lp.OneShotPruning("channels", target_flops=0.5)], tmp_path,
                 max_epochs=3, limit_train_batches=1, limit_val_batches=0)


def _validate_then_fit(callbacks, root, max_epochs=1):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(callbacks=callbacks, accelerator="cpu", devices=1, max_epochs=max_epochs,
                         limit_train_batches=1, limit_val_batches=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                         num_sanity_val_steps=0)
    model, data = tiny_classifier(), tiny_datamodule(limit=160)
    trainer.validate(model, datamodule=data, verbose=False)
    trainer.fit(model, datamodule=data)
    return trainer


def test_a_fit_after_a_validate_still_refuses_what_cannot_follow_the_one_shot_removal(tmp_path):
    """The groups found at setup('validate') are kept; the fit's setup still runs the fit-only checks (before:
    it returned early on the cached groups, and the fit failed later with a raw shape error)."""
    with pytest.raises(MisconfigurationException, match=r"OneShotPruning\(method='channels'\) cannot share a"
                       r" fit with LotteryTicket"):
        _validate_then_fit([lp.LotteryTicket(), lp.OneShotPruning("channels", target_flops=0.5,
                                                                  calibration_batches=1, verbose=False)],
                           tmp_path, max_epochs=3)


def test_a_fit_after_a_validate_prunes_and_installs_its_resume(tmp_path):
    one_shot = lp.OneShotPruning("channels", target_flops=0.5, calibration_batches=1, verbose=False)
    trainer = _validate_then_fit([one_shot], tmp_path)
    assert one_shot.shrink.removed and any(one_shot.shrink.removed.values())
    assert one_shot.state_key in getattr(trainer.strategy, "_lightning_prune_resume", {})


class _PluginMasks(lp.PruningCallback):
    """A third-party pruning callback: it has not said that its state survives a cut (follows_removal)."""


@pytest.mark.parametrize("case, other, why", [
    ("lottery", "LotteryTicket", r"its rewind snapshot"),
    ("random_channels", "RandomChannels", r"its channel groups and kept units"),
    ("one_shot_channels", "OneShotPruning", r"method='channels' removes units too"),
    ("magnitude_nm", "GradualMagnitudePruning",
     r"pattern='2:4' groups every 4 consecutive weights along the input dimension, which the cut shifts \(the"
     r" cut masks would no longer be N:M\)"),
    ("magnitude_block", "GradualMagnitudePruning", r"block_size=\(2, 2\) masks whole blocks, which the cut"
     r" shifts"),
    ("one_shot_nm", "OneShotPruning", r"pattern='2:4' groups consecutive weights .*no longer be N:M"),
    ("plugin", "_PluginMasks", r"it does not say that it can follow the removal .*HINT: compress=False .*"
     r"if _PluginMasks's masks stay right when cut like the parameters .*set `follows_removal = True` on it"),
])
def test_callbacks_that_cannot_follow_a_removal_are_refused_at_setup(case, other, why):
    """Following a removal is opt-in (PruningCallback.follows_removal): the callbacks whose state the cut
    would break (N:M groups and blocks shift along the cut dims) and every callback that has not said so
    (a plugin) are refused by name, with the reason and what to do."""
    from lightning_prune_baselines import RandomChannels, RandomUnstructured

    made = {"lottery": lambda: lp.LotteryTicket(), "random_channels": lambda: RandomChannels(),
            "one_shot_channels": lambda: lp.OneShotPruning("channels", target_flops=0.5),
            "magnitude_nm": lambda: lp.GradualMagnitudePruning(pattern="2:4"),
            "magnitude_block": lambda: lp.GradualMagnitudePruning(block_size=(2, 2)),
            "one_shot_nm": lambda: lp.OneShotPruning("wanda", pattern="2:4"),
            "plugin": lambda: _PluginMasks()}[case]()
    cb = GroupLassoPruning(compress=True, target_flops=0.5)
    trainer = SimpleNamespace(strategy=type("DDPStrategy", (), {})(), callbacks=[made, cb])
    with pytest.raises(MisconfigurationException, match=rf"GroupLassoPruning\(compress=True\) cannot share a"
                       rf" fit with {other}: the units removed inside the fit .*{why}"):
        cb._refuse_stale_holders(trainer)
    trainer.callbacks = [lp.GradualMagnitudePruning(), lp.OneShotPruning("wanda"), RandomUnstructured(), cb]
    cb._refuse_stale_holders(trainer)  # (they cut their masks)


def _masks_dump(trainer, module, hook):
    gmp = trainer.callbacks[0]
    out = Path(os.environ["LP_TEST_DDP_DIR"]) / f"rank{trainer.global_rank}.pt"
    torch.save({"masks": gmp.masks.state_dict(), "bound": all(gmp.masks.param(n) is module.get_parameter(n)
                                                                for n in gmp.masks),
                "params": {k: v.detach().cpu() for k, v in module.named_parameters()}}, out)


@pytest.mark.slow
def test_a_mask_callback_beside_an_in_fit_removal_under_ddp_agrees_on_every_rank(tmp_path, monkeypatch):
    """ddp_spawn on 2 ranks: after the removal, GradualMagnitudePruning's masks have the compressed shapes,
    are bound to the live weights and applied, and are the same on both ranks."""
    monkeypatch.setenv("LP_TEST_DDP_DIR", str(tmp_path))
    gmp, gl = _beside()
    fit_tiny([gmp, gl, Spy(_masks_dump, ("on_train_end",))], tmp_path, strategy="ddp_spawn", devices=2,
             max_epochs=2, limit_train_batches=4, limit_val_batches=0)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["bound"] and r1["bound"]
    assert_state_equal(r0["masks"], r1["masks"])
    dense = dict(tiny_classifier().named_parameters())
    assert sum(r0["params"][n].shape != dense[n].shape for n in r0["masks"]) > 3  # compressed
    for name, mask in r0["masks"].items():
        assert mask.shape == r0["params"][name].shape, name
        assert torch.all(r0["params"][name][~mask] == 0) and torch.all(r1["params"][name][~mask] == 0), name
        assert int((~mask).sum()) > 0, name


def test_the_in_fit_compression_returns_the_cuts_it_made_and_refuses_a_plan_it_did_not_make():
    """The masks and the optimizer state are cut with the cuts of the plan the compression applied
    (compress_exactly, round_to=1), checked against the new shapes: a compression that rounds the plan is a
    clear error at the removal, not a shape ValueError in a mask callback afterwards."""
    from lightning_prune.callbacks.shrink import compress_exactly
    from lightning_prune.core.compression import compress
    from lightning_prune.graph import analyse_channels

    def make():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        with torch.no_grad():  # the units to remove dead (as the callback's masks leave them)
            net[0].weight[[1, 4, 9]] = 0
            net[0].bias[[1, 4, 9]] = 0
        return net

    x = torch.randn(2, 6)
    model = make()
    groups = analyse_channels(model, x).groups
    removed = {groups[0].name: [1, 4, 9]}
    cuts = compress_exactly(model, groups, removed, x)
    assert model[0].weight.shape == (13, 6) and model[2].weight.shape == (3, 13)
    kept = [u for u in range(16) if u not in (1, 4, 9)]
    assert [(d, k.tolist()) for d, k in cuts["2.weight"]] == [(1, kept)]
    rounding = lambda *args, **kwargs: compress(*args, **{**kwargs, "round_to": 8})  # noqa: E731 - keeps 16
    with pytest.raises(RuntimeError, match=r"cut '0.weight' from \(16, 6\) to \(16, 6\), not to \(13, 6\)"):
        compress_exactly(make(), groups, removed, x, compress=rounding)
