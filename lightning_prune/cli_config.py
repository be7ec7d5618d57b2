"""What the commands that read a ``fit`` config share (``lightning-prune export``, ``lightning-prune
sensitivity``): the ``fit`` arguments they accept, and building a LightningCLI that runs no subcommand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

__all__ = ["add_fit_config_arguments", "config_cli"]

CLI = TypeVar("CLI", bound=LightningCLI)


def add_fit_config_arguments(parser: LightningArgumentParser, ckpt_help: str) -> None:
    """``--ckpt_path`` (what ``ckpt_help`` says), and the arguments of a ``fit`` config -- written by hand or
    the ``config.yaml`` a run saved -- that these commands accept and do not use."""
    parser.add_argument("--ckpt_path", type=str | None, default=None, help=ckpt_help)
    parser.add_argument("--test_after_fit", type=bool, default=True,
                        help="Accepted for configs written for `fit`; unused here.")
    parser.add_argument("--weights_only", type=bool | None, default=None,
                        help="Accepted for the config.yaml a `fit` run saved; unused here.")


def config_cli(cli_class: type[CLI], argv: Sequence[str]) -> CLI:
    """``cli_class`` over any LightningModule / LightningDataModule of the config, built without running a
    subcommand and without saving the config."""
    return cli_class(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(argv),
        run=False,
        save_config_callback=None,
    )
