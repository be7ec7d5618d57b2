"""The README's argument tables are the constructors' signatures: every argument once, with its default."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import lightning_prune as lp

ROOT = Path(__file__).resolve().parents[1]
CORE = ["GradualMagnitudePruning", "LotteryTicket", "GroupLassoPruning", "L0Pruning", "ActivationDecay",
        "EvolutionaryMutation", "KnowledgeDistillation"]
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
