"""The channel analysis's limits: a CPU-time budget that touches no signal, and no crash from what the tracer
or torch-pruning raises (the failing parts are skipped with their reason, the fit goes on)."""

from __future__ import annotations

import signal

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

import lightning_prune as lp
from lightning_prune.errors import InvalidArgumentError
from lightning_prune.graph import GraphTimeoutError, analyse_channels, masked_and_sliced
from lightning_prune.testing import fit_tiny, tiny_classifier

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# ------------------------------------------------------------------ CPU-time budget
@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="no SIGALRM on this platform")
@pytest.mark.parametrize("user_alarm", [False, True])
def test_the_time_limit_stops_with_a_clear_error_and_touches_no_signal(user_alarm):
    model = timm.create_model("test_resnet", num_classes=10).eval()
    fired = []
    previous = signal.getsignal(signal.SIGALRM)
    if user_alarm:  # the program's own alarm, far away: it must stay as it is
        signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
        signal.setitimer(signal.ITIMER_REAL, 1000.0)
    try:
        handler, timer = signal.getsignal(signal.SIGALRM), signal.getitimer(signal.ITIMER_REAL)
        with pytest.raises(GraphTimeoutError, match=r"CPU time .*`analysis_time_limit_s`.*HINT: pass a larger"
                                                    r" `analysis_time_limit_s`"):
            analyse_channels(model, X, analysis_time_limit_s=1e-6)
        assert signal.getsignal(signal.SIGALRM) is handler
        after = signal.getitimer(signal.ITIMER_REAL)
        assert after[1] == timer[1] and (after[0] == 0.0) == (timer[0] == 0.0)
        assert timer[0] - after[0] < 60.0  # the user's alarm still counts down from where it was
        assert _hooks(model) == 0  # neither the budget's checks nor torch-pruning's tracing hooks stay behind
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, previous)
    assert not fired


def test_the_time_limit_counts_cpu_time_and_none_is_unlimited():
    model = timm.create_model("test_resnet", num_classes=10).eval()
    analysis = analyse_channels(model, X, analysis_time_limit_s=None)
    assert analysis.groups and 0.0 < analysis.cpu_seconds
    assert _hooks(model) == 0


@pytest.mark.parametrize("bad", [0, -1.0, "10", float("nan")])
def test_analysis_time_limit_is_validated_at_construction(bad):
    for make in (lambda: lp.GroupLassoPruning(analysis_time_limit_s=bad),
                 lambda: lp.L0Pruning(analysis_time_limit_s=bad)):
        with pytest.raises(MisconfigurationException, match="analysis_time_limit_s"):
            make()
    with pytest.raises(InvalidArgumentError, match="analysis_time_limit_s"):
        lp.compress(timm.create_model("test_resnet"), X, analysis_time_limit_s=bad)
    with pytest.raises(InvalidArgumentError, match="analysis_time_limit_s"):
        analyse_channels(timm.create_model("test_resnet"), X, analysis_time_limit_s=bad)
    baselines = pytest.importorskip("lightning_prune_baselines")
    for cls in (baselines.FirstKChannels, baselines.RandomChannels):
        with pytest.raises(MisconfigurationException, match="analysis_time_limit_s"):
            cls(analysis_time_limit_s=bad)


def test_a_callback_s_time_limit_reaches_the_fit_with_its_name(tmp_path):
    pruning = lp.GroupLassoPruning(analysis_time_limit_s=1e-6, verbose=False)
    with pytest.raises(Exception, match="analysis_time_limit_s") as info:
        fit_tiny([pruning], tmp_path, max_steps=1)
    assert isinstance(info.value, (GraphTimeoutError, MisconfigurationException))


# ------------------------------------------------------------------ never a crash from analysis
class Untraceable(nn.Module):
    """Stands for an op the tracer cannot follow: it raises under autograd in eval mode (what torch-pruning's
    tracing does), and is the identity in training and inference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and torch.is_grad_enabled():
            raise RuntimeError("no autograd formula for this op")
        return x


class PartlyTraceable(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.odd = Untraceable()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        self.example_input_array = torch.randn(2, 3, 32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.odd(self.features(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _no_export(monkeypatch):
    """torch.export raises too (the operator-graph engine falls back to torch-pruning's dependency graph)."""
    from lightning_prune.graph import labels

    def refuse(model, example):
        raise RuntimeError("no autograd formula (export refused)")

    monkeypatch.setattr(labels, "_export", refuse)


def test_a_model_the_tracer_cannot_trace_is_analysed_by_parts_with_the_reason(monkeypatch):
    _no_export(monkeypatch)
    torch.manual_seed(0)
    model = PartlyTraceable().eval()
    analysis = analyse_channels(model, model.example_input_array)
    why = analysis.skipped["PartlyTraceable"]
    assert "tracing it failed" in why and "RuntimeError: no autograd formula" in why
    assert "submodules were analysed one by one" in why
    assert [g.name for g in analysis.groups] == ["features.0"]  # inside a part: proven on the part's outputs
    assert "features.3" in analysis.skipped  # leaves its part: left alone
    masked, small, sliced = masked_and_sliced(model, model.example_input_array, analysis.groups,
                                              {"features.0": [1, 5, 7]})
    assert small.features[0].out_channels == 13 and torch.allclose(masked, sliced)
    assert _hooks(model) == 0


def test_the_fit_goes_on_when_the_tracer_raises(tmp_path, monkeypatch):
    _no_export(monkeypatch)
    pruning = lp.GroupLassoPruning(finalize_step=0.5, compress=True, verbose=False)
    trainer, module = fit_tiny([pruning], tmp_path, model=PartlyTraceable(), max_steps=6,
                               limit_val_batches=0)
    assert trainer.global_step == 6 and pruning.finalized
    assert [g.name for g in pruning.groups] == ["features.0"]
    assert "tracing it failed" in pruning.skipped["PartlyTraceable"]


def test_what_torch_pruning_raises_for_one_producer_skips_that_group_only(monkeypatch):
    from lightning_prune.graph import dependencies

    real = dependencies._expand

    def expand(graph, module, fn, idxs, check):
        if module is model.layer1[0].conv1:
            return 1 // 0  # what torch-pruning's index mappings raise on gcvit
        return real(graph, module, fn, idxs, check)

    model = timm.create_model("test_resnet", num_classes=10).eval()
    dense = analyse_channels(model, X, engine="torch-pruning")
    monkeypatch.setattr(dependencies, "_expand", expand)
    _no_export(monkeypatch)
    analysis = analyse_channels(model, X)
    why = analysis.skipped["layer1.0.conv1"]
    assert why.startswith("following its channels through the graph failed in ")  # in <the raising package>
    assert why.endswith("(ZeroDivisionError: integer division or modulo by zero)")
    assert {g.name for g in analysis.groups} == {g.name for g in dense.groups} - {"layer1.0.conv1"}


def test_a_model_that_does_not_run_on_its_input_raises_one_clear_error_naming_the_model_s():
    """The model's own exception (an empty AssertionError on halonet26t at 64 px) is not what reaches the
    user: one InvalidArgumentError naming it and the line that raised it, chained to it."""
    from lightning_prune.graph import ModelInputError

    model = timm.create_model("test_resnet", num_classes=10).eval()
    with pytest.raises(ModelInputError, match=r"ResNet raised RuntimeError on the example input at .*\.py:\d+"
                       ) as info:
        analyse_channels(model, torch.randn(2, 5, 32, 32))
    assert isinstance(info.value.__cause__, RuntimeError)

    class Asserts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            assert x.shape[-1] % 8 == 0
            return self.conv(x)

    with pytest.raises(ModelInputError, match=r"Asserts raised AssertionError .*assert x.shape\[-1\] % 8"):
        analyse_channels(Asserts(), torch.randn(1, 3, 12, 12))


def test_tiny_classifier_is_unchanged_by_the_fallback():
    """A traceable model never takes the fallback: no skipped entry names the model itself."""
    module = tiny_classifier("test_resnet")
    analysis = analyse_channels(module.model, X)
    assert analysis.groups and not any("tracing it failed" in why for why in analysis.skipped.values())


def test_a_model_torch_pruning_cannot_count_needs_no_size_target(tmp_path, monkeypatch):
    from lightning_prune.callbacks import channels

    def fails(*args, **kwargs):
        raise AssertionError("Expected gradient function to be set")  # what torch-pruning raised on cait/pit

    monkeypatch.setattr(channels, "CostModel", fails)
    with pytest.raises(MisconfigurationException, match=r"cannot count the FLOPs .*AssertionError: Expected"):
        fit_tiny([lp.GroupLassoPruning(target_flops=0.5, verbose=False)], tmp_path, max_steps=1)
    pruning = lp.GroupLassoPruning(finalize_step=0.5, verbose=False)
    trainer, _ = fit_tiny([pruning], tmp_path, max_steps=4, limit_val_batches=0)
    assert trainer.global_step == 4 and pruning.finalized and pruning.size_metrics() == {}


def test_dpn_which_torch_pruning_cannot_trace_is_analysed_by_parts_and_every_group_is_exact():
    """dpn68: torch-pruning's concatenation index mapping raises a TypeError on the whole model (the issue's
    crash inside the fit); its blocks are analysed one by one instead."""
    torch.manual_seed(0)
    model = timm.create_model("dpn68", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    analysis = analyse_channels(model, x, engine="torch-pruning")  # (the traced default follows it whole)
    assert "tracing it failed in torch-pruning (TypeError" in analysis.skipped["DPN"]
    assert len(analysis.groups) > 10 and analysis.coverage > 0.5
    removed = {g.name: list(range(0, g.size - 1, 3)) for g in analysis.groups}
    masked, _, sliced = masked_and_sliced(model, x, analysis.groups, removed)
    assert torch.allclose(masked, sliced, rtol=1e-9, atol=1e-9 * float(masked.abs().max()))
