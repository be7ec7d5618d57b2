"""The built-in callbacks, importable from one place like ``lightning.pytorch.callbacks``::

    from lightning_prune.callbacks import GradualMagnitudePruning, LotteryTicket

One module per algorithm (``magnitude``, ``lottery_ticket``, ``group_lasso``, ``l0``, ``activation_decay``,
``evolution``, ``distill``, ``one_shot``),
the shared bases in ``base`` (:class:`PruningCallback`) and ``gating``
(:class:`GatePruningCallback`). Every algorithm is also registered through the ``lightning_prune.callbacks``
entry-point group in the project's ``pyproject.toml``, exactly as a plugin registers its own. Names are
imported on first access.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_MODULES = {
    "PruningCallback": "base",
    "GatePruningCallback": "gating",
    "GradualMagnitudePruning": "magnitude",
    "LotteryTicket": "lottery_ticket",
    "GroupLassoPruning": "group_lasso",
    "L0Pruning": "l0",
    "ActivationDecay": "activation_decay",
    "EvolutionaryMutation": "evolution",
    "KnowledgeDistillation": "distill",
    "OneShotPruning": "one_shot",
}

__all__ = list(_MODULES)


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = getattr(import_module(f"{__name__}.{_MODULES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
