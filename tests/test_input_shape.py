"""Where the channel callbacks measure the model (at the shape it trains on); the analysis' thread count."""

from __future__ import annotations

import logging

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch_pruning.utils import count_ops_and_params

import lightning_prune as lp
from lightning_prune.callbacks.input_shape import batch_input, first_batch_input_size
from lightning_prune.core import threads
from lightning_prune.graph import ModelInputError, example_inputs_for, traced_root
from lightning_prune.testing import fit_tiny, tiny_classifier, tiny_datamodule

FAST = {"max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 1}


# ------------------------------------------------------------------ threads
@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_analysis_runs_at_one_thread_and_gives_the_caller_s_count_back(two_threads, monkeypatch):
    import lightning_prune.graph.analysis as graph

    seen = []
    prove = graph.exact_subsets  # the exactness proof, run by either engine

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return prove(*args, **kwargs)

    monkeypatch.setattr(graph, "exact_subsets", spy)
    model = tiny_classifier("test_resnet").model
    analysis = lp.analyse_channels(model, torch.randn(2, 3, 32, 32))
    assert analysis.groups and seen == [threads.ANALYSIS_THREADS] == [1]
    assert torch.get_num_threads() == 2


def test_the_thread_count_is_restored_when_the_analysis_fails(two_threads):
    model = tiny_classifier("test_resnet").model
    with pytest.raises(ModelInputError, match="ResNet raised RuntimeError on the example input"):
        lp.analyse_channels(model, torch.randn(2, 5, 32, 32))  # 5 channels into a 3-channel stem
    assert torch.get_num_threads() == 2
    with pytest.raises(KeyError), threads.limited_threads(1):
        assert torch.get_num_threads() == 1
        raise KeyError("x")
    assert torch.get_num_threads() == 2


def test_limited_threads_never_raises_the_count(two_threads):
    with threads.limited_threads(8):
        assert torch.get_num_threads() == 2
    with threads.limited_threads(None):
        assert torch.get_num_threads() == 2


# ------------------------------------------------------------------ the training batch's shape
def test_batch_input_finds_the_input_of_common_batch_layouts():
    x = torch.zeros(4, 3, 8, 8)
    assert batch_input(x) is x
    assert batch_input((x, torch.zeros(4))) is x
    assert batch_input([[x], torch.zeros(4)]) is x
    assert batch_input({"label": torch.zeros(4), "image": x}) is x
    assert batch_input({"a": x}) is x
    assert batch_input("text") is None


def test_the_first_batch_shape_does_not_move_the_seeded_rng():
    dm = tiny_datamodule(image_size=24)
    dm.setup("fit")

    class _Trainer:  # what first_batch_input_size reads: the datamodule
        fit_loop = None
        datamodule = dm

    torch.manual_seed(5)
    assert first_batch_input_size(_Trainer()) == (3, 24, 24)
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))
    assert first_batch_input_size(None) is None


def _channel_callbacks():
    baselines = pytest.importorskip("lightning_prune_baselines")
    return [
        lp.GroupLassoPruning(finalize_step=0.5),
        lp.L0Pruning(finalize_step=0.5),
        baselines.FirstKChannels(target_sparsity=0.5, prune_epoch=1),
        baselines.RandomChannels(target_sparsity=0.5),
        lp.OneShotPruning("channels", target_flops=0.5, prune_step=1, calibration_batches=1),
    ]


@pytest.mark.parametrize("index", range(5),
                         ids=["group_lasso", "l0", "first_k", "random_channels", "one_shot"])
def test_channel_callbacks_measure_at_the_training_batch_shape(index, tmp_path, caplog):
    """test_resnet's pretrained input size is 160x160; the digits are 24x24 here: the callback traces,
    counts and logs at 24x24, and says so once."""
    cb = _channel_callbacks()[index]
    model = tiny_classifier("test_resnet")
    _, root = traced_root(model)
    assert tuple(root.pretrained_cfg["input_size"]) != (3, 24, 24)
    with caplog.at_level(logging.INFO):
        fit_tiny([cb], tmp_path, model=model, datamodule=tiny_datamodule(image_size=24), **FAST)
    assert cb.traced_size == (3, 24, 24)
    lines = [r.getMessage() for r in caplog.records if "first training batch" in r.getMessage()]
    assert len(lines) == 1 and "(3, 24, 24)" in lines[0], lines


def test_an_explicit_input_size_and_example_input_array_still_come_first(tmp_path):
    cb = lp.GroupLassoPruning(finalize_step=0.5, input_size=(3, 16, 16), verbose=False)
    fit_tiny([cb], tmp_path, model=tiny_classifier("test_resnet"), **FAST)
    assert cb.traced_size == (3, 16, 16)
    cb = lp.GroupLassoPruning(finalize_step=0.5, verbose=False)
    model = tiny_classifier("test_resnet")
    model.model.example_input_array = torch.randn(2, 3, 40, 40)
    fit_tiny([cb], tmp_path, model=model, **FAST)
    assert cb.traced_size is None
    assert cb._cost._example.shape[-1] == 40


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_target_flops_is_met_at_the_size_the_model_trains_on(name, tmp_path):
    """`target_flops=0.25` on 32x32 digits: the compressed model has at most a quarter of the dense FLOPs
    counted at 32x32 (not at timm's 160x160), and no more than one `round_to` step of one group below it."""
    model = tiny_classifier(name)
    _, root = traced_root(model)
    x = example_inputs_for(root, (3, 32, 32))
    dense, _ = count_ops_and_params(root, x)
    cb = lp.GroupLassoPruning(target_flops=0.25, finalize_step=0.5, compress=True, verbose=False)
    fit_tiny([cb], tmp_path, model=model, **FAST)
    flops, _ = count_ops_and_params(model.model, x)
    ratio = flops / dense
    removed = {g.name: (~k).nonzero().flatten().tolist() for g, k in zip(cb.groups, cb.keep)}
    steps = []
    for group in cb.groups:
        if removed.get(group.name):
            back = {**removed, group.name: removed[group.name][cb.round_to:]}
            steps.append(cb._cost.ratios(back)[0] - cb._cost.ratios(removed)[0])
    assert ratio <= 0.25
    assert ratio >= 0.25 - max(steps), (ratio, max(steps))


def test_one_shot_target_flops_is_counted_at_the_size_the_model_trains_on(tmp_path):
    """OneShotPruning("channels") traced at timm's pretrained size before: the FLOPs it reported (and met)
    were those of 160x160 inputs, not of the 32x32 digits it trains on (on NaFlexViT 0.39 reported, 0.25
    there)."""
    model = tiny_classifier("test_resnet")
    _, root = traced_root(model)
    x = example_inputs_for(root, (3, 32, 32))
    dense, _ = count_ops_and_params(root, x)
    cb = lp.OneShotPruning("channels", target_flops=0.25, prune_step=1, calibration_batches=1, verbose=False)
    fit_tiny([cb], tmp_path, model=model, **FAST)
    flops, _ = count_ops_and_params(model.model, x)
    assert cb.traced_size == (3, 32, 32)
    assert flops / dense <= 0.25 and flops / dense == pytest.approx(cb.flops_remaining, abs=1e-6)


def test_no_training_data_falls_back_to_timm_s_size():
    """A bare Trainer (``lp.restore_run``'s) has no training batch: timm's ``input_size`` as before."""
    import lightning.pytorch as pl

    from lightning_prune.callbacks.input_shape import traced_input_size

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    assert traced_input_size(None, trainer, tiny_classifier("test_resnet"), "X") is None
    with pytest.raises(MisconfigurationException):
        lp.GroupLassoPruning(input_size=(3, 0, 32))


def test_an_example_input_array_of_zeros_is_traced_at_random_values_of_its_shape():
    """Lightning's habitual ``example_input_array = torch.zeros(...)``: traced on constants, every tensor of
    one shape holds the same values and the analysis cannot tell which a reshape's size was read from
    (BoTNet's heads were lost that way inside a fit); a seeded draw of the same shape is traced instead.
    Integer inputs and inputs that vary are kept."""
    module = tiny_classifier()
    module.example_input_array = torch.zeros(2, 3, 32, 32)
    traced = example_inputs_for(module)
    assert traced.shape == (2, 3, 32, 32) and traced.dtype == torch.float32 and float(traced.std()) > 0.5
    assert torch.equal(traced, example_inputs_for(module))  # seeded: every rank traces the same
    module.example_input_array = {"x": torch.ones(2, 4), "ids": torch.zeros(2, 4, dtype=torch.long)}
    traced = example_inputs_for(module)
    assert float(traced["x"].std()) > 0.5 and torch.equal(traced["ids"], torch.zeros(2, 4, dtype=torch.long))
    varying = torch.randn(2, 3, 32, 32)
    module.example_input_array = varying
    assert torch.equal(example_inputs_for(module), varying)
