"""Every Python and shell block of README.md and docs/*.md runs as written.

Each block runs on its own (the names it uses are defined in it), in a fresh temporary directory with the
repository's ``recipes/`` beside it. Training is shortened by the test, not by the text: every ``Trainer``
a Python block builds gets ``limit_*_batches=1`` and at most :data:`MAX_EPOCHS` epochs (all of them with a
``LotteryTicket``, which needs its rounds; and it must say how long it trains: Lightning's default is 1,000
epochs), and every ``lightning-prune fit`` line of a shell
block gets the same through ``--trainer.*`` arguments appended to it.

A block the test cannot run here is marked in the Markdown, on the line right before its fence, with
``<!-- docs-test: skip (why) -->`` (a GPU, the network, the test suite itself); a block that takes long is
marked ``<!-- docs-test: slow -->`` and runs with ``-m slow``. The list of skipped blocks is pinned below so
that it stays short.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
MARKER = re.compile(r"^<!-- docs-test: (?P<kind>skip|slow)(?: \((?P<why>[^)]*)\))? -->$")
MAX_EPOCHS = 6
FAST_TRAINER = {"limit_train_batches": 1, "limit_val_batches": 1, "limit_test_batches": 1,
                "limit_predict_batches": 1, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                "enable_model_summary": False}
FAST_CLI = ("--trainer.max_epochs 2 --trainer.limit_train_batches 2 --trainer.limit_val_batches 1"
            " --trainer.limit_test_batches 1 --trainer.enable_progress_bar false")


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    skip: str | None = None
    slow: bool = False

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced Python and shell blocks of ``path`` with their markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        language = LANGUAGES.get(fence.group(1))
        if language is not None:
            block = Block(path, i + 1, language, "\n".join(lines[i + 1:end]) + "\n")
            k = i - 1
            while k >= 0 and MARKER.match(lines[k]):  # markers stack right above the fence
                marker = MARKER.match(lines[k])
                assert marker is not None
                if marker["kind"] == "skip":
                    assert marker["why"], f"{path.name}:{k + 1}: a skip marker says why"
                    block.skip = marker["why"]
                else:
                    block.slow = True
                k -= 1
            out.append(block)
        i = end + 1
    return out


BLOCKS = [block for path in DOCS for block in code_blocks(path)]

# What may be skipped (file, why); a new skip must be added here too.
SKIPPED = [
    ("README.md", "the demo's minutes and the test suite itself"),
    ("README.md", "a GPU"),
    ("README.md", "a GPU"),
    ("README.md", "a plugin's own test: it imports the package being written"),
    ("docs/deploy.md", "a GPU"),
    # added by the one-shot and sharded branches; the first is open (see the marker)
    ("README.md", "two processes under torch.distributed; run as python sharded.py"),
    ("docs/one_shot.md", "the network: pretrained weights from the hub"),
]


def _params():
    for block in BLOCKS:
        marks = [pytest.mark.slow] if block.slow else []
        if block.skip:
            marks.append(pytest.mark.skip(reason=f"marked in the text: {block.skip}"))
        yield pytest.param(block, id=block.id, marks=marks)


def test_the_skip_list_is_short_and_pinned():
    skipped = [(str(b.path.relative_to(ROOT)), b.skip) for b in BLOCKS if b.skip]
    assert sorted(skipped) == sorted(SKIPPED), skipped
    assert len(BLOCKS) - len(skipped) >= 2 * len(skipped)


def _workdir(tmp_path: Path) -> Path:
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    return tmp_path


def _fast_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning.pytorch as pl

    init = pl.Trainer.__init__

    def fast(self, *args, **kwargs):
        caller = Path(sys._getframe(1).f_code.co_filename).resolve()
        if ROOT / "lightning_prune" in caller.parents:  # the library's own (restore_run's): it does not train
            init(self, *args, **kwargs)
            return
        assert "max_epochs" in kwargs or "max_steps" in kwargs, (
            "a Trainer in the docs says how long it trains (Lightning's default is 1,000 epochs)")
        rounds = any(type(cb).__name__ == "LotteryTicket" for cb in kwargs.get("callbacks") or [])
        if "max_epochs" in kwargs and not rounds:  # (a LotteryTicket needs all its rounds' epochs)
            kwargs["max_epochs"] = min(kwargs["max_epochs"], MAX_EPOCHS)
        kwargs.setdefault("accelerator", "cpu")
        kwargs.update(FAST_TRAINER)
        init(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "__init__", fast)


def _run_python(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(_workdir(tmp_path))
    _fast_trainer(monkeypatch)
    namespace = {"__name__": "__docs__"}
    exec(compile(block.code, block.id, "exec"), namespace)  # noqa: S102 - the documentation's own code


def shortened_shell(code: str) -> str:
    """``code`` with continuation lines joined and every ``lightning-prune fit`` shortened."""
    joined = re.sub(r"\\\n\s*", "", code)
    out = []
    for line in joined.splitlines():
        command = line.split("#", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        if re.search(r"lightning-prune\s+fit\b", command):
            line = f"{command} {FAST_CLI}"
        out.append(line)
    return "\n".join(out) + "\n"


def _run_shell(block: Block, tmp_path: Path) -> None:
    work = _workdir(tmp_path)
    venv_bin = Path(sys.executable).parent
    (work / ".venv").mkdir()
    (work / ".venv" / "bin").symlink_to(venv_bin)
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "LIGHTNING_PRUNE_TRACEBACK": "1"}
    env.pop("LIGHTNING_PRUNE", None)
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", shortened_shell(block.code)], cwd=work,
                          env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, f"{block.id} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.mark.parametrize("block", list(_params()))
def test_the_block_runs(block: Block, tmp_path, monkeypatch):
    if block.language == "python":
        _run_python(block, tmp_path, monkeypatch)
    else:
        assert shutil.which("bash")
        _run_shell(block, tmp_path)


def test_shell_blocks_are_shortened():
    code = "lightning-prune fit --config a.yaml \\\n    --trainer.max_epochs 9   # comment\necho ok\n"
    expected = f"lightning-prune fit --config a.yaml --trainer.max_epochs 9 {FAST_CLI}\necho ok\n"
    assert shortened_shell(code) == expected
