"""FirstKChannels on real timm models and real Lightning training steps."""

import pickle
import re

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_prune as lp
from lightning_prune.testing import TINY_MODELS, check_callback_conformance, fit_tiny, tiny_classifier
from lightning_prune_baselines import FirstKChannels, first_k_pruned

FAST = {"max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 1}


def channel_outputs(pl_module, groups, x, train):
    """Each group's channel outputs: the BatchNorm's output when one follows the layer, else the layer's."""
    outputs, hooks = {}, []
    for group in groups:
        module_name = (group.members[-1] if len(group.members) >= 2 else group.weight).rsplit(".", 1)[0]
        hooks.append(
            pl_module.get_submodule(module_name).register_forward_hook(
                lambda m, a, out, n=group.weight: outputs.__setitem__(n, out)
            )
        )
    pl_module.train(train)
    with torch.no_grad():
        pl_module(x)
    for hook in hooks:
        hook.remove()
    return outputs


@pytest.mark.parametrize("model_name", list(TINY_MODELS))
def test_first_k_channels_output_exactly_zero_after_fine_tuning(tmp_path, model_name):
    pruner = FirstKChannels(target_sparsity=0.4, verbose=False)
    model = tiny_classifier(model_name, optimizer="sgd", momentum=0.9, weight_decay=1e-3, lr=0.05)
    trainer, model = fit_tiny([pruner], tmp_path, model=model, **FAST)
    assert (
        pruner.last_update == 1 and trainer.global_step == 6
    )  # pruned after the first step, then fine-tuned
    groups = pruner.groups
    assert len(groups) == len(pruner.weight_names) > 3
    if model_name in ("test_resnet", "test_efficientnet"):
        # every conv is followed by a BatchNorm, except in squeeze-excitation (conv -> sigmoid gate)
        assert all(len(g.members) == (1 if ".se." in g.weight else 2) for g in groups)
    x = next(iter(trainer.datamodule.train_dataloader()))[0][:8]
    for train in (False, True):
        outputs = channel_outputs(model, groups, x, train)
        for group in groups:
            weight = model.get_parameter(group.weight)
            k = first_k_pruned(weight.shape[0], 0.4)
            assert k >= 1
            for name in group.names:  # weights, biases, BatchNorm affine: the first k entries are exact zeros
                param = model.get_parameter(name)
                assert torch.all(param[:k] == 0), name
                assert param[k:].abs().sum() > 0, name
            out = outputs[group.weight]
            linear = isinstance(model.get_submodule(group.weight.rsplit(".", 1)[0]), torch.nn.Linear)
            channels = (
                out[..., :k] if linear and len(group.members) < 2 else out[:, :k]
            )  # Linear: features last
            assert torch.all(channels == 0), group.weight
    pruned_rows = sum(first_k_pruned(model.get_parameter(n).shape[0], 0.4) for n in pruner.weight_names)
    rows = sum(model.get_parameter(n).shape[0] for n in pruner.weight_names)
    metrics = pruner.sparsity_metrics()
    assert metrics["prune/channel_sparsity"] == pytest.approx(pruned_rows / rows)
    weights = [model.get_parameter(n) for n in pruner.weight_names]
    expected = sum(first_k_pruned(w.shape[0], 0.4) * w[0].numel() for w in weights) / sum(
        w.numel() for w in weights
    )
    assert metrics["prune/sparsity"] == pytest.approx(expected)
    report = {layer.name: layer for layer in lp.sparsity_report(model).layers}
    for name in pruner.weight_names:
        assert report[name.removesuffix(".weight")].zero_channels >= first_k_pruned(
            report[name.removesuffix(".weight")].channels, 0.4
        )


class _Record(Callback):
    def __init__(self, pruner):
        self.pruner, self.seen = pruner, []

    def on_train_batch_end(self, trainer, *args):  # runs after the pruner's own hook (callback order)
        self.seen.append(
            (trainer.current_epoch, trainer.global_step, self.pruner.sparsity_metrics()["prune/sparsity"])
        )


def test_prune_epoch_and_prune_step(tmp_path):
    run = {"max_epochs": 3, "limit_train_batches": 3, "limit_val_batches": 0}
    # prune_epoch=1 resolves to step 1 * 3 = 3, reached by the end of the LAST batch of epoch 0: the masks
    # come in there, one batch earlier than under the old API (which pruned in epoch 1's first batch, step 4)
    pruner = FirstKChannels(target_sparsity=0.5, prune_epoch=1, verbose=False)
    record = _Record(pruner)
    fit_tiny([pruner, record], tmp_path / "epoch", **run)
    assert [s for e, _, s in record.seen if e == 0][:2] == [0.0, 0.0]
    assert [(e, step) for e, step, s in record.seen if s > 0][0] == (0, 3)
    assert pruner.last_update == 3 and all(s > 0.45 for _, step, s in record.seen if step >= 3)

    pruner = FirstKChannels(target_sparsity=0.5, prune_step=5, verbose=False)
    record = _Record(pruner)
    fit_tiny([pruner, record], tmp_path / "step", **run)
    assert [step for _, step, s in record.seen if s > 0][0] == 5 and pruner.last_update == 5
    assert all(s == 0.0 for _, step, s in record.seen if step < 5)

    # a float in [0, 1] is a fraction of the whole training: 2/3 of 9 steps = step 6, the end of epoch 1
    pruner = FirstKChannels(target_sparsity=0.5, prune_epoch=2 / 3, verbose=False)
    record = _Record(pruner)
    fit_tiny([pruner, record], tmp_path / "fraction", **run)
    assert [step for _, step, s in record.seen if s > 0][0] == 6 and pruner.last_update == 6


@pytest.mark.parametrize(
    ("when", "max_epochs", "pruned_at"),
    [
        # prune_epoch=e now prunes at the end of the last batch of epoch e - 1 (step e * 3): prune_epoch=1
        # would prune before the checkpoint of epoch 0, so epoch 2 (step 6, the end of epoch 1) crosses the
        # resume point
        ({"prune_epoch": 2}, 3, 6),
        # step 4: the resumed run's first batch both traces the model again and prunes (the old prune_epoch=1)
        ({"prune_step": 4}, 2, 4),
    ],
)
def test_resume_across_the_pruning_epoch_equals_uninterrupted_run(tmp_path, when, max_epochs, pruned_at):
    # the checkpoint of epoch 0 is dense; the resumed run traces the model again and prunes in epoch 1
    state = check_callback_conformance(
        lambda: lp.create_callback("first_k", target_sparsity=0.3, verbose=False, **when),
        tmp_path,
        max_epochs=max_epochs,
        limit_train_batches=3,
    )
    assert state["last_update"] == pruned_at and state["current_sparsity"] == pytest.approx(0.3)
    assert state["prune_at_step"] == pruned_at
    assert any(not bool(m.all()) for m in state["masks"].values())


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
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        FirstKChannels(**kwargs)


@pytest.mark.parametrize("pattern", ["nothing*", "*.fc", "*bn1"])
def test_patterns_that_match_nothing_fail_at_setup(tmp_path, pattern):
    # `include` only narrows the default set: it never adds the classifier (`fc`) or a BatchNorm
    match = rf"No module to prune: include=\['{re.escape(pattern)}'\]"
    with pytest.raises(MisconfigurationException, match=match):
        fit_tiny([FirstKChannels(include=pattern)], tmp_path, **FAST)


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
    assert trainer.global_step == 3 and pruner.last_update == 0  # pruned after the first micro-batch
    assert all(len(g.members) >= 1 for g in pruner.groups)
    for group in pruner.groups:
        k = first_k_pruned(model.get_parameter(group.weight).shape[0], 0.25)
        assert all(torch.all(model.get_parameter(n)[:k] == 0) for n in group.names), group.weight
    trainer.logger.finalize("success")
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("prune/channel_sparsity")]
    assert rows and float(rows[0]["prune/target_sparsity"]) == 0.25
    assert float(rows[0]["prune/channel_sparsity"]) == pytest.approx(
        pruner.sparsity_metrics()["prune/channel_sparsity"]
    )
    assert not any(k.startswith("prune/sparsity/") and "bn" in k for k in rows[0])  # weights only, per layer
