"""Reading files the user names: checkpoints, compressed models, teachers -- never running their code unasked.

``torch.load(weights_only=False)`` unpickles arbitrary objects, which runs whatever code the file carries.
Every loader of the library goes through :func:`load_file`, which uses ``weights_only=True`` unless the
caller passes ``weights_only=False`` explicitly (the same opt-in as Lightning's ``Trainer.fit(...,
weights_only=...)``). A file the safe unpickler rejects is refused with a message naming the file, what it
holds that is not plain data, and the opt-in; it is never retried unsafely behind the caller's back.

Example::

    payload = load_file("run/last.ckpt")                       # tensors, numbers, strings, containers only
    payload = load_file("run/last.ckpt", weights_only=False)   # a file you trust that holds Python objects
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from lightning_prune.errors import InvalidArgumentError, UnsafeFileError

__all__ = ["load_file"]


def _is_remote(path: str) -> bool:
    return "://" in path


def load_file(path: str | os.PathLike[str], *, weights_only: bool = True, map_location: Any = "cpu",
              argument: str = "weights_only") -> Any:
    """``torch.load`` of ``path``, safely unless ``weights_only=False`` is passed.

    Args:
        path: a local path or an fsspec URL (``s3://...``).
        weights_only: ``True`` (default): only tensors, numbers, strings and containers are read, whatever
            the file holds. ``False``: full unpickling, which runs the code the file holds -- pass it only for
            files you trust.
        map_location: as ``torch.load``'s.
        argument: the name under which the caller exposes ``weights_only`` (said in the refusal's hint).

    Raises:
        FileNotFoundError: ``path`` does not exist (one line, naming it).
        UnsafeFileError: ``weights_only=True`` and the file holds objects the safe unpickler refuses.
        InvalidArgumentError: the file is not something ``torch.load`` reads.
    """
    if not isinstance(weights_only, bool):
        raise InvalidArgumentError(f"`{argument}` must be True or False, got {weights_only!r}.")
    name = os.fspath(path)
    if not _is_remote(name) and not Path(name).is_file():
        raise FileNotFoundError(f"{name}: no such file.")
    try:
        if _is_remote(name):
            import fsspec

            with fsspec.open(name, "rb") as handle:
                return torch.load(handle, map_location=map_location, weights_only=weights_only)
        return torch.load(name, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as error:
        refused = _refused_global(error)
        if not weights_only or refused is None:
            raise InvalidArgumentError(
                f"{name} could not be read by torch.load ({_reason(error)}).") from None
        raise UnsafeFileError(
            f"{name} holds Python objects that are not plain data ({refused} among them), so it was not"
            f" loaded: unpickling them would run the code the file carries. HINT: if you trust the file, pass"
            f" `{argument}=False`; or allow the named classes with torch.serialization.add_safe_globals."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise InvalidArgumentError(
            f"{name} could not be read by torch.load ({_reason(error)}).") from None


def _reason(error: BaseException) -> str:
    """The line of torch's message that says what is wrong (its weights-only preamble left out)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    preamble = ("Weights only load failed", "Please file", "Check the")
    telling = [line for line in lines if not line.startswith(preamble)]
    return f"{type(error).__name__}: {(telling or lines or [''])[0][:200]}"


def _refused_global(error: BaseException) -> str | None:
    """The class torch's safe unpickler refused ("Unsupported global: GLOBAL x.y ..."); None for other
    errors."""
    for line in str(error).splitlines():
        if "GLOBAL" in line:
            return line.split("GLOBAL", 1)[1].strip().split(" ")[0].strip(".,")
    return None
