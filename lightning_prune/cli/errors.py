"""The command's errors: :class:`ConfigError` and the one line a mistake of the user's is reported as.

Both :mod:`lightning_prune.cli.app` (the dispatcher) and :mod:`lightning_prune.cli.fit` (the LightningCLI)
import these from here, so neither imports the other and ``python -m lightning_prune.cli`` recognises the
same ``ConfigError`` that ``fit`` raises.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["PROG", "TRACEBACK_ENV", "ConfigError", "check_accelerator", "did_you_mean", "explain_parse_error",
           "one_line", "report_user_error", "user_error_in"]

PROG = "lightning-prune"
TRACEBACK_ENV = "LIGHTNING_PRUNE_TRACEBACK"


class ConfigError(Exception):
    """A mistake in the command line or the config, reported as one line (exit status 2)."""


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


def did_you_mean(word: str, choices: Sequence[str]) -> str:
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


def explain_parse_error(message: str, args: Sequence[str], parser: Any = None) -> str:
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
                    f"{did_you_mean(bad, _class_arguments(cls))}{_source_of(bad, args)}")
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
                    f"{_source_of(arg, args)}")
        return f"{name}{f' ({where})' if where else ''}: {reason}"
    unknown = re.search(r"(?:Key|Option) ['\"]([\w.]+)['\"] is not (?:accepted|expected)", message)
    unrecognized = re.search(r"Unrecognized arguments:\s*(--[\w.]+)", message, flags=re.I)
    if unknown or unrecognized:
        bad = unknown.group(1) if unknown else unrecognized.group(1).lstrip("-")
        keys: list[str] = []
        try:
            keys = [k for k in parser.get_defaults().keys() if not k.startswith("__")]
        except Exception:
            pass
        return f"unknown option `{bad}`{did_you_mean(bad, keys)}{_source_of(bad.rpartition('.')[2], args)}"
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:3]) + (" ..." if len(lines) > 3 else "")


def check_accelerator(accelerator: Any) -> None:
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


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that report a mistake of the user's (one line), not a bug (a traceback)."""
    from lightning_prune.errors import LightningPruneError

    errors: list[type[BaseException]] = [ConfigError, LightningPruneError, FileNotFoundError]
    if "lightning.fabric.utilities.exceptions" in sys.modules or "lightning" in sys.modules:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        errors.append(MisconfigurationException)
    return tuple(errors)


def user_error_in(err: BaseException) -> BaseException | None:
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


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def report_user_error(err: BaseException) -> NoReturn:
    """Print a mistake of the user's found in ``err`` as one line on stderr and exit (status 2 for a
    :class:`ConfigError`, 1 otherwise); re-raise ``err`` when it is not one, or when
    ``LIGHTNING_PRUNE_TRACEBACK`` is set. Call it from an ``except`` block."""
    found = user_error_in(err)
    if found is None or os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0"):
        raise err
    print(f"{PROG}: error: {one_line(found)}", file=sys.stderr)
    raise SystemExit(2 if isinstance(found, ConfigError) else 1) from None
