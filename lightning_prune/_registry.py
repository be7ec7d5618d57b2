"""Discovery of pruning callbacks through the ``lightning_prune.callbacks`` entry-point group.

Entry points are read by name only; a class is imported the first time it is asked for. A plugin that
fails to import is reported as broken, with its error, and never breaks the others. The built-in
algorithms are registered in this project's own ``pyproject.toml`` exactly as a third party would.

``list_callbacks(load=False)`` (what ``lightning-prune list`` shows) imports nothing: it finds each entry
point's module file, reads the class's docstring with :mod:`ast`, and checks that the declaring
distribution's requirements are installed, so it answers without importing torch.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import inspect
import re
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, PackageNotFoundError, entry_points
from importlib.metadata import version as _installed_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import Callback

__all__ = ["ENTRY_POINT_GROUP", "CallbackInfo", "class_of_key", "create_callback", "get_callback",
           "list_callbacks", "registered_class_names", "warn_ignored_states"]

ENTRY_POINT_GROUP = "lightning_prune.callbacks"

_loaded: dict[str, type[Callback]] = {}
_errors: dict[str, str] = {}


@dataclass(frozen=True)
class CallbackInfo:
    """What the registry knows of one registered callback.

    Attributes:
        name: the entry-point name, as passed to :func:`create_callback`.
        object_path: ``"module:Class"`` as declared by the entry point.
        distribution: the installed distribution that declares it (``None`` when unknown).
        version: that distribution's version.
        summary: the first line of the class docstring (empty when broken).
        error: why loading failed, or ``None`` when the callback loads.
        loaded: whether the class was imported to tell (``False``: read from its source file only).
    """

    name: str
    object_path: str
    distribution: str | None
    version: str | None
    summary: str
    error: str | None = None
    loaded: bool = True

    @property
    def broken(self) -> bool:
        return self.error is not None


def _entry_points() -> dict[str, EntryPoint]:
    """Entry points of the group by name; the first declaration of a name wins."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def _load(name: str, ep: EntryPoint) -> type[Callback]:
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        raise ImportError(_errors[name])
    from lightning.pytorch.callbacks import Callback

    try:
        obj = ep.load()
        if not (inspect.isclass(obj) and issubclass(obj, Callback)):
            raise TypeError(f"{ep.value} is {obj!r}, not a subclass of lightning.pytorch.Callback")
    except Exception as err:  # a broken plugin must never break the others
        detail = "".join(traceback.format_exception_only(type(err), err)).strip()
        _errors[name] = f"entry point {name!r} ({ep.value}) failed to load: {detail}"
        raise ImportError(_errors[name]) from err
    _loaded[name] = obj
    return obj


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _module_file(module: str) -> Path | None:
    """The source file of ``module`` without importing it (nor its parent packages); ``None`` if not found.

    Raises:
        ModuleNotFoundError: the top-level package is not installed.
    """
    top, *rest = module.split(".")
    spec = sys.modules[top].__spec__ if top in sys.modules else importlib.util.find_spec(top)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {top!r}", name=top)
    if not rest:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    dirs = [Path(d) for d in (spec.submodule_search_locations or [])]
    for i, part in enumerate(rest):
        last = i == len(rest) - 1
        found = []
        for d in dirs:
            if last and (d / f"{part}.py").is_file():
                return d / f"{part}.py"
            if (d / part).is_dir():
                found.append(d / part)
        if last:
            init = next((d / "__init__.py" for d in found if (d / "__init__.py").is_file()), None)
            if init is not None:
                return init
            if not found:
                raise ModuleNotFoundError(f"No module named {module!r}", name=module)
            return None
        if not found:
            raise ModuleNotFoundError(f"No module named {'.'.join([top, *rest[:i + 1]])!r}",
                                      name=".".join([top, *rest[:i + 1]]))
        dirs = found
    return None


def _static_summary(ep: EntryPoint) -> str | None:
    """The first docstring line of the entry point's class read from its source, or ``None`` when that
    cannot be told without importing (a class defined elsewhere and re-exported, a compiled module).

    Raises:
        ModuleNotFoundError, ImportError: the module or the class does not exist.
    """
    module, _, attr = ep.value.partition(":")
    attr = attr.strip()
    path = _module_file(module.strip())
    if path is None or "." in attr or not attr:
        return None
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == attr:
            doc = ast.get_docstring(node) or ""
            return doc.strip().splitlines()[0] if doc.strip() else ""
    assigned = {target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(target, ast.Name)}
    imported = {alias.asname or alias.name.split(".")[0] for node in tree.body
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    if attr in assigned or attr in imported or any(
            isinstance(node, (ast.Import, ast.ImportFrom)) and any(a.name == "*" for a in node.names)
            for node in tree.body) or any(isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
                                          for node in tree.body):
        return None  # defined elsewhere: only an import can tell
    raise ImportError(f"cannot import name {attr!r} from {module.strip()!r} ({path})")


_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*)(;.*)?$")


def _missing_requirement(dist: Any) -> str | None:
    """The first requirement of ``dist`` (its ``Requires-Dist``, extras left out) that is not installed or
    not at an accepted version, as ``"name>=1.0 (installed: 0.9)"``; ``None`` when all are there."""
    try:
        from packaging.markers import Marker
        from packaging.specifiers import SpecifierSet
    except ImportError:  # pragma: no cover - packaging ships with pip, setuptools and Lightning
        Marker = SpecifierSet = None  # noqa: N806
    for requirement in dist.requires or []:
        match = _REQUIREMENT.match(requirement)
        if not match:
            continue
        name, _, spec, marker = match.groups()
        if marker:
            if Marker is None or "extra" in marker:
                continue
            try:
                if not Marker(marker.lstrip(";").strip()).evaluate():
                    continue
            except Exception:  # an unreadable marker: do not guess
                continue
        try:
            installed = _installed_version(name)
        except PackageNotFoundError:
            return f"{requirement.split(';')[0].strip()} (not installed)"
        spec = spec.strip().strip("()")
        if spec and SpecifierSet is not None:
            try:
                if not SpecifierSet(spec).contains(installed, prereleases=True):
                    return f"{name}{spec} (installed: {installed})"
            except Exception:
                continue
    return None


def _info(name: str, ep: EntryPoint, load: bool = True) -> CallbackInfo:
    dist = getattr(ep, "dist", None)
    dist_name = dist.metadata["Name"] if dist is not None else None
    version = dist.version if dist is not None else None
    if not load and name not in _loaded and name not in _errors:
        try:
            summary = _static_summary(ep)
        except (ImportError, SyntaxError, OSError) as err:
            detail = "".join(traceback.format_exception_only(type(err), err)).strip()
            return CallbackInfo(name, ep.value, dist_name, version, "",
                                f"entry point {name!r} ({ep.value}) failed to load: {detail}", loaded=False)
        missing = _missing_requirement(dist) if dist is not None else None
        if missing is not None:
            return CallbackInfo(name, ep.value, dist_name, version, "",
                                f"{dist_name} requires {missing}", loaded=False)
        if summary is not None:
            return CallbackInfo(name, ep.value, dist_name, version, summary, loaded=False)
    try:
        cls = _load(name, ep)
    except ImportError as err:
        return CallbackInfo(name, ep.value, dist_name, version, "", str(err))
    return CallbackInfo(name, ep.value, dist_name, version, _summary(cls))


def list_callbacks(filter: str | None = None, *, load: bool = True) -> dict[str, CallbackInfo]:  # noqa: A002
    """All registered callbacks, broken ones included, sorted by name.

    Args:
        filter: an optional glob (``"l*"``) or substring over the names.
        load: import every class to tell whether it loads (the default). ``False`` imports nothing: each
            class is found in its module's source and its docstring read there, the distribution's
            requirements are checked as installed, and only a class defined elsewhere (re-exported) is
            imported; an error raised while the module runs is then not seen (``info.loaded`` is ``False``).

    Example::

        >>> import lightning_prune
        >>> "magnitude" in lightning_prune.list_callbacks()
        True
    """
    eps = _entry_points()
    names = sorted(eps)
    if filter:
        pattern = filter if any(c in filter for c in "*?[") else f"*{filter}*"
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return {name: _info(name, eps[name], load) for name in names}


def get_callback(name: str) -> type[Callback]:
    """The callback class registered under ``name``, imported on first use.

    Raises:
        KeyError: no callback has that name; the message lists the names that exist.
        ImportError: the callback is registered but its plugin fails to import.
    """
    eps = _entry_points()
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise KeyError(f"No pruning callback named {name!r}. Registered callbacks: {known}.")
    return _load(name, eps[name])


def create_callback(name: str, **kwargs: Any) -> Callback:
    """Instantiate the callback registered under ``name`` with ``kwargs``.

    Example::

        cb = lightning_prune.create_callback("magnitude", target_sparsity=0.9)
    """
    return get_callback(name)(**kwargs)


def _reset_cache() -> None:
    """Forget what was loaded (tests that fake entry points use it)."""
    _loaded.clear()
    _errors.clear()


# The pruning state of a registered callback in a checkpoint (read by the callbacks' resume check and by
# ImageClassifier, which warns when no callback of the Trainer claims it).

def registered_class_names() -> set[str]:
    """The class names (``Class`` of ``module:Class``) of every registered callback."""
    return {info.object_path.rpartition(":")[2] for info in list_callbacks().values()}


def class_of_key(key: str) -> str:
    """The class name of a callback's ``state_key`` (``Class{'arg': ...}`` -> ``Class``)."""
    return key.split("{", 1)[0]


def warn_ignored_states(trainer: Trainer, checkpoint: Mapping[str, Any]) -> None:
    """Warn once per checkpoint when a fit resumes from it without a lightning-prune callback whose state it
    holds (the weights, zeros included, still load)."""
    from lightning.pytorch.utilities import rank_zero_warn

    states = checkpoint.get("callbacks") or {}
    if trainer.state.fn != "fit":  # (test/validate/predict resume no schedule)
        return
    if getattr(trainer, "_lightning_prune_checked", None) == id(checkpoint):
        return
    trainer._lightning_prune_checked = id(checkpoint)  # type: ignore[attr-defined]
    ours = registered_class_names()
    present = {cb.state_key for cb in trainer.callbacks}
    ignored = [key for key in states if class_of_key(key) in ours and key not in present]
    if ignored:
        rank_zero_warn(
            f"The checkpoint holds the pruning state of {', '.join(ignored)}, which this Trainer does not"
            " have: that state (masks, gates, schedule positions) is ignored; the weights, with their zeros,"
            " are loaded. HINT: pass the same callback to resume the pruning schedule.")
