"""What every lightning-prune callback shares about its state: the configuration checked when a fit resumes,
tolerant loading, the seed rule and seeded generators, and the methods ``restore_run`` calls.

:class:`CallbackState` is the base of all the callbacks (the mask callbacks through
:class:`~lightning_prune.callbacks.base.PruningCallback`, and ``ActivationDecay``, ``KnowledgeDistillation``,
``EvolutionaryMutation`` directly). A subclass writes its own state in :meth:`~CallbackState.extra_state_dict`
(tensors and plain values) and reads it back in :meth:`~CallbackState.load_extra_state_dict` (with ``.get``,
so that a checkpoint of an older version loads); the base adds the configuration (``"config"``) and refuses a
resumed fit whose arguments differ (:func:`lightning_prune.callbacks._resume.check_resume`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_prune.callbacks._resume import check_resume, config_of

__all__ = ["CallbackState", "resolve_seed", "seeded_generator"]

_SEED_MASK = (1 << 63) - 1


def resolve_seed(seed: int | None, trainer: pl.Trainer | None = None) -> int:
    """The seed a callback uses: ``seed`` itself, or (``None``) ``torch.initial_seed()`` -- what
    ``seed_everything`` set -- and, under DDP, rank zero's value on every rank.

    Every callback with a ``seed`` argument follows this rule and keeps the resolved value (or its generator's
    state) in its state, so a resumed run draws the same numbers.
    """
    value = int(torch.initial_seed()) & _SEED_MASK if seed is None else int(seed)
    if trainer is not None and trainer.world_size > 1:
        value = int(trainer.strategy.broadcast(value, src=0))
    return value


def seeded_generator(seed: int | None, trainer: pl.Trainer | None = None,
                     device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded by the rule of :func:`resolve_seed` (taken modulo 2**64, the
    generator's range: a seed derived from ``torch.initial_seed()`` by arithmetic may exceed it)."""
    return torch.Generator(device=device).manual_seed(resolve_seed(seed, trainer) % 2**64)


class CallbackState(Callback):
    """The state base of every lightning-prune callback.

    ``state_dict()`` is ``{**extra_state_dict(), "config": <the constructor arguments>}``; a resumed fit with
    other arguments is refused before anything loads (``on_load_checkpoint``); ``load_state_dict`` hands the
    state to :meth:`load_extra_state_dict`. :func:`lightning_prune.restore_run` calls
    :meth:`finalize_for_deployment`, :meth:`compress_for_deployment` and :meth:`after_restore`.
    """

    # ------------------------------------------------------------------ state
    def extra_state_dict(self) -> dict[str, Any]:
        """The subclass's own state (tensors and Python scalars)."""
        return {}

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state_dict` returned; use ``.get`` for keys added later."""

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.extra_state_dict(), "config": config_of(self)}

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        check_resume(self, trainer, checkpoint)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_extra_state_dict(state_dict)

    # ------------------------------------------------------------------ deployment (restore_run)
    def finalize_for_deployment(self, module: pl.LightningModule) -> str | None:
        """:func:`lightning_prune.restore_run` with ``finalize=True``: decide now what the end of training
        would have decided; return what was done (one line), or ``None`` when there is nothing to do."""
        return None

    def compress_for_deployment(self, module: pl.LightningModule, compress: bool | None = None) -> bool:
        """:func:`lightning_prune.restore_run`: compress ``module`` with this callback's plan when asked
        (``compress``; ``None``: as configured); ``True`` when it did."""
        return False

    def after_restore(self, module: pl.LightningModule) -> None:
        """:func:`lightning_prune.restore_run`, once the state is loaded onto ``module``."""
