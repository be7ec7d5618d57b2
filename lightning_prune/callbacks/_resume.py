"""What every callback checks when a fit resumes from a checkpoint: the same configuration, the keys an
older version did not write, and the pruning state a Trainer without the callback leaves behind.

The rule (README, "Resume, kills and NaNs"):

* **Changed arguments are refused.** A callback saves its configuration (``"config"`` in its state: every
  constructor argument that is a plain value, except :data:`TOLERANT`); resuming with other values, or with
  another ``state_key`` (``target_sparsity``, ``rounds``, ...) of the same class, raises a
  ``MisconfigurationException`` that names the callback and every argument that differs, before any state
  is loaded. ``verbose`` and ``log_media_every_n_epochs`` may change.
* **A callback added** to a resumed fit (no state of its class in the checkpoint) starts fresh at the resumed
  step, with a warning.
* **A callback removed**: the zeros are in the weights and load; the pruning state is ignored, with one
  warning (from any lightning-prune callback still attached, or from
  :class:`~lightning_prune.ImageClassifier`).
* **Keys an older version did not write** load with their defaults, with a warning naming them; masks missing
  from a pruning callback's state are rebuilt from the zeros of the restored weights.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_prune._registry import class_of_key, warn_ignored_states

__all__ = ["LOADER_STATE_ATTRIBUTES", "TOLERANT", "check_resume", "config_of", "resume_loader_position",
           "warn_ignored_states"]  # the last from _registry

#: arguments that may change between a checkpoint and the resumed fit
TOLERANT = frozenset({"verbose", "log_media_every_n_epochs"})
_PLAIN = (type(None), bool, int, float, str)


def _plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _normal(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _normal(v) for k, v in value.items()}
    return value


def config_of(callback: Callback) -> dict[str, Any]:
    """The callback's constructor arguments (as it normalised them) that are plain values, without
    :data:`TOLERANT`: what a resumed fit must repeat."""
    import inspect

    names = [p for p in inspect.signature(type(callback).__init__).parameters if p != "self"]
    config = {}
    for name in names:
        if name in TOLERANT or not hasattr(callback, name):
            continue
        value = getattr(callback, name)
        if _plain(value):
            config[name] = _normal(value)
    return config


def _args_of_key(key: str) -> dict[str, Any] | None:
    _, brace, rest = key.partition("{")
    if not brace:
        return {}
    try:
        value = ast.literal_eval("{" + rest)
    except (ValueError, SyntaxError):
        return None
    return value if isinstance(value, dict) else None


def _diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    out = []
    for name in sorted(set(saved) | set(current)):
        old, new = saved.get(name, "<not set>"), current.get(name, "<not set>")
        if _normal(old) != _normal(new):
            out.append(f"`{name}` (checkpoint {old!r}, now {new!r})")
    return out


def _refuse(callback: Callback, diffs: list[str]) -> MisconfigurationException:
    name = type(callback).__name__
    return MisconfigurationException(
        f"{name}: the checkpoint was written with other arguments; resuming would mix its state with the new"
        f" ones. Differs: {', '.join(diffs)}. HINT: resume with the checkpoint's arguments; to continue from"
        " its weights with new arguments start a new fit (load `checkpoint['state_dict']` into the model and"
        " call fit without `ckpt_path`).")


def check_resume(callback: Callback, trainer: pl.Trainer, checkpoint: Mapping[str, Any]) -> None:
    """Called from the callback's ``on_load_checkpoint`` (before Lightning loads any callback state)."""
    warn_ignored_states(trainer, checkpoint)
    states: Mapping[str, Any] = checkpoint.get("callbacks") or {}
    own = states.get(callback.state_key)
    name = type(callback).__name__
    if own is None:
        claimed = {cb.state_key for cb in trainer.callbacks}
        others = [k for k in states if class_of_key(k) == type(callback).__qualname__ and k not in claimed]
        if others:
            current = _args_of_key(callback.state_key) or {}
            saved = _args_of_key(others[0])
            diffs = _diff(saved, current) if saved is not None else [f"state key {others[0]!r}"]
            raise _refuse(callback, diffs or [f"state key {others[0]!r}"])
        if checkpoint.get("global_step", 0):
            rank_zero_warn(
                f"{name}: the checkpoint holds no state for this callback (it was added to the resumed fit);"
                f" it starts fresh at step {checkpoint.get('global_step')}, with its schedule positions as"
                " configured.")
        return
    if not isinstance(own, Mapping):
        return
    saved_config = own.get("config")
    if isinstance(saved_config, Mapping):
        diffs = _diff(saved_config, config_of(callback))
        if diffs:
            raise _refuse(callback, diffs)
    expected = set(callback.state_dict()) - {"config"}
    missing = sorted(expected - set(own))
    if missing:
        rank_zero_warn(
            f"{name}: the checkpoint's state lacks {', '.join(repr(k) for k in missing)} (written by an older"
            " version); loading them with their defaults"
            + (", the masks rebuilt from the zeros of the weights." if "masks" in missing else "."))


#: the fit loop's private attributes (Lightning 2.x) :func:`resume_loader_position` relies on
LOADER_STATE_ATTRIBUTES = ("_combined_loader", "_combined_loader_states_to_load",
                           "_load_combined_loader_states", "_data_fetcher")


def resume_loader_position(trainer: Any) -> None:
    """Make a resumed fit's training loader continue from its saved position also when the loader was built
    before Lightning restored the loops (called from every callback's ``setup``; idempotent).

    Lightning saves a stateful training loader's position (``fit_loop.state_dict()["combined_loader"]``) and
    hands it to the loader in ``FitLoop.setup_data``, only when that builds the loader *after* the loops were
    restored. Anything that asks for ``trainer.estimated_stepping_batches`` (or ``num_training_batches``)
    earlier makes ``setup_data`` build the loader then, and the saved position is never loaded: the resumed
    epoch starts again from its first batch while the step count goes on (Lightning #20550). Under
    ``ModelParallelStrategy`` (``restore_checkpoint_after_setup``) "earlier" includes every ``on_fit_start``
    -- where the callbacks resolve their schedules from the loader's length -- so every callback's mid-epoch
    resume under FSDP2 trained on other batches; under DDP and one device, a ``configure_optimizers`` asking
    for the total steps (``OneCycleLR``). This wraps the Trainer's fit loop so that, once its state is
    loaded, a loader that already exists receives the saved position at once, and the loop's batch fetcher
    starts a fresh iterator over it (one made before may have drawn indices already: loader workers).

    It uses the fit loop's private :data:`LOADER_STATE_ATTRIBUTES`; where this Lightning's loop lacks one of
    them it warns once (a mid-epoch resume may then restart the epoch's batches) and wraps nothing."""
    loop = getattr(trainer, "fit_loop", None)
    load = getattr(loop, "load_state_dict", None)
    if load is None or getattr(loop, "_lightning_prune_resumes_loader", False):
        return
    missing = [name for name in LOADER_STATE_ATTRIBUTES if not hasattr(loop, name)]
    loop._lightning_prune_resumes_loader = True  # (checked once per loop, warned once)
    if missing:
        rank_zero_warn(
            "lightning-prune cannot hand a resumed fit's training loader its saved position when the"
            " loader is built before the checkpoint is restored: this Lightning's fit loop has no"
            f" {', '.join(missing)}. A mid-epoch resume may restart the epoch's batches (Lightning #20550)"
            " while the step count goes on. HINT: resume from end-of-epoch checkpoints, or use a Lightning"
            " version this release supports (pyproject.toml).")
        return

    def load_state_dict(*args: Any, **kwargs: Any) -> Any:
        out = load(*args, **kwargs)
        if loop._combined_loader is not None and loop._combined_loader_states_to_load:
            loop._load_combined_loader_states()
            if loop._data_fetcher is not None:
                iter(loop._data_fetcher)
        return out

    loop.load_state_dict = load_state_dict
