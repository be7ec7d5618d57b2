import subprocess
import sys
from pathlib import Path

import pytest

from lightning_prune.cli import format_callback_list, main

ROOT = Path(__file__).parents[1]


def test_list_shows_name_class_distribution_version_status_summary():
    table = format_callback_list()
    header, *rows = table.splitlines()
    assert header.split()[:5] == ["name", "class", "distribution", "version", "status"]
    row = next(r for r in rows if r.startswith("magnitude "))
    assert "lightning_prune.callbacks.magnitude:GradualMagnitudePruning" in row
    assert "lightning-prune" in row and " ok " in row and "Gradual magnitude pruning" in row


def test_console_script_list():
    out = subprocess.run([sys.executable, "-m", "lightning_prune.cli", "list"], capture_output=True,
                         text=True, check=True).stdout
    assert "magnitude" in out and "GradualMagnitudePruning" in out


def _tiny_fit_args(tmp_path, *extra):
    return [
        "fit", "--config", "recipes/digits/magnitude.yaml",
        "--model.init_args.model_name=test_resnet", "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=2",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.callbacks.init_args.every_n_steps=1",
        "--trainer.callbacks.init_args.sparsity_end_step=3", *extra,
    ]


def test_fit_prints_the_final_table_with_test_accuracy(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    main(_tiny_fit_args(tmp_path))
    out = capsys.readouterr().out
    assert "model.layer1.0.conv1" in out and "targeted weights" in out and "test/acc" in out
    line = next(line for line in out.splitlines() if line.startswith("targeted weights"))
    assert 0.80 <= float(line.split()[-1].rstrip("%")) / 100 <= 0.90  # 90% of the targeted weights


def test_fit_without_test_after_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    main(_tiny_fit_args(tmp_path, "--test_after_fit=false"))
    assert "test/acc" not in capsys.readouterr().out


def test_bad_config_value_is_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match=r"`target_sparsity` must be a number in \[0, 1\), got 1.5"):
        main(_tiny_fit_args(tmp_path, "--trainer.callbacks.init_args.target_sparsity=1.5"))
