"""The sensitivity scan: one layer (or channel group) pruned at a time, the table, the heat map, the layer
targets it gives GradualMagnitudePruning, and `lightning-prune sensitivity`."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_prune as lp
from lightning_prune.cli import main
from lightning_prune.core.sensitivity import SensitivityTable, channel_removal
from lightning_prune.errors import InvalidArgumentError, InvalidArgumentTypeError, NoTargetsError
from lightning_prune.functional import magnitude_mask
from lightning_prune.testing import fit_tiny, tiny_classifier, tiny_datamodule
from tests.helpers import ROOT

FAST = {"max_epochs": 8, "limit_val_batches": 0}  # ~2 s each: accuracy 0.85-0.98 on the validation images


@pytest.fixture(scope="module")
def data():
    dm = tiny_datamodule()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """Tiny models trained a little, so that pruning one layer changes what they predict."""
    models = {}
    for name in ("test_resnet", "test_vit", "test_efficientnet"):
        _, model = fit_tiny([], tmp_path_factory.mktemp(name), model=tiny_classifier(name), datamodule=data,
                            **FAST)
        models[name] = model.eval()
    return models


def _loss(model, loader):
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            total += float(F.cross_entropy(model(x), y)) * len(y)
            n += len(y)
    return total / n


# ------------------------------------------------------------------ the scan
def test_magnitude_scan_prunes_one_layer_at_a_time_and_restores(trained, data):
    model = trained["test_resnet"].train()
    before = copy.deepcopy(model.state_dict())
    table = lp.sensitivity(model, data.val_dataloader(), sparsities=(0.9, 0.0, 0.5), metric="loss",
                           progress=False)
    assert table.sparsities == (0.0, 0.5, 0.9) and table.method == "magnitude" and not table.higher_is_better
    assert table.layers == [t.module_name for t in lp.resolve_targets(model)]
    assert "model.conv1.0" not in table.layers and "model.fc" not in table.layers  # timm's first conv, head
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.eval()
    assert table.baseline == pytest.approx(_loss(model, data.val_dataloader()), rel=1e-6)
    assert all(table.value(layer, 0.0) == pytest.approx(table.baseline, rel=1e-6) for layer in table.layers)
    # the oracle: prune that layer by hand with the shared magnitude function, evaluate
    layer = "model.layer2.0.conv2"
    pruned = copy.deepcopy(model)
    weight = pruned.get_submodule(layer).weight
    with torch.no_grad():
        weight.mul_(magnitude_mask(weight.abs(), 0.9))
    assert table.value(layer, 0.9) == pytest.approx(_loss(pruned, data.val_dataloader()), rel=1e-6)
    assert table.value(layer, 0.9) != pytest.approx(table.baseline, rel=1e-3)  # it did something
    assert table.sizes[layer] == weight.numel() and table.units[layer] == "weight"
    assert table.drop(layer) == [v - table.baseline for v in table.values[layer]]  # loss: higher is worse


#: first_k removes the first units whatever the model (``_keep_units``): on test_resnet it shows the criterion
#: reaches the scan, l2 on all three shows each family's groups; its other two families run with -m slow
_FIRST_K_FAMILIES = [pytest.param("first_k", name, marks=pytest.mark.slow)
                     for name in ("test_vit", "test_efficientnet")]


@pytest.mark.parametrize(("criterion", "name"), [
    *(("l2", name) for name in ("test_resnet", "test_vit", "test_efficientnet")),
    ("first_k", "test_resnet"),
    *_FIRST_K_FAMILIES,
])
def test_channel_scan_equals_the_physically_smaller_model(name, criterion, trained, data):
    """Each masked evaluation is what the model computes with the group's units removed (lp.compress)."""
    model = trained[name]
    loader = data.val_dataloader()
    table = lp.sensitivity(model, loader, sparsities=(0.5,), method="channels", metric="loss",
                           channel_criterion=criterion, progress=False)
    assert table.method == "channels" and table.layers
    units = set(table.units.values())
    assert units <= {"channel", "head", "conv group"} and (name != "test_vit" or "head" in units or
                                                             "channel" in units)
    changed = 0
    for group_name in table.layers[:4]:
        small = copy.deepcopy(model)
        groups, removed = channel_removal(small, {group_name: 0.5}, criterion=criterion,
                                          example_inputs=next(iter(loader))[0][:2])
        assert len(removed[group_name]) == next(g.size for g in groups if g.name == group_name) // 2
        before = sum(p.numel() for p in small.parameters())
        lp.compress(small, next(iter(loader))[0][:2], groups=groups, removed=removed, round_to=1,
                    verify=False)
        assert sum(p.numel() for p in small.parameters()) < before
        assert table.value(group_name, 0.5) == pytest.approx(_loss(small.eval(), loader), rel=1e-4, abs=1e-5)
        changed += not math.isclose(table.value(group_name, 0.5), table.baseline, rel_tol=1e-4)
    assert changed


def test_l2_keeps_the_strongest_units(trained, data):
    model = trained["test_resnet"]
    groups, removed = channel_removal(model, {"model.layer4.0.conv1": 0.75})
    group = next(g for g in groups if g.name == "model.layer4.0.conv1")
    weight = model.get_submodule("model.layer4.0.conv1").weight.detach()
    norms = weight.flatten(1).norm(dim=1)
    gone = removed[group.name]
    kept = sorted(set(range(group.size)) - set(gone))
    assert len(kept) == round(group.size * 0.25) and norms[gone].max() <= norms[kept].min()


def test_heat_map_progress_bar_and_accuracy(trained, data, tmp_path, capsys):
    model = trained["test_resnet"]
    path = tmp_path / "sens.png"
    table = lp.sensitivity(model, data.val_dataloader(), sparsities=(0.5, 0.95), heatmap=path, max_batches=1)
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    err = capsys.readouterr().err
    assert "sensitivity (magnitude)" in err and f"{len(table.layers)}/{len(table.layers)}" in err
    assert table.metric == "accuracy" and table.higher_is_better and 0.0 <= table.baseline <= 1.0
    assert all(v * 32 == round(v * 32) for row in table.values.values() for v in row)  # one batch of 32


def test_a_callable_metric(trained, data):
    def error_rate(logits, y):
        return (logits.argmax(-1) != y).float().mean()

    table = lp.sensitivity(trained["test_resnet"], data.val_dataloader(), sparsities=(0.9,),
                           metric=error_rate, higher_is_better=False, progress=False)
    acc = lp.sensitivity(trained["test_resnet"], data.val_dataloader(), sparsities=(0.9,), progress=False)
    assert table.metric == "error_rate" and table.baseline == pytest.approx(1 - acc.baseline)
    for layer in table.layers:
        assert table.drop(layer) == pytest.approx(acc.drop(layer), abs=1e-9)


def test_the_table_round_trips_and_formats(tmp_path):
    table = SensitivityTable("magnitude", "accuracy", True, 0.9, (0.5, 0.9),
                             {"a.conv": [0.9, 0.8], "b.conv": [0.85, 0.1]}, {"a.conv": 10, "b.conv": 30},
                             {"a.conv": "weight", "b.conv": "weight"})
    assert SensitivityTable.load(table.save(tmp_path / "t.json")) == table
    assert SensitivityTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    text = str(table)
    assert "unpruned: 0.9000" in text and "| `b.conv` | 30 | 0.8500 | 0.1000 |" in text
    assert table.drop("b.conv") == pytest.approx([0.05, 0.8])
    with pytest.raises(InvalidArgumentError, match=r"0.7 is not a scanned sparsity; the table has \[0.5,"):
        table.value("a.conv", 0.7)
    with pytest.raises(InvalidArgumentError, match="not a sensitivity table"):
        SensitivityTable.from_dict({"method": "magnitude"})


# ------------------------------------------------------------------ layer targets
def _random_table(rng, layers=6):
    sparsities = (0.5, 0.75, 0.9, 0.95, 0.98)
    values, sizes = {}, {}
    for i in range(layers):
        acc, row = 0.9, []
        for _ in sparsities:
            acc -= rng.random() * 0.1 * (i % 3)  # a third of the layers lose nothing
            row.append(acc)
        values[f"l{i}"] = row
        sizes[f"l{i}"] = rng.randint(10, 1000)
    return SensitivityTable("magnitude", "accuracy", True, 0.9, sparsities, values, sizes)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [0.3, 0.8, 0.9, 0.95])
def test_layer_targets_meet_the_global_target(seed, target):
    table = _random_table(random.Random(seed))
    targets = lp.layer_targets_from_sensitivity(table, target)
    mean = sum(table.sizes[k] * v for k, v in targets.items()) / sum(table.sizes.values())
    assert mean == pytest.approx(target, abs=1e-6)
    assert all(0.0 <= v <= 0.98 for v in targets.values()) and set(targets) == set(table.layers)
    # robust layers are pruned at least as far as sensitive ones
    for a in table.layers:
        for b in table.layers:
            if all(da <= db for da, db in zip(table.drop(a), table.drop(b))):
                assert targets[a] >= targets[b] - 1e-9, (a, b)


def test_layer_targets_share_a_free_target_and_respect_the_tolerance():
    table = SensitivityTable("magnitude", "accuracy", True, 0.9, (0.5, 0.9),
                             {"x.robust": [0.9, 0.9], "y.noisy": [0.897, 0.897], "z.weak": [0.7, 0.2]},
                             {"x.robust": 100, "y.noisy": 100, "z.weak": 100})
    free = lp.layer_targets_from_sensitivity(table, 0.3)
    assert free == pytest.approx({"x.robust": 0.9, "y.noisy": 0.0, "z.weak": 0.0})
    noisy = lp.layer_targets_from_sensitivity(table, 0.3, tolerance=0.004)  # one image in 270 is 0.0037
    assert noisy == pytest.approx({"x.robust": 0.45, "y.noisy": 0.45, "z.weak": 0.0})
    costly = lp.layer_targets_from_sensitivity(table, 0.7)
    assert costly["z.weak"] == pytest.approx(0.3) and costly["x.robust"] == pytest.approx(0.9)
    with pytest.raises(InvalidArgumentError, match=r"`target_sparsity`=0.95 is more than the scan reaches"
                                                   r" \(0.9000.*HINT: scan higher sparsities"):
        lp.layer_targets_from_sensitivity(table, 0.95)
    with pytest.raises(InvalidArgumentError, match=r"`target_sparsity` must be a number in \[0, 1\)"):
        lp.layer_targets_from_sensitivity(table, 1.0)
    with pytest.raises(InvalidArgumentError, match=r"`tolerance` must be a number >= 0, got -0.1"):
        lp.layer_targets_from_sensitivity(table, 0.5, tolerance=-0.1)
    with pytest.raises(InvalidArgumentTypeError, match=r"`table` must be a SensitivityTable, got list"):
        lp.layer_targets_from_sensitivity([], 0.5)


def test_the_most_specific_names_come_first():
    table = SensitivityTable("magnitude", "accuracy", True, 0.9, (0.5,),
                             {"conv1": [0.9], "layer1.0.conv1": [0.5]}, {"conv1": 10, "layer1.0.conv1": 10})
    targets = lp.layer_targets_from_sensitivity(table, 0.3)
    assert list(targets) == ["layer1.0.conv1", "conv1"]  # "conv1" also matches "model.layer1.0.conv1"
    pruning = lp.GradualMagnitudePruning(target_sparsity=0.3, layer_targets=targets)
    assert pruning._layer_target("model.layer1.0.conv1.weight") == targets["layer1.0.conv1"]
    assert pruning._layer_target("model.conv1.weight") == targets["conv1"]


def test_gradual_magnitude_pruning_reaches_the_layer_targets(trained, data, tmp_path):
    model = copy.deepcopy(trained["test_resnet"])
    table = lp.sensitivity(model, data.val_dataloader(), sparsities=(0.5, 0.8, 0.9, 0.95), progress=False)
    targets = lp.layer_targets_from_sensitivity(table, 0.9, tolerance=1 / 48)
    assert len(set(round(v, 3) for v in targets.values())) > 1  # not uniform
    pruning = lp.GradualMagnitudePruning(target_sparsity=0.9, layer_targets=targets, every_n_steps=2,
                                         sparsity_end_step=0.5, verbose=False)
    fit_tiny([pruning], tmp_path, model=model.train(), datamodule=data, max_epochs=2, limit_train_batches=4,
             limit_val_batches=0)
    report = {layer.name.removesuffix(".weight"): layer for layer in lp.sparsity_report(model).layers}
    for name, target in targets.items():
        assert report[name].sparsity == pytest.approx(target, abs=2 / report[name].params + 1e-6), name
    assert lp.sparsity_report(model).sparsity == pytest.approx(0.9, abs=1e-3)


def test_channel_ratios_become_a_compression_plan(trained, data):
    model = copy.deepcopy(trained["test_resnet"])
    table = lp.sensitivity(model, data.val_dataloader(), sparsities=(0.25, 0.5, 0.75), method="channels",
                           progress=False)
    ratios = lp.layer_targets_from_sensitivity(table, 0.5)
    mean = sum(table.sizes[k] * v for k, v in ratios.items()) / sum(table.sizes.values())
    assert mean == pytest.approx(0.5, abs=1e-6)
    groups, removed = channel_removal(model, ratios)
    before = sum(p.numel() for p in model.parameters())
    lp.compress(model, groups=groups, removed=removed, input_size=(3, 32, 32), round_to=1,
                verify=False)
    assert sum(p.numel() for p in model.parameters()) < 0.8 * before
    with pytest.raises(InvalidArgumentError, match=r"`ratios` names groups \['nope'\] that ImageClassifier"):
        channel_removal(model, {"nope": 0.5})


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"sparsities": ()}, InvalidArgumentError, r"`sparsities` must be a non-empty sequence"),
    ({"sparsities": "0.5"}, InvalidArgumentError, r"`sparsities` must be a non-empty sequence"),
    ({"sparsities": (0.5, 1.0)}, InvalidArgumentError, r"`sparsities` must be a number in \[0, 1\), got 1.0"),
    ({"method": "random"}, InvalidArgumentError, r"`method` must be one of \['magnitude', 'channels'\]"),
    ({"metric": "f1"}, InvalidArgumentError, r"`metric` must be one of \['accuracy', 'loss'\]"),
    ({"metric": 3}, InvalidArgumentTypeError, r"`metric` must be 'accuracy', 'loss' or a callable"),
    ({"metric": "loss", "higher_is_better": True}, InvalidArgumentError, r"contradicts metric 'loss'"),
    ({"channel_criterion": "l1"}, InvalidArgumentError, r"`channel_criterion` must be one of \['l2', 'first"),
    ({"max_batches": 0}, InvalidArgumentError, r"`max_batches` must be an integer >= 1"),
    ({"include": ["nothing*"]}, NoTargetsError, r"No module to prune: `include=\['nothing\*'\]`"),
])
def test_bad_arguments(kwargs, error, match, trained, data):
    with pytest.raises(error, match=match):
        lp.sensitivity(trained["test_resnet"], data.val_dataloader(), **{"progress": False, **kwargs})


def test_bad_data(trained):
    model = trained["test_resnet"]
    with pytest.raises(InvalidArgumentError, match="the dataloader yielded no batch"):
        lp.sensitivity(model, [], progress=False)
    with pytest.raises(InvalidArgumentTypeError, match=r"batches must be \(inputs, targets, ...\) sequences"):
        lp.sensitivity(model, [torch.zeros(2, 3, 32, 32)], progress=False)


# ------------------------------------------------------------------ the command
def _cli(tmp_path, *extra):
    return ["sensitivity", "--config", "recipes/digits/dense.yaml",
            "--model.init_args.model_name=test_resnet", "--data.init_args.limit=320",
            "--data.init_args.batch_size=32", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}", "--sensitivity.sparsities=[0.5, 0.9]",
            f"--sensitivity.out_dir={tmp_path / 'out'}", *extra]


def test_cli_fits_then_scans_and_writes_the_layer_targets(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    main(_cli(tmp_path, "--sensitivity.target_sparsity=0.8"))
    out = capsys.readouterr().out
    assert "accuracy with one layer pruned (magnitude)" in out and "model.layer1.0.conv1" in out
    assert "layer targets for a global sparsity of 0.8" in out
    table = SensitivityTable.load(tmp_path / "out" / "sensitivity.json")
    targets = json.loads((tmp_path / "out" / "layer_targets.json").read_text())
    assert set(targets) == set(table.layers) and (tmp_path / "out" / "sensitivity.png").stat().st_size > 5000
    assert (tmp_path / "out" / "sensitivity.md").read_text().startswith("accuracy with one layer pruned")


def test_cli_scans_the_weights_of_a_checkpoint(tmp_path, monkeypatch, data):
    monkeypatch.chdir(ROOT)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="dense")
    _, model = fit_tiny([saver], tmp_path / "fit", datamodule=tiny_datamodule(), **FAST)
    main(_cli(tmp_path, f"--ckpt_path={tmp_path / 'ckpt' / 'dense.ckpt'}", "--sensitivity.method=channels",
              "--sensitivity.metric=loss"))
    table = SensitivityTable.load(tmp_path / "out" / "sensitivity.json")
    loader = tiny_datamodule()
    loader.setup("validate")
    assert table.method == "channels"
    assert table.baseline == pytest.approx(_loss(model.eval(), loader.val_dataloader()), rel=1e-5)


def test_the_other_subcommands_still_work(capsys):
    main(["list"])
    assert "distill" in capsys.readouterr().out
