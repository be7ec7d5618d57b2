"""``lp.restore_run`` compresses a baseline's run as the end of training would: the plugin's callbacks take
part through the methods of lightning-prune's channel base (``compress_for_deployment``), no class named."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_prune as lp
from lightning_prune.testing import fit_tiny, tiny_classifier
from lightning_prune_baselines import FirstKChannels, RandomChannels

FIT = {"max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 1}


def _params(module):
    return sum(p.numel() for p in module.parameters())


def _fit(tmp_path, make):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", save_top_k=1)
    _, model = fit_tiny([make(), saver], tmp_path / "fit", **FIT)
    return model.eval(), tmp_path / "ckpt" / "last.ckpt"


def _same(a, b):
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    return ya.shape == yb.shape and torch.allclose(ya, yb, atol=1e-5, rtol=1e-4)


def test_a_baseline_compressed_at_the_end_is_compressed_on_restore(tmp_path):
    def make():  # the units are removed at the end of training: the last checkpoint is from before
        return FirstKChannels(0.5, prune_step=1, compress=True, compress_step=1.0, verbose=False)

    trained, ckpt = _fit(tmp_path, make)
    state = next(iter(torch.load(ckpt, weights_only=False)["callbacks"].values()))
    assert state["shrink"]["removed"] is None and state["keep"] is not None
    run = lp.restore_run(ckpt, tiny_classifier(), [make()])
    try:
        assert [s.split(" ")[0] for s in run.steps] == ["restored", "compressed:"]
        assert _params(run.module) == _params(trained) < 0.7 * _params(tiny_classifier())
        assert _same(trained, run.module)
    finally:
        run.close()


def test_a_masked_baseline_compresses_with_its_own_plan_when_asked(tmp_path):
    def make():  # masks only (compress=False): restore_run(compress=True) removes exactly the kept-out units
        return RandomChannels(0.5, seed=3, verbose=False)

    trained, ckpt = _fit(tmp_path, make)
    callback = make()
    run = lp.restore_run(ckpt, tiny_classifier(), [callback], compress=True)
    try:
        assert callback.shrink.removed == callback.removed_units()
        assert sum(len(v) for v in callback.shrink.removed.values()) > 0
        assert _params(run.module) < 0.7 * _params(tiny_classifier())
        assert _same(trained, run.module)
    finally:
        run.close()
    masked_only = lp.restore_run(ckpt, tiny_classifier(), [make()])  # as configured: no compression
    assert _params(masked_only.module) == _params(tiny_classifier())
    masked_only.close()
