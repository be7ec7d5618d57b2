"""``importance=`` of the channel callbacks: each criterion against a hand computation on constructed layers,
the allocation's floor and cap, BatchNorm recalibration, the Taylor statistics under DDP and across a
mid-epoch resume, and the errors at construction."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

import lightning_prune as lp
from lightning_prune.callbacks.channels import ChannelPruningCallback
from lightning_prune.callbacks.group_lasso import GroupLassoPruning
from lightning_prune.callbacks.l0 import L0Pruning
from lightning_prune.core.batchnorm import recalibrate_batchnorm
from lightning_prune.core.importance import ImportanceContext, get_importance, importance_names
from lightning_prune.graph import ChannelGroup, Slice
from lightning_prune.testing import check_mid_epoch_resume, fit_tiny
from lightning_prune_baselines import FirstKChannels, RandomChannels
from tests.helpers import Spy


# ------------------------------------------------------------------ constructed layers
class Net(nn.Module):
    """conv1 (3 -> 4) -> bn1 -> conv2 (4 -> 2): conv1's 4 channels are one group; a second group of 2
    "heads" (2 channels each) is fc1 (-> 4) read by fc2, without a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 2, 1)
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))


CONV = ChannelGroup("conv1", 4, "channel", 1, (), (
    Slice("conv1", "out", (0, 1, 2, 3), (0, 1, 2, 3)),
    Slice("bn1", "channel", (0, 1, 2, 3), (0, 1, 2, 3)),
    Slice("conv2", "in", (0, 1, 2, 3), (0, 1, 2, 3)),
), ("conv1",))
HEADS = ChannelGroup("fc1", 2, "head", 2, (), (
    Slice("fc1", "out", (0, 1, 2, 3), (0, 0, 1, 1)),
    Slice("fc2", "in", (0, 1, 2, 3), (0, 0, 1, 1)),
), ("fc1",))


def _context(net, **kwargs):
    return ImportanceContext(model=net, **kwargs)


def _per_unit(values, units, size):
    out = torch.zeros(size, dtype=torch.float64)
    for v, u in zip(values, units):
        out[u] += v
    return out


def _hand_weight_norm(net):
    c = net.conv1.weight.double().flatten(1).pow(2).sum(1)  # producer rows
    b = net.bn1.weight.double().pow(2)  # the norm's scale
    r = net.conv2.weight.double().flatten(2).transpose(0, 1).pow(2).sum((1, 2))  # reader columns
    conv = (c + b + r) / 3
    f = net.fc1.weight.double().pow(2).sum(1)
    h = net.fc2.weight.double().pow(2).sum(0)
    heads = (_per_unit(f, [0, 0, 1, 1], 2) + _per_unit(h, [0, 0, 1, 1], 2)) / 2
    return conv / conv.mean(), heads / heads.mean()


def test_weight_norm_is_torch_pruning_group_norm_by_hand():
    net = Net()
    scores = get_importance("weight_norm").scores([CONV, HEADS], _context(net))
    conv, heads = _hand_weight_norm(net)
    torch.testing.assert_close(scores["conv1"].double(), conv, rtol=1e-6, atol=0)
    torch.testing.assert_close(scores["fc1"].double(), heads, rtol=1e-6, atol=0)
    # a unit whose weights are made large ranks first
    with torch.no_grad():
        net.conv1.weight[2] *= 100
    assert int(get_importance("weight_norm").scores([CONV], _context(net))["conv1"].argmax()) == 2


def test_bn_scale_is_abs_gamma_and_a_group_without_a_norm_falls_back_once():
    net = Net()
    said = []
    criterion = get_importance("bn_scale")
    scores = criterion.scores([CONV, HEADS], _context(net, warn=said.append))
    gamma = net.bn1.weight.double().abs()
    torch.testing.assert_close(scores["conv1"].double(), gamma / gamma.mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(scores["fc1"].double(), _hand_weight_norm(net)[1], rtol=1e-6, atol=0)
    assert len(said) == 1 and "`fc1`" in said[0] and "weight_norm" in said[0]
    criterion.scores([CONV, HEADS], _context(net, warn=said.append))
    assert len(said) == 1  # said once


@pytest.mark.parametrize("name", ["taylor", "taylor_elementwise"])
def test_taylor_sums_the_per_step_absolute_first_order_terms(name):
    net = Net()
    criterion = get_importance(name)
    entry = torch.abs if name == "taylor_elementwise" else torch.clone  # (|w * dL/dw| summed, elementwise)
    steps = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        # by hand: per unit, sum of w * dL/dw over every entry it owns (weights and biases)
        wg = lambda p: entry((p.detach() * p.grad).double())  # noqa: E731
        conv = (wg(net.conv1.weight).flatten(1).sum(1) + wg(net.conv1.bias) + wg(net.bn1.weight)
                + wg(net.bn1.bias) + wg(net.conv2.weight).sum((0, 2, 3)))
        heads = _per_unit(wg(net.fc1.weight).sum(1) + wg(net.fc1.bias), [0, 0, 1, 1], 2) \
            + _per_unit(wg(net.fc2.weight).sum(0), [0, 0, 1, 1], 2)
        steps.append((conv.abs(), heads.abs()))
        criterion.accumulate([CONV, HEADS], _context(net))
    conv = steps[0][0] + steps[1][0]
    heads = steps[0][1] + steps[1][1]
    scores = criterion.scores([CONV, HEADS], _context(net))
    torch.testing.assert_close(scores["conv1"].double(), conv / conv.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(scores["fc1"].double(), heads / heads.mean(), rtol=1e-5, atol=0)
    net.conv1.weight.grad[0, 0] = float("inf")  # an overflowed AMP step: left out
    criterion.accumulate([CONV, HEADS], _context(net))
    state = criterion.state_dict()
    assert state["steps"] == 2
    fresh = get_importance(name)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.scores([CONV], _context(net))["conv1"], scores["conv1"])
    criterion.reset()
    assert criterion.state_dict() == {"sums": {}, "steps": 0}


def test_random_draws_from_the_given_generator():
    net = Net()
    scores = get_importance("random").scores([CONV, HEADS],
                                             _context(net, generator=torch.Generator().manual_seed(7)))
    g = torch.Generator().manual_seed(7)
    assert torch.equal(scores["conv1"], torch.rand(4, generator=g, dtype=torch.float64).float())
    assert torch.equal(scores["fc1"], torch.rand(2, generator=g, dtype=torch.float64).float())


def test_a_plugin_adds_a_criterion_in_a_few_lines():
    @lp.register_importance("test_bias_norm")
    class BiasNorm(lp.Importance):
        normalize = False

        def group_scores(self, group, context):
            return lp.unit_reduce(context.model, group, lambda x: x.abs().sum(1), roles=("out",),
                                  params=("bias",))

    assert "test_bias_norm" in importance_names()
    net = Net()
    scores = get_importance("test_bias_norm").scores([CONV], _context(net))
    torch.testing.assert_close(scores["conv1"], net.conv1.bias.detach().abs())
    cb = FirstKChannels(importance="test_bias_norm")
    assert cb.criterion is not None and cb.importance == "test_bias_norm"
    assert "first_k" in importance_names()  # the baselines plugin's control is a criterion too


# ------------------------------------------------------------------ errors at construction
@pytest.mark.parametrize(("make", "match"), [
    (lambda: GroupLassoPruning(importance="magnitude"),
     r"`importance` of GroupLassoPruning must be one of .*'bn_scale'.*'gate'.*'random'.*'taylor'.*"
     r"'weight_norm'.*got 'magnitude'"),
    (lambda: FirstKChannels(importance="gate"), r"'gate' needs a gate callback"),
    (lambda: L0Pruning(max_group_sparsity=0.0), r"max_group_sparsity"),
    (lambda: L0Pruning(max_group_sparsity=1.5), r"max_group_sparsity"),
    (lambda: RandomChannels(min_group_keep=1.0), r"min_group_keep"),
    (lambda: GroupLassoPruning(recalibrate_bn_batches=-1), r"recalibrate_bn_batches"),
    (lambda: lp.OneShotPruning("wanda", importance="weight_norm"), r"needs method='channels'"),
    (lambda: lp.OneShotPruning("channels", importance="nope"), r"must be one of .*'weight_norm'"),
], ids=["unknown", "gate-without-gates", "cap-0", "cap-1.5", "floor-1", "recalibrate-negative",
        "one-shot-weights", "one-shot-unknown"])
def test_bad_arguments_fail_at_construction(make, match):
    with pytest.raises(MisconfigurationException, match=match):
        make()


def test_defaults_and_choices():
    assert GroupLassoPruning().criterion is None  # the gates
    assert GroupLassoPruning(importance="gate").criterion is None
    assert L0Pruning(importance="taylor").criterion.name == "taylor"
    assert RandomChannels().criterion is None and FirstKChannels().criterion is None
    assert GroupLassoPruning(max_group_sparsity=1.0).max_group_sparsity == 1.0


# ------------------------------------------------------------------ allocation: floor and cap
class _Fixed(ChannelPruningCallback):
    def due(self, trainer):
        return None

    def unit_scores(self, trainer, pl_module):
        return {}


class _UnitCost:
    """Cost = the fraction of the units kept (what the budget search needs)."""

    def __init__(self, groups):
        self.total = sum(g.size for g in groups)

    def ratios(self, removed):
        kept = 1 - sum(len(v) for v in removed.values()) / self.total
        return kept, kept

    measured_ratios = ratios


def _groups(*sizes):
    return [ChannelGroup(f"g{i}", n, "channel", 1, (), (), (f"g{i}",)) for i, n in enumerate(sizes)]


def _scores(groups, scale):
    return [torch.arange(g.size, dtype=torch.float32) * s for g, s in zip(groups, scale)]


def test_global_ranking_keeps_the_floor_of_every_group():
    cb = _Fixed(target_flops=0.2, min_group_keep=0.5)
    cb.groups = _groups(10, 10, 4)
    cb._cost = _UnitCost(cb.groups)
    with pytest.warns(UserWarning, match="is not reached"):  # the floor keeps half: 0.5 > 0.2
        keep = cb.budget_keep(_scores(cb.groups, [0.01, 1.0, 100.0]))
    assert [int(k.sum()) for k in keep] == [5, 5, 2]
    assert torch.equal(keep[0], torch.arange(10) >= 5)  # the largest scores stay


def test_the_cap_limits_the_losses_of_the_smallest_scored_group():
    cb = _Fixed(target_flops=0.5, max_group_sparsity=0.6)
    cb.groups = _groups(10, 10)
    cb._cost = _UnitCost(cb.groups)
    keep = cb.budget_keep(_scores(cb.groups, [0.001, 1.0]))  # without the cap g0 would lose 9 units
    assert [int(k.sum()) for k in keep] == [4, 6]
    uncapped = _Fixed(target_flops=0.5)
    uncapped.groups, uncapped._cost = cb.groups, cb._cost
    assert [int(k.sum()) for k in uncapped.budget_keep(_scores(cb.groups, [0.001, 1.0]))] == [1, 9]


def test_uniform_sparsity_and_a_rule_of_its_own_respect_the_floor():
    cb = _Fixed(min_group_keep=0.3)
    cb.groups = _groups(10, 3)
    scores = _scores(cb.groups, [1.0, 1.0])
    assert [int(k.sum()) for k in cb.allocate(scores, 0.95)] == [3, 1]
    everything_gone = [torch.zeros(10, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)]
    keep = cb.allocate(scores, keep=everything_gone)
    assert [int(k.sum()) for k in keep] == [3, 1]
    assert keep[0].tolist() == [False] * 7 + [True] * 3


def test_random_is_seeded_by_the_rule_and_resumes_with_its_generator():
    torch.manual_seed(3)  # what seed_everything sets: the seed when none is given
    cb = _Fixed(importance="random")
    cb.groups = _groups(5, 3)
    first = cb.scores_list(None, nn.Module())
    g = torch.Generator().manual_seed(3)
    assert torch.equal(first[0], torch.rand(5, generator=g, dtype=torch.float64).float())
    state = cb.state_dict()
    second = cb.scores_list(None, nn.Module())
    resumed = _Fixed(importance="random")
    resumed.groups = cb.groups
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(resumed.scores_list(None, nn.Module()), second))
    assert not torch.equal(first[0], second[0])


# ------------------------------------------------------------------ BatchNorm recalibration
def test_recalibration_equals_a_fresh_pass_and_leaves_weights_and_modes_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, momentum=0.3), nn.Dropout(0.5), nn.ReLU(),
                          nn.Conv2d(5, 4, 1), nn.BatchNorm2d(4))
    model.train()
    model[2].eval()  # a mixed mode, restored as it was
    with torch.no_grad():  # stale statistics
        for bn in (model[1], model[5]):
            bn.running_mean.fill_(3.0)
            bn.running_var.fill_(7.0)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num" not in k}
    batches = [torch.randn(6, 3, 8, 8) for _ in range(3)]
    assert recalibrate_batchnorm(model, batches, lambda m, b: m(b)) == 2
    # by hand: the cumulative average over the batches of each batch's statistics (dropout off)
    with torch.no_grad():
        h = [model[0](b) for b in batches]
        mean1 = torch.stack([x.mean((0, 2, 3)) for x in h]).mean(0)
        var1 = torch.stack([x.var((0, 2, 3), unbiased=True) for x in h]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, var1, rtol=1e-5, atol=1e-6)
    assert int(model[1].num_batches_tracked) == 3 and model[1].momentum == 0.3
    # the second norm: what a fresh pass computes (every norm in training mode, on the batch's statistics)
    first, fresh = copy.deepcopy(model[1]).train(), nn.BatchNorm2d(4, momentum=None)
    with torch.no_grad():
        for b in batches:
            fresh(model[4](model[3](first(model[0](b)))))
    torch.testing.assert_close(model[5].running_mean, fresh.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[5].running_var, fresh.running_var, rtol=1e-5, atol=1e-6)
    assert [m.training for m in model] == [True, True, False, True, True, True]
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k


def _bn_stats(trainer, module, hook):
    cb = next(c for c in trainer.callbacks if isinstance(c, FirstKChannels))
    if cb.keep is not None and "stats" not in SEEN:
        SEEN["stats"] = {n: b.clone() for n, b in module.named_buffers() if "running" in n}


SEEN: dict = {}


def test_the_callback_recalibrates_after_its_decision(tmp_path):
    from lightning_prune.callbacks.one_shot import calibration_loader
    from lightning_prune.core.one_shot import default_forward, draw_batches

    SEEN.clear()
    cb = FirstKChannels(target_sparsity=0.5, verbose=False, recalibrate_bn_batches=2)
    trainer, module = fit_tiny([cb, Spy(_bn_stats, ("on_train_batch_end",))], tmp_path, max_steps=1,
                               limit_val_batches=0)
    expected = {n: b.clone() for n, b in module.named_buffers() if "running" in n}
    recalibrate_batchnorm(module, draw_batches(calibration_loader(trainer), 2), default_forward)
    fresh = {n: b for n, b in module.named_buffers() if "running" in n}
    for name, value in SEEN["stats"].items():
        torch.testing.assert_close(value, fresh[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(expected[name], fresh[name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ Taylor: resume and DDP
@pytest.mark.parametrize("name", ["taylor", "taylor_elementwise"])
def test_taylor_statistics_resume_exactly_mid_epoch(tmp_path, name):
    state = check_mid_epoch_resume(
        lambda: FirstKChannels(target_sparsity=0.5, prune_step=100, importance=name, verbose=False,
                               recalibrate_bn_batches=1),
        tmp_path, max_epochs=2, resume_step=5)
    assert state["importance"]["steps"] == 8
    assert all(float(v.sum()) > 0 for v in state["importance"]["sums"].values())


def _ddp_record(trainer, module, hook):
    cb = next(c for c in trainer.callbacks if isinstance(c, FirstKChannels))
    out = Path(os.environ["LP_TEST_DDP_DIR"]) / f"rank{trainer.global_rank}.pt"
    torch.save({"state": cb.criterion.state_dict()}, out)


@pytest.mark.slow
def test_ddp_taylor_statistics_identical_on_both_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("LP_TEST_DDP_DIR", str(tmp_path))
    cb = FirstKChannels(target_sparsity=0.5, prune_step=100, importance="taylor", verbose=False)
    fit_tiny([Spy(_ddp_record, ("on_train_end",)), cb], tmp_path, strategy="ddp_spawn", devices=2,
             max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["state"]["steps"] == r1["state"]["steps"] == 3
    assert r0["state"]["sums"].keys() == r1["state"]["sums"].keys()
    for name, value in r0["state"]["sums"].items():
        assert torch.equal(value, r1["state"]["sums"][name]), name
        assert float(value.sum()) > 0


# ------------------------------------------------------------------ one-shot channels
def test_one_shot_channels_rank_by_the_chosen_criterion(tmp_path):
    from lightning_prune.testing import tiny_classifier

    model = tiny_classifier("test_resnet")
    dense = copy.deepcopy(model)
    cb = lp.OneShotPruning("channels", target_sparsity=0.5, importance="weight_norm", calibration_batches=1,
                           verbose=False)
    fit_tiny([cb], tmp_path, model=model, max_steps=1, limit_val_batches=0)
    scores = get_importance("weight_norm").scores(cb.groups, _context(dense.model, prefix="model"))
    for group in cb.groups:
        removed = sorted(cb.shrink.removed.get(group.name, []))
        if removed:  # the lowest weight norms went
            lowest = sorted(range(group.size), key=lambda u: (float(scores[group.name][u]), u))[:len(removed)]
            assert removed == sorted(lowest), group.name
