"""A trained run, back from its checkpoint: the model with the callbacks' state, finalised, compressed and
fused as asked -- what ``lightning-prune export`` exports.

A checkpoint holds the model's weights and each callback's state (masks, gates, the removed units, λ). To get
the deployable model, :func:`restore_run` does what resuming the fit would do -- the callbacks set up on a
fresh LightningModule, a checkpoint of a model whose channels were removed inside the fit loads onto it (the
callbacks' recorded removals first), the callbacks' states restored -- and then what the end of training would
do: gate callbacks that have not finalised yet choose their units (``finalize``), the pruned units are removed
with the callback's own plan (``compress``; by default when the callback was configured with
``compress=True``) or, for other callbacks, as dead channels, and decayed activations are fused
(``fuse``; by default when ``ActivationDecay(fuse_on_train_end=True)`` was configured).

Example::

    pruning = lp.GroupLassoPruning(target_flops=0.5)            # as the run configured it
    run = lp.restore_run("last.ckpt", lp.ImageClassifier("resnet18"), [pruning])
    try:
        lp.export(run.module, "model.onnx", input_size=(3, 32, 32))
    finally:
        run.close()
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_prune.checkpoint_io import load_file
from lightning_prune.errors import InvalidArgumentError, InvalidArgumentTypeError
from lightning_prune.validation import check_bool, check_optional

__all__ = ["RestoredRun", "restore_run"]


@dataclass
class RestoredRun:
    """The restored module, the callbacks restored onto it, and what was done after restoring
    (``steps``). Call :meth:`close` when done: it removes the callbacks' hooks (gates, LayerNorm
    restrictions) from the module."""

    module: nn.Module
    callbacks: list[Callback]
    trainer: pl.Trainer
    steps: list[str] = field(default_factory=list)

    def close(self) -> None:
        for callback in self.callbacks:
            callback.teardown(self.trainer, self.module, "fit")


def _load(path: str | Path, weights_only: bool) -> dict[str, Any]:
    payload = load_file(path, weights_only=weights_only)
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise InvalidArgumentError(f"{path} is not a Lightning checkpoint (it has no 'state_dict').")
    return payload


def _is_ours(callback: Callback) -> bool:
    """Callbacks whose state matters to the model: all but Lightning's own (checkpointing, progress)."""
    return not type(callback).__module__.startswith(("lightning.", "pytorch_lightning."))


@torch.no_grad()
def restore_run(
    ckpt_path: str | Path,
    module: pl.LightningModule,
    callbacks: Sequence[Callback] = (),
    *,
    finalize: bool = True,
    compress: bool | None = None,
    fuse: bool | None = None,
    weights_only: bool = True,
) -> RestoredRun:
    """Load ``ckpt_path`` onto a fresh ``module`` with ``callbacks`` (the run's, as configured), then
    finalise, compress and fuse as asked.

    Args:
        ckpt_path: a checkpoint the run wrote (``last.ckpt``, ``epoch=3.ckpt``).
        module: a freshly constructed LightningModule of the run (same class and arguments).
        callbacks: the run's callbacks, constructed with its arguments (Lightning's own are ignored).
        finalize: gate callbacks (group-LASSO, L0) that had not finalised choose their units now (their
            ``finalize``; otherwise the model is exported with its gates).
        compress: remove the pruned units: a gate callback with its own plan, any other model as dead
            channels (:func:`~lightning_prune.compress`). ``None``: as the callbacks were configured
            (``compress=True``).
        fuse: :func:`~lightning_prune.reparameterize` the model (decayed activations must be at λ = 1).
            ``None``: when an ``ActivationDecay(fuse_on_train_end=True)`` is among the callbacks.
        weights_only: ``True`` (default): the checkpoint is read with ``torch.load(weights_only=True)`` and
            refused (:class:`~lightning_prune.UnsafeFileError`) if it holds other Python objects (e.g.
            hyperparameters that are objects). ``False`` runs the code the file holds: only for files you
            trust.

    Returns:
        a :class:`RestoredRun`; ``run.module`` is ``module``, restored and changed in place.

    Raises:
        FileNotFoundError: no file at ``ckpt_path``.
        UnsafeFileError: the file needs ``weights_only=False`` to load.
        InvalidArgumentError: not a Lightning checkpoint, or a callback it needs is missing.
        CompressionError: compressing or fusing would change the outputs (e.g. λ < 1).
    """
    check_bool("finalize", finalize, error=InvalidArgumentError)
    check_optional(check_bool, "compress", compress, error=InvalidArgumentError)
    check_optional(check_bool, "fuse", fuse, error=InvalidArgumentError)
    check_bool("weights_only", weights_only, error=InvalidArgumentError)
    if not isinstance(module, pl.LightningModule):
        raise InvalidArgumentTypeError(
            f"`module` must be the run's LightningModule, freshly constructed, got {type(module).__name__}."
            " HINT: for a plain model use lp.load_compressed(ckpt_path, model) or load_state_dict.")
    from lightning_prune.core.compression import compress as compress_dead
    from lightning_prune.core.compression import load_compressed
    from lightning_prune.core.reparam import count_layers, reparameterize

    payload = _load(ckpt_path, weights_only)
    ours = [cb for cb in callbacks if _is_ours(cb)]
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=ours)
    trainer.strategy.connect(module)
    module.eval()
    steps: list[str] = []
    states = payload.get("callbacks", {}) or {}
    missing = [key for key, state in states.items()
               if isinstance(state, dict) and ((state.get("shrink") or {}).get("removed")
                                               or (state.get("shrink") or {}).get("frozen"))
               and not any(cb.state_key == key for cb in ours)]
    for callback in ours:
        callback.setup(trainer, module, "fit")
    if missing and not ours:
        # the recorded removals, without the callbacks
        load_compressed(ckpt_path, module, weights_only=weights_only)
    elif missing:
        raise InvalidArgumentError(
            f"{ckpt_path} was written after {missing[0].split('{')[0]} removed channels inside the fit, but"
            " no such callback (with the same arguments) was given. HINT: pass the run's callbacks as"
            " configured.")
    else:
        trainer.strategy.load_model_state_dict(payload, strict=True)  # takes the removals the callbacks saved
    restored = []
    for callback in ours:
        state = states.get(callback.state_key)
        if state is not None:
            callback.load_state_dict(copy.deepcopy(state))
            restored.append(type(callback).__name__)
        else:
            rank_zero_warn(
                f"{ckpt_path} holds no state for {callback.state_key}: that callback starts from nothing"
                f" (the checkpoint has {sorted(states) or 'no callback state'}). HINT: construct it with the"
                " run's arguments; they are part of its state key.")
        after_restore = getattr(callback, "after_restore", None)
        if after_restore is not None:
            after_restore(module)
    steps.append(f"restored {Path(ckpt_path).name} (epoch {payload.get('epoch')}, step"
                 f" {payload.get('global_step')}; callback state: {', '.join(restored) or 'none'})")

    # each callback prepares the model as the end of training would have (no class is named here: a
    # plugin's callback takes part through the same methods)
    if finalize:
        for callback in ours:
            done = getattr(callback, "finalize_for_deployment", None)
            step = done(module) if done is not None else None
            if step:
                steps.append(step)
    before = sum(p.numel() for p in module.parameters())
    compressed = False
    for callback in ours:
        method = getattr(callback, "compress_for_deployment", None)
        if method is not None and method(module, compress):
            compressed = True
    if compress and not compressed:
        compress_dead(module)
        compressed = True
    if compressed:
        steps.append(f"compressed: parameters {before:,} -> {sum(p.numel() for p in module.parameters()):,}")
    if fuse if fuse is not None else any(getattr(cb, "fuse_on_train_end", False) for cb in ours):
        layers = count_layers(module)
        reparameterize(module, strict=False)
        steps.append(f"fused: {layers} -> {count_layers(module)} conv/linear layers, conv+BN folded")
    for step in steps:
        rank_zero_info(f"[restore_run] {step}")
    return RestoredRun(module, ours, trainer, steps)
