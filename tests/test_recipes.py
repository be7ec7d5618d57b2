"""Every recipe runs: digits recipes for a few real steps, CIFAR-10 ones on small local data (no download)."""

from pathlib import Path

import pytest
import yaml

from lightning_prune.cli import run
from tests.helpers import fake_cifar

ROOT = Path(__file__).parents[1]
DIGITS = sorted((ROOT / "recipes" / "digits").glob("*.yaml"))
CIFAR = sorted((ROOT / "recipes" / "cifar10").glob("*.yaml"))
SHAPES = sorted((ROOT / "recipes" / "shapes").glob("*.yaml"))
COMMON = ["--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--trainer.logger=false",
          "--trainer.enable_progress_bar=false"]


def test_there_are_recipes():
    names = {"magnitude", "lottery_ticket", "group_lasso", "l0", "activation_decay", "evolution"}
    assert {f"{n}.yaml" for n in names} | {"dense.yaml"} <= {p.name for p in DIGITS}
    assert {f"{n}.yaml" for n in names} <= {p.name for p in CIFAR}
    assert "dense.yaml" in {p.name for p in SHAPES}


def _check_run(recipe, cli, steps, out):
    """The recipe's fit ran: its callbacks attached (the classes the YAML names), the steps asked for trained,
    and the test stage after the fit measured an accuracy, which the summary prints."""
    declared = yaml.safe_load(recipe.read_text())["trainer"].get("callbacks") or []
    declared = [declared] if isinstance(declared, dict) else declared
    wanted = sorted(c["class_path"].rsplit(".", 1)[-1] for c in declared)
    attached = sorted(type(cb).__name__ for cb in cli.trainer.callbacks)
    assert set(wanted) <= set(attached), (attached, wanted)
    assert cli.trainer.global_step == steps, cli.trainer.global_step
    acc = float(cli.trainer.callback_metrics["test/acc"])
    assert 0.0 <= acc <= 1.0
    assert "test/acc" in out


#: recipes whose few steps take long on a CPU: SparseGPT over resnet18's layers (~100 s on 2 busy cores)
SLOW_RECIPES = {"one_shot"}


@pytest.mark.parametrize("recipe", [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_RECIPES else p
                                    for p in DIGITS], ids=lambda p: p.stem)
def test_digits_recipe_runs(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    cli = run(["fit", "--config", str(recipe), "--trainer.limit_train_batches=1", "--trainer.max_steps=3",
               f"--trainer.default_root_dir={tmp_path}", "--data.init_args.batch_size=16", *COMMON])
    _check_run(recipe, cli, 3, capsys.readouterr().out)


@pytest.mark.parametrize("recipe", SHAPES, ids=lambda p: p.stem)
def test_shapes_recipe_runs_on_a_small_set(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    cli = run(["fit", "--config", str(recipe), "--trainer.limit_train_batches=1", "--trainer.max_steps=2",
               f"--trainer.default_root_dir={tmp_path}", "--data.init_args.train_size=64",
               "--data.init_args.val_size=16", "--data.init_args.test_size=16",
               "--data.init_args.batch_size=16", *COMMON])
    _check_run(recipe, cli, 2, capsys.readouterr().out)


def _run_cifar_recipe(recipe, tmp_path, monkeypatch, capsys, *extra):
    import torchvision.datasets.cifar as cifar

    fake_cifar(tmp_path / "data")
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.chdir(ROOT)
    cli = run(["fit", "--config", str(recipe), "--trainer.max_steps=10", "--trainer.accelerator=cpu",
               f"--trainer.default_root_dir={tmp_path}", f"--data.init_args.data_dir={tmp_path / 'data'}",
               "--data.init_args.download=false", "--data.init_args.batch_size=8",
               "--data.init_args.num_workers=0", "--data.init_args.val_size=10", *extra, *COMMON])
    _check_run(recipe, cli, 10, capsys.readouterr().out)


#: the CIFAR-10 recipes whose GPU precision (16-mixed) Lightning turns into bf16-mixed on a CPU, where a
#: resnet18 backward step takes ~7 s (80-100 s a recipe under load; in 32-true about 1 s a step)
MIXED_CIFAR = {p.stem for p in CIFAR
               if "mixed" in str(yaml.safe_load(p.read_text())["trainer"].get("precision"))}


@pytest.mark.parametrize("recipe", CIFAR, ids=lambda p: p.stem)
def test_cifar10_recipe_runs_on_small_local_data(recipe, tmp_path, monkeypatch, capsys):
    """Each recipe in full precision: its data module, model and callbacks, 10 real steps and the test stage.
    The callbacks under mixed precision: tests/callbacks/test_group_lasso.py and test_l0.py
    (test_amp_gate_gradients_are_unscaled), test_magnitude.py (test_gradient_accumulation_and_bf16_mixed);
    the recipes' own precision: the slow test below."""
    _run_cifar_recipe(recipe, tmp_path, monkeypatch, capsys, "--trainer.precision=32-true")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [p for p in CIFAR if p.stem in MIXED_CIFAR], ids=lambda p: p.stem)
def test_cifar10_recipe_runs_at_its_own_precision(recipe, tmp_path, monkeypatch, capsys):
    _run_cifar_recipe(recipe, tmp_path, monkeypatch, capsys)


def _acted(name, cli):
    """What each digits recipe must have done in a shortened run (so not a plain fit)."""
    import lightning_prune as lp

    callbacks = [cb for cb in cli.trainer.callbacks if type(cb).__module__.startswith("lightning_prune.")]
    if name == "dense":
        return not callbacks
    (cb,) = callbacks
    if name == "magnitude":
        return abs(lp.sparsity_report(cli.model).sparsity - 0.9) < 0.01
    if name == "lottery_ticket":
        masks = [m for _, m in cb.masks.items()]
        pruned = sum(int((~m).sum()) for m in masks) / sum(m.numel() for m in masks)
        return cb.round == cb.rounds >= 1 and abs(pruned - cb.target_sparsity) < 0.02
    if name in ("group_lasso", "l0"):
        return cb.finalized and cb.shrink.removed is not None and not all(bool(k.all()) for k in cb.keep)
    if name == "activation_decay":
        return cb.lam == 1.0 and cb._fused_model is not None
    if name == "evolution":
        return cb.generation >= 2
    if name == "one_shot":
        return cb.done and bool(cb.errors) and abs(lp.sparsity_report(cli.model).sparsity - 0.5) < 0.02
    raise AssertionError(f"no check for the recipe {name}")


@pytest.mark.parametrize("recipe", DIGITS, ids=lambda p: p.stem)
def test_a_digits_recipe_shortened_to_two_epochs_still_runs_its_algorithm(recipe, tmp_path, monkeypatch):
    import warnings

    monkeypatch.chdir(ROOT)
    model = [] if recipe.stem == "activation_decay" else ["--model.init_args.model_name=test_resnet"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run(["fit", "--config", str(recipe), "--trainer.max_epochs=2",
                   "--trainer.limit_train_batches=10", f"--trainer.default_root_dir={tmp_path}",
                   "--data.init_args.batch_size=16", "--test_after_fit=false", *model, *COMMON])
    assert _acted(recipe.stem, cli), f"{recipe.name} with --trainer.max_epochs 2 did not run its algorithm"
    ours = [str(w.message) for w in caught if "but this fit has" in str(w.message)
            or "LotteryTicket: `rounds=" in str(w.message)]
    assert len(ours) == (1 if recipe.stem == "lottery_ticket" else 0), ours  # fewer rounds: said once


def test_a_schedule_that_cannot_act_warns_at_setup_and_third_party_noise_is_filtered(tmp_path):
    """The real console script: our warning names the argument; Lightning's LeafSpec deprecation, the
    litlogger tip and LightningCLI's args warning do not show."""
    import os
    import subprocess
    import sys

    script = Path(sys.executable).with_name("lightning-prune")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lightning_prune.cli"]
    result = subprocess.run(
        [*command, "fit", "--config", "recipes/digits/evolution.yaml", "--trainer.max_epochs=2",
         "--trainer.limit_train_batches=2", "--model.init_args.model_name=test_resnet",
         "--test_after_fit=false", "--trainer.callbacks.init_args.every_n_epochs=5",
         f"--trainer.default_root_dir={tmp_path}", *COMMON],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("EvolutionaryMutation: `every_n_epochs`=5 is optimizer step 9, but this fit has 4 steps (2 epochs"
            " of 2): the first generation would come after it, so this is plain SGD. HINT: give"
            " `every_n_epochs` as a fraction of training") in result.stderr, result.stderr[-3000:]
    for noise in ("LeafSpec", "litlogger", "LightningCLI's args parameter"):
        assert noise not in result.stderr + result.stdout, noise
