"""Every script in ``benchmarks/`` still imports against the library (without running its ``main``).

The scripts run for minutes to hours, so nothing else exercises them: a renamed or moved name they import
(``channels_l0.py`` importing what ``channels.py`` no longer defined) would otherwise rot unseen until the
next rerun of a published result.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

from tests.helpers import BENCHMARKS, benchmark_script

SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


def test_there_are_scripts() -> None:
    assert len(SCRIPTS) > 10, SCRIPTS


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_benchmark_script_imports(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = path.read_text(encoding="utf-8")
    assert 'if __name__ == "__main__":' in source, f"{path.name} would run when imported"
    modules = set(sys.modules)
    try:
        with warnings.catch_warnings():  # (deploy.py silences every warning at import)
            module = benchmark_script(path.stem, monkeypatch)
    finally:
        # the benchmarks imported by plain name from another script (``from one_shot import accuracy``)
        for name in set(sys.modules) - modules:
            if (BENCHMARKS / f"{name}.py").exists():
                del sys.modules[name]
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"
