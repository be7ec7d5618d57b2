"""One-shot channels ranked by first-order Taylor from the calibration batches (``importance="taylor"`` of
``prune_one_shot`` and ``OneShotPruning``): the scores against a hand computation, the least-squares refit
after a Taylor ranking, a real fit (the units the scores imply go; the first optimizer step's gradients do not
see the calibration backward), the error without a loss, DDP."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

import lightning_prune as lp
from lightning_prune.callbacks.one_shot import OneShotPruning, calibration_loader
from lightning_prune.core.importance import Taylor, get_importance
from lightning_prune.core.one_shot import (
    calibration_gradient_scores,
    draw_batches,
    find_channel_groups,
    prune_channels,
    prune_one_shot,
)
from lightning_prune.errors import InvalidArgumentError
from lightning_prune.testing import fit_tiny


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double()


def _batches(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _hand_products(net, batches):
    """Per unit of the hidden layer, ``w * sum_batches dL/dw`` of every entry it owns: its row of the first
    weight, its bias, its column of the second weight."""
    net = copy.deepcopy(net)
    for batch in batches:
        _loss(net, batch).backward()
    w0, b0, w1 = net[0].weight, net[0].bias, net[2].weight
    return [torch.cat([w0[u] * w0.grad[u], (b0[u] * b0.grad[u]).reshape(1), w1[:, u] * w1.grad[:, u]])
            .detach() for u in range(6)]


@pytest.mark.parametrize("elementwise", [False, True])
def test_taylor_scores_are_the_first_order_terms_summed_over_the_calibration_batches(elementwise):
    net, batches = _net(), _batches()
    products = _hand_products(net, batches)
    raw = torch.stack([p.abs().sum() if elementwise else p.sum().abs() for p in products])
    prefix, root, groups, _, _ = find_channel_groups(net, example_inputs=batches[0][0])
    assert [g.name for g in groups] == ["0"]
    criterion = Taylor(elementwise=elementwise)
    calibration_gradient_scores(criterion, net, root, prefix, groups, batches, _loss)
    scores = criterion.scores(groups, lp.ImportanceContext(model=root, prefix=prefix))["0"]
    torch.testing.assert_close(scores.double(), raw / raw.mean(), rtol=1e-6, atol=0)
    # the model as it was: no gradients, its mode
    assert all(p.grad is None for p in net.parameters()) and net.training
    # prune_one_shot removes the lowest
    result = prune_one_shot(net, batches, method="channels", target_sparsity=0.5, calibration_batches=3,
                            importance="taylor_elementwise" if elementwise else "taylor", loss_fn=_loss)
    assert result.removed == {"0": sorted(raw.argsort()[:3].tolist())}


def test_the_least_squares_refit_runs_after_a_taylor_ranking():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4)).double()
    with torch.no_grad():  # units 4 and 5 are small combinations of units 0..3
        w1, b1 = model[0].weight, model[0].bias
        w1[4], b1[4] = 0.05 * (w1[0] - w1[2]), 0.05 * (b1[0] - b1[2])
        w1[5], b1[5] = 0.05 * (2 * w1[1] + w1[3]), 0.05 * (2 * b1[1] + b1[3])
    x = torch.randn(64, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (64,), generator=g)
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    outputs = {}
    for compensate in (True, False):
        net = copy.deepcopy(model)
        result = prune_one_shot(net, batches, method="channels", target_sparsity=2 / 6, calibration_batches=2,
                                compensate=compensate, damping=1e-9, importance="taylor", loss_fn=_loss)
        assert result.removed == {"0": [4, 5]}  # Taylor's choice (the small units), the same either way
        with torch.no_grad():
            outputs[compensate] = net(x)
        assert (result.errors["1"] < 1e-12) is compensate
    with torch.no_grad():
        dense = model(x)
    torch.testing.assert_close(outputs[True], dense, rtol=0, atol=1e-8)  # refit: the dense output
    assert not torch.allclose(outputs[False], dense, atol=1e-4)


def test_taylor_without_a_loss_function_is_a_clear_error():
    with pytest.raises(InvalidArgumentError, match=r"importance='taylor' ranks the units by the gradients.*"
                                                   r"pass `loss_fn\(model, batch\) -> loss`"):
        prune_one_shot(_net(), _batches(), method="channels", importance="taylor")
    with pytest.raises(InvalidArgumentError, match=r"needs method='channels'"):
        prune_one_shot(_net(), _batches(), method="wanda", importance="taylor", loss_fn=_loss)
    with pytest.raises(InvalidArgumentError, match=r"must be one of"):
        prune_one_shot(_net(), _batches(), method="channels", importance="nope")


def test_the_calibration_backward_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    example = torch.zeros(2, 5, dtype=torch.float64)
    prefix, root, groups, _, _ = find_channel_groups(net, example_inputs=example)
    net.eval()
    net[1].train()  # mixed modes come back per module
    net[3].weight.requires_grad_(False)
    sentinel = torch.full_like(net[0].weight, 7.0)
    net[0].weight.grad = sentinel
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    rng = torch.get_rng_state()
    criterion = get_importance("taylor")
    calibration_gradient_scores(criterion, net, root, prefix, groups, _batches(), _loss)
    assert criterion.steps == 1 and all(float(v.sum()) > 0 for v in criterion.sums.values())
    assert net[0].weight.grad is sentinel and float(sentinel.min()) == 7.0
    assert all(p.grad is None for n, p in net.named_parameters() if n != "0.weight")
    assert not net[3].weight.requires_grad and net[0].weight.requires_grad
    assert [m.training for m in net] == [False, True, False, False]
    for k, v in net.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(InvalidArgumentError, match=r"scalar tensor that requires grad"):
        calibration_gradient_scores(criterion, net, root, prefix, groups, _batches(),
                                    lambda m, b: m(b[0]))  # not a scalar


class _DictLoss(lp.ImageClassifier):
    """training_step returns a dict with the loss (and logs it)."""

    def training_step(self, batch, batch_idx):
        return {"loss": super().training_step(batch, batch_idx)}


class _FirstStep(pl.Callback):
    """At the first step: the module before it (after the pruning) and the batch; at its optimizer step the
    gradients Lightning computed."""

    def __init__(self):
        self.model = self.batch = self.grads = self.had_grads = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            self.model, self.batch = copy.deepcopy(pl_module.model), copy.deepcopy(batch)
            self.had_grads = any(p.grad is not None for p in pl_module.parameters())
            self.training = pl_module.training and all(m.training for m in pl_module.modules())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.grads = {n.removeprefix("model."): p.grad.clone() for n, p in pl_module.named_parameters()
                          if p.grad is not None}


def test_a_fit_removes_the_units_the_taylor_scores_imply_and_its_first_step_is_untouched(tmp_path):
    model = _DictLoss("test_resnet", num_classes=10, optimizer="sgd", lr=0.05, scheduler="none",
                      weight_decay=0.0)
    dense = copy.deepcopy(model)
    cb = OneShotPruning("channels", target_sparsity=0.4, importance="taylor", calibration_batches=2,
                        verbose=False)
    first = _FirstStep()
    trainer, _ = fit_tiny([cb, first], tmp_path, model=model, max_steps=1, limit_val_batches=0)
    # the scores: the same Taylor on the dense copy, the loss summed over the calibration batches
    batches = draw_batches(calibration_loader(trainer), 2)
    dense.train()
    for x, y in batches:
        F.cross_entropy(dense(x), y).backward()
    expected = Taylor()
    expected.accumulate(cb.groups, lp.ImportanceContext(model=dense))
    scores = expected.scores(cb.groups, lp.ImportanceContext(model=dense))
    assert cb.shrink.removed
    for group in cb.groups:
        removed = sorted(cb.shrink.removed.get(group.name, []))
        lowest = sorted(range(group.size), key=lambda u: (float(scores[group.name][u]), u))[:len(removed)]
        assert removed == sorted(lowest), group.name
    # the pruned model as the fit left it: no gradients, training mode, the BatchNorm statistics not
    # advanced by the calibration forwards
    assert first.had_grads is False and first.training
    norms = [m for m in first.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(int(m.num_batches_tracked) == 0 for m in norms)
    # the first optimizer step's gradients: those of its own batch alone, on the pruned model
    pruned = first.model
    pruned.zero_grad(set_to_none=True)
    x, y = first.batch
    F.cross_entropy(pruned(x), y).backward()
    assert first.grads
    assert first.grads.keys() == {n for n, p in pruned.named_parameters() if p.grad is not None}
    for name, grad in first.grads.items():
        torch.testing.assert_close(grad, dict(pruned.named_parameters())[name].grad, rtol=1e-5, atol=1e-6)


class _RankRemoved(pl.Callback):
    def __init__(self, root):
        self.root = root

    def on_train_start(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, OneShotPruning))
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"removed": cb.shrink.removed, "sums": cb.criterion.sums, "state": state},
                   Path(self.root) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_remove_the_same_units_by_taylor(tmp_path):
    cb = OneShotPruning("channels", target_flops=0.6, importance="taylor", calibration_batches=1,
                        verbose=False)
    fit_tiny([cb, _RankRemoved(tmp_path)], tmp_path, max_epochs=1, limit_train_batches=2,
             limit_val_batches=0, strategy="ddp_spawn", devices=2, accelerator="cpu")
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a["removed"] and a["removed"] == b["removed"]
    assert a["sums"].keys() == b["sums"].keys()
    for name in a["sums"]:
        assert torch.equal(a["sums"][name], b["sums"][name]), name
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key


class _ManualOptimization(lp.ImageClassifier):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False


class _NoneLoss(lp.ImageClassifier):
    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        return None


class _Started(pl.Callback):
    def __init__(self):
        self.started = False

    def on_fit_start(self, trainer, pl_module):
        self.started = True


def _tiny(cls):
    return cls("test_resnet", num_classes=10, optimizer="sgd", lr=0.05, scheduler="none", weight_decay=0.0)


def test_taylor_under_manual_optimization_is_refused_before_the_fit_starts(tmp_path):
    """Refused at setup('fit'), not at the pruning step mid-fit (prune_step=2 here)."""
    started = _Started()
    cb = OneShotPruning("channels", target_flops=0.5, importance="taylor", prune_step=2,
                        calibration_batches=1, verbose=False)
    with pytest.raises(MisconfigurationException, match=r"importance='taylor' ranks units by the gradients"
                       r" of the training_step loss .*uses manual optimization.*HINT: importance=None"):
        fit_tiny([cb, started], tmp_path, model=_tiny(_ManualOptimization), max_steps=4,
                 limit_val_batches=0)
    assert not started.started


def test_taylor_refuses_a_training_step_that_returns_none(tmp_path):
    cb = OneShotPruning("channels", target_flops=0.5, importance="taylor", calibration_batches=1,
                        verbose=False)
    with pytest.raises(MisconfigurationException, match=r"needs the loss of training_step on the calibration"
                       r" batches, but it returned None"):
        fit_tiny([cb], tmp_path, model=_tiny(_NoneLoss), max_steps=1, limit_val_batches=0)


def _groups(net):
    example = torch.zeros(2, 5, dtype=torch.float64)
    prefix, root, groups, cost, _ = find_channel_groups(net, example_inputs=example)
    return prefix, root, groups, cost


def test_the_calibration_gradient_error_paths():
    net = _net()
    prefix, root, groups, cost = _groups(net)
    taylor = get_importance("taylor")
    with pytest.raises(InvalidArgumentError, match=r"importance='taylor' needs calibration batches"):
        calibration_gradient_scores(taylor, net, root, prefix, groups, [], _loss)
    with pytest.raises(InvalidArgumentError, match=r"gradients of the calibration loss are not finite"):
        calibration_gradient_scores(taylor, net, root, prefix, groups, _batches(),
                                    lambda m, b: _loss(m, b) * float("nan"))
    with pytest.raises(InvalidArgumentError, match=r"importance='taylor' ranks units by the gradients of the"
                       r" loss on the calibration batches: pass `loss_fn\(model, batch\) -> loss`"):
        prune_channels(net, _batches(), groups, cost, prefix, root, importance=taylor)
    with pytest.raises(InvalidArgumentError, match=r"`loss_fn` must be a callable `loss_fn\(model, batch\)"
                                                   r" -> loss`, got str"):
        prune_one_shot(_net(), _batches(), method="channels", loss_fn="cross_entropy")


def test_the_calibration_rng_forks_only_the_model_devices(monkeypatch):
    """The random state is restored, and on CPU no CUDA generator is forked even where GPUs are visible
    (before: every visible GPU, a CUDA context on each of them on every DDP rank)."""
    forked, real = [], torch.random.fork_rng

    def recording(devices=None, **kwargs):
        forked.append(list(devices) if devices is not None else None)
        return real(devices=[], **kwargs)

    monkeypatch.setattr(torch.random, "fork_rng", recording)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 3)).double()
    example = torch.zeros(2, 5, dtype=torch.float64)
    prefix, root, groups, _, _ = find_channel_groups(net, example_inputs=example)
    rng = torch.get_rng_state()
    batches = draw_batches(torch.utils.data.DataLoader(list(range(8)), batch_size=2, shuffle=True), 2)
    calibration_gradient_scores(get_importance("taylor"), net, root, prefix, groups, _batches(), _loss)
    assert torch.equal(torch.get_rng_state(), rng) and len(batches) == 2
    assert forked == [[], []]


@pytest.mark.parametrize("legacy", [False, True])
def test_taylor_says_once_that_it_leaves_out_a_weight_norm_reader(legacy, recwarn):
    """The reader's weight is computed from its parametrization's parameters: it has no gradient of its own,
    so Taylor leaves it out of the units' scores -- said once (before: silently)."""
    import warnings

    norm = torch.nn.utils.weight_norm if legacy else torch.nn.utils.parametrizations.weight_norm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the legacy weight_norm's deprecation)
        net = _net()
        net[2] = norm(net[2])
    prefix, root, groups, _ = _groups(net)
    taylor = get_importance("taylor")
    with pytest.warns(UserWarning, match=r"importance='taylor' leaves the weights of 1 layer\(s\) \(`2`\) out"
                                         r" of the scores.*weight_norm"):
        calibration_gradient_scores(taylor, net, root, prefix, groups, _batches(), _loss)
    assert taylor.steps == 1
    recwarn.clear()
    calibration_gradient_scores(taylor, net, root, prefix, groups, _batches(), _loss)
    assert not [w for w in recwarn if "leaves the weights" in str(w.message)]  # once


def test_taylor_does_not_warn_about_plain_layers(recwarn):
    net = _net()
    prefix, root, groups, _ = _groups(net)
    calibration_gradient_scores(get_importance("taylor"), net, root, prefix, groups, _batches(), _loss)
    assert not [w for w in recwarn if "leaves the weights" in str(w.message)]
