"""Every recipe runs: digits recipes for a few real steps, CIFAR-10 ones on small local data (no download)."""

from pathlib import Path

import pytest

from lightning_prune.cli import main

ROOT = Path(__file__).parents[1]
DIGITS = sorted((ROOT / "recipes" / "digits").glob("*.yaml"))
CIFAR = sorted((ROOT / "recipes" / "cifar10").glob("*.yaml"))
COMMON = ["--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--trainer.logger=false",
          "--trainer.enable_progress_bar=false"]


def test_there_are_recipes():
    names = {"magnitude", "lottery_ticket", "group_lasso", "l0", "activation_decay", "evolution"}
    assert {f"{n}.yaml" for n in names} | {"dense.yaml"} <= {p.name for p in DIGITS}
    assert {f"{n}.yaml" for n in names} <= {p.name for p in CIFAR}


@pytest.mark.parametrize("recipe", DIGITS, ids=lambda p: p.stem)
def test_digits_recipe_runs(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    main(["fit", "--config", str(recipe), "--trainer.limit_train_batches=1", "--trainer.max_steps=3",
          f"--trainer.default_root_dir={tmp_path}", *COMMON])
    assert "test/acc" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", CIFAR, ids=lambda p: p.stem)
def test_cifar10_recipe_runs_on_small_local_data(recipe, tmp_path, monkeypatch, capsys):
    import torchvision.datasets.cifar as cifar

    from tests.test_data_and_model import _fake_cifar

    _fake_cifar(tmp_path / "data")
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.chdir(ROOT)
    main(["fit", "--config", str(recipe), "--trainer.max_steps=10", "--trainer.accelerator=cpu",
          f"--trainer.default_root_dir={tmp_path}", f"--data.init_args.data_dir={tmp_path / 'data'}",
          "--data.init_args.download=false", "--data.init_args.batch_size=8",
          "--data.init_args.num_workers=0", "--data.init_args.val_size=10", *COMMON])
    assert "test/acc" in capsys.readouterr().out
