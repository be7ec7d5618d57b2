"""What the commands that read a ``fit`` config share (``lightning-prune export``, ``lightning-prune
sensitivity``): the ``fit`` arguments they accept, and building a LightningCLI that runs no subcommand.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TypeVar

import lightning.pytorch as pl
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

__all__ = ["OneLineParseErrors", "add_fit_config_arguments", "config_cli", "weights_only_of"]

CLI = TypeVar("CLI", bound=LightningCLI)


class OneLineParseErrors(LightningCLI):
    """A LightningCLI with no abbreviated options (``--trainer.max_epoch`` is not ``max_epochs``) whose parse
    errors come back as one :class:`~lightning_prune.cli.ConfigError` line (the
    class, the unknown key and its closest valid spelling, or the innermost reason) instead of jsonargparse's
    usage dump and nested union errors: what ``fit``, ``export`` and ``sensitivity`` share."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("exit_on_error", False)  # errors come back to `parse_arguments`
        kwargs.setdefault("allow_abbrev", False)  # every parser: the main one and each subcommand's
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        from lightning_prune.cli.errors import ConfigError, explain_parse_error

        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            argv = sys.argv[1:] if args is None else list(args)
            subparsers = getattr(self, "_subcommand_parsers", {})
            sub = next((a for a in argv if a in subparsers), None)
            raise ConfigError(explain_parse_error(str(err), argv, subparsers.get(sub, parser))) from None


def add_fit_config_arguments(parser: LightningArgumentParser, ckpt_help: str) -> None:
    """``--ckpt_path`` (what ``ckpt_help`` says), and the arguments of a ``fit`` config -- written by hand or
    the ``config.yaml`` a run saved -- that these commands accept and do not use."""
    parser.add_argument("--ckpt_path", type=str | None, default=None, help=ckpt_help)
    parser.add_argument("--test_after_fit", type=bool, default=True,
                        help="Accepted for configs written for `fit`; unused here.")
    parser.add_argument("--torch_threads", type=int | None, default=None,
                        help="Accepted for configs written for `fit`; unused here.")
    parser.add_argument("--weights_only", type=bool | None, default=None,
                        help="How --ckpt_path is read: true (the default, also for null) refuses a file that"
                             " holds Python objects other than tensors and plain data; false unpickles them,"
                             " which runs the code the file holds (only for files you trust).")


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


def weights_only_of(config: object) -> bool:
    """The ``--weights_only`` of a parsed config; ``null`` (a saved fit config's default) reads as
    ``True``."""
    value = config.get("weights_only") if hasattr(config, "get") else None
    return True if value is None else bool(value)
