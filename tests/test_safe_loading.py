"""No loader of the library runs a file's pickled code unless the user opted in with ``weights_only=False``.

Each test writes a checkpoint that also holds an object whose ``__reduce__`` creates a marker file when
unpickled: before the fix, ``load_compressed`` and ``restore_run`` retried such a file with
``weights_only=False`` (creating the marker) and ``KnowledgeDistillation(teacher=path)`` always did.
"""

from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

import lightning_prune as lp
from lightning_prune.testing import fit_tiny, tiny_classifier
from tests.helpers import ROOT, in_process_error


class _CreatesMarker:
    """Unpickling this calls ``open(marker, "w")``: the file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _booby_trapped(tmp_path: Path) -> tuple[Path, Path]:
    """A Lightning-checkpoint-shaped file of the tiny classifier that would create ``marker`` if unpickled."""
    marker, path = tmp_path / "code_ran", tmp_path / "trapped.ckpt"
    payload = {"state_dict": tiny_classifier().state_dict(), "callbacks": {},
               "hyper_parameters": {"note": _CreatesMarker(marker)}}
    torch.save(payload, path)
    return path, marker


def test_load_compressed_refuses_and_loads_only_when_asked(tmp_path):
    path, marker = _booby_trapped(tmp_path)
    with pytest.raises(lp.UnsafeFileError, match=rf"{path.name} holds Python objects .*io.open among them.*"
                                                 r"HINT: if you trust the file, pass `weights_only=False`"):
        lp.load_compressed(path, tiny_classifier())
    assert not marker.exists()
    lp.load_compressed(path, tiny_classifier(), weights_only=False)
    assert marker.exists()  # the opt-in is real: the file's code ran


def test_restore_run_refuses_and_loads_only_when_asked(tmp_path):
    path, marker = _booby_trapped(tmp_path)
    with pytest.raises(lp.UnsafeFileError, match="`weights_only=False`"):
        lp.restore_run(path, tiny_classifier())
    assert not marker.exists()
    lp.restore_run(path, tiny_classifier(), weights_only=False).close()
    assert marker.exists()


def test_load_sparse_refuses(tmp_path):
    path, marker = _booby_trapped(tmp_path)
    with pytest.raises(lp.UnsafeFileError):
        lp.load_sparse(path)
    assert not marker.exists()


def test_the_distillation_teacher_file_is_refused_unless_asked(tmp_path):
    path, marker = _booby_trapped(tmp_path)
    fast = {"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 0}
    with pytest.raises(MisconfigurationException, match=r"`teacher`=.*trapped.ckpt.* could not be loaded: .*"
                                                        r"`weights_only=False`"):
        fit_tiny([lp.KnowledgeDistillation(teacher=path, verbose=False)], tmp_path, **fast)
    assert not marker.exists()
    fit_tiny([lp.KnowledgeDistillation(teacher=path, verbose=False, weights_only=False)], tmp_path, **fast)
    assert marker.exists()


@pytest.mark.parametrize("command", ["export", "sensitivity"])
def test_the_commands_refuse_in_one_line(tmp_path, command, capsys, monkeypatch):
    path, marker = _booby_trapped(tmp_path)
    monkeypatch.chdir(ROOT)
    _, line = in_process_error(
        capsys, command, "--config", "recipes/digits/magnitude.yaml",
        "--model.init_args.model_name=test_resnet", f"--ckpt_path={path}", "--trainer.logger=false",
        f"--{command}.out_dir={tmp_path}"
        if command == "sensitivity" else f"--export.output={tmp_path / 'm.onnx'}")
    assert "holds Python objects" in line and "weights_only=False" in line, line
    assert not marker.exists()


def test_a_missing_file_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "last.ckpt"
    for load in (lambda: lp.load_compressed(missing, tiny_classifier()),
                 lambda: lp.restore_run(missing, tiny_classifier()),
                 lambda: lp.load_sparse(missing)):
        with pytest.raises(FileNotFoundError, match=rf"^{missing}: no such file\.$") as info:
            load()
        assert info.value.__cause__ is None and info.value.__context__ is None
    monkeypatch.chdir(ROOT)
    _, line = in_process_error(capsys, "export", "--config", "recipes/digits/magnitude.yaml",
                               f"--ckpt_path={missing}", f"--export.output={tmp_path / 'm.onnx'}")
    assert line == f"lightning-prune: error: {missing}: no such file."


def test_a_damaged_file_says_so_without_blaming_pickled_code(tmp_path):
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(b"not a checkpoint at all")
    with pytest.raises(lp.InvalidArgumentError, match=r"damaged.ckpt could not be read by torch.load"):
        lp.load_compressed(damaged, tiny_classifier())
