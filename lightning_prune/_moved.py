"""Old import paths -> new modules: the deprecation shims of the layout of ``docs/architecture.md``.

The old paths (before that layout, 0.1) work for one more release.

Each old path is a two-line module calling :func:`moved`: it imports the new module, warns (once, when the
old path is first imported) with a ``DeprecationWarning`` naming the new path, attributed to the code that
imported the old path, and re-exports the new module's public names (any other attribute is read from the new
module on access). The classes and functions are the same objects, so ``isinstance`` checks agree; a
``mock.patch`` must name the new path.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

__all__ = ["MOVED", "moved"]

#: old module path -> new module path (the shims at the old paths; remove them after one release)
MOVED: dict[str, str] = {
    "lightning_prune.targets": "lightning_prune.core.targets",
    "lightning_prune.masks": "lightning_prune.core.masks",
    "lightning_prune.gates": "lightning_prune.core.gates",
    "lightning_prune.compression": "lightning_prune.core.compression",
    "lightning_prune.reparam": "lightning_prune.core.reparam",
    "lightning_prune.report": "lightning_prune.core.report",
    "lightning_prune.semi_structured": "lightning_prune.core.semi_structured",
    "lightning_prune.sensitivity_scan": "lightning_prune.core.sensitivity",
    "lightning_prune.shrink": "lightning_prune.callbacks.shrink",
    "lightning_prune.schedules": "lightning_prune.callbacks.schedules",
    "lightning_prune.logging": "lightning_prune.callbacks.logging",
    "lightning_prune.onnx_export": "lightning_prune.deploy.onnx",
    "lightning_prune.sparse_io": "lightning_prune.deploy.sparse_io",
    "lightning_prune.restore": "lightning_prune.deploy.restore",
    "lightning_prune.models": "lightning_prune.training.models",
    "lightning_prune.models_reducenet": "lightning_prune.training.reducenet",
    "lightning_prune.data": "lightning_prune.training.data",
    "lightning_prune.cli_fit": "lightning_prune.cli.fit",
    "lightning_prune.cli_export": "lightning_prune.cli.export",
    "lightning_prune.cli_sensitivity": "lightning_prune.cli.sensitivity",
    "lightning_prune.cli_config": "lightning_prune.cli.config",
}


def _stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside the import machinery, this module and the shim
    (``warnings.warn`` itself skips, without counting them, the frames of ``importlib._bootstrap``), so the
    warning names the line that imported the old path."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith("importlib._bootstrap"):
            if not (name == __name__ or name in MOVED or name == "importlib"):  # importlib.import_module
                return level
            level += 1
        frame = frame.f_back
    return 1


def moved(old: str, namespace: dict[str, Any]) -> None:
    """Called by the shim at ``old`` with its ``globals()``: re-export the module it moved to, with a
    ``DeprecationWarning``."""
    new = MOVED[old]
    module = importlib.import_module(new)
    warnings.warn(f"`{old}` moved to `{new}`; import it from there (the old path goes in the next release).",
                  DeprecationWarning, stacklevel=_stacklevel())
    names = list(getattr(module, "__all__", None) or (n for n in vars(module) if not n.startswith("_")))
    namespace.update({name: getattr(module, name) for name in names})
    namespace["__all__"] = names

    def __getattr__(name: str) -> Any:  # noqa: N807 -- the module-level hook
        return getattr(module, name)

    namespace["__getattr__"] = __getattr__
