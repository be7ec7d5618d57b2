"""Argument checks shared by every callback, the plugins and the model-level functions.

Each helper returns the normalised value or raises with one message of the same shape: the argument in
backticks, what it must be, the value received, and a ``HINT:`` when there is an obvious fix. Booleans are
never accepted where a number is expected, and ``nan``/``inf`` are rejected everywhere a finite number is
meant. Callbacks use the default exception (Lightning's ``MisconfigurationException``); functions that work on
a plain ``nn.Module`` pass ``error=InvalidArgumentError`` (or ``InvalidArgumentTypeError``).

**When-arguments** follow one rule: a name ending in ``_step`` counts optimizer steps, one ending in
``_epoch`` counts epochs, and either also takes a float in [0, 1] meaning that fraction of the whole training
(:func:`check_position`; :func:`lightning_prune.callbacks.schedules.resolve_step` turns all of them into
steps).

Example::

    >>> check_fraction("target_sparsity", 0.9)
    0.9
    >>> check_position("begin_step", 3.0)   # a config parser may hand over `3` as 3.0
    3
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

__all__ = [
    "check_latency_device",
    "check_latency_options",
    "check_size_targets",
    "as_misconfiguration",
    "check_bool",
    "check_cadence",
    "check_choice",
    "check_exclusive",
    "check_fraction",
    "check_fraction_map",
    "check_group_names",
    "check_input_size",
    "check_int",
    "check_nonnegative",
    "check_number",
    "check_optional",
    "check_patterns",
    "check_position",
    "check_positive",
    "check_types",
    "check_window",
    "window_positions",
    "input_size_errors",
    "is_number",
    "sexagesimal_hint",
]

ErrorType = type[Exception]
_DEFAULT: ErrorType = MisconfigurationException


def _fail(name: str, expected: str, value: Any, hint: str, error: ErrorType) -> Exception:
    return error(f"`{name}` must be {expected}, got {value!r}." + (f" HINT: {hint}" if hint else ""))


def is_number(value: Any) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _interval(low: float | None, high: float | None, low_inclusive: bool, high_inclusive: bool) -> str:
    if low is not None and high is not None:
        return f"in {'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
    if low is not None:
        return f"{'>=' if low_inclusive else '>'} {low:g}"
    if high is not None:
        return f"{'<=' if high_inclusive else '<'} {high:g}"
    return "finite"


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = True, high_inclusive: bool = True, hint: str = "",
                 error: ErrorType = _DEFAULT) -> float:
    """A finite number within ``[low, high]`` (bounds optional, each inclusive or not); returns a float."""
    ok = is_number(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        raise _fail(name, f"a number {_interval(low, high, low_inclusive, high_inclusive)}", value, hint,
                    error)
    return float(value)


def check_fraction(name: str, value: Any, low: float = 0.0, high: float = 1.0, high_inclusive: bool = False,
                   hint: str = "", error: ErrorType = _DEFAULT) -> float:
    """A number in ``[low, high)`` (``[low, high]`` with ``high_inclusive``)."""
    return check_number(name, value, low, high, True, high_inclusive, hint, error)


def check_fraction_map(name: str, value: Any, hint: str = "",
                       error: ErrorType = _DEFAULT) -> dict[str, float] | None:
    """``None`` or a mapping ``{name: fraction in [0, 1)}`` (a value's error names ``name['key']``).

    Example::

        >>> check_fraction_map("group_targets", {"model.layer1.0.conv1": 0.5})
        {'model.layer1.0.conv1': 0.5}
    """
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
        raise _fail(name, "None or a mapping {group name: fraction in [0, 1)}", value, hint, error)
    return {k: check_fraction(f"{name}[{k!r}]", v, hint=hint, error=error) for k, v in value.items()}


def check_group_names(name: str, ratios: Mapping[str, float], known: Iterable[str], owner: str,
                      prefix: str = "", hint: str = "", error: ErrorType = _DEFAULT) -> dict[str, float]:
    """``ratios`` keyed by channel-group names of ``owner`` (``known``); a name may leave out the module path
    ``prefix`` (the scan of the model a LightningModule holds names ``layer1.0.conv1``, the LightningModule's
    ``model.layer1.0.conv1``: ``prefix="model"``). Raises naming the unknown names and a few known ones."""
    known = set(known)
    out, unknown = {}, []
    for key, value in ratios.items():
        full = key if key in known or not prefix else f"{prefix}.{key}"
        if full in known:
            out[full] = value
        else:
            unknown.append(key)
    if unknown:
        raise error(f"`{name}` names groups {sorted(unknown)[:4]} that {owner} does not have; it has"
                    f" {sorted(known)[:6]}... HINT: scan the same model with method='channels'."
                    + (f" {hint}" if hint else ""))
    return out


def check_positive(name: str, value: Any, hint: str = "", error: ErrorType = _DEFAULT) -> float:
    """A finite number ``> 0``."""
    return check_number(name, value, low=0.0, low_inclusive=False, hint=hint, error=error)


def check_nonnegative(name: str, value: Any, hint: str = "", error: ErrorType = _DEFAULT) -> float:
    """A finite number ``>= 0``."""
    return check_number(name, value, low=0.0, hint=hint, error=error)


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None, hint: str = "",
              error: ErrorType = _DEFAULT) -> int:
    """An integer (not a bool, not a float) within ``[minimum, maximum]``."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        bounds = _interval(minimum, maximum, True, True)
        raise _fail(name, "an integer" + ("" if bounds == "finite" else f" {bounds}"), value, hint, error)
    return int(value)


def check_bool(name: str, value: Any, hint: str = "", error: ErrorType = _DEFAULT) -> bool:
    """``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise _fail(name, "True or False", value, hint, error)
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any], hint: str = "",
                 error: ErrorType = _DEFAULT) -> Any:
    """One of ``choices``."""
    if isinstance(value, bool) or value not in tuple(choices):
        raise _fail(name, f"one of {list(choices)}", value, hint, error)
    return value


def check_optional(check: Any, name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
    """``None``, or what ``check(name, value, ...)`` accepts."""
    return None if value is None else check(name, value, *args, **kwargs)


def check_patterns(name: str, value: Any, error: ErrorType = _DEFAULT) -> list[str]:
    """Glob patterns: ``None`` (none), a string, or a sequence of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
        items = list(value)
        if all(isinstance(v, str) and v for v in items):
            return items
    raise _fail(name, "a glob pattern or a list of them (strings)", value,
                "patterns match module names, e.g. ['layer4.*'] or '*.downsample.*'.", error)


def check_position(name: str, value: Any, allow_none: bool = False, hint: str = "",
                   error: ErrorType = _DEFAULT) -> int | float | None:
    """A when-argument: an ``int >= 0`` (steps or epochs, as the name says) or a float in [0, 1].

    A float in [0, 1] is a fraction of the whole training. An integral float above 1 is read as the count it
    spells (``3.0`` -> ``3``): config parsers (jsonargparse under LightningCLI) hand ``int | float | None``
    arguments over as floats."""
    if value is None and allow_none:
        return None
    unit = "epochs" if name.endswith("_epoch") else "optimizer steps"
    expected = (f"{unit} (an int >= 0) or a fraction of training (a float in [0, 1])"
                + (" or None" if allow_none else ""))
    if isinstance(value, bool) or not is_number(value) or value < 0:
        raise _fail(name, expected, value, hint, error)
    if isinstance(value, int):
        return int(value)
    if value <= 1.0:
        return float(value)
    if float(value).is_integer():
        return int(value)
    raise _fail(name, expected, value, hint or "a float counts only as a fraction of training, in [0, 1].",
                error)


def check_cadence(name: str, value: Any, allow_none: bool = False, hint: str = "",
                  error: ErrorType = _DEFAULT) -> int | float | None:
    """An ``every_n_*`` argument: an ``int >= 1`` (steps or epochs) or a float in (0, 1] (that fraction of
    training between two events). Integral floats above 1 are read as counts, as in :func:`check_position`."""
    if value is None and allow_none:
        return None
    unit = "epochs" if name.endswith("epochs") else "optimizer steps"
    expected = f"a number of {unit} (an int >= 1) or a fraction of training (a float in (0, 1])" + (
        " or None" if allow_none else "")
    if isinstance(value, bool) or not is_number(value):
        raise _fail(name, expected, value, hint, error)
    if isinstance(value, int):
        if value < 1:
            raise _fail(name, expected, value, hint, error)
        return int(value)
    if 0.0 < value <= 1.0:
        return float(value)
    if value > 1.0 and float(value).is_integer():
        return int(value)
    raise _fail(name, expected, value, hint, error)


def check_exclusive(error: ErrorType = _DEFAULT, hint: str = "", **values: Any) -> None:
    """At most one of the named arguments is not ``None``."""
    given = [k for k, v in values.items() if v is not None]
    if len(given) > 1:
        shown = ", ".join(f"`{k}`={values[k]!r}" for k in given)
        raise error(f"Pass only one of {', '.join(f'`{k}`' for k in values)}; got {shown}."
                    + (f" HINT: {hint}" if hint else ""))


def window_positions(begin_step: Any, begin_epoch: Any, end_step: Any, end_epoch: Any
                     ) -> tuple[tuple[str, int | float], tuple[str, int | float]]:
    """The begin and end of a window as ``(name, value)``: the ``*_epoch`` argument where it is set, else the
    ``*_step`` one."""
    begin = ("begin_epoch", begin_epoch) if begin_epoch is not None else ("begin_step", begin_step)
    end = ("end_epoch", end_epoch) if end_epoch is not None else ("end_step", end_step)
    return begin, end


def check_window(begin_step: Any, begin_epoch: Any, end_step: Any, end_epoch: Any, default_end: float,
                 hint: str = "", order_hint: str = ""
                 ) -> tuple[tuple[str, int | float], tuple[str, int | float]]:
    """A window by the unit rule: one of ``begin_step``/``begin_epoch`` (default ``begin_step=0``) and one of
    ``end_step``/``end_epoch`` (default ``end_step=default_end``), each a position (:func:`check_position`);
    the end must not come before the begin when both are in the same unit and type (``1.0``, the end of
    training, never does). Returns ``((begin name, value), (end name, value))``.

    Example::

        >>> check_window(None, 2, None, None, 0.75)
        (('begin_epoch', 2), ('end_step', 0.75))
    """
    check_exclusive(begin_step=begin_step, begin_epoch=begin_epoch, hint=hint)
    check_exclusive(end_step=end_step, end_epoch=end_epoch, hint=hint)
    begin_step = check_position("begin_step", begin_step, allow_none=True, hint=hint)
    begin_epoch = check_position("begin_epoch", begin_epoch, allow_none=True, hint=hint)
    end_step = check_position("end_step", end_step, allow_none=True, hint=hint)
    end_epoch = check_position("end_epoch", end_epoch, allow_none=True, hint=hint)
    begin, end = window_positions(0 if begin_step is None else begin_step, begin_epoch,
                                  default_end if end_step is None else end_step, end_epoch)
    (begin_name, begin_at), (end_name, end_at) = begin, end
    at_the_end = isinstance(end_at, float) and end_at == 1.0
    if (type(begin_at) is type(end_at) and begin_name[-5:] == end_name[-5:] and end_at < begin_at
            and not at_the_end):
        raise MisconfigurationException(
            f"`{end_name}` ({end_at}) must not come before `{begin_name}` ({begin_at})."
            f" HINT: {order_hint or hint}")
    return begin, end


def check_input_size(name: str, value: Any, error: ErrorType = _DEFAULT) -> tuple[int, ...] | None:
    """``None`` or a sequence of positive ints such as ``(3, 32, 32)``."""
    if value is None:
        return None
    if (isinstance(value, (list, tuple)) and value
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in value)):
        return tuple(int(s) for s in value)
    raise _fail(name, "None or a sequence of positive ints such as (3, 32, 32)", value,
                "it is the shape of one input sample, without the batch dimension.", error)


class input_size_errors:  # noqa: N801  (a context manager, like as_misconfiguration)
    """The model failed on a traced input of the user's ``input_size``: re-raise as
    ``MisconfigurationException`` naming `input_size` (nothing changes when ``input_size`` is ``None``)."""

    def __init__(self, input_size: Sequence[int] | None, name: str = "input_size") -> None:
        self.input_size, self.name = input_size, name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> bool:
        from lightning_prune.errors import InvalidArgumentError

        failed = isinstance(value, (RuntimeError, TypeError, ValueError, IndexError))
        if self.input_size is not None and failed and not isinstance(value, MisconfigurationException):
            # graph.ModelInputError ("the model raised on its example input"): show the model's own error
            shown = value.__cause__ if isinstance(value, InvalidArgumentError) and value.__cause__ else value
            raise MisconfigurationException(
                f"`{self.name}`={tuple(self.input_size)!r}: the model fails on an input of that shape"
                f" ({type(shown).__name__}: {str(shown).splitlines()[0] if str(shown) else ''})."
                " HINT: give the shape of one sample the model takes, e.g. (3, 32, 32), or leave it None.") \
                from value
        return False


def _module_type(spec: Any) -> type[nn.Module] | None:
    if isinstance(spec, type):
        return spec if issubclass(spec, nn.Module) else None
    if not isinstance(spec, str) or not spec:
        return None
    module_name, _, attr = spec.rpartition(".")
    try:
        owner = importlib.import_module(module_name) if module_name else nn
        found = getattr(owner, attr, None)
    except ImportError:
        found = None
    return found if isinstance(found, type) and issubclass(found, nn.Module) else None


def check_types(name: str, value: Any, error: ErrorType = _DEFAULT) -> tuple[type[nn.Module], ...] | None:
    """``None`` or module types: classes, names in ``torch.nn`` (``"BatchNorm2d"``) or dotted paths
    (``"timm.layers.StdConv2d"``)."""
    if value is None:
        return None
    items = ([value] if isinstance(value, (str, type))
             else list(value) if isinstance(value, Iterable) else None)
    resolved = [_module_type(v) for v in items] if items else None
    if not resolved or any(t is None for t in resolved):
        raise _fail(name, "a list of nn.Module types (classes, torch.nn names or dotted paths)", value,
                    "e.g. types=['Conv2d', 'Linear', 'BatchNorm2d'].", error)
    return tuple(resolved)  # type: ignore[arg-type]


class as_misconfiguration:  # noqa: N801  (used as a context manager, like contextlib's)
    """Re-raise lightning-prune's own ``ValueError``/``TypeError`` subclasses as ``MisconfigurationException``
    (what a callback raises), keeping the message and the cause.

    Example::

        with as_misconfiguration():
            targets = resolve_targets(pl_module, include, exclude)
    """

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> bool:
        from lightning_prune.errors import InvalidArgumentError, InvalidArgumentTypeError

        if isinstance(value, (InvalidArgumentError, InvalidArgumentTypeError)):
            raise MisconfigurationException(str(value)) from value
        return False


def sexagesimal_hint(value: object) -> str:
    """For an integer where text was expected: what YAML 1.1 read as a base-60 number (``2:4`` -> 124), and
    that quoting keeps it text; ``""`` otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 60:
        return ""
    digits, rest = [], value
    while rest:
        rest, digit = divmod(rest, 60)
        digits.append(str(digit))
    written = ":".join(reversed(digits))
    return (f". HINT: YAML 1.1 reads an unquoted {written} as the base-60 number {value}; quote it:"
            f" \"{written}\"")


def check_size_targets(target_flops: Any, target_params: Any, target_latency: Any
                       ) -> tuple[float | None, float | None, float | None]:
    """``target_flops`` / ``target_params`` / ``target_latency``: at most one of them, a fraction of the
    dense model (its FLOPs, parameters, measured latency) in (0, 1]."""
    if target_latency is None:
        check_exclusive(target_flops=target_flops, target_params=target_params,
                        hint="ask for one size: a fraction of the dense FLOPs or of the parameters.")
    else:
        check_exclusive(target_flops=target_flops, target_params=target_params, target_latency=target_latency,
                        hint="ask for one target: a fraction of the dense FLOPs, of the parameters or of the"
                             " measured latency.")
    hint = "a fraction of the dense model in (0, 1], e.g. 0.5 keeps half."
    values = {}
    for name, value in (("target_flops", target_flops), ("target_params", target_params),
                        ("target_latency", target_latency)):
        checked = check_optional(check_fraction, name, value, 0.0, 1.0, True, hint=hint)
        if checked == 0.0:
            raise MisconfigurationException(f"`{name}` must be a number in (0, 1], got 0.0. HINT: {hint}")
        values[name] = checked
    return values["target_flops"], values["target_params"], values["target_latency"]


def check_latency_device(device: Any) -> torch.device:
    """``latency_device``: anything ``torch.device`` accepts."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise MisconfigurationException(
            f"`latency_device` must be a device, got {device!r} ({error}). HINT: 'cpu', 'cuda', 'cuda:1';"
            " None times on the training device.") from None


def check_latency_options(device: Any, batch_size: Any, model: Any) -> tuple[str | None, int | None, Any]:
    """``latency_device`` (as a string), ``latency_batch_size`` and ``latency_model`` of a callback with
    ``target_latency``, each ``None`` or checked."""
    checked_device = None if device is None else str(check_latency_device(device))
    checked_batch = check_optional(check_int, "latency_batch_size", batch_size, 1,
                                   hint="the batch the latency is measured at, e.g. 64.")
    if model is not None and not callable(getattr(model, "predict", None)):
        raise MisconfigurationException(
            f"`latency_model` must have a `predict(removed)` method, got {type(model).__name__}."
            " HINT: see lightning_prune.graph.latency.LatencyPredictor.")
    return checked_device, checked_batch, model
