"""Discovery of pruning callbacks through the ``lightning_prune.callbacks`` entry-point group.

Entry points are read by name only; a class is imported the first time it is asked for. A plugin that
fails to import is reported as broken, with its error, and never breaks the others. The built-in
algorithms are registered in this project's own ``pyproject.toml`` exactly as a third party would.
"""

from __future__ import annotations

import fnmatch
import inspect
import traceback
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from lightning.pytorch.callbacks import Callback

__all__ = ["ENTRY_POINT_GROUP", "CallbackInfo", "create_callback", "get_callback", "list_callbacks"]

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
    """

    name: str
    object_path: str
    distribution: str | None
    version: str | None
    summary: str
    error: str | None = None

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


def _info(name: str, ep: EntryPoint) -> CallbackInfo:
    dist = getattr(ep, "dist", None)
    dist_name = dist.metadata["Name"] if dist is not None else None
    version = dist.version if dist is not None else None
    try:
        cls = _load(name, ep)
    except ImportError as err:
        return CallbackInfo(name, ep.value, dist_name, version, "", str(err))
    return CallbackInfo(name, ep.value, dist_name, version, _summary(cls))


def list_callbacks(filter: str | None = None) -> dict[str, CallbackInfo]:  # noqa: A002 - public name
    """All registered callbacks, broken ones included, sorted by name.

    Args:
        filter: an optional glob (``"l*"``) or substring over the names.

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
    return {name: _info(name, eps[name]) for name in names}


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
