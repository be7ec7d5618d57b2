"""The package's layering (docs/architecture.md), read from the source with :mod:`ast` (nothing is imported):

* each layer imports only the layers below it: the core (``core/``, ``graph``) and ``functional/`` never
  import Lightning (``lightning``, ``lightning.pytorch``, ``pytorch_lightning``) nor the callbacks,
  deployment, training kit or CLI; the foundations (``errors``, ``validation``, ``_registry``, ...) import
  no layer;
* no import cycle between the package's modules, lazy (function-level) imports included;
* no private name (``_x``) imported from another module of the package.

The deprecation shims at the old paths (``lightning_prune/masks.py`` ..., listed in
``lightning_prune._moved``) are left out of the graph: they only forward to the new module; their own test is
at the end.
"""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

from lightning_prune._moved import MOVED

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_prune"
LIGHTNING = ("lightning", "pytorch_lightning")

# layer -> the module prefixes that belong to it (a prefix covers `x` and `x.*`: `graph` may become a package)
LAYERS: dict[str, tuple[str, ...]] = {
    "foundation": ("lightning_prune.__about__", "lightning_prune.errors", "lightning_prune.validation",
                   "lightning_prune._registry", "lightning_prune._quiet", "lightning_prune._moved",
                   "lightning_prune.checkpoint_io"),
    "functional": ("lightning_prune.functional",),
    "core": ("lightning_prune.core", "lightning_prune.graph"),
    "callbacks": ("lightning_prune.callbacks",),
    "training": ("lightning_prune.training",),
    "deploy": ("lightning_prune.deploy",),
    "cli": ("lightning_prune.cli",),
    "top": ("lightning_prune._autoload", "lightning_prune.testing"),
}
# layer -> the layers it may import (its own included)
MAY_IMPORT: dict[str, set[str]] = {
    "foundation": {"foundation"},
    "functional": {"foundation", "functional"},
    "core": {"foundation", "functional", "core"},
    "callbacks": {"foundation", "functional", "core", "callbacks"},
    "training": {"foundation", "functional", "core", "training"},
    "deploy": {"foundation", "functional", "core", "callbacks", "training", "deploy"},
    "cli": {"foundation", "functional", "core", "callbacks", "training", "deploy", "cli"},
    "top": {"foundation", "functional", "core", "callbacks", "training", "deploy", "top"},
}
# (the foundations may: `validation` raises Lightning's MisconfigurationException for the callbacks)
LIGHTNING_FREE = {"functional", "core"}

# (importer, module, name): private names imported across modules, each with its reason
PRIVATE_ALLOWED: dict[tuple[str, str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()
SHIMS = {name for name in MOVED if name in MODULES}


def _layer(module: str) -> str | None:
    for layer, prefixes in LAYERS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    return None


def _imports(module: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) of every import statement, lazy ones included."""
    is_package = path.name == "__init__.py"
    out: list[tuple[str, str | None, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out += [(base, alias.name, node.lineno) for alias in node.names]
    return out


def _targets(imported: str, name: str | None) -> list[str]:
    """The package modules an import statement loads: the module, and ``module.name`` when that is one."""
    found = [imported] if imported in MODULES else []
    if name is not None and f"{imported}.{name}" in MODULES:
        found.append(f"{imported}.{name}")
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        if module in SHIMS:
            continue
        graph[module] = {t for imported, name, _ in _imports(module, path) for t in _targets(imported, name)
                         if t != module and t not in SHIMS}
    return graph


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m not in SHIMS and m != "lightning_prune" and _layer(m) is None] == [], (
        "a new top-level module: put it in a subpackage, or give it a layer here and in docs/architecture.md")


def test_each_layer_imports_only_the_layers_below_it():
    bad = []
    for module, path in MODULES.items():
        layer = _layer(module)
        if module in SHIMS or layer is None:
            continue
        for imported, name, line in _imports(module, path):
            if layer in LIGHTNING_FREE and imported.split(".")[0] in LIGHTNING:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported} (the {layer} layer"
                           " is Lightning-free)")
            for target in _targets(imported, name):
                other = _layer(target)
                if other is not None and other not in MAY_IMPORT[layer]:
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} ({layer} may"
                               f" import {sorted(MAY_IMPORT[layer])}, not {other})")
            if imported.startswith("lightning_prune") and any(imported == old for old in MOVED):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports the deprecated path {imported}"
                           f" (use {MOVED[imported]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_name_imported_across_modules():
    bad, used = [], set()
    for module, path in MODULES.items():
        if module in SHIMS:
            continue
        for imported, name, line in _imports(module, path):
            if (imported.split(".")[0] != "lightning_prune" or name is None or not name.startswith("_")
                    or name.startswith("__") or f"{imported}.{name}" in MODULES or imported == module):
                continue
            if (module, imported, name) in PRIVATE_ALLOWED:
                used.add((module, imported, name))
                continue
            bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name} from {imported}")
    assert bad == [], "make the name public (no underscore, in __all__) or move it: " + "; ".join(bad)
    assert set(PRIVATE_ALLOWED) == used, f"stale allow-list entries: {set(PRIVATE_ALLOWED) - used}"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_warns_and_reexports_the_new_module(old):
    assert old in MODULES, f"{old} has no shim left: remove it from lightning_prune._moved.MOVED"
    new = importlib.import_module(MOVED[old])
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shim = importlib.import_module(old)
    ours = [w for w in caught if w.category is DeprecationWarning and "moved to" in str(w.message)]
    assert [str(w.message) for w in ours] == [
        f"`{old}` moved to `{MOVED[old]}`; import it from there (the old path goes in the next release)."]
    assert ours[0].filename == __file__  # attributed to the importer, so the warning filters show it
    public = getattr(new, "__all__", None) or [n for n in vars(new) if not n.startswith("_")]
    assert all(getattr(shim, name) is getattr(new, name) for name in public)
