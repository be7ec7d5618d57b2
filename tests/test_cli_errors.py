"""The command's mistakes, each one line with the same prefix (issue 28, item 5)."""

from __future__ import annotations

import logging

import pytest

from lightning_prune.cli import main
from lightning_prune.testing import fit_tiny, tiny_classifier, tiny_datamodule
from tests.helpers import ROOT
from tests.helpers import in_process_error as _error

RECIPE = "recipes/digits/magnitude.yaml"
TINY = ["--model.init_args.model_name=test_resnet", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false"]


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("LIGHTNING_PRUNE_TRACEBACK", raising=False)


def test_a_typo_in_a_trainer_argument_says_did_you_mean(capsys):
    code, line = _error(capsys, "fit", "--config", RECIPE, *TINY, "--trainer.max_epocs", "1")
    assert code == 2
    assert line == ("lightning-prune: error: unknown option `trainer.max_epocs`; did you mean"
                    " `trainer.max_epochs`? (on the command line)")


def test_no_silent_abbreviation(capsys):
    """argparse would take `--trainer.max_epoch` for `--trainer.max_epochs`: here it is an error."""
    code, line = _error(capsys, "fit", "--config", RECIPE, *TINY, "--trainer.max_epoch", "1")
    assert code == 2 and "unknown option `trainer.max_epoch`; did you mean `trainer.max_epochs`?" in line
    code, line = _error(capsys, "fit", "--conf", RECIPE)
    assert code == 2 and "`conf`" in line and "did you mean `config`?" in line


def test_a_typo_in_a_model_or_data_argument_says_did_you_mean(capsys):
    _, line = _error(capsys, "fit", "--config", RECIPE, *TINY, "--model.init_args.lrr", "0.1")
    assert "ImageClassifier (model) has no argument `lrr`; did you mean `lr`?" in line
    _, line = _error(capsys, "fit", "--config", RECIPE, *TINY, "--data.init_args.batch_sz", "8")
    assert "DigitsDataModule (data) has no argument `batch_sz`; did you mean `batch_size`?" in line


def test_export_without_a_checkpoint_is_one_line_with_the_prefix(capsys):
    code, line = _error(capsys, "export", "--config", RECIPE, *TINY)
    assert code == 2 and "`lightning-prune export` needs `--ckpt_path`" in line


def test_an_abbreviated_option_of_export_is_refused_too(capsys):
    code, line = _error(capsys, "export", "--config", RECIPE, *TINY, "--ckpt", "x.ckpt")
    assert code == 2 and "unknown option `ckpt`" in line


def test_a_model_name_with_no_close_match_gets_a_useful_hint(capsys):
    code, line = _error(capsys, "fit", "--config", RECIPE, "--model.init_args.model_name", "not_a_model_xyz")
    assert code == 1
    assert "got 'not_a_model_xyz': no timm model has a name like it" in line
    assert "list_models('not" not in line and "list_models('*resnet*')" in line


def test_torch_threads_is_checked_applied_and_given_back(capsys, monkeypatch):
    import torch

    from lightning_prune.cli import fit

    code, line = _error(capsys, "fit", "--config", RECIPE, *TINY, "--torch_threads", "0")
    assert code == 2 and "`torch_threads` must be an integer >= 1, got 0" in line
    seen = []

    def stop(self):  # what the run would train with; then stop before anything is built
        seen.append(torch.get_num_threads())
        raise KeyboardInterrupt

    monkeypatch.setattr(fit.PruneCLI, "instantiate_classes", stop)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(KeyboardInterrupt):
            main(["fit", "--config", RECIPE, *TINY, "--torch_threads", "1"])
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ the channel callbacks' console lines
@pytest.mark.parametrize("name", ["group_lasso", "first_k"])
def test_channel_callbacks_log_units_and_flops_not_a_weight_sparsity(name, tmp_path, caplog):
    import lightning_prune as lp

    if name == "group_lasso":
        cb = lp.GroupLassoPruning(target_flops=0.5, finalize_step=0.5)
    else:
        cb = pytest.importorskip("lightning_prune_baselines").FirstKChannels(0.5, prune_step=1)
    with caplog.at_level(logging.INFO):
        fit_tiny([cb], tmp_path, model=tiny_classifier("test_resnet"), datamodule=tiny_datamodule(),
                 max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    prefix = f"[{type(cb).__name__}] step"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]
    assert lines, [r.getMessage() for r in caplog.records]
    for line in lines:
        assert "sparsity" not in line, line
        assert " units kept (" in line and "FLOPs" in line and "of dense" in line, line
    if name == "group_lasso":
        start = next(r.getMessage() for r in caplog.records if "gated group" in r.getMessage())
        assert "1 group left alone" in start or "groups left alone" in start
        assert "(1 groups" not in start


def test_counted_says_one_group_and_two_groups():
    from lightning_prune.callbacks.logging import counted

    assert counted(1, "group") == "1 group"
    assert counted(2, "group") == "2 groups"
    assert counted(0, "unit") == "0 units"
    assert counted(1234, "unit") == "1,234 units"
