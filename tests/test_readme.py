"""The README's argument tables are the constructors' signatures: every argument once, with its default."""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import pytest

import lightning_prune as lp

ROOT = Path(__file__).resolve().parents[1]
CORE = ["GradualMagnitudePruning", "LotteryTicket", "GroupLassoPruning", "L0Pruning", "ActivationDecay",
        "EvolutionaryMutation", "KnowledgeDistillation", "OneShotPruning"]
BASELINES = ["FirstKChannels", "RandomChannels", "RandomUnstructured"]


def documented_arguments(readme: Path, class_name: str) -> dict[str, object]:
    """``{argument: default}`` from the table under the ``### `ClassName` `` heading of ``readme``.

    Rows read ``| `a`, `b` | `default_a`, `default_b` | meaning |``; defaults are Python literals."""
    text = readme.read_text(encoding="utf-8")
    match = re.search(rf"^### `{class_name}`\n(.*?)(?=^#{{2,3}} |\Z)", text, re.S | re.M)
    assert match, f"{readme.name} has no '### `{class_name}`' section"
    rows = [line for line in match.group(1).splitlines() if line.startswith("| `")]
    assert rows, f"the {class_name} section of {readme.name} has no argument table"
    out: dict[str, object] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        names = re.findall(r"`([a-z_0-9]+)`", cells[0])
        defaults = [ast.literal_eval(d) for d in re.findall(r"`([^`]+)`", cells[1])]
        assert len(names) == len(defaults), f"{class_name}: {names} have {len(defaults)} defaults in {row!r}"
        for name, default in zip(names, defaults):
            assert name not in out, f"{class_name}: `{name}` is listed twice"
            out[name] = default
    return out


def signature_arguments(cls: type) -> dict[str, object]:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name: p.default for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


@pytest.mark.parametrize(("readme", "class_name"), [
    *((ROOT / "README.md", name) for name in CORE),
    *((ROOT / "plugins" / "lightning-prune-baselines" / "README.md", name) for name in BASELINES),
])
def test_the_argument_table_matches_the_signature(readme, class_name):
    if class_name in CORE:
        cls = getattr(lp, class_name)
    else:
        cls = getattr(pytest.importorskip("lightning_prune_baselines"), class_name)
    assert documented_arguments(readme, class_name) == signature_arguments(cls)


def test_every_built_in_callback_has_a_table():
    registered = {info.object_path.rpartition(":")[2] for info in lp.list_callbacks().values()
                  if info.error is None}
    assert registered <= set(CORE) | set(BASELINES), sorted(registered - set(CORE) - set(BASELINES))


def _readme_tables():
    """``benchmarks/readme_tables.py``, imported from its path (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_s_result_tables_are_those_the_result_files_render():
    tables = _readme_tables()
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert not tables.unmarked_tables(text), "a `<!-- results: ... -->` line without its `<!-- /results -->`"
    blocks = tables.blocks(text)
    refs = [m["ref"] for m in blocks]
    for name in ("recipes", "timm_coverage-traced", "channels", "shrink_while_training", "deploy", "lottery",
                 "reparam", "evolution.full", "overhead", "distill", "first_hour"):
        assert any(ref.startswith(f"benchmarks/results/{name}.md") for ref in refs), f"no table for {name}"
    try:
        import lightning_prune_baselines  # noqa: F401  (the list block shows the bundled plugin)
    except ImportError:
        blocks = [m for m in blocks if m["kind"] != "output"]
    stale = [m["ref"] for m in blocks if m["body"].rstrip("\n") != tables.render_block(m["kind"], m["ref"])]
    assert not stale, f"README tables differ from the result files: {stale}; run benchmarks/readme_tables.py"


def test_a_changed_result_file_makes_the_readme_stale(tmp_path, monkeypatch):
    tables = _readme_tables()
    for path in (ROOT / "benchmarks" / "results").iterdir():
        if path.suffix in (".json", ".md"):
            (tmp_path / path.name).write_bytes(path.read_bytes())
    recipes = json.loads((tmp_path / "recipes.json").read_text())
    md = (tmp_path / "recipes.md").read_text()
    first = f"{recipes[0]['test_acc']:.4f}"
    (tmp_path / "recipes.md").write_text(md.replace(f"| {first} |", "| 0.1234 |", 1))
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert tables.stale_blocks(text) == ["benchmarks/results/recipes.md"]
    assert "| 0.1234 |" in tables.rendered(text)
