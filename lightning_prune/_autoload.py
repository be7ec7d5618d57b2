"""Opt-in callbacks for every ``Trainer``, configured through the ``LIGHTNING_PRUNE`` environment variable.

Lightning calls :func:`callbacks_from_env` through its ``lightning.pytorch.callbacks_factory`` entry-point
group whenever a ``Trainer`` is built. With the variable unset it returns nothing. Its syntax::

    LIGHTNING_PRUNE="magnitude:target_sparsity=0.9,frequency=50;lottery_ticket:rounds=3"

Callbacks are separated by ``;``; each is a registered name, optionally followed by ``:`` and
comma-separated ``key=value`` pairs. Values are Python literals (numbers, strings, tuples, lists,
``None``, ``True``); anything else is taken as a string.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import os
import re
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["ENV_VAR", "callbacks_from_env", "parse_spec"]

ENV_VAR = "LIGHTNING_PRUNE"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets and quotes, so ``block_size=(1,4)`` stays one value."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _value(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def parse_spec(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse a ``LIGHTNING_PRUNE`` value into ``[(name, kwargs), ...]``.

    Raises:
        MisconfigurationException: naming the malformed part.
    """
    parsed = []
    for part in _split_top_level(spec, ";"):
        part = part.strip()
        if not part:
            continue
        name, _, args = part.partition(":")
        name = name.strip()
        if not _NAME.match(name):
            raise MisconfigurationException(
                f"{ENV_VAR}: {part!r} does not start with a callback name."
                f" HINT: use NAME or NAME:key=value,key=value, several separated by ';'."
            )
        kwargs: dict[str, Any] = {}
        for pair in _split_top_level(args, ",") if args.strip() else []:
            key, eq, raw = pair.partition("=")
            key = key.strip()
            if not eq or not _KEY.match(key) or not raw.strip():
                raise MisconfigurationException(
                    f"{ENV_VAR}: {pair.strip()!r} in {part!r} is not a key=value pair."
                    f" HINT: write e.g. {name}:target_sparsity=0.9,frequency=50."
                )
            kwargs[key] = _value(raw.strip())
        parsed.append((name, kwargs))
    return parsed


def callbacks_from_env() -> list[Callback]:
    """The callbacks that ``LIGHTNING_PRUNE`` asks for; an empty list when it is unset or empty."""
    spec = os.environ.get(ENV_VAR, "").strip()
    if not spec:
        return []
    from lightning_prune._registry import get_callback, list_callbacks

    callbacks = []
    for name, kwargs in parse_spec(spec):
        try:
            cls = get_callback(name)
        except KeyError as err:
            close = difflib.get_close_matches(name, list(list_callbacks(load=False)), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise MisconfigurationException(f"{ENV_VAR}: {err.args[0]}{hint}") from None
        except ImportError as err:
            raise MisconfigurationException(f"{ENV_VAR}: {err}") from err
        unknown = _unknown_arguments(cls, kwargs)
        if unknown:
            valid = _arguments(cls)
            bad = unknown[0]
            close = difflib.get_close_matches(bad, valid, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"its arguments are {', '.join(valid)}."
            raise MisconfigurationException(
                f"{ENV_VAR}: {name!r} ({cls.__name__}) has no argument `{bad}`; {hint}")
        try:
            callbacks.append(cls(**kwargs))
        except (MisconfigurationException, ValueError, TypeError) as err:
            message = str(err)
            raise MisconfigurationException(
                f"{ENV_VAR}: {name!r} rejected its arguments: {message}"
                if isinstance(err, TypeError) and not isinstance(err, MisconfigurationException)
                else f"{ENV_VAR}: {name!r}: {message}") from err
    return callbacks


def _arguments(cls: type) -> list[str]:
    """The keyword arguments ``cls`` accepts (empty when it takes ``**kwargs``: anything goes)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _unknown_arguments(cls: type, kwargs: dict[str, Any]) -> list[str]:
    valid = _arguments(cls)
    return [key for key in kwargs if valid and key not in valid]
