"""KnowledgeDistillation: the gradients of loss + alpha T² KL, teachers, windows, logs, resume, AMP, DDP."""

from __future__ import annotations

import copy
import csv
import pickle
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

import lightning_prune as lp
from lightning_prune.callbacks.distill import KnowledgeDistillation
from lightning_prune.testing import assert_state_equal, check_callback_conformance, fit_tiny, tiny_classifier
from lightning_prune.training.models import ImageClassifier
from tests.helpers import Spy

FAST = {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 0}
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))


class GradRecorder(pl.Callback):
    """The parameters' gradients (unscaled) right before every optimizer step."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                           if p.grad is not None})


class HandWritten(ImageClassifier):
    """The oracle: ``training_step`` returns ``cross_entropy + alpha T² KL (+ feature_alpha MSE)`` by hand."""

    def __init__(self, teacher, alpha, temperature, features=(), feature_alpha=1.0, **kwargs):
        super().__init__(**kwargs)
        self._teacher = [teacher]  # a list: not a submodule, not trained
        self.alpha, self.temperature, self.features, self.feature_alpha = alpha, temperature, features, \
            feature_alpha

    def training_step(self, batch, batch_idx):
        x, y = batch
        seen = {"s": {}, "t": {}}
        handles = [m.get_submodule(n).register_forward_hook(
            lambda mod, a, out, n=n, k=k: seen[k].__setitem__(n, out))
            for k, m in (("s", self.model), ("t", self._teacher[0])) for n in self.features]
        logits = self(x)
        with torch.no_grad():
            teacher = self._teacher[0](x)
        for h in handles:
            h.remove()
        t = self.temperature
        loss = F.cross_entropy(logits, y) + self.alpha * t**2 * F.kl_div(
            F.log_softmax(logits.float() / t, -1), F.softmax(teacher.float() / t, -1), reduction="batchmean")
        if self.features:
            hints = [F.mse_loss(seen["s"][n].float(), seen["t"][n].float()) for n in self.features]
            loss = loss + self.feature_alpha * sum(hints) / len(hints)
        return loss


def _oracle_grads(tmp_path, alpha, temperature, features=(), feature_alpha=1.0, fresh=dict, **trainer_kwargs):
    """Gradients of the same seeded fit (a) with the callback, (b) with the hand-written loss, (c) plain;
    ``fresh()`` gives Trainer arguments that must not be shared between the fits (precision plugins)."""
    pl.seed_everything(0)
    model = tiny_classifier()
    initial = copy.deepcopy(model.state_dict())
    teacher = copy.deepcopy(model.model).eval()
    with_cb = GradRecorder()
    fit_tiny([KnowledgeDistillation(alpha=alpha, temperature=temperature, features=list(features) or None,
                                    feature_alpha=feature_alpha, verbose=False), with_cb],
             tmp_path / "cb", model=model, **{**FAST, **trainer_kwargs, **fresh()})
    hand = HandWritten(teacher, alpha, temperature, features, feature_alpha, model_name="test_resnet",
                       num_classes=10, optimizer="sgd", lr=0.05, scheduler="none", weight_decay=0.0)
    hand.load_state_dict(initial)
    by_hand = GradRecorder()
    fit_tiny([by_hand], tmp_path / "hand", model=hand, **{**FAST, **trainer_kwargs, **fresh()})
    plain_model = tiny_classifier()
    plain_model.load_state_dict(initial)
    plain = GradRecorder()
    fit_tiny([plain], tmp_path / "plain", model=plain_model, **{**FAST, **trainer_kwargs, **fresh()})
    return with_cb.grads, by_hand.grads, plain.grads


def _max_rel(a, b):
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b)


# ------------------------------------------------------------------ the gradients are those of the loss
def test_gradients_equal_the_hand_written_loss(tmp_path):
    ours, hand, plain = _oracle_grads(tmp_path, alpha=0.7, temperature=3.0)
    assert len(ours) == len(hand) == 2 and set(ours[0]) == set(hand[0])
    for a, b, c in zip(ours, hand, plain):
        assert _max_rel(a, b) < 1e-4  # the second step too: the teacher stayed what it was
        assert _max_rel(c, b) > 1e-2  # and the term is not negligible: without it the gradients differ


def test_gradient_accumulation_scales_the_term_like_the_loss(tmp_path):
    ours, hand, plain = _oracle_grads(tmp_path, alpha=1.0, temperature=2.0, accumulate_grad_batches=2,
                                      limit_train_batches=4)
    assert len(ours) == len(hand) == 2
    for a, b, c in zip(ours, hand, plain):
        assert _max_rel(a, b) < 1e-4 and _max_rel(c, b) > 1e-2


def test_feature_hints_equal_the_hand_written_loss(tmp_path):
    ours, hand, _ = _oracle_grads(tmp_path, alpha=0.5, temperature=4.0, features=("layer2", "layer4"),
                                  feature_alpha=3.0)
    _, without_hints, _ = _oracle_grads(tmp_path / "nofeat", alpha=0.5, temperature=4.0)
    for a, b, c in zip(ours, hand, without_hints):
        assert _max_rel(a, b) < 1e-4 and _max_rel(c, b) > 1e-3


def test_bf16_mixed_matches_the_hand_written_loss(tmp_path):
    ours, hand, _ = _oracle_grads(tmp_path, alpha=1.0, temperature=4.0, precision="bf16-mixed")
    for a, b in zip(ours, hand):
        flat = [torch.cat([g[k].flatten() for k in b]) for g in (a, b)]
        cos = F.cosine_similarity(*flat, dim=0)
        assert _max_rel(a, b) < 0.05 and cos > 0.999


def test_the_amp_loss_scale_reaches_the_term(tmp_path):
    """16-mixed with a 2**12 loss scale: after unscaling, the gradients are those of the unscaled loss."""
    fresh = lambda: {"plugins": [MixedPrecision("16-mixed", "cpu",  # noqa: E731
                                                torch.amp.GradScaler("cpu", init_scale=2.0**12))]}
    ours, hand, plain = _oracle_grads(tmp_path, alpha=1.0, temperature=4.0, fresh=fresh)
    for a, b, c in zip(ours, hand, plain):  # a term 4096x too small would leave `ours` near `plain`
        assert _max_rel(a, b) < 1e-3 and _max_rel(c, b) > 1e-2


class ManualStep(ImageClassifier):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        self.manual_backward(F.cross_entropy(self(x), y))
        opt.step()


def test_manual_optimisation(tmp_path):
    pl.seed_everything(0)
    kwargs = {"model_name": "test_resnet", "optimizer": "sgd", "lr": 0.05, "scheduler": "none",
              "weight_decay": 0.0}
    model = ManualStep(**kwargs)
    teacher = copy.deepcopy(model.model).eval()
    initial = copy.deepcopy(model.state_dict())
    ours = GradRecorder()
    fit_tiny([KnowledgeDistillation(verbose=False), ours], tmp_path / "a", model=model, **FAST)
    hand = HandWritten(teacher, 1.0, 4.0, **kwargs)
    hand.load_state_dict(initial)
    by_hand = GradRecorder()
    fit_tiny([by_hand], tmp_path / "b", model=hand, **FAST)
    for a, b in zip(ours.grads, by_hand.grads):
        assert _max_rel(a, b) < 1e-4


# ------------------------------------------------------------------ conformance, resume, state
def test_conformance_no_arguments(tmp_path):
    state = check_callback_conformance(lambda: lp.create_callback("distill"), tmp_path)
    assert state["teacher_source"] == "snapshot" and state["bounds"] == [0, None]
    fresh = tiny_classifier().model.state_dict()
    assert set(state["teacher"]) == set(fresh)  # the teacher is the student's architecture, saved whole


def test_conformance_on_vit_and_efficientnet_with_a_window(tmp_path):
    for name in ("test_vit", "test_efficientnet"):
        check_callback_conformance(lambda: KnowledgeDistillation(begin_epoch=1, end_step=0.9, verbose=False),
                                   tmp_path / name, model_name=name, resume_epoch=2)


def test_the_teacher_is_the_frozen_model_at_fit_start(tmp_path):
    pl.seed_everything(0)
    model = tiny_classifier()
    initial = {k: v.clone() for k, v in model.model.state_dict().items()}
    kd = KnowledgeDistillation(verbose=False)
    trainer, _ = fit_tiny([kd], tmp_path, model=model, max_epochs=2, limit_train_batches=3)
    teacher = kd.teacher_module
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, initial[k]) for k, v in teacher.state_dict().items())  # unchanged by training
    assert not any(torch.equal(v, initial[k]) for k, v in model.model.state_dict().items()
                   if v.is_floating_point() and "weight" in k)  # ... while the student moved
    assert all(teacher is not m for m in model.modules())  # not part of the LightningModule
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks gone after fit


def test_other_callbacks_hooks_are_not_copied_into_the_teacher(tmp_path):
    """GroupLasso's gates sit on the student as hooks; the teacher is the dense model without them."""
    gates = lp.GroupLassoPruning(lam=0.3, gate_lr=0.5, finalize_step=1.0, verbose=False)
    kd = KnowledgeDistillation(verbose=False)
    pl.seed_everything(0)
    model = tiny_classifier()
    dense = copy.deepcopy(model.model).eval()
    fit_tiny([gates, kd], tmp_path, model=model, max_epochs=1, limit_train_batches=3)
    teacher = kd.teacher_module
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())
    with torch.no_grad():
        assert torch.allclose(teacher(X), dense(X), atol=1e-6)


def test_composes_with_magnitude_pruning_and_logs(tmp_path):
    pl.seed_everything(0)
    pruning = lp.GradualMagnitudePruning(target_sparsity=0.8, every_n_steps=2, sparsity_end_step=0.5,
                                         verbose=False)
    kd = KnowledgeDistillation(alpha=0.5, verbose=False)
    logger = CSVLogger(tmp_path, name="run")
    fit_tiny([pruning, kd], tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=1, logger=logger,
             log_every_n_steps=1)
    assert lp.sparsity_report(kd.teacher_module).sparsity == 0.0  # the teacher stays dense
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    losses = [(int(r["step"]), float(r["distill/loss"])) for r in rows if r.get("distill/loss")]
    agreement = [float(r["distill/agreement"]) for r in rows if r.get("distill/agreement")]
    assert [s for s, _ in losses] == list(range(8)) and all(v > 0 for _, v in losses)
    assert len(agreement) == 8 and all(0.0 <= a <= 1.0 for a in agreement)


def test_window_in_steps_and_epochs(tmp_path):
    for kwargs, expected in (({"begin_step": 2, "end_step": 5}, [2, 3, 4]),
                             ({"begin_epoch": 1}, [4, 5, 6, 7]),
                             ({"end_epoch": 0.5}, [0, 1, 2, 3])):
        logger = CSVLogger(tmp_path, name=str(kwargs))
        kd = KnowledgeDistillation(verbose=False, **kwargs)
        fit_tiny([kd], tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=0, logger=logger,
                 log_every_n_steps=1)
        rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
        assert [int(r["step"]) for r in rows if r.get("distill/agreement")] == expected, kwargs


def test_teacher_from_a_checkpoint_and_a_state_dict(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "dense", filename="dense")
    _, dense = fit_tiny([saver], tmp_path / "fit", max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    ckpt = tmp_path / "dense" / "dense.ckpt"
    torch.save(dense.model.state_dict(), tmp_path / "plain.pt")
    torch.save(dense.model, tmp_path / "module.pt")
    refused = KnowledgeDistillation(teacher=tmp_path / "module.pt", verbose=False)  # a pickled nn.Module
    with pytest.raises(MisconfigurationException, match=r"module.pt.* holds Python objects .*weights_only"):
        fit_tiny([refused], tmp_path / "refused", **FAST)
    for source in (ckpt, tmp_path / "plain.pt", tmp_path / "module.pt"):
        kd = KnowledgeDistillation(teacher=source, verbose=False, weights_only=source.name != "module.pt")
        fit_tiny([kd], tmp_path / source.stem, **FAST)
        expected = dense.model.state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in kd.teacher_module.state_dict().items())
        assert kd.state_dict()["teacher"] is None  # reproducible from the file: not saved again
        assert kd.state_dict()["teacher_source"] == "file"


def test_a_different_teacher_module(tmp_path):
    teacher = timm.create_model("test_efficientnet", num_classes=10)
    before = copy.deepcopy(teacher.state_dict())
    kd = KnowledgeDistillation(teacher=teacher, temperature=2.0, verbose=False)
    _, model = fit_tiny([kd], tmp_path, **FAST)
    assert kd.teacher_module is teacher and not teacher.training
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert kd.state_dict()["teacher"] is None and kd.state_dict()["teacher_source"] == "module"
    # a LightningModule as the teacher gives its submodule of the student's name
    lit_teacher = tiny_classifier("test_efficientnet")
    kd = KnowledgeDistillation(teacher=lit_teacher, verbose=False)
    fit_tiny([kd], tmp_path / "lit", **FAST)
    assert kd.teacher_module is lit_teacher.model


class TupleModule(pl.LightningModule):
    """The student is the LightningModule itself; its forward returns (logits, features)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        features = self.net(x)
        return self.head(features), features

    def training_step(self, batch, batch_idx):
        logits, _ = self(batch[0])
        return F.cross_entropy(logits, batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_lightning_module_without_timm_is_its_own_student(tmp_path):
    kd = KnowledgeDistillation(features="net", verbose=False)
    model = TupleModule()
    fit_tiny([kd], tmp_path, model=model, **FAST)
    assert isinstance(kd.teacher_module, TupleModule) and kd.teacher_module is not model
    assert kd.teacher_module._trainer is None  # the copy does not drag the Trainer along
    assert set(kd.state_dict()["teacher"]) == set(model.state_dict())


def test_resume_after_channels_were_removed_inside_the_fit(tmp_path):
    """GroupLasso compresses at step 6; the checkpoint of epoch 2 holds the smaller student and the dense
    teacher. A fresh module and fresh callbacks resume from it to the uninterrupted run's weights and
    state."""
    def callbacks():
        return [lp.GroupLassoPruning(target_flops=0.5, finalize_step=0.5, compress=True, verbose=False),
                KnowledgeDistillation(verbose=False)]

    common = {"max_epochs": 3, "limit_train_batches": 4, "limit_val_batches": 0}
    full_cbs = callbacks()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    pl.seed_everything(0)
    _, full = fit_tiny([*full_cbs, saver], tmp_path / "full", model=tiny_classifier(), **common)
    dense_params = sum(p.numel() for p in tiny_classifier().parameters())
    assert sum(p.numel() for p in full.parameters()) < dense_params  # compressed
    assert sum(p.numel() for p in full_cbs[1].teacher_module.parameters()) == dense_params  # dense teacher
    resumed_cbs = callbacks()
    _, resumed = fit_tiny(resumed_cbs, tmp_path / "resumed", model=tiny_classifier(),
                          ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt", **common)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert_state_equal(full_cbs[1].state_dict(), resumed_cbs[1].state_dict())


def test_picklable_before_and_after_a_fit(tmp_path):
    kd = KnowledgeDistillation(verbose=False)
    pickle.loads(pickle.dumps(kd))
    fit_tiny([kd], tmp_path, **FAST)
    clone = pickle.loads(pickle.dumps(kd))
    assert clone.teacher_module is None and clone.state_dict()["teacher"] is None


def _dump(trainer, pl_module, hook):
    kd = next(cb for cb in trainer.callbacks if isinstance(cb, KnowledgeDistillation))
    torch.save({"model": dict(pl_module.named_parameters()), "teacher": kd.teacher_module.state_dict(),
                "wrapped": type(trainer.strategy.model).__name__, "teacher_in_model": any(
                    kd.teacher_module is m for m in trainer.strategy.model.modules())},
               Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_spawn_ranks_agree_and_the_teacher_is_not_wrapped(tmp_path):
    pl.seed_everything(0)
    model = tiny_classifier()
    initial = copy.deepcopy(model.model.state_dict())
    fit_tiny([lp.GradualMagnitudePruning(target_sparsity=0.5, every_n_steps=1, verbose=False),
              KnowledgeDistillation(verbose=False), Spy(_dump, ("on_train_end",))], tmp_path, model=model,
             strategy="ddp_spawn", devices=2, max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["wrapped"] == "DistributedDataParallel" and not r0["teacher_in_model"]
    for key in r0["model"]:  # the parameters (BatchNorm statistics are per rank without SyncBatchNorm)
        assert torch.equal(r0["model"][key], r1["model"][key]), key
    for key, value in r0["teacher"].items():
        assert torch.equal(value, r1["teacher"][key]) and torch.equal(value, initial[key]), key


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"alpha": -1.0}, r"`alpha` must be a number >= 0, got -1.0"),
    ({"alpha": float("nan")}, r"`alpha` must be a number >= 0"),
    ({"temperature": 0}, r"`temperature` must be a number > 0, got 0. HINT: T = 1"),
    ({"begin_step": 3, "begin_epoch": 1}, r"Pass only one of `begin_step`, `begin_epoch`"),
    ({"end_step": 2, "end_epoch": 1}, r"Pass only one of `end_step`, `end_epoch`"),
    ({"begin_step": 10, "end_step": 5}, r"`end_step` \(5\) must not come before `begin_step` \(10\)"),
    ({"end_step": -1}, r"`end_step` must be optimizer steps \(an int >= 0\)"),
    ({"begin_epoch": 1.5}, r"`begin_epoch` must be epochs"),
    ({"teacher": 3}, r"`teacher` must be None, an nn.Module or a path to a checkpoint, got int"),
    ({"student": 0}, r"`student` must be None or a module name"),
    ({"features": [1]}, r"`features` must be a glob pattern or a list of them"),
    ({"feature_alpha": 0.0, "features": "layer4"}, r"`feature_alpha` must be a number > 0"),
    ({"alpha": 0.0}, r"`alpha` is 0 and no `features` are matched: nothing would be distilled"),
    ({"verbose": "yes"}, r"`verbose` must be True or False"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        KnowledgeDistillation(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"student": "backbone"}, r"`student`='backbone' is not a submodule of ImageClassifier. Its submodules:"
                              r" model"),
    ({"features": "nothing*"}, r"`features`=\['nothing\*'\] matched no module of the student"),
    ({"teacher": "/no/such/file.ckpt"}, r"`teacher`='/no/such/file.ckpt': no such file"),
    ({"teacher": timm.create_model("test_resnet", num_classes=5)},
     r"The teacher's logits have shape \(32, 5\), the student's \(32, 10\)"),
    ({"teacher": timm.create_model("test_efficientnet", num_classes=10), "features": "layer4"},
     r"The teacher has no module 'layer4'"),
])
def test_bad_setups_fail_clearly(kwargs, match, tmp_path):
    with pytest.raises(MisconfigurationException, match=match):
        fit_tiny([KnowledgeDistillation(verbose=False, **kwargs)], tmp_path, **FAST)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    torch.save(timm.create_model("test_efficientnet", num_classes=10).state_dict(), tmp_path / "other.pt")
    with pytest.raises(MisconfigurationException, match=r"do not fit the student's architecture \(ResNet\):"
                                                        r" missing \(87\): conv1.0.weight, .*HINT: pass"):
        fit_tiny([KnowledgeDistillation(teacher=tmp_path / "other.pt", verbose=False)], tmp_path, **FAST)


def test_sharded_strategies_need_a_given_teacher():
    class FSDPStrategy:  # only the name matters
        pass

    trainer = type("T", (), {"strategy": FSDPStrategy()})()
    with pytest.raises(MisconfigurationException, match=r"cannot copy the model under FSDPStrategy"):
        KnowledgeDistillation().setup(trainer, tiny_classifier(), "fit")
