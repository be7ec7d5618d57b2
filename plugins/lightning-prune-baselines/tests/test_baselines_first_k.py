"""FirstKChannels on real timm models and real Lightning training steps."""

import pickle
import re

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from unit_checks import CompressAtFitEnd, check_unit_masks, check_weights_masked, expected_masks

import lightning_prune as lp
from lightning_prune.testing import TINY_MODELS, check_callback_conformance, fit_tiny, tiny_classifier
from lightning_prune_baselines import (
    FirstKChannels,
    channel_groups,
    first_k_channel_masks,
    first_k_keep,
    first_k_pruned,
)

FAST = {"max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 1}
INPUT_SIZE = r"`input_size` must be None or a sequence of positive ints"


#: in a fit on a convnet and a ViT; the first-k masks of every family: test_baselines_channels.py::
#: test_first_k_masks_cut_every_tensor_of_the_first_k_units, and RandomChannels' fit on every family (the same
#: masks and compression): test_baselines_random.py; the other two families here with -m slow
@pytest.mark.parametrize("model_name", [n if n in ("test_resnet", "test_vit") else
                                        pytest.param(n, marks=pytest.mark.slow) for n in TINY_MODELS])
def test_first_k_channels_prune_the_first_units_of_every_group_and_compress_exactly(tmp_path, model_name):
    pruner = FirstKChannels(target_sparsity=0.4, verbose=False)
    model = tiny_classifier(model_name, optimizer="sgd", momentum=0.9, weight_decay=1e-3, lr=0.05)
    x = torch.randn(8, 3, 32, 32)
    at_end = CompressAtFitEnd(pruner, x)
    trainer, model = fit_tiny([pruner, at_end], tmp_path, model=model, **FAST)
    assert (
        pruner.updated_at_step == 1 and trainer.global_step == 6
    )  # pruned after the first step, then fine-tuned
    # the groups are lightning-prune's analysis of the LightningModule (names from the module: "model.")
    groups = pruner.groups
    assert [g.name for g in groups] == [g.name for g in channel_groups(tiny_classifier(model_name))]
    assert len(groups) > 3 and all(g.name.startswith("model.") for g in groups)
    keep = [first_k_keep(g.size, 0.4) for g in groups]
    assert all(torch.equal(k, e) for k, e in zip(pruner.keep, keep))
    assert all(first_k_pruned(g.size, 0.4) >= 1 for g in groups)
    # the first k units of every group are masked in every tensor of the unit (filters, BatchNorm and
    # LayerNorm entries, depthwise filters, the readers' columns, pos_embed...), and nothing else is
    check_unit_masks(at_end.state, groups, keep, at_end.masks)
    check_weights_masked(at_end.state, at_end.masks)  # exact zeros after fine-tuning; the rest trained
    assert all(not at_end.masks[n].all() for n in pruner.weight_names)  # every targeted layer lost units
    # the masked model (the callback's restricted norms attached) computes what the compressed one computes,
    # and the compressed one lost exactly the masked entries
    at_end.check(groups, keep)
    assert not any(m._forward_hooks for m in model.modules())  # teardown left a plain model
    units = sum(g.size for g in groups)
    metrics = at_end.metrics
    assert metrics["prune/channel_sparsity"] == pytest.approx(
        sum(first_k_pruned(g.size, 0.4) for g in groups) / units
    )
    assert metrics["prune/target_sparsity"] == 0.4
    expected = expected_masks(at_end.state, groups, keep)
    weights = [expected.get(n) for n in pruner.weight_names]
    assert all(w is not None for w in weights)
    assert metrics["prune/sparsity"] == pytest.approx(
        sum(int((~w).sum()) for w in weights) / sum(w.numel() for w in weights)
    )
    for name in pruner.weight_names:  # the report sees the zero filters
        rows = expected[name].reshape(expected[name].shape[0], -1)
        assert at_end.report[name.removesuffix(".weight")].zero_channels >= int((~rows.any(1)).sum()) > 0


class _Record(Callback):
    """(epoch, step, fraction of pruned units) after every batch; 0.0 while nothing is pruned."""

    def __init__(self, pruner):
        self.pruner, self.seen = pruner, []

    def on_train_batch_end(self, trainer, *args):  # runs after the pruner's own hook (callback order)
        metrics = self.pruner.sparsity_metrics()
        units = metrics.get("prune/channel_sparsity", 0.0)
        assert (units > 0) == (metrics["prune/sparsity"] > 0) == (self.pruner.keep is not None)
        self.seen.append((trainer.current_epoch, trainer.global_step, units))


def test_prune_epoch_and_prune_step(tmp_path):
    run = {"max_epochs": 3, "limit_train_batches": 3, "limit_val_batches": 0}
    sizes = [g.size for g in channel_groups(tiny_classifier())]
    half = sum(first_k_pruned(size, 0.5) for size in sizes) / sum(sizes)  # the units first_k drops at 0.5
    # prune_epoch=1 resolves to step 1 * 3 = 3, reached by the end of the LAST batch of epoch 0: the masks
    # come in there, one batch earlier than under the old API (which pruned in epoch 1's first batch, step 4)
    pruner = FirstKChannels(target_sparsity=0.5, prune_epoch=1, verbose=False)
    record = _Record(pruner)
    fit_tiny([pruner, record], tmp_path / "epoch", **run)
    assert [s for e, _, s in record.seen if e == 0][:2] == [0.0, 0.0]
    assert [(e, step) for e, step, s in record.seen if s > 0][0] == (0, 3)
    assert pruner.updated_at_step == 3
    assert all(s == pytest.approx(half) for _, step, s in record.seen if step >= 3)

    pruner = FirstKChannels(target_sparsity=0.5, prune_step=5, verbose=False)
    record = _Record(pruner)
    fit_tiny([pruner, record], tmp_path / "step", **run)
    assert [step for _, step, s in record.seen if s > 0][0] == 5 and pruner.updated_at_step == 5
    assert all(s == 0.0 for _, step, s in record.seen if step < 5)

    # a float in [0, 1] is a fraction of the whole training: 2/3 of 9 steps = step 6, the end of epoch 1
    pruner = FirstKChannels(target_sparsity=0.5, prune_epoch=2 / 3, verbose=False)
    record = _Record(pruner)
    fit_tiny([pruner, record], tmp_path / "fraction", **run)
    assert [step for _, step, s in record.seen if s > 0][0] == 6 and pruner.updated_at_step == 6


@pytest.mark.parametrize(
    ("when", "max_epochs", "pruned_at"),
    [
        # prune_epoch=e now prunes at the end of the last batch of epoch e - 1 (step e * 3): prune_epoch=1
        # would prune before the checkpoint of epoch 0, so epoch 2 (step 6, the end of epoch 1) crosses the
        # resume point
        ({"prune_epoch": 2}, 3, 6),
        # step 4: the resumed run's first batch prunes (the old prune_epoch=1)
        ({"prune_step": 4}, 2, 4),
    ],
)
def test_resume_across_the_pruning_epoch_equals_uninterrupted_run(tmp_path, when, max_epochs, pruned_at):
    # the checkpoint of epoch 0 is dense; the resumed run analyses the model again at setup, prunes in epoch 1
    state = check_callback_conformance(
        lambda: lp.create_callback("first_k", target_sparsity=0.3, verbose=False, **when),
        tmp_path,
        max_epochs=max_epochs,
        limit_train_batches=3,
    )
    assert state["updated_at_step"] == pruned_at and state["current_target"] == pytest.approx(0.3)
    assert state["prune_at_step"] == pruned_at
    assert all(torch.equal(k, first_k_keep(k.numel(), 0.3)) for k in state["keep"])
    # the callback's masks are the one-shot helper's on the same LightningModule; the other targets are whole
    expected = first_k_channel_masks(tiny_classifier(), 0.3)
    assert set(expected) <= set(state["masks"])
    for name, mask in state["masks"].items():
        assert torch.equal(mask, expected[name]) if name in expected else bool(mask.all()), name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"target_sparsity": 1.0},
            r"`target_sparsity` must be a number in \[0, 1\), got 1.0."
            r" HINT: the fraction of channels dropped",
        ),
        ({"target_sparsity": 1.5}, r"`target_sparsity` must be a number in \[0, 1\), got 1.5. HINT: "),
        ({"target_sparsity": -0.5}, r"`target_sparsity` must be a number in \[0, 1\), got -0.5"),
        ({"target_sparsity": "half"}, r"`target_sparsity` must be a number in \[0, 1\), got 'half'"),
        ({"target_sparsity": True}, r"`target_sparsity` must be a number in \[0, 1\), got True"),
        ({"target_sparsity": float("nan")}, r"`target_sparsity` must be a number in \[0, 1\), got nan"),
        (
            {"prune_epoch": -1},
            r"`prune_epoch` must be epochs \(an int >= 0\) or a fraction of training \(a float in \[0, 1\]\)"
            r" or None, got -1. HINT: 0 prunes at the start",
        ),
        ({"prune_epoch": 1.5}, r"`prune_epoch` must be epochs \(an int >= 0\) .* got 1.5. HINT: 0 prunes"),
        ({"prune_epoch": True}, r"`prune_epoch` must be epochs \(an int >= 0\) .* got True"),
        ({"prune_epoch": float("inf")}, r"`prune_epoch` must be epochs \(an int >= 0\) .* got inf"),
        (
            {"prune_step": -2},
            r"`prune_step` must be optimizer steps \(an int >= 0\) or a fraction of training"
            r" \(a float in \[0, 1\]\) or None, got -2. HINT: 0 prunes at the start",
        ),
        ({"prune_step": False}, r"`prune_step` must be optimizer steps \(an int >= 0\) .* got False"),
        ({"prune_step": float("nan")}, r"`prune_step` must be optimizer steps \(an int >= 0\) .* got nan"),
        (
            {"prune_step": 4, "prune_epoch": 1},
            r"Pass only one of `prune_step`, `prune_epoch`; got `prune_step`=4, `prune_epoch`=1."
            r" HINT: 0 prunes",
        ),
        (
            {"log_media_every_n_epochs": -1},
            r"`log_media_every_n_epochs` must be an integer >= 0, got -1. HINT: 0 logs media only at the end",
        ),
        ({"log_media_every_n_epochs": True}, r"`log_media_every_n_epochs` must be an integer >= 0, got True"),
        ({"types": ["NoSuchLayer"]}, r"`types` must be a list of nn.Module types .* got \['NoSuchLayer'\]"),
        (
            {"input_size": (3, -1, 32)},
            r"`input_size` must be None or a sequence of positive ints such as \(3, 32, 32\),"
            r" got \(3, -1, 32\)\."
            r" HINT: it is the shape of one input sample",
        ),
        ({"input_size": (3, 0, 32)}, INPUT_SIZE),
        ({"input_size": ()}, rf"{INPUT_SIZE} .* got \(\)"),
        ({"input_size": "3x32x32"}, rf"{INPUT_SIZE} .* got '3x32x32'"),
        ({"input_size": (3, 32.0, 32)}, rf"{INPUT_SIZE} .* got \(3, 32.0, 32\)"),
        ({"input_size": (True, 32, 32)}, rf"{INPUT_SIZE} .* got \(True, 32, 32\)"),
        ({"input_size": 32}, rf"{INPUT_SIZE} .* got 32\."),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        FirstKChannels(**kwargs)


@pytest.mark.parametrize("pattern", ["nothing*", "*.fc", "*bn1"])
def test_patterns_that_match_nothing_fail_at_setup(tmp_path, pattern):
    # `include` only narrows the default set: it never adds the classifier (`fc`) or a BatchNorm
    match = rf"No module to prune: `include=\['{re.escape(pattern)}'\]`"
    with pytest.raises(MisconfigurationException, match=match):
        fit_tiny([FirstKChannels(include=pattern)], tmp_path, **FAST)


def test_a_selection_without_removable_groups_fails_at_setup(tmp_path):
    # depthwise convs are targets, but no group is produced by one (they are sliced along with their input)
    with pytest.raises(MisconfigurationException, match=r"FirstKChannels found no removable channel group in"
                       r" ImageClassifier \(include=\['\*conv_dw'\].*What blocked them: .*"
                       r" HINT: check `include`/`exclude`"):
        fit_tiny([FirstKChannels(include="*conv_dw")], tmp_path, model=tiny_classifier("test_efficientnet"),
                 **FAST)


def test_include_narrows_the_groups_and_their_readers_lose_the_columns(tmp_path):
    pruner = FirstKChannels(target_sparsity=0.5, include="layer3*", verbose=False)
    at_end = CompressAtFitEnd(pruner, torch.randn(4, 3, 32, 32))
    _, model = fit_tiny([pruner, at_end], tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    assert [g.name for g in pruner.groups] == ["model.layer3.0.conv1", "model.layer3.0.conv2",
                                               "model.layer3.0.conv3"]
    assert pruner.weight_names and all(n.startswith("model.layer3.0.") for n in pruner.weight_names)
    keep = [first_k_keep(g.size, 0.5) for g in pruner.groups]
    check_unit_masks(at_end.state, pruner.groups, keep, at_end.masks)  # nothing outside the three groups
    # the last group is a residual stream: its second producer and its readers in layer4 are cut too
    assert "model.layer3.0.downsample.1.weight" in pruner.weight_names
    for reader in ("model.layer4.0.conv1.weight", "model.layer4.0.downsample.1.weight"):
        assert reader not in pruner.weight_names
        mask = at_end.masks[reader]
        assert not mask[:, :96].any() and mask[:, 96:].all(), reader  # columns only: its rows stay
    assert {n for n in at_end.masks if not n.startswith("model.layer3.")} == {  # nothing else is masked
        "model.layer4.0.conv1.weight", "model.layer4.0.downsample.1.weight"}
    check_weights_masked(at_end.state, at_end.masks)
    at_end.check(pruner.groups, keep)


class _TwoConvNet(nn.Module):
    """No timm model, no example_input_array: nothing tells what it takes but `input_size`."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.features(x))


def _plain_classifier():
    module = tiny_classifier()
    module.model = _TwoConvNet()
    return module


def test_input_size_traces_a_model_that_does_not_tell_its_input(tmp_path):
    first_batch = FirstKChannels(verbose=False)  # no input_size: traced at the first training batch's shape
    fit_tiny([first_batch], tmp_path / "none", model=_plain_classifier(), **FAST)
    assert first_batch.traced_size == (3, 32, 32) and first_batch.groups
    pruner = FirstKChannels(target_sparsity=0.5, verbose=False, input_size=(3, 32, 32))
    assert pruner.input_size == (3, 32, 32)
    at_end = CompressAtFitEnd(pruner, torch.randn(4, 3, 32, 32))
    _, model = fit_tiny([pruner, at_end], tmp_path / "size", model=_plain_classifier(), **FAST)
    assert [(g.name, g.size) for g in pruner.groups] == [("model.features.0", 8), ("model.features.3", 16)]
    keep = [first_k_keep(g.size, 0.5) for g in pruner.groups]
    check_unit_masks(at_end.state, pruner.groups, keep, at_end.masks)
    assert not at_end.masks["model.head.weight"][:, :8].any()  # the classifier reads no pruned channel
    at_end.check(pruner.groups, keep)
    assert at_end.params_after == sum(p.numel() for p in model.parameters()) < at_end.params_before


def test_include_and_state_key():
    a = FirstKChannels(target_sparsity=0.5, include="layer1*")
    b = FirstKChannels(target_sparsity=0.25, include="layer1*")
    assert a.state_key != b.state_key
    assert pickle.loads(pickle.dumps(a)).state_key == a.state_key


def test_bf16_gradient_accumulation_and_logged_metrics(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    pruner = FirstKChannels(target_sparsity=0.25, verbose=False)
    trainer, model = fit_tiny(
        [pruner],
        tmp_path,
        model=tiny_classifier("test_efficientnet"),
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        logger=CSVLogger(tmp_path, name="csv"),
        max_epochs=1,
        limit_train_batches=6,
        limit_val_batches=0,
    )
    assert trainer.global_step == 3 and pruner.updated_at_step == 0  # pruned after the first micro-batch
    keep = [first_k_keep(g.size, 0.25) for g in pruner.groups]
    assert all(torch.equal(k, e) for k, e in zip(pruner.keep, keep))
    check_unit_masks(model, pruner.groups, keep, pruner.masks.state_dict())
    check_weights_masked(model.state_dict(), pruner.masks.state_dict())  # exact zeros through bf16 steps
    trainer.logger.finalize("success")
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("prune/channel_sparsity")]
    assert rows and float(rows[0]["prune/target_sparsity"]) == 0.25
    assert float(rows[0]["prune/channel_sparsity"]) == pytest.approx(
        pruner.sparsity_metrics()["prune/channel_sparsity"]
    )
    assert not any(k.startswith("prune/sparsity/") and "bn" in k for k in rows[0])  # weights only, per layer
