"""ActivationDecay: λ schedule, wrapping, logging, resume, DDP, fusion at train end, bad input."""

import copy
import csv
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

import lightning_prune as lp
from lightning_prune.callbacks.activation_decay import ActivationDecay, decay_lambda
from lightning_prune.core.reparam import DecayingActivation
from lightning_prune.testing import check_callback_conformance, fit_tiny, tiny_classifier, tiny_datamodule

FIT = {"limit_train_batches": 4, "limit_val_batches": 1}


class LambdaProbe(pl.Callback):
    """Records, before every training batch, λ on the callback and on every wrapper in the model."""

    def __init__(self, decay):
        self.decay, self.seen = decay, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        wrappers = {m.lam for m in pl_module.modules() if isinstance(m, DecayingActivation)}
        assert wrappers == {self.decay.lam}, (wrappers, self.decay.lam)
        self.seen.append((trainer.global_step, trainer.current_epoch, self.decay.lam))


# ------------------------------------------------------------------ schedule oracles
def test_decay_lambda_oracles():
    # VanillaNet: λ = epoch / decay_epochs (linear) or 0.5 (1 - cos(π epoch / decay_epochs)); 1 afterwards
    for epoch in range(0, 130, 7):
        assert decay_lambda(epoch, 0, 100) == pytest.approx(min(epoch / 100, 1.0))
        cos = 0.5 * (1 - math.cos(math.pi * epoch / 100)) if epoch <= 100 else 1.0
        assert decay_lambda(epoch, 0, 100, "cosine") == pytest.approx(cos)
    # ReduceNet: a = 0.5 (1 + cos(π iter / total)) multiplies the ReLU, so λ = 1 - a
    for it in range(0, 1000, 37):
        assert decay_lambda(it, 0, 1000, "cosine") == pytest.approx(
            1 - 0.5 * (1 + math.cos(math.pi * it / 1000)))
    assert (decay_lambda(5, 10, 20) == 0.0 and decay_lambda(15, 10, 20) == 0.5
            and decay_lambda(10, 10, 10) == 1.0)


# ------------------------------------------------------------------ conformance and resume
def test_conformance_no_arguments(tmp_path):
    state = check_callback_conformance(lambda: lp.create_callback("activation_decay"), tmp_path)
    assert state["decayed"] == ["model.layer3.0.act2"] and state["lam"] == 1.0


def test_conformance_reducenet_per_epoch_cosine_resumes_mid_schedule(tmp_path):
    make = lambda: ActivationDecay(end_epoch=2, schedule="cosine", every_n_epochs=1, verbose=False)  # noqa: E731
    # the checkpoint of epoch 1 holds λ = 0.5; the resumed run must continue to the same weights and λ = 1
    state = check_callback_conformance(make, tmp_path, model_name="reducenet_20", max_epochs=3,
                                       resume_epoch=2)
    assert len(state["decayed"]) == 9 and state["lam"] == 1.0


def test_resume_restores_lambda_exactly(tmp_path):
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1,
                                         filename="{epoch}")
    first = ActivationDecay(end_step=1.0, schedule="cosine", verbose=False)
    fit_tiny([first, saver], tmp_path / "a", max_epochs=2, **FIT)
    saved = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=False)["callbacks"][first.state_key]
    assert 0.0 < saved["lam"] < 1.0
    assert saved["lam"] == decay_lambda(3, 0, 8, "cosine")  # last batch of epoch 0 ran at step 3 of 8

    resumed = ActivationDecay(end_step=1.0, schedule="cosine", verbose=False)
    model = tiny_classifier()
    resumed.setup(None, model, "fit")
    resumed.load_state_dict(saved)
    assert resumed.lam == saved["lam"]
    assert {m.lam for m in model.modules() if isinstance(m, DecayingActivation)} == {saved["lam"]}
    probe = LambdaProbe(resumed)
    fit_tiny([resumed, probe], tmp_path / "b", model=tiny_classifier(), max_epochs=2,
             ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt", **FIT)
    assert [s for s, _, _ in probe.seen] == [4, 5, 6, 7]
    assert [lam for *_, lam in probe.seen] == [decay_lambda(s, 0, 8, "cosine") for s in range(4, 8)]


# ------------------------------------------------------------------ schedule in real training
def test_per_step_schedule_is_applied_and_logged(tmp_path):
    decay = ActivationDecay(begin_step=0.25, end_step=0.75, verbose=False)
    probe = LambdaProbe(decay)
    logger = CSVLogger(tmp_path, name="run")
    fit_tiny([decay, probe], tmp_path, max_epochs=4, logger=logger, log_every_n_steps=1, **FIT)
    lams = [lam for *_, lam in probe.seen]
    assert lams == [decay_lambda(s, 4, 12) for s in range(16)]
    assert lams[0] == 0.0 and lams[-1] == 1.0 and lams == sorted(lams)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = [(int(r["step"]), float(r["prune/lambda"])) for r in rows if r.get("prune/lambda")]
    assert logged and all(lam == decay_lambda(step, 4, 12) for step, lam in logged)
    assert logged[-1][1] == 1.0


def test_schedule_under_bf16_mixed_precision(tmp_path):
    """The CIFAR-10 recipe's precision on a CPU (its 16-mixed on a GPU): λ follows the same schedule to 1,
    and the weights stay float32 and finite under autocast."""
    decay = ActivationDecay(begin_step=0.25, end_step=0.75, verbose=False)
    probe = LambdaProbe(decay)
    _, model = fit_tiny([decay, probe], tmp_path, max_epochs=2, precision="bf16-mixed",
                        limit_train_batches=2, limit_val_batches=1)
    assert [lam for *_, lam in probe.seen] == [decay_lambda(s, 1, 3) for s in range(4)]
    assert decay.lam == 1.0
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_per_epoch_schedule_on_vit(tmp_path):
    decay = ActivationDecay(begin_epoch=1, end_epoch=3, every_n_epochs=1, verbose=False)
    probe = LambdaProbe(decay)
    fit_tiny([decay, probe], tmp_path, model=tiny_classifier("test_vit"), max_epochs=4, **FIT)
    by_epoch = {epoch: lam for _, epoch, lam in probe.seen}
    assert by_epoch == {0: 0.0, 1: 0.0, 2: 0.5, 3: 1.0}
    assert len(decay.decayed) == 6 and all(n.endswith("mlp.act") for n in decay.decayed)


def test_lambda_changes_the_forward_pass():
    model = tiny_classifier("test_efficientnet").eval()
    decay = ActivationDecay(verbose=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        decay.setup(None, model, "fit")
        assert torch.equal(model(x), ref)  # λ = 0 is the original network
        decay._apply(0.5)
        assert not torch.allclose(model(x), ref)


# ------------------------------------------------------------------ fusion at train end
@pytest.mark.parametrize("name", ["reducenet_20", "test_efficientnet"])
def test_fuse_on_train_end_gives_the_same_outputs(tmp_path, name):
    class Snapshot(pl.Callback):
        def on_train_end(self, trainer, pl_module):  # runs before ActivationDecay fuses (listed first)
            self.model = copy.deepcopy(pl_module).eval()

    snap = Snapshot()
    decay = ActivationDecay(end_step=0.5, fuse_on_train_end=True, verbose=False)
    trainer, model = fit_tiny([snap, decay], tmp_path, model=tiny_classifier(name), max_epochs=2, **FIT)
    assert not any(isinstance(m, DecayingActivation) for m in model.modules())
    # the fused model tests, nothing re-wrapped
    trainer.test(model, datamodule=tiny_datamodule(), verbose=False)
    assert not any(isinstance(m, DecayingActivation) for m in model.modules())
    convs = lambda m: sum(isinstance(x, nn.Conv2d) for x in m.modules())  # noqa: E731
    assert convs(model) < convs(snap.model)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref, out = snap.model(x), model.eval()(x)
    assert ((out - ref).abs().amax(-1) / ref.abs().amax(-1)).max() <= 1e-4


def test_fuse_on_train_end_needs_lambda_to_reach_one(tmp_path):
    with pytest.raises(MisconfigurationException,
                       match=r"`fuse_on_train_end=True` but λ reaches 1 only at step 8,"
                             r" after the last update of λ \(step 7\)"):
        fit_tiny([ActivationDecay(end_step=1.0, fuse_on_train_end=True)], tmp_path, max_epochs=2, **FIT)


def test_training_stopped_before_lambda_is_one_is_not_fused():
    model = tiny_classifier()
    decay = ActivationDecay(fuse_on_train_end=True, verbose=False)
    decay.setup(None, model, "fit")
    decay._apply(0.5)
    with pytest.warns(UserWarning, match="NOT fused"):
        decay.on_train_end(None, model)
    assert any(isinstance(m, DecayingActivation) for m in model.modules())


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,match", [
    ({"begin_step": -1}, r"`begin_step` must be optimizer steps \(an int >= 0\) or a fraction of training"
                         r" \(a float in \[0, 1\]\) or None, got -1"),
    ({"begin_epoch": -1}, r"`begin_epoch` must be epochs \(an int >= 0\) or a fraction of training"),
    ({"end_step": 1.5}, r"`end_step` must be .* got 1.5\. HINT"),
    ({"end_step": "half"}, r"`end_step` must be .* got 'half'"),
    ({"end_step": True}, r"`end_step` must be .* got True"),
    ({"end_epoch": float("nan")}, r"`end_epoch` must be .* got nan"),
    ({"begin_step": 5, "end_step": 2}, r"`end_step` \(2\) must not come before `begin_step` \(5\)"),
    ({"begin_epoch": 5, "end_epoch": 2}, r"`end_epoch` \(2\) must not come before `begin_epoch` \(5\)"),
    ({"end_step": 10, "end_epoch": 2},
     r"Pass only one of `end_step`, `end_epoch`; got `end_step`=10, `end_epoch`=2"),
    ({"every_n_steps": 1, "every_n_epochs": 1}, r"Pass only one of `every_n_steps`, `every_n_epochs`"),
    ({"every_n_epochs": 0}, r"`every_n_epochs` must be an integer >= 1, got 0"),
    ({"schedule": "exp"}, r"`schedule` must be one of \['linear', 'cosine'\], got 'exp'"),
    ({"fusable_only": "yes"}, r"`fusable_only` must be True or False, got 'yes'"),
    ({"include": [1]}, r"`include` must be a glob pattern"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        ActivationDecay(**kwargs)


def test_end_before_start_after_resolution(tmp_path):
    with pytest.raises(MisconfigurationException,
                       match=r"`end_step` \(0.25\) resolves to step 2, before `begin_epoch` \(1\) at step 4"):
        fit_tiny([ActivationDecay(begin_epoch=1, end_step=0.25, verbose=False)], tmp_path, max_epochs=2,
                 **FIT)


def test_checkpoint_with_another_selection_warns():
    decay = ActivationDecay(verbose=False)
    decay.decayed = ["model.layer3.0.act2"]
    with pytest.warns(UserWarning, match="the checkpoint decayed 2 activation"):
        decay.load_state_dict({"lam": 0.5, "decayed": ["a", "b"], "bounds": [0, 8]})
    assert decay.lam == 0.5 and decay._bounds == (0, 8)


def test_fractions_need_a_finite_training_length(tmp_path):
    with pytest.raises(MisconfigurationException,
                       match="`end_step`=0.75 is a fraction of training, but this Trainer has no end"):
        fit_tiny([ActivationDecay(verbose=False)], tmp_path, max_epochs=-1, **FIT)


def test_model_with_nothing_to_decay_is_an_error(tmp_path):
    with pytest.raises(MisconfigurationException,
                       match=r"found nothing to decay.*not between two fusable linear layers.*HINT"):
        fit_tiny([ActivationDecay()], tmp_path, model=tiny_classifier("reducenet_20_plain"), max_epochs=1,
                 **FIT)
    with pytest.raises(MisconfigurationException, match="found nothing to decay"):
        fit_tiny([ActivationDecay(include="no_such_act")], tmp_path, max_epochs=1, **FIT)


def test_plan_is_a_dry_run_on_class_and_instance():
    model = tiny_classifier()
    plan = ActivationDecay.plan(model)
    assert plan.decay == ["model.layer3.0.act2"]
    assert not any(isinstance(m, DecayingActivation) for m in model.modules())
    # include only narrows
    assert ActivationDecay(include="layer1.0.act1", verbose=False).plan(model).decay == []
    widened = ActivationDecay(include="layer1.0.act1", fusable_only=False, verbose=False)
    assert widened.plan(model).decay == ["model.layer1.0.act1"]


# ------------------------------------------------------------------ DDP
class _RankRecorder(pl.Callback):
    def __init__(self, decay, out_dir):
        self.decay, self.out_dir = decay, str(out_dir)

    def on_train_end(self, trainer, pl_module):
        wrappers = {n: m.lam for n, m in pl_module.named_modules() if isinstance(m, DecayingActivation)}
        state = {"lam": self.decay.lam, "wrappers": wrappers, "step": trainer.global_step,
                 "weight": pl_module.model.layer3[0].conv3.weight.sum().item()}
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(state))


@pytest.mark.slow
def test_ddp_spawn_ranks_agree(tmp_path):
    decay = ActivationDecay(end_step=0.5, verbose=False)
    fit_tiny([decay, _RankRecorder(decay, tmp_path)], tmp_path, strategy="ddp_spawn", devices=2, max_epochs=2,
             deterministic=False, **FIT)
    states = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert states[0] == states[1]
    assert states[0]["lam"] == 1.0 and states[0]["wrappers"] == {"model.layer3.0.act2": 1.0}


# ------------------------------------------------------------------ recipes
@pytest.mark.parametrize("recipe", ["digits", "cifar10"])
def test_recipes_build(recipe):
    import timm
    import yaml

    config = yaml.safe_load(open(Path(__file__).parents[2] / "recipes" / recipe / "activation_decay.yaml"))
    (cb,) = config["trainer"]["callbacks"]
    assert cb["class_path"] == "lightning_prune.ActivationDecay"
    decay = ActivationDecay(**cb["init_args"], verbose=False)
    assert decay.fuse_on_train_end and decay.schedule == "cosine"
    name = config["model"]["init_args"]["model_name"]
    assert timm.is_model(name)
    fusions = ActivationDecay.plan(timm.create_model(name, num_classes=10)).fusions
    assert len(fusions) == {"digits": 9, "cifar10": 27}[recipe]
