"""Group-LASSO channel pruning with learnable channel gates.

He, Zhang, Sun, "Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017, arXiv:1707.06168
(a scale ``beta`` per channel under an L1 penalty), in the form of seed 000 ("mask layers"): one learnable
gate per output channel multiplies the output of the BatchNorm after a conv (or of the layer itself), the
loss gains ``lam * sum |g|`` (added as a gradient, like Network Slimming's ``grad += s * sign(gamma)``,
Liu et al. 2017, arXiv:1708.06519), optional L1/L2 on the ordinary weights keeps ReLU nets from
compensating, gates below a *capture* threshold are set to zero and frozen, and at ``finalize_at`` the
gates below ``prune_threshold`` become pruned channels while the others are folded into the weights;
training then continues as fine-tuning with fixed channel masks, and :func:`lightning_prune.compress`
removes the dead channels physically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_prune.callbacks.base import PruningCallback, check_choice, check_fraction, check_int
from lightning_prune.functional.channels import capture_mask, gate_l1_penalty, gate_l1_subgradient, keep_mask
from lightning_prune.gates import (
    ChannelGroup,
    GateSet,
    ScaleGate,
    example_inputs_for,
    find_channel_groups,
    traced_root,
)
from lightning_prune.logging import PREFIX, log_histograms, log_images, log_scalars
from lightning_prune.targets import Target, matches

__all__ = ["GroupLassoPruning", "GateCallbackMixin"]

_PHASES = ("joint", "weights", "gates")


def _check_nonnegative(name: str, value: float, hint: str = "") -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise MisconfigurationException(
            f"`{name}` must be a number >= 0, got {value!r}." + (f" HINT: {hint}" if hint else "")
        )
    return float(value)


def _check_finalize_at(value: int | float | None) -> int | float | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, float) and 0.0 < value <= 1.0:
        return value
    raise MisconfigurationException(
        f"`finalize_at` must be an epoch (int >= 0), a fraction of training (float in (0, 1]) or None, got"
        f" {value!r}. HINT: finalize_at=0.75 prunes after 75% of the training steps and fine-tunes the rest."
    )


class GateCallbackMixin:
    """What every channel-gate callback shares (group-LASSO here, hard-concrete L0 in ``l0.py``).

    Finds the channel groups at ``setup``, builds one :class:`~lightning_prune.gates.Gate` per group with
    :meth:`make_gate`, hooks them into the model, steps them with their own optimizer in
    ``on_before_optimizer_step`` (AMP-unscaled, all-reduced under DDP), finalises them (fold + channel
    masks) and keeps all of it in the callback state. A subclass provides :meth:`make_gate`,
    :meth:`gate_penalty_grad_` (the regulariser's gradient on the gates), :meth:`final_keep` (which channels
    survive) and optionally :meth:`after_gate_step`.
    """

    # set by the subclass' __init__
    gate_lr: float
    gate_optimizer: str
    prune_coupled: bool
    finalize_at: int | float | None
    compress_on_train_end: bool
    input_size: tuple[int, ...] | None

    def _init_gate_state(self) -> None:
        self.groups: list[ChannelGroup] | None = None
        self.skipped: dict[str, str] = {}
        self.gateset: GateSet | None = None
        self.gate_opt: torch.optim.Optimizer | None = None
        self.finalized = False
        self.finalize_step: int | None = None
        self.weight_targets: list[Target] = []
        self._traced_prefix = ""
        self._pending_gates: dict[str, Any] | None = None
        self._last_penalty = 0.0
        self._before_step: list[Tensor] | None = None

    # ------------------------------------------------------------------ to implement
    def make_gate(self, group: ChannelGroup) -> ScaleGate:  # pragma: no cover - abstract
        raise NotImplementedError

    def gate_penalty_grad_(self, step: int) -> float:  # pragma: no cover - abstract
        """Add the regulariser's gradient to the gates' ``.grad``; return the penalty's value (for logging)."""
        raise NotImplementedError

    def final_keep(self) -> list[Tensor]:  # pragma: no cover - abstract
        """Per group, the channels that survive finalisation."""
        raise NotImplementedError

    def after_gate_step(self, step: int) -> None:
        """Called right after the gate optimizer stepped (capture masks, clamping)."""

    # ------------------------------------------------------------------ groups and gates
    def find_groups(self, pl_module: pl.LightningModule) -> list[ChannelGroup]:
        prefix, root = traced_root(pl_module)
        example = example_inputs_for(root, self.input_size)
        groups, skipped = find_channel_groups(root, example, self.include, self.exclude, self.prune_coupled,
                                              prefix=prefix, exclusion_root=pl_module)
        self._traced_prefix, self.skipped = prefix, skipped
        if not groups:
            reasons = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:4]) or "no Conv/Linear output channels"
            raise MisconfigurationException(
                f"{type(self).__name__} found no gateable channel group in {type(pl_module).__name__}"
                f" (include={self.include or 'default'}, exclude={self.exclude}). Left alone: {reasons}."
                " HINT: `prune_coupled=True` gates residual channels together; `include=[...]` selects other layers."
            )
        return groups

    def _build_gates(self) -> None:
        assert self.groups is not None
        self.gateset = GateSet(self.groups, [self.make_gate(g) for g in self.groups])
        params = self.gateset.parameters()
        if self.gate_optimizer == "adam":
            self.gate_opt = torch.optim.Adam(params, lr=self.gate_lr)
        else:
            self.gate_opt = torch.optim.SGD(params, lr=self.gate_lr, momentum=0.9)

    def _sync_hooks(self, pl_module: pl.LightningModule) -> None:
        if self.gateset is None:
            return
        if self.finalized:
            self.gateset.detach()
        elif not self.gateset.attached:
            self.gateset.to(pl_module.device)
            self.gateset.attach(pl_module, self._traced_prefix)

    def gate_values(self) -> list[Tensor]:
        """Each group's deterministic gate values (detached, on the CPU)."""
        assert self.gateset is not None
        return [g.deterministic().cpu() for g in self.gateset.gates]

    def channels_alive(self) -> dict[str, int]:
        """Per group, channels that would survive finalisation now."""
        if self.gateset is None:
            return {}
        return {g.name: int(k.sum()) for g, k in zip(self.gateset.groups, self.final_keep())}

    # ------------------------------------------------------------------ step
    def _gate_phase(self, step: int) -> str:
        if not getattr(self, "alternate", False):
            return "joint"
        return "weights" if (step // self.phase_steps) % 2 == 0 else "gates"

    def _prepare_gate_grads(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale (AMP) and average (DDP) the gates' gradients; False when the step must be skipped."""
        assert self.gateset is not None
        params = self.gateset.parameters()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        skip = False
        if scaler is not None and scaler.is_enabled():
            flat = flat / float(scaler.get_scale())
            try:  # the scaler skips the weights' step when their unscaled gradients overflowed
                found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
                skip = any(bool(v.item()) for v in found.values())
            except (AttributeError, KeyError):
                skip = False
        if trainer.world_size > 1:
            flat = trainer.strategy.reduce(flat, reduce_op="mean")
            skip = bool(trainer.strategy.reduce(torch.tensor(float(skip), device=flat.device), reduce_op="sum") > 0)
        skip = skip or not bool(torch.isfinite(flat).all())
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n
        return not skip

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.finalized or self.gateset is None or self.gate_opt is None:
            return
        if trainer.optimizers and optimizer is not trainer.optimizers[0]:
            return
        step = trainer.global_step
        phase = self._gate_phase(step)
        ok = self._prepare_gate_grads(trainer, optimizer)
        if ok and phase in ("joint", "gates"):
            self._last_penalty = self.gate_penalty_grad_(step)
            self._before_step = [p.detach().clone() for p in self.gateset.parameters()]
            for gate in self.gateset.gates:
                for p in gate.parameters():
                    if p.grad is not None and p.shape == gate.frozen.shape:
                        p.grad[gate.frozen] = 0.0
            self.gate_opt.step()
            self.after_gate_step(step)
        self.gate_opt.zero_grad(set_to_none=True)
        if phase in ("joint", "weights"):
            self.weight_regularizer_grad_()
        else:  # gates phase: the weights do not move (their gradients are dropped before the user's step)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def weight_regularizer_grad_(self) -> None:
        """Optional L1/L2 on the ordinary weights (seed 000: ReLU nets otherwise compensate by growing them)."""

    # ------------------------------------------------------------------ finalisation
    @torch.no_grad()
    def finalize(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> None:
        """Prune the gates below threshold, fold the others into the weights, remove the hooks."""
        if self.finalized or self.gateset is None:
            return
        keep = self.final_keep()
        scales = [g.deterministic() * k.to(g.frozen.device) for g, k in zip(self.gateset.gates, keep)]
        self.gateset.detach()
        self.gateset.fold_(pl_module, scales)
        self.finalized = True
        assert self.masks is not None
        masks = {n: m & self.masks[n].to(m.device) for n, m in self.gateset.channel_masks(pl_module, keep).items()
                 if n in self.masks}
        kept, total = sum(int(k.sum()) for k in keep), sum(k.numel() for k in keep)
        if trainer is not None:
            self.update_masks(masks, trainer)
            log_scalars(trainer, {f"{PREFIX}/channels_remaining": kept / max(total, 1)})
        else:
            self.masks.update(masks)
        if self.verbose:
            rank_zero_info(f"[{type(self).__name__}] finalised: {kept}/{total} gated channels kept"
                           f" ({1 - kept / max(total, 1):.1%} pruned) in {len(keep)} groups; fine-tuning continues")

    # ------------------------------------------------------------------ logging
    def gate_metrics(self) -> dict[str, float]:
        alive = self.channels_alive()
        total = sum(g.size for g in self.groups or [])
        metrics = {f"{PREFIX}/channels_remaining": sum(alive.values()) / max(total, 1),
                   f"{PREFIX}/gate_penalty": self._last_penalty}
        metrics.update({f"{PREFIX}/channels_alive/{n}": float(v) for n, v in alive.items()})
        return metrics

    def log_gate_media(self, trainer: pl.Trainer) -> None:
        if self.gateset is None or not trainer.loggers:
            return
        values = {g.name: v for g, v in zip(self.gateset.groups, self.gate_values())}
        log_histograms(trainer, {f"{PREFIX}/gates/{n}": v for n, v in values.items()})
        images = {}
        for name, v in values.items():
            row = (v.abs() / v.abs().max().clamp_min(1e-12)).reshape(1, -1)
            images[f"{PREFIX}/gate_image/{name}"] = (row.repeat(8, 1) * 255).to(torch.uint8)
        log_images(trainer, images, caption="|gate| per channel (white = 1)")

    # ------------------------------------------------------------------ state
    def gate_state_dict(self) -> dict[str, Any]:
        gates = self.gateset.state_dict() if self.gateset is not None else (self._pending_gates or {}).get("gates")
        opt = self.gate_opt.state_dict() if self.gate_opt is not None else (self._pending_gates or {}).get("opt")
        return {"finalized": self.finalized, "finalize_step": self.finalize_step, "gates": gates,
                "gate_optimizer": opt}

    def load_gate_state_dict(self, state: dict[str, Any]) -> None:
        self.finalized = bool(state.get("finalized", False))
        self.finalize_step = state.get("finalize_step")
        pending = {"gates": state.get("gates"), "opt": state.get("gate_optimizer")}
        if self.gateset is not None:
            self._load_pending(pending)
            if self.finalized:
                self.gateset.detach()
        else:
            self._pending_gates = pending

    def _load_pending(self, pending: dict[str, Any]) -> None:
        assert self.gateset is not None and self.gate_opt is not None
        if pending.get("gates"):
            self.gateset.load_state_dict(pending["gates"])
        if pending.get("opt"):
            self.gate_opt.load_state_dict(pending["opt"])


class GroupLassoPruning(GateCallbackMixin, PruningCallback):
    """Group-LASSO channel pruning: a learnable gate per output channel under an L1 penalty.

    Gates sit after the BatchNorm that follows each Conv/Linear (else after the layer) of every channel
    group that torch-pruning's DependencyGraph finds and that can be removed on its own; coupled channels
    (residual additions) are left alone unless ``prune_coupled=True``. The regulariser's gradient
    ``lam * sign(g)`` is added to the gates in ``on_before_optimizer_step`` (after AMP unscaling); the gates
    have their own optimizer and are averaged across DDP ranks. At ``finalize_at`` the gates with
    ``|g| < prune_threshold`` prune their channels (masks on every weight and BatchNorm slice of the
    channel, kept at zero while fine-tuning continues) and the others are folded into the weights.

    Args:
        lam: weight of the L1 penalty ``lam * sum |g|`` (>= 0).
        gate_lr: learning rate of the gates' optimizer.
        gate_optimizer: ``"sgd"`` (momentum 0.9; the penalty then shrinks every gate by about
            ``gate_lr * lam / 0.1`` per step against its data gradient) or ``"adam"`` (which normalises the update,
            so with a dominant penalty all gates shrink at the same speed: keep ``lam`` near the data gradient).
        weight_l1: L1 coefficient on the targeted Conv/Linear weights (seed 000 used 5e-5).
        weight_l2: L2 coefficient on them (seed 000 used 2.5e-4).
        group_lam: ``{glob: factor}``: a group whose root, site or producer name matches gets ``lam * factor``
            (seed 000: a different lambda per residual branch).
        prune_coupled: gate coupled channels (residual sums) with one shared gate after every producer.
        capture_threshold: a gate with ``|g|`` below it, or whose sign flipped in a step (it crossed zero), is set
            to zero and frozen (``0`` = never).
        prune_threshold: at finalisation, gates with ``|g|`` below it prune their channel.
        finalize_at: an epoch (int), a fraction of the training steps (float in (0, 1]), or ``None`` (gates are
            folded at the end of training, captured channels pruned).
        alternate: two-phase training: ``phase_steps`` optimizer steps of the weights with the gates frozen,
            then ``phase_steps`` of the gates with the weights frozen, and so on.
        phase_steps: length of each phase.
        compress_on_train_end: physically remove the pruned channels at the end of training
            (:func:`lightning_prune.compress`); the model's layers then get smaller.
        input_size: ``(C, H, W)`` used to trace the model (default: the LightningModule's
            ``example_input_array``, else timm's ``pretrained_cfg["input_size"]``).
        include, exclude: globs over module names; select the gated groups (by their producers) and the weights
            under ``weight_l1``/``weight_l2``.
        log_masks_every_n_epochs, verbose: see :class:`~lightning_prune.callbacks.base.PruningCallback`.

    Raises:
        MisconfigurationException: a bad argument, or (at ``setup``) a model with no gateable channel.

    Example::

        trainer = Trainer(callbacks=[GroupLassoPruning(lam=5e-3, finalize_at=0.6, compress_on_train_end=True)])
    """

    def __init__(
        self,
        lam: float = 5e-3,
        gate_lr: float = 0.1,
        gate_optimizer: str = "sgd",
        weight_l1: float = 0.0,
        weight_l2: float = 0.0,
        group_lam: Mapping[str, float] | None = None,
        prune_coupled: bool = False,
        capture_threshold: float = 1e-2,
        prune_threshold: float = 0.05,
        finalize_at: int | float | None = 0.75,
        alternate: bool = False,
        phase_steps: int = 20,
        compress_on_train_end: bool = False,
        input_size: Sequence[int] | None = None,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        log_masks_every_n_epochs: int = 1,
        verbose: bool = True,
    ) -> None:
        super().__init__(include, exclude, log_masks_every_n_epochs, verbose)
        self.lam = _check_nonnegative("lam", lam, "lam weighs the L1 penalty on the gates; 0 disables it.")
        if not isinstance(gate_lr, (int, float)) or isinstance(gate_lr, bool) or not gate_lr > 0:
            raise MisconfigurationException(f"`gate_lr` must be > 0, got {gate_lr!r}.")
        self.gate_lr = float(gate_lr)
        self.gate_optimizer = check_choice("gate_optimizer", gate_optimizer, ("adam", "sgd"))
        self.weight_l1 = _check_nonnegative("weight_l1", weight_l1)
        self.weight_l2 = _check_nonnegative("weight_l2", weight_l2)
        self.group_lam = {str(k): _check_nonnegative(f"group_lam[{k!r}]", v) for k, v in dict(group_lam or {}).items()}
        self.prune_coupled = bool(prune_coupled)
        self.prune_threshold = check_fraction(
            "prune_threshold", prune_threshold, hint="gates start at 1; channels with |gate| below it are pruned.")
        self.capture_threshold = check_fraction("capture_threshold", capture_threshold)
        if self.capture_threshold > self.prune_threshold:
            raise MisconfigurationException(
                f"`capture_threshold` ({capture_threshold}) must not exceed `prune_threshold` ({prune_threshold})."
                " HINT: captured gates are zero and always pruned; capture below the pruning threshold."
            )
        self.finalize_at = _check_finalize_at(finalize_at)
        self.alternate = bool(alternate)
        self.phase_steps = check_int("phase_steps", phase_steps, 1)
        self.compress_on_train_end = bool(compress_on_train_end)
        if input_size is not None and (not isinstance(input_size, (list, tuple)) or not all(
                isinstance(s, int) and s > 0 for s in input_size)):
            raise MisconfigurationException(f"`input_size` must be a sequence of positive ints (C, H, W), got"
                                            f" {input_size!r}.")
        self.input_size = tuple(input_size) if input_size is not None else None
        self._init_gate_state()

    @override
    def state_key_args(self) -> dict[str, Any]:
        return {**super().state_key_args(), "lam": self.lam, "prune_coupled": self.prune_coupled}

    # ------------------------------------------------------------------ gates
    @override
    def make_gate(self, group: ChannelGroup) -> ScaleGate:
        return ScaleGate(group.size, init=1.0)

    def group_lams(self) -> list[float]:
        """``lam`` times the first ``group_lam`` factor whose glob matches the group (root, site or producer)."""
        out = []
        for group in self.groups or []:
            factor = 1.0
            for pattern, value in self.group_lam.items():
                if any(matches(n, [pattern]) for n in (group.name, *group.sites, *group.producers)):
                    factor = value
                    break
            out.append(self.lam * factor)
        return out

    @override
    def gate_penalty_grad_(self, step: int) -> float:
        assert self.gateset is not None
        total = 0.0
        for gate, lam in zip(self.gateset.gates, self.group_lams()):
            w = gate.weight
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            w.grad.add_(gate_l1_subgradient(w.detach(), lam))
            total += float(gate_l1_penalty(w.detach(), lam))
        return total

    @override
    @torch.no_grad()
    def after_gate_step(self, step: int) -> None:
        assert self.gateset is not None and self.gate_opt is not None
        previous = getattr(self, "_before_step", None) or [None] * len(self.gateset.gates)
        for gate, before in zip(self.gateset.gates, previous):
            w = gate.weight
            new = (capture_mask(w, gate.frozen, self.capture_threshold, before) if self.capture_threshold > 0
                   else gate.frozen)
            newly = new & ~gate.frozen
            gate.frozen.copy_(new)
            w[gate.frozen] = 0.0
            if newly.any():
                for value in self.gate_opt.state.get(w, {}).values():
                    if isinstance(value, Tensor) and value.shape == w.shape:
                        value[newly] = 0.0

    @override
    def final_keep(self) -> list[Tensor]:
        assert self.gateset is not None
        threshold = self.prune_threshold if self.finalize_at is not None else 0.0
        return [keep_mask(g.weight, threshold) & ~g.frozen for g in self.gateset.gates]

    @override
    @torch.no_grad()
    def weight_regularizer_grad_(self) -> None:
        if not (self.weight_l1 or self.weight_l2):
            return
        for target in self.weight_targets:
            p = target.param
            if p.grad is None:
                continue
            if self.weight_l1:
                p.grad.add_(torch.sign(p), alpha=self.weight_l1)
            if self.weight_l2:
                p.grad.add_(p, alpha=self.weight_l2)

    # ------------------------------------------------------------------ targets and setup
    @override
    def select_targets(self, pl_module: pl.LightningModule) -> list[Target]:
        targets = super().select_targets(pl_module)
        self.weight_targets = list(targets)
        self.groups = self.find_groups(pl_module)
        names = {t.name for t in targets}
        for group in self.groups:
            for module_name, pname in group.channel_params():
                module = pl_module.get_submodule(module_name)
                target = Target(module_name, module, pname)
                if isinstance(getattr(module, pname, None), nn.Parameter) and target.name not in names:
                    targets.append(target)
                    names.add(target.name)
        return targets

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        rebuilt = not (self.masks is not None and self.targets and self._targets_belong_to(pl_module))
        super().setup(trainer, pl_module, stage)
        if rebuilt or self.gateset is None:
            self._build_gates()
            if self._pending_gates is not None:
                self._load_pending(self._pending_gates)
                self._pending_gates = None
        self._sync_hooks(pl_module)

    def _resolve_finalize_step(self, trainer: pl.Trainer) -> None:
        if self.finalize_step is None and isinstance(self.finalize_at, float):
            self.finalize_step = int(round(self.finalize_at * trainer.estimated_stepping_batches))

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        assert self.gateset is not None and self.gate_opt is not None
        if trainer.world_size > 1 and not self.finalized:  # every rank starts from rank 0's gates
            state = trainer.strategy.broadcast(self.gateset.state_dict(), src=0)
            self.gateset.load_state_dict(state)
        self.gateset.to(pl_module.device)
        for state in self.gate_opt.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor) and key != "step":
                    state[key] = value.to(pl_module.device)
        self._resolve_finalize_step(trainer)
        self._sync_hooks(pl_module)
        if self.verbose:
            total = sum(g.size for g in self.groups or [])
            rank_zero_info(
                f"[GroupLassoPruning] {total} channels in {len(self.groups or [])} gated groups"
                f" ({len(self.skipped)} groups left alone); lam={self.lam}, finalize at "
                f"{self.finalize_step if self.finalize_step is not None else self.finalize_at}"
                f"{' (step)' if self.finalize_step is not None else ' (epoch)'}"
            )

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        GateCallbackMixin.on_before_optimizer_step(self, trainer, pl_module, optimizer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self.finalize_at, int) and not self.finalized and trainer.current_epoch >= self.finalize_at:
            self.finalize(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.finalized:
            return
        step = trainer.global_step
        if self.finalize_step is not None and step >= self.finalize_step:
            self.finalize(trainer, pl_module)
        elif trainer.log_every_n_steps and step % trainer.log_every_n_steps == 0:
            log_scalars(trainer, self.gate_metrics())

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        n = self.log_masks_every_n_epochs
        if not self.finalized and n and (trainer.current_epoch + 1) % n == 0:
            log_scalars(trainer, self.gate_metrics())
            self.log_gate_media(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.finalized:
            self.log_gate_media(trainer)
            self.finalize(trainer, pl_module)
        super().on_train_end(trainer, pl_module)
        if self.compress_on_train_end:
            from lightning_prune.compress import compress

            prefix, root = traced_root(pl_module)
            compress(root, example_inputs_for(root, self.input_size))
            if self.masks is not None:
                self.masks.invalidate()
            self._remove_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self.gateset is not None:
            self.gateset.detach()

    # ------------------------------------------------------------------ state
    @override
    def extra_state_dict(self) -> dict[str, Any]:
        return self.gate_state_dict()

    @override
    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        self.load_gate_state_dict(state)
