"""The ``lightning-prune`` command: ``fit`` / ``validate`` / ``test`` / ``predict`` through LightningCLI,
``list``, ``export`` (:mod:`lightning_prune.cli.export`) and ``sensitivity``
(:mod:`lightning_prune.cli.sensitivity`). The errors and their one-line report live in
:mod:`lightning_prune.cli.errors`.

Examples::

    lightning-prune list
    lightning-prune fit --config recipes/digits/magnitude.yaml
    lightning-prune fit --config recipes/digits/magnitude.yaml --trainer.max_epochs 2   # a shorter run
    lightning-prune fit --config recipes/digits/magnitude.yaml --trainer.accelerator gpu
    lightning-prune export --config recipes/digits/magnitude.yaml --ckpt_path last.ckpt

``fit`` ends, unless ``--test_after_fit false``, with a test of the final (pruned) weights and a table of
per-layer and global sparsity, parameters and accuracy.

A mistake in the configuration is answered by one line on stderr (exit status 2), a misconfiguration found
while the run is set up by one line too (exit status 1); ``LIGHTNING_PRUNE_TRACEBACK=1`` shows the traceback
instead. The help, ``--version`` and ``list`` import neither torch nor Lightning.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from lightning_prune._quiet import quiet_third_party
from lightning_prune.cli.errors import PROG, ConfigError, did_you_mean, report_user_error

__all__ = ["COMMANDS", "ConfigError", "format_callback_list", "main", "run"]  # and PruneCLI, from cli.fit

# One line per command, for `lightning-prune --help` and a bare `lightning-prune`.
COMMANDS: dict[str, str] = {
    "fit": "train with the config's model, data and callbacks, then test and print the sparsity table",
    "validate": "evaluate a model on the validation data of the config",
    "test": "evaluate a model on the test data of the config",
    "predict": "run a model over the prediction data of the config",
    "list": "the pruning callbacks installed (built-in and plugins), one line each",
    "export": "a run's checkpoint to ONNX, checked in onnxruntime, and to a sparse checkpoint",
    "sensitivity": "per-layer sensitivity scan: accuracy against sparsity, layer by layer",
}
_LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

_LIST_COLUMNS = """\
columns:
  name          the entry-point name: `lp.create_callback(name)`, `LIGHTNING_PRUNE="name:key=value"`
  class         the `module:Class` the entry point declares (a config's `class_path` is `module.Class`)
  distribution  the installed package that declares it (`pip uninstall` it and the row is gone)
  version       that package's version
  status        `ok`, or `BROKEN` with why in the summary column: the module or class does not exist, a
                requirement of the package is missing, or (with --check) the import failed
  summary       the first line of the class's docstring

Without --check nothing is imported: the class is found in its module's source file and its docstring
read there, so a plugin whose module raises when imported still shows `ok`; --check imports every class
(the whole stack: torch, Lightning, timm) and reports such a plugin as BROKEN."""


def _version() -> str:
    from lightning_prune.__about__ import __version__

    return __version__


def _overview() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: {PROG} <command> [options]",
        "",
        "PyTorch Lightning callbacks that prune, sparsify and reparameterise any timm model while it trains.",
        "",
        "commands:",
        *(f"  {name.ljust(width)}  {text}" for name, text in COMMANDS.items()),
        "",
        f"`{PROG} <command> --help` shows the options of one command. Start with:",
        f"  {PROG} fit --config recipes/digits/magnitude.yaml                       # the demo, on a CPU",
        f"  {PROG} fit --config recipes/digits/magnitude.yaml --trainer.max_epochs 2  # shorter",
        f"  {PROG} list                                                            # what is installed",
    ]
    return "\n".join(lines)


def format_callback_list(filter: str | None = None, check: bool = False) -> str:  # noqa: A002
    """The table ``lightning-prune list`` prints: name, class, distribution, version, status, summary.

    Args:
        filter: a glob or substring over the names (as :func:`lightning_prune.list_callbacks`).
        check: import every class to tell whether it loads; without it nothing is imported.
    """
    from lightning_prune._registry import list_callbacks

    rows = [("name", "class", "distribution", "version", "status", "summary")]
    for info in list_callbacks(filter, load=check).values():
        status = "BROKEN" if info.broken else "ok"
        summary = info.error if info.broken else info.summary
        rows.append((info.name, info.object_path, info.distribution or "?", info.version or "?", status,
                     summary))
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows)


def _list_main(args: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} list", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The pruning callbacks registered in the `lightning_prune.callbacks` entry-point group: "
                    "the built-in ones and those of every installed plugin, sorted by name.",
        epilog=_LIST_COLUMNS)
    parser.add_argument("filter", nargs="?", default=None,
                        help="a glob (`l*`) or a substring over the names")
    parser.add_argument("--check", action="store_true", help="import every class to check that it loads")
    options = parser.parse_args(list(args))
    print(format_callback_list(options.filter, check=options.check))


def __getattr__(name: str) -> Any:
    if name == "PruneCLI":  # defined beside Lightning's imports, so that the help and `list` need none
        from lightning_prune.cli.fit import PruneCLI

        return PruneCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run(args: Sequence[str]) -> Any:
    """``lightning-prune fit|validate|test|predict ARGS`` in this process; returns the :class:`PruneCLI`
    (its ``trainer``, ``model``, ``datamodule``). Errors are raised, not printed."""
    import lightning.pytorch as pl

    from lightning_prune.cli.fit import PruneCLI

    args = list(args)

    # LightningCLI reads the arguments from sys.argv itself: it then has nothing to warn about
    # ("LightningCLI's args parameter is intended to run from within Python ...").
    import torch

    saved, threads = sys.argv, torch.get_num_threads()
    sys.argv = [saved[0] if saved else PROG, *args]
    try:
        return PruneCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                        subclass_mode_data=True, save_config_kwargs={"overwrite": True})
    finally:
        sys.argv = saved
        torch.set_num_threads(threads)  # (`--torch_threads` is for the run, not for the caller's process)


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``lightning-prune`` with ``argv`` (default: the command line)."""
    args = list(sys.argv[1:] if argv is None else argv)
    quiet_third_party()
    if not args:
        print(_overview())
        return
    if args[0] in ("-h", "--help", "help"):
        print(_overview())
        return
    if args[0] in ("-V", "--version", "version"):
        print(f"{PROG} {_version()}")
        return
    if args[0] == "list":
        _list_main(args[1:])
        return
    if not args[0].startswith("-") and args[0] not in COMMANDS:
        print(f"{PROG}: error: unknown command {args[0]!r}{did_you_mean(args[0], list(COMMANDS))}"
              f" (commands: {', '.join(COMMANDS)}; `{PROG} --help` says what each does)", file=sys.stderr)
        raise SystemExit(2)
    try:
        if args[0] == "sensitivity":  # the per-layer sensitivity scan (lightning_prune.cli.sensitivity)
            import warnings

            from lightning_prune.cli.sensitivity import main as sensitivity_main

            with warnings.catch_warnings():  # it passes our own argv to LightningCLI on purpose
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
                sensitivity_main(args[1:])
        elif args[0] == "export":  # checkpoint -> ONNX checked in onnxruntime (lightning_prune.cli.export)
            import warnings

            from lightning_prune.cli.export import main as export_main

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
                export_main(args[1:])
        else:
            run(args)
    except Exception as err:
        report_user_error(err)


if __name__ == "__main__":  # pragma: no cover
    main()
