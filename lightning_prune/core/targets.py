"""Which modules and parameters a callback acts on.

The rule, in one sentence: **the targets are the default set -- every module of ``types`` (Conv and Linear
unless widened) except each timm model's first convolution and classifier -- narrowed to the modules that
match ``include`` (when given) and do not match ``exclude``.** ``include`` and ``exclude`` never add a module
the default set leaves out; only ``types`` widens it (``types=["Conv2d", "Linear", "BatchNorm2d"]``).

The first convolution and the classifier come from each timm model's own ``pretrained_cfg["first_conv"]`` and
``pretrained_cfg["classifier"]`` (no size heuristics). A pattern matches a module when it matches its full
name (``"model.layer1.0.conv1"``) or any dotted suffix of it (``"layer1.0.conv1"``, ``"conv1"``), so the
attribute under which a LightningModule keeps its timm model does not matter.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_prune.errors import NoTargetsError

__all__ = [
    "PRUNABLE_TYPES",
    "Target",
    "as_patterns",
    "matches",
    "resolve_targets",
    "timm_default_exclusions",
    "timm_module_names",
    "uncompiled",
]

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Target:
    """One parameter a callback acts on.

    Attributes:
        module_name: the module's name inside the root (``"model.layer1.0.conv1"``).
        module: the module itself.
        param_name: the parameter's attribute on the module (``"weight"``).
    """

    module_name: str
    module: nn.Module
    param_name: str = "weight"

    @property
    def name(self) -> str:
        """The parameter's full name, as in the root's ``state_dict``."""
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)


def as_patterns(patterns: str | Iterable[str] | None) -> tuple[str, ...]:
    """Normalise a pattern argument: ``None`` -> ``()``, a string -> a 1-tuple."""
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        return (patterns,)
    return tuple(patterns)


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a module name matches any glob, on its full name or on any dotted suffix."""
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))] or [name]
    return any(fnmatch.fnmatchcase(s, p) for p in patterns for s in suffixes)


def _timm_cfg_names(value: str | Sequence[str] | None) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def timm_module_names(root: nn.Module, keys: Sequence[str] = ("first_conv", "classifier")) -> set[str]:
    """Full names of the modules that every timm model inside ``root`` names in ``pretrained_cfg[key]``,
    with their submodules (a Sequential stem such as ``conv1.0``, or a classifier that is a Sequential)."""
    names: set[str] = set()
    for prefix, module in root.named_modules():
        cfg = getattr(module, "pretrained_cfg", None)
        if not isinstance(cfg, dict):
            continue
        for key in keys:
            for rel in _timm_cfg_names(cfg.get(key)):
                full = f"{prefix}.{rel}" if prefix else rel
                names.add(full)
                if _has_submodule(module, rel):
                    names.update(f"{full}.{sub}" for sub, _ in module.get_submodule(rel).named_modules()
                                 if sub)
    return names


def timm_default_exclusions(root: nn.Module) -> set[str]:
    """Full names of the first conv and the classifier of every timm model inside ``root``."""
    return timm_module_names(root, ("first_conv", "classifier"))


def uncompiled(name: str, module: nn.Module) -> tuple[str, nn.Module]:
    """``(name, torch.compile(net))`` -> ``(f"{name}._orig_mod", net)``; anything else unchanged.

    Analyses that trace a network (``torch.fx``, torch-pruning) must see the eager modules of a network the
    LightningModule compiled itself (``self.model = torch.compile(net)``); the hooks and masks they lead to
    sit on those same modules, which the compiled code runs.
    """
    while isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        name, module = (f"{name}._orig_mod" if name else "_orig_mod"), module._orig_mod
    return name, module


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def resolve_targets(
    root: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    types: Sequence[type[nn.Module]] | None = None,
    param_name: str = "weight",
) -> list[Target]:
    """The parameters a callback acts on, in module order.

    Args:
        root: the LightningModule or any ``nn.Module``.
        include: globs of module names; narrows the default set to the modules that match.
        exclude: globs of module names to leave alone.
        types: the module types of the default set (default :data:`PRUNABLE_TYPES`: Conv1d/2d/3d, Linear).
        param_name: which parameter of each module.

    Raises:
        NoTargetsError: nothing is left; names the patterns and some module names that exist.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3))
        >>> [t.name for t in resolve_targets(net, include=["*"])]   # the BatchNorm is not a Conv/Linear
        ['0.weight', '2.weight']
    """
    include_p, exclude_p = as_patterns(include), as_patterns(exclude)
    types = tuple(types) if types else PRUNABLE_TYPES
    defaults_out = timm_default_exclusions(root)
    targets = []
    for name, module in root.named_modules():
        param = getattr(module, param_name, None)
        if not name or not isinstance(param, nn.Parameter) or not isinstance(module, types):
            continue
        if name in defaults_out:
            continue
        if include_p and not matches(name, include_p):
            continue
        if exclude_p and matches(name, exclude_p):
            continue
        targets.append(Target(name, module, param_name))
    if not targets:
        candidates = [n for n, m in root.named_modules()
                      if n and isinstance(m, types) and n not in defaults_out]
        shown = ", ".join(candidates[:8]) + (", ..." if len(candidates) > 8 else "")
        raise NoTargetsError(
            f"No module to prune: `include={list(include_p) or 'default'}` `exclude={list(exclude_p)}`"
            f" matched nothing of types {', '.join(t.__name__ for t in types)}"
            f" with a `{param_name}` parameter in {type(root).__name__}"
            " (each timm model's first conv and classifier are never targets)."
            f" Modules that could be: {shown or 'none'}."
            " HINT: patterns are globs over module names, e.g. include=['layer*.conv*'] or exclude=['head*'];"
            " `types=[...]` widens the module types."
        )
    return targets
