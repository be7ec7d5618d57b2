"""The ``lightning-prune`` command (``python -m lightning_prune.cli`` runs it too).

:mod:`~lightning_prune.cli.app` dispatches (help, ``--version``, ``list`` import neither torch nor Lightning),
:mod:`~lightning_prune.cli.fit` is the LightningCLI behind ``fit``/``validate``/``test``/``predict``,
:mod:`~lightning_prune.cli.export` and :mod:`~lightning_prune.cli.sensitivity` are the other commands,
:mod:`~lightning_prune.cli.config` what they share to read a fit's config, :mod:`~lightning_prune.cli.errors`
the :class:`ConfigError` and the one-line report of a user's mistake.
"""

from __future__ import annotations

from typing import Any

from lightning_prune.cli.app import COMMANDS, format_callback_list, main, run
from lightning_prune.cli.errors import ConfigError

__all__ = ["COMMANDS", "ConfigError", "format_callback_list", "main", "run"]  # and PruneCLI, from cli.fit


def __getattr__(name: str) -> Any:
    if name == "PruneCLI":  # defined beside Lightning's imports, so that the help and `list` need none
        from lightning_prune.cli.fit import PruneCLI

        return PruneCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
