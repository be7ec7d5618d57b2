import re
import subprocess
import sys

import pytest

from lightning_prune.cli import COMMANDS, format_callback_list, main
from tests.helpers import ROOT, one_error_line
from tests.helpers import lightning_prune_command as lightning_prune

TINY = ["--model.init_args.model_name=test_resnet", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_help_and_a_bare_command_list_every_subcommand_with_one_line():
    for args in (["--help"], []):
        result = lightning_prune(*args)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        for name in ("fit", "validate", "test", "list", "export", "sensitivity"):
            rows = [line for line in lines if re.match(rf"^  {name} +\S", line)]
            assert len(rows) == 1, (name, result.stdout)
        assert set(COMMANDS) >= {"fit", "validate", "test", "predict", "list", "export", "sensitivity"}
        assert result.stderr == "", result.stderr  # no warning, nothing imported that would print one


def test_list_help_explains_every_column():
    result = lightning_prune("list", "--help")
    assert result.returncode == 0, result.stderr
    for column in ("name", "class", "distribution", "version", "status", "summary"):
        assert re.search(rf"^  {column} +\S", result.stdout, re.M), (column, result.stdout)
    assert "--check" in result.stdout


def test_list_imports_neither_torch_nor_lightning():
    code = ("import sys; from lightning_prune.cli import main; main(['list']); "
            "print(sorted(m for m in ('torch', 'lightning', 'timm') if m in sys.modules), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=ROOT)
    assert result.stderr.strip().splitlines()[-1] == "[]", result.stderr
    assert "magnitude" in result.stdout


def test_list_shows_name_class_distribution_version_status_summary():
    table = format_callback_list()
    header, *rows = table.splitlines()
    assert header.split()[:5] == ["name", "class", "distribution", "version", "status"]
    row = next(r for r in rows if r.startswith("magnitude "))
    assert "lightning_prune.callbacks.magnitude:GradualMagnitudePruning" in row
    assert "lightning-prune" in row and " ok " in row and "Gradual magnitude pruning" in row


def test_console_script_list():
    result = lightning_prune("list")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "magnitude" in result.stdout and "GradualMagnitudePruning" in result.stdout
    checked = lightning_prune("list", "--check", "magn")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.splitlines()[1].split()[:5] == [
        "magnitude", "lightning_prune.callbacks.magnitude:GradualMagnitudePruning", "lightning-prune",
        checked.stdout.splitlines()[1].split()[3], "ok"]


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


def test_bad_config_value_is_reported_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exited:
        main(_tiny_fit_args(tmp_path, "--trainer.callbacks.init_args.target_sparsity=1.5"))
    assert exited.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lightning-prune: error: `target_sparsity` must be a number in [0, 1), got 1.5")


def test_the_traceback_is_there_when_asked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("LIGHTNING_PRUNE_TRACEBACK", "1")
    with pytest.raises(Exception, match=r"`target_sparsity` must be a number in \[0, 1\), got 1.5"):
        main(_tiny_fit_args(tmp_path, "--trainer.callbacks.init_args.target_sparsity=1.5"))


def test_a_typo_in_a_callback_argument_in_yaml_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = (ROOT / "recipes" / "digits" / "magnitude.yaml").read_text()
    config = tmp_path / "typo.yaml"
    config.write_text(recipe.replace("target_sparsity: 0.9", "target_sparsty: 0.9"))
    line = _in_process_error(capsys, ["fit", "--config", str(config), *TINY])
    assert line == (f"lightning-prune: error: GradualMagnitudePruning (trainer.callbacks) has no argument"
                    f" `target_sparsty`; did you mean `target_sparsity`? (in {config})")


def test_an_unknown_timm_model_is_one_line_with_close_matches(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    line = _in_process_error(capsys, ["fit", "--config", "recipes/digits/magnitude.yaml", *TINY,
                                      "--model.init_args.model_name=resnt18"], code=1)
    assert re.match(r"lightning-prune: error: `model_name` must be a model of `timm.list_models\(\)`, got"
                    r" 'resnt18'\. Did you mean 'resnet18'", line), line


@pytest.mark.slow  # the same line from the same code (cli.app) in a fresh process: the next test, by default
def test_a_gpu_asked_for_without_one_is_one_line_saying_how_to_use_the_cpu():
    result = lightning_prune("fit", "--config", "recipes/digits/magnitude.yaml", *TINY,
                             "--trainer.accelerator", "gpu", env={"CUDA_VISIBLE_DEVICES": ""})
    line = one_error_line(result)
    assert "`trainer.accelerator` is 'gpu', but PyTorch sees no CUDA GPU on this machine" in line
    assert "--trainer.accelerator cpu" in line


def test_python_m_cli_reports_a_mistake_in_one_line_too():
    """``python -m lightning_prune.cli`` (the fallback without the console script) runs the command as
    ``__main__``: the ``ConfigError`` that ``cli.fit`` raises is the one ``cli.app`` recognises (both take it
    from ``cli.errors``), so the answer is the same one line, not a traceback."""
    import os

    result = subprocess.run([sys.executable, "-m", "lightning_prune.cli", "fit", "--config",
                             "recipes/digits/magnitude.yaml", *TINY, "--trainer.accelerator", "gpu"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    line = one_error_line(result)
    assert "`trainer.accelerator` is 'gpu', but PyTorch sees no CUDA GPU on this machine" in line
    assert "--trainer.accelerator cpu" in line
    assert result.returncode == 2


def test_a_bad_value_from_the_environment_names_the_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("LIGHTNING_PRUNE", "magnitude:target_sparsity=1.5")
    line = _in_process_error(capsys, ["fit", "--config", "recipes/digits/dense.yaml", *TINY,
                                      f"--trainer.default_root_dir={tmp_path}"], code=1)
    assert line.startswith("lightning-prune: error: LIGHTNING_PRUNE: 'magnitude': `target_sparsity` must be"
                           " a number in [0, 1), got 1.5."), line


def _in_process_error(capsys, args, code: int | None = 2) -> str:
    """``main(args)`` ends with one ``lightning-prune: error:`` line on stderr and no usage dump (exit status
    ``code``; ``None``: any)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert code is None or exit_info.value.code == code, exit_info.value.code
    err = capsys.readouterr().err
    assert "usage:" not in err and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("lightning-prune: error: "), err
    return lines[0]


@pytest.mark.parametrize(("command", "typo", "meant"), [
    ("export", "--export.outptu=x.onnx", "export.output"),
    ("sensitivity", "--sensitivity.sparsites=[0.5]", "sensitivity.sparsities"),
])
def test_export_and_sensitivity_parse_errors_are_one_line_like_fit(command, typo, meant, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    line = _in_process_error(capsys, [command, "--config", "recipes/digits/magnitude.yaml", typo])
    assert f"did you mean `{meant}`?" in line, line


def test_an_unquoted_nm_pattern_in_yaml_says_to_quote_it(tmp_path, capsys, monkeypatch):
    """YAML 1.1 reads ``pattern: 2:4`` as the base-60 number 124."""
    monkeypatch.chdir(ROOT)
    recipe = (ROOT / "recipes" / "digits" / "magnitude.yaml").read_text()
    config = tmp_path / "nm.yaml"
    nm = "        scope: global\n        pattern: 2:4\n"
    config.write_text(recipe.replace("        scope: global\n", nm))
    line = _in_process_error(capsys, ["fit", "--config", str(config), *TINY])
    assert "`pattern` must be str | NoneType, got 124" in line
    assert 'reads an unquoted 2:4 as the base-60 number 124; quote it: "2:4"' in line, line
