import pickle
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_prune import GradualMagnitudePruning, sparsity_report
from lightning_prune.testing import TINY_MODELS, check_callback_conformance, fit_tiny, tiny_classifier
from lightning_prune.training.models import ImageClassifier

FAST = {"max_epochs": 2, "limit_train_batches": 6, "limit_val_batches": 1}


def _pruner(**kwargs):
    defaults = {"target_sparsity": 0.8, "every_n_steps": 2, "sparsity_end_step": 8, "verbose": False}
    return GradualMagnitudePruning(**{**defaults, **kwargs})


class ZeroProbe(Callback):
    """Asserts that masked weights are exact zeros whenever the model is used."""

    def __init__(self, pruner):
        self.pruner, self.checks = pruner, 0

    def _check(self):
        for name, mask in self.pruner.masks.items():
            assert torch.all(self.pruner.masks.param(name)[~mask] == 0), name
        self.checks += 1

    def on_train_batch_start(self, *args):
        self._check()

    def on_validation_start(self, *args):
        self._check()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        for name, mask in self.pruner.masks.items():
            assert torch.all(checkpoint["state_dict"][name][~mask.cpu()] == 0)


@pytest.mark.parametrize("model_name", list(TINY_MODELS))
def test_reaches_global_target_on_timm_families(tmp_path, model_name):
    pruner = _pruner()
    probe = ZeroProbe(pruner)
    _, model = fit_tiny([pruner, probe], tmp_path,
                        model=tiny_classifier(model_name, optimizer="adamw", lr=1e-3), **FAST)
    counts = pruner.masks.pruned_counts()
    pruned, total = sum(p for p, _ in counts.values()), sum(t for _, t in counts.values())
    # 12 steps, schedule 0 -> 0.8 over steps 0-8, masks every 2 steps: the last update is at s = 0.8 exactly
    assert total - pruned == pytest.approx(round(total * 0.2), abs=5)  # ties may keep a few more
    assert probe.checks > 10
    report = {layer.name: layer for layer in sparsity_report(model).layers}
    for name, (n_pruned, _) in counts.items():  # the report counts at least the masked zeros
        assert report[name.removesuffix(".weight")].zeros >= n_pruned


def test_layer_scope_prunes_every_layer_to_the_target(tmp_path):
    pruner = _pruner(scope="layer", target_sparsity=0.5)
    fit_tiny([pruner], tmp_path, **FAST)
    for name, (pruned, total) in pruner.masks.pruned_counts().items():
        assert total - pruned == max(round(total * 0.5), 1), name


def test_mask_updates_follow_the_tensorflow_schedule(tmp_path):
    seen = []

    class Spy(GradualMagnitudePruning):
        def update_masks(self, new_masks, trainer=None):
            seen.append((trainer.global_step, round(self.current_target, 4)))
            super().update_masks(new_masks, trainer)

    pruner = Spy(target_sparsity=0.9, every_n_steps=3, sparsity_begin_step=0, sparsity_end_step=9,
                 verbose=False)
    fit_tiny([pruner], tmp_path, max_epochs=2, limit_train_batches=7, limit_val_batches=0)
    expected = [(s, round(0.9 - 0.9 * (1 - min(s / 9, 1)) ** 3, 4)) for s in (3, 6, 9, 12)]
    assert seen == expected


def test_momentum_and_weight_decay_cannot_revive_pruned_weights(tmp_path):
    pruner = _pruner(target_sparsity=0.7, end_step=4)  # masks frozen after step 4, training goes on
    probe = ZeroProbe(pruner)
    model = tiny_classifier("test_resnet", optimizer="sgd", momentum=0.9, weight_decay=1e-3, lr=0.1)
    trainer, _ = fit_tiny([pruner, probe], tmp_path, model=model, **FAST)
    assert trainer.global_step == 12 and pruner.last_update == 4
    # the last update (step 4) pruned to s(4) = 0.7 * (1 - 0.5^3); eight more steps with momentum
    # revived nothing
    assert pruner.masks.sparsity() == pytest.approx(0.7 * (1 - 0.5**3), abs=0.005)
    for name, mask in pruner.masks.items():
        assert torch.all(pruner.masks.param(name)[~mask] == 0), name
    assert probe.checks >= 12


def test_state_dict_keys_stay_those_of_the_plain_model_and_checkpoint_is_zero(tmp_path):
    state = check_callback_conformance(lambda: _pruner(sparsity_end_step=10), tmp_path, max_epochs=3,
                                       resume_epoch=1)
    # read the checkpoint file itself: the pruned weights are zeros in the model's own state_dict, same keys
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=2.ckpt", map_location="cpu", weights_only=False)
    weights = checkpoint["state_dict"]
    assert set(weights) == set(tiny_classifier().state_dict())
    assert set(state["masks"]) and all(name in weights for name in state["masks"])
    pruned = 0
    for name, mask in state["masks"].items():
        assert torch.all(weights[name][~mask] == 0), name
        pruned += int((~mask).sum())
    total = sum(m.numel() for m in state["masks"].values())
    assert pruned / total == pytest.approx(0.8, abs=0.01)


def test_resume_mid_schedule_equals_uninterrupted_with_derived_schedule(tmp_path):
    # default sparsity_end_step: 75% of trainer.estimated_stepping_batches, resolved once and checkpointed
    state = check_callback_conformance(lambda: GradualMagnitudePruning(target_sparsity=0.6, every_n_steps=1,
                                                                       verbose=False), tmp_path, max_epochs=3)
    assert state["schedule"] == [0, sys.maxsize, 0, 9] and state["last_update"] == 12
    assert state["current_target"] == pytest.approx(0.6)


def test_gradient_accumulation_and_bf16_mixed(tmp_path):
    pruner = _pruner(every_n_steps=1, sparsity_end_step=3)
    probe = ZeroProbe(pruner)
    trainer, _ = fit_tiny([pruner, probe], tmp_path, precision="bf16-mixed", accumulate_grad_batches=2,
                          max_epochs=1, limit_train_batches=8, limit_val_batches=1)
    assert trainer.global_step == 4
    assert pruner.last_update == 4
    assert pruner.masks.sparsity() == pytest.approx(0.8, abs=0.01)


def test_timm_model_under_a_nested_attribute(tmp_path):
    class Nested(ImageClassifier):
        def __init__(self):
            super().__init__("test_resnet", num_classes=10, scheduler="none")
            self.wrapper = nn.ModuleDict({"backbone": self.model})
            del self.model

        def forward(self, x):
            return self.wrapper["backbone"](x)

    pruner = _pruner()
    fit_tiny([pruner], tmp_path, model=Nested(), **FAST)
    names = set(pruner.masks.names())
    assert "wrapper.backbone.fc.weight" not in names and "wrapper.backbone.conv1.0.weight" not in names
    assert pruner.masks.sparsity() == pytest.approx(0.8, abs=0.01)


def test_layer_targets_scale_the_schedule_and_block_pruning(tmp_path):
    pruner = _pruner(scope="global", target_sparsity=0.8, layer_targets={"*.mlp.fc1": 0.4, "*.attn.qkv": 0.0},
                     block_size=(4, 4))
    fit_tiny([pruner], tmp_path, model=tiny_classifier("test_vit"), **FAST)
    sparsity = pruner.masks.layer_sparsity()
    fc1 = [n for n in sparsity if n.endswith("mlp.fc1.weight")]
    qkv = [n for n in sparsity if n.endswith("attn.qkv.weight")]
    assert fc1 and all(sparsity[n] == pytest.approx(0.4, abs=0.05) for n in fc1)
    assert qkv and all(sparsity[n] == 0.0 for n in qkv)
    for name in fc1:  # whole 4x4 blocks are pruned
        mask = pruner.masks[name]
        blocks = (mask.reshape(mask.shape[0] // 4, 4, mask.shape[1] // 4, 4).permute(0, 2, 1, 3)
                  .reshape(-1, 16))
        assert torch.all(blocks.all(dim=1) | (~blocks).all(dim=1))


def test_threshold_decay_smooths_thresholds(tmp_path):
    pruner = _pruner(threshold_decay=0.9, scope="layer")
    fit_tiny([pruner], tmp_path, **FAST)
    assert pruner.thresholds and pruner.masks.sparsity() < 0.8  # the EMA lags behind the target


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_sparsity": 1.0}, r"`target_sparsity` must be a number in \[0, 1\), got 1.0. HINT"),
        ({"target_sparsity": -0.1}, r"`target_sparsity` must be a number in \[0, 1\), got -0.1"),
        ({"target_sparsity": True}, r"`target_sparsity` must be a number in \[0, 1\), got True"),
        ({"target_sparsity": float("nan")}, r"`target_sparsity` must be a number in \[0, 1\), got nan"),
        ({"initial_sparsity": 1.2}, r"`initial_sparsity` must be a number in"),
        ({"begin_step": 10, "end_step": 5}, r"`end_step` \(5\) must not come before `begin_step` \(10\)"),
        ({"end_step": -1}, r"`end_step` must be optimizer steps .* got -1. HINT: end_step=1.0 keeps"),
        ({"every_n_steps": 0}, r"`every_n_steps` must be a number of optimizer steps .* got 0"),
        ({"every_n_steps": -3}, r"`every_n_steps` must be a number of optimizer steps .* got -3"),
        ({"every_n_steps": 0.5}, r"`every_n_steps` must be an int >= 1 here, got 0.5"),
        ({"scope": "model"}, r"`scope` must be one of \['global', 'layer'\], got 'model'"),
        ({"sparsity_begin_step": 10, "sparsity_end_step": 5},
         r"`sparsity_end_step` \(5\) must not come before"),
        ({"sparsity_end_step": 1.5}, r"`sparsity_end_step` must be optimizer steps .* fraction .* got 1.5"),
        ({"sparsity_end_step": float("inf")}, r"`sparsity_end_step` must be optimizer steps .* got inf"),
        ({"block_size": (2,)}, r"`block_size` must be two integers"),
        ({"block_pooling": "min"}, r"`block_pooling` must be one of"),
        ({"layer_targets": {"*": 0.5}, "initial_sparsity": 0.1},
         r"`layer_targets` needs `initial_sparsity=0`"),
        ({"threshold_decay": 1.0}, r"`threshold_decay` must be a number in"),
        ({"exponent": 0}, r"`exponent` must be a number > 0"),
        ({"include": 3}, r"`include` must be a glob pattern"),
        ({"types": ["NoSuchLayer"]}, r"`types` must be a list of nn.Module types"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        GradualMagnitudePruning(**kwargs)


def test_patterns_that_match_nothing_fail_at_setup_with_nothing_applied(tmp_path):
    model = tiny_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MisconfigurationException, match=r"No module to prune: `include=\['nothing\*'\]`"):
        fit_tiny([GradualMagnitudePruning(include="nothing*")], tmp_path, model=model, **FAST)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_two_instances_have_distinct_state_keys_and_pickle():
    a, b = GradualMagnitudePruning(include="layer1*"), GradualMagnitudePruning(include="layer2*")
    assert a.state_key != b.state_key
    assert pickle.loads(pickle.dumps(a)).state_key == a.state_key


class _SaveMasks(Callback):
    def __init__(self, pruner, out: Path):
        self.pruner, self.out = pruner, out

    def on_train_end(self, trainer, pl_module):
        torch.save(self.pruner.masks.state_dict(), self.out / f"rank{trainer.global_rank}.pt")


def test_ddp_spawn_masks_identical_on_both_ranks(tmp_path):
    pruner = _pruner()
    fit_tiny([pruner, _SaveMasks(pruner, tmp_path)], tmp_path, strategy="ddp_spawn", devices=2, **FAST)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert set(rank0) == set(rank1) and len(rank0) > 5
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    sparsity = sum(int((~m).sum()) for m in rank0.values()) / sum(m.numel() for m in rank0.values())
    assert sparsity == pytest.approx(0.8, abs=0.01)


def test_manual_optimization_two_steps_per_batch(tmp_path):
    class Manual(ImageClassifier):
        def __init__(self):
            super().__init__("test_resnet", num_classes=10, scheduler="none")
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            x, y = batch
            for _ in range(2):  # the second forward must already see the masked weights
                loss = torch.nn.functional.cross_entropy(self(x), y)
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
                for name, mask in pruner.masks.items():
                    assert torch.all(pruner.masks.param(name)[~mask] == 0)

    pruner = _pruner(every_n_steps=2, sparsity_end_step=6)
    trainer, _ = fit_tiny([pruner], tmp_path, model=Manual(), max_epochs=1, limit_train_batches=4,
                          limit_val_batches=1)
    assert trainer.global_step == 8 and pruner.last_update == 8
    assert pruner.masks.sparsity() == pytest.approx(0.8, abs=0.01)


def test_endless_training_needs_steps_for_the_schedule(tmp_path):
    with pytest.raises(MisconfigurationException,
                       match="`sparsity_end_step`=0.75 is a fraction .* no end .* HINT"):
        fit_tiny([GradualMagnitudePruning()], tmp_path, max_epochs=-1, max_steps=-1,
                 limit_train_batches=2)
    pruner = _pruner(sparsity_end_step=4)
    fit_tiny([pruner], tmp_path, max_epochs=-1, max_steps=6, limit_train_batches=2, limit_val_batches=0)
    assert pruner.masks.sparsity() == pytest.approx(0.8, abs=0.01)
