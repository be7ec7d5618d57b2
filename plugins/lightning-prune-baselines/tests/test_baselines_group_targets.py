"""``group_targets`` of the channel baselines: the named groups drop their own fraction of units."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from unit_checks import CompressAtFitEnd

from lightning_prune.functional import kept_count
from lightning_prune.testing import fit_tiny, tiny_classifier
from lightning_prune_baselines import FirstKChannels, RandomChannels, RandomUnstructured, first_k_keep

FAST = {"max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 0}
TARGETS = {"model.layer2.0.conv1": 0.75, "layer4.0.conv2": 0.1, "model.conv1.0": 0.0}  # a stream, a dense one


def _full(name):
    return name if name.startswith("model.") else f"model.{name}"


def test_first_k_drops_the_first_units_of_each_named_group_and_compresses_exactly(tmp_path):
    pruner = FirstKChannels(target_sparsity=0.4, group_targets=TARGETS, verbose=False)
    at_end = CompressAtFitEnd(pruner, torch.randn(4, 3, 32, 32))
    fit_tiny([pruner, at_end], tmp_path, **FAST)
    wanted = {_full(k): v for k, v in TARGETS.items()}
    keep = [first_k_keep(g.size, wanted.get(g.name, 0.4)) for g in pruner.groups]
    assert all(torch.equal(k, e) for k, e in zip(pruner.keep, keep))
    sizes = {g.name: int(k.sum()) for g, k in zip(pruner.groups, pruner.keep)}
    assert sizes["model.layer2.0.conv1"] == 12 and sizes["model.layer4.0.conv2"] == kept_count(96, 0.1)
    assert sizes["model.conv1.0"] == 16 and sizes["model.layer1.0.conv1"] == kept_count(32, 0.4)
    at_end.check(pruner.groups, keep)  # the compressed model computes what the masked one computed


class _Keeps(Callback):
    def __init__(self, pruner):
        self.pruner, self.seen = pruner, []

    def on_train_batch_end(self, trainer, *args):
        pruner = self.pruner
        if pruner.keep is not None:
            kept = {g.name: int(k.sum()) for g, k in zip(pruner.groups, pruner.keep)}
            self.seen.append((pruner.current_target, kept))


def test_random_channels_scale_the_schedule_to_each_named_group(tmp_path):
    pruner = RandomChannels(target_sparsity=0.5, sparsity_end_step=4, every_n_steps=2, seed=1,
                            group_targets=TARGETS, verbose=False)
    keeps = _Keeps(pruner)
    fit_tiny([pruner, keeps], tmp_path, **FAST)
    assert len({s for s, _ in keeps.seen}) >= 2 and keeps.seen[-1][0] == 0.5  # a ramp, then the target
    wanted = {_full(k): v for k, v in TARGETS.items()}
    sizes = {g.name: g.size for g in pruner.groups}
    for sparsity, kept in keeps.seen:
        for name, size in sizes.items():
            fraction = wanted[name] * sparsity / 0.5 if name in wanted else sparsity
            assert kept[name] == kept_count(size, fraction), (sparsity, name)
    assert keeps.seen[-1][1]["model.layer2.0.conv1"] == 12


@pytest.mark.parametrize("cls", [FirstKChannels, RandomChannels])
@pytest.mark.parametrize(("value", "match"), [
    ({"a": 1.0}, r"`group_targets\['a'\]` must be a number in \[0, 1\), got 1.0. HINT: the fraction"),
    ({"a": None}, r"`group_targets\['a'\]` must be a number in \[0, 1\), got None"),
    ("model.fc", r"`group_targets` must be None or a mapping \{group name: fraction in \[0, 1\)\}"),
])
def test_bad_values_name_the_argument(cls, value, match):
    with pytest.raises(MisconfigurationException, match=match):
        cls(group_targets=value)


@pytest.mark.parametrize("cls", [FirstKChannels, RandomChannels])
def test_unknown_names_are_refused_at_setup(cls, tmp_path):
    pruner = cls(group_targets={"model.nope": 0.5}, verbose=False)
    with pytest.raises(MisconfigurationException, match=(
            rf"`group_targets` names groups \['model.nope'\] that {cls.__name__} \(on ImageClassifier\) does"
            r" not have; it has \['model.conv1.0', .*HINT: scan the same model with method='channels'")):
        fit_tiny([pruner], tmp_path, model=tiny_classifier(), max_epochs=1, limit_train_batches=1,
                 limit_val_batches=0)


def test_the_weight_baseline_has_no_group_targets():
    with pytest.raises(TypeError):
        RandomUnstructured(group_targets={"a": 0.5})
