"""The ``lightning-prune`` command: ``fit`` / ``validate`` / ``test`` / ``predict`` through LightningCLI,
``list``, ``export`` (:mod:`lightning_prune.cli_export`) and ``sensitivity``
(:mod:`lightning_prune.cli_sensitivity`).

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
import difflib
import inspect
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from lightning_prune._quiet import quiet_third_party

__all__ = ["COMMANDS", "ConfigError", "format_callback_list", "main", "run"]  # and PruneCLI, from cli_fit

PROG = "lightning-prune"

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
TRACEBACK_ENV = "LIGHTNING_PRUNE_TRACEBACK"

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


class ConfigError(Exception):
    """A mistake in the command line or the config, reported as one line (exit status 2)."""


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


def _class_arguments(cls: type) -> list[str]:
    """The keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up the MRO as jsonargparse does."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = list(inspect.signature(init).parameters.values())[1:]
        except (TypeError, ValueError):
            break
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def _import_object(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except Exception:  # the parser already reported what it could not import
        return None


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _source_of(key: str, args: Sequence[str]) -> str:
    """Where ``key`` was written: the config file that holds it, or the command line."""
    configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--config", "-c")]
    configs += [a.split("=", 1)[1] for a in args if a.startswith(("--config=", "-c="))]
    if any(key in a for a in args if a.startswith("--") and a not in ("--config", "-c")):
        return " (on the command line)"
    for config in configs:
        try:
            with open(config, encoding="utf-8") as f:
                if re.search(rf"\b{re.escape(key)}\b", f.read()):
                    return f" (in {config})"
        except OSError:
            continue
    return ""


def _sexagesimal_hint(arg: str, value: str, types: str) -> str:
    from lightning_prune.validation import sexagesimal_hint

    return sexagesimal_hint(int(value)) if "str" in types.split(" | ") and value.isdigit() else ""


def _explain_parse_error(message: str, args: Sequence[str], parser: Any = None) -> str:
    """One line for jsonargparse's many-line error: an unknown argument of a class names the class, the key
    and its closest valid spelling; anything else keeps jsonargparse's innermost reason."""
    bad_class = re.search(r"Problem with given class_path ['\"]([\w.]+)['\"]:\s*\n?\s*(.+)", message)
    section = re.search(r"Parser key ['\"]([^'\"]+)['\"]", message)
    where = section.group(1) if section else None
    if bad_class:
        class_path, reason = bad_class.group(1), bad_class.group(2).strip()
        key = re.search(r"['\"]([\w.]+)['\"] is not (?:accepted|expected)", reason)
        cls = _import_object(class_path)
        name = class_path.rpartition(".")[2]
        if key and cls is not None:
            bad = key.group(1).rpartition(".")[2]
            return (f"{name}{f' ({where})' if where else ''} has no argument `{bad}`"
                    f"{_did_you_mean(bad, _class_arguments(cls))}{_source_of(bad, args)}")
        rest = message[bad_class.end(2):]
        inner = re.search(r"Parser key ['\"]([\w.]+)['\"]", reason + rest)
        subtypes = re.search(r"Subtypes: \[([^\]]*)\]", rest)
        given = re.search(r"Given value: (.*)", rest)
        if inner and (subtypes or given):
            types = " | ".join(re.sub(r"<class '(?:[\w]+\.)*(\w+)'>", r"\1", t).strip()
                               for t in subtypes.group(1).split(",")) if subtypes else "of another type"
            value = given.group(1).strip() if given else "?"
            arg = inner.group(1)
            return (f"{name}{f' ({where})' if where else ''}: `{arg}` must be {types}, got {value}"
                    f"{_source_of(arg, args)}{_sexagesimal_hint(arg, value, types)}")
        return f"{name}{f' ({where})' if where else ''}: {reason}"
    unknown = re.search(r"(?:Key|Option) ['\"]([\w.]+)['\"] is not (?:accepted|expected)", message)
    unrecognized = re.search(r"(?i)unrecognized arguments:\s*(--[\w.]+)", message)
    if unknown or unrecognized:
        bad = unknown.group(1) if unknown else unrecognized.group(1).lstrip("-")
        keys: list[str] = []
        try:
            keys = [k for k in parser.get_defaults().keys() if not k.startswith("__")]
        except Exception:
            pass
        return f"unknown option `{bad}`{_did_you_mean(bad, keys)}{_source_of(bad.rpartition('.')[2], args)}"
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:3]) + (" ..." if len(lines) > 3 else "")


def __getattr__(name: str) -> Any:
    if name == "PruneCLI":  # defined beside Lightning's imports, so that the help and `list` need none
        from lightning_prune.cli_fit import PruneCLI

        return PruneCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_accelerator(accelerator: Any) -> None:
    """A GPU asked for on a machine without one fails before anything is built, saying how to use the CPU."""
    if not isinstance(accelerator, str):
        return
    asked = accelerator.lower()
    if asked not in ("gpu", "cuda", "mps"):
        return
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if (asked == "cuda" and cuda) or (asked == "mps" and mps) or (asked == "gpu" and (cuda or mps)):
        return
    build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
    raise ConfigError(
        f"`trainer.accelerator` is {accelerator!r}, but PyTorch sees no "
        f"{'MPS device' if asked == 'mps' else 'CUDA GPU'} on this machine ({build}). HINT: run on the CPU"
        " with `--trainer.accelerator cpu`, or `auto` to take a GPU only where there is one.")


def run(args: Sequence[str]) -> Any:
    """``lightning-prune fit|validate|test|predict ARGS`` in this process; returns the :class:`PruneCLI`
    (its ``trainer``, ``model``, ``datamodule``). Errors are raised, not printed."""
    import lightning.pytorch as pl

    from lightning_prune.cli_fit import PruneCLI

    args = list(args)

    # LightningCLI reads the arguments from sys.argv itself: it then has nothing to warn about
    # ("LightningCLI's args parameter is intended to run from within Python ...").
    saved = sys.argv
    sys.argv = [saved[0] if saved else PROG, *args]
    try:
        return PruneCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                        subclass_mode_data=True, save_config_kwargs={"overwrite": True})
    finally:
        sys.argv = saved


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that report a mistake of the user's (one line), not a bug (a traceback)."""
    from lightning_prune.errors import LightningPruneError

    errors: list[type[BaseException]] = [ConfigError, LightningPruneError, FileNotFoundError]
    if "lightning.fabric.utilities.exceptions" in sys.modules or "lightning" in sys.modules:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        errors.append(MisconfigurationException)
    return tuple(errors)


def _user_error_in(err: BaseException) -> BaseException | None:
    """``err`` or the exception it wraps (jsonargparse wraps what a class's ``__init__`` raised in its own
    union-type error) when that is a mistake of the user's; ``None`` for anything else."""
    kinds, seen, todo = _user_errors(), set(), [err]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kinds):
            return current
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]
    return None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


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
        print(f"{PROG}: error: unknown command {args[0]!r}{_did_you_mean(args[0], list(COMMANDS))}"
              f" (commands: {', '.join(COMMANDS)}; `{PROG} --help` says what each does)", file=sys.stderr)
        raise SystemExit(2)
    try:
        if args[0] == "sensitivity":  # the per-layer sensitivity scan (lightning_prune.cli_sensitivity)
            import warnings

            from lightning_prune.cli_sensitivity import main as sensitivity_main

            with warnings.catch_warnings():  # it passes our own argv to LightningCLI on purpose
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
                sensitivity_main(args[1:])
        elif args[0] == "export":  # checkpoint -> ONNX checked in onnxruntime (lightning_prune.cli_export)
            import warnings

            from lightning_prune.cli_export import main as export_main

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
                export_main(args[1:])
        else:
            run(args)
    except Exception as err:
        found = _user_error_in(err)
        if found is None or os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0"):
            raise
        print(f"{PROG}: error: {_one_line(found)}", file=sys.stderr)
        raise SystemExit(2 if isinstance(found, ConfigError) else 1) from None


if __name__ == "__main__":  # pragma: no cover
    main()
