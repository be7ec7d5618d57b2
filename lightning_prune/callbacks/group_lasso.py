"""Group-LASSO channel pruning with learnable channel gates.

He, Zhang, Sun, "Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017, arXiv:1707.06168 (a
scale ``beta`` per channel under an L1 penalty), in the "mask layer" form of the Habr article «Редукция
нейронных сетей при помощи вариационной оптимизации» ("Reducing neural networks with variational
optimisation", in Russian): one learnable gate per unit of every exactly removable channel group (a channel, a
residual-stream channel, an attention head, a conv group) scales the unit wherever a layer reads it, the loss
gains ``lam * sum |g|`` (added as a gradient, like Network Slimming's ``grad += s * sign(gamma)``, Liu et al.
2017, arXiv:1708.06519), optional L1/L2 on the ordinary weights keeps ReLU nets from compensating, gates below
a *capture* threshold are set to zero and frozen, and at ``finalize_step`` the gates below ``prune_threshold``
(or, with ``target_flops``/``target_params``, all but the largest gates that fit the budget) become pruned
units while the others are folded into the weights; training then continues as fine-tuning with fixed channel
masks, and ``compress=True`` compresses the model inside the fit
(:mod:`lightning_prune.callbacks.shrink`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_prune.callbacks.gating import GatePruningCallback
from lightning_prune.core.gates import ScaleGate
from lightning_prune.core.importance import Importance
from lightning_prune.core.targets import matches
from lightning_prune.functional.channels import capture_mask, gate_l1_penalty, gate_l1_subgradient, keep_mask
from lightning_prune.graph import DEFAULT_ANALYSIS_TIME_LIMIT_S, ChannelGroup
from lightning_prune.validation import check_fraction, check_nonnegative, check_optional, check_positive

__all__ = ["LAM", "LAM_WITH_TARGET", "GroupLassoPruning"]

#: the penalty's default weight without a size target (gates below ``prune_threshold`` decide what goes)
LAM = 2e-4
#: the default with ``target_flops``/``target_params``/``target_latency`` (the budget decides how many go)
LAM_WITH_TARGET = 2e-5


class GroupLassoPruning(GatePruningCallback):
    """Group-LASSO channel pruning: a learnable gate per channel unit under an L1 penalty.

    One gate per unit of every channel group :func:`lightning_prune.graph.analyse_channels` proves exactly
    removable -- channels, residual streams (stem and downsample branches included; LayerNorm-normalised
    embedding dimensions), whole attention heads, whole conv groups -- multiplies the unit where every layer
    reads it. The regulariser's gradient ``lam * sign(g)`` is added to the gates in
    ``on_before_optimizer_step`` (after AMP unscaling); the gates have their own optimizer and are averaged
    across DDP ranks. At ``finalize_step`` the gates with ``|g| < prune_threshold`` prune their units -- or,
    with ``target_flops``/``target_params``, the largest gates that fit the budget are kept -- (masks on every
    tensor of the unit, LayerNorm statistics over the kept channels, kept while fine-tuning continues) and the
    others are folded into the weights.

    Args:
        lam: weight of the L1 penalty ``lam * sum |g|`` (>= 0). Default (``None``): ``2e-4`` (:data:`LAM`), or
            ``2e-5`` (:data:`LAM_WITH_TARGET`) with ``target_flops``/``target_params``/``target_latency``: the
            budget then decides how many units go and the penalty only has to rank them; at ``2e-4`` it drove
            whole early stages of resnet18 on ``lp.ShapesDataModule`` to a few channels before the decision
            (0.67 test accuracy at 0.5 of the FLOPs against 0.81 at ``2e-5``, dense 0.82;
            ``benchmarks/results/lasso_strength.md``).
        gate_lr: learning rate of the gates' optimizer. It is large by default: a BatchNorm after the gated
            layer makes the loss nearly invariant to scaling all of a layer's gates together, so their
            gradients are small; with SGD each gate shrinks by about ``10 * gate_lr * lam`` per step minus its
            data gradient, so pick ``gate_lr * lam`` so that ``10 * gate_lr * lam * steps_until_finalize`` is
            about 1, and ``lam`` near the spread of the gates' data gradients (1e-4 to 1e-3 for a timm ResNet
            on digits).
        gate_optimizer: ``"sgd"`` (momentum 0.9; the penalty then shrinks every gate by about
            ``gate_lr * lam / 0.1`` per step against its data gradient) or ``"adam"`` (which normalises the
            update, so with a dominant penalty all gates shrink at the same speed: keep ``lam`` near the data
            gradient).
        weight_l1: L1 coefficient on the targeted Conv/Linear weights (the Habr channel-pruning article used
            5e-5).
        weight_l2: L2 coefficient on them (the article used 2.5e-4).
        group_lam: ``{glob: factor}``: a group whose name or producer name matches gets ``lam * factor``
            (the article: a different lambda per residual branch).
        prune_coupled: gate coupled channels (residual streams) with one gate per channel shared by every
            reader (default); ``False`` leaves them alone.
        target_flops, target_params, round_to: ask for the size instead of tuning ``lam`` (see
            :class:`~lightning_prune.callbacks.gating.GatePruningCallback`).
        target_latency, latency_device, latency_batch_size, latency_model: ask for a fraction of the dense
            model's measured latency instead (see
            :class:`~lightning_prune.callbacks.channels.ChannelPruningCallback`).
        group_targets: ``{group name: fraction}``: the named channel groups lose that fraction of their units
            (the smallest gates) at finalisation, the others follow ``prune_threshold``; what
            :func:`lightning_prune.layer_targets_from_sensitivity` makes of a ``method="channels"`` scan (see
            :class:`~lightning_prune.callbacks.gating.GatePruningCallback`).
        capture_threshold: a gate with ``|g|`` below it, or whose sign flipped in a step (it crossed zero), is
            set to zero and frozen (``0`` = never).
        max_gate_step: the most a gate moves in one step: ``"auto"`` (default) is twice the drift the
            penalty alone gives it (``2 * gate_lr * lam_group / (1 - 0.9)`` with SGD; no limit with Adam,
            whose steps are at most about ``gate_lr``, or where the group's ``lam`` is 0), a number, or
            ``None`` (no limit).
            The data gradient must not move a gate faster than the penalty does: on ``efficientnet_b0`` (gates
            read by squeeze-excitation and depthwise blocks) the gates' data gradients are ~10x a ResNet's,
            and at ``gate_lr=5`` with momentum a gate moved by O(1) per step, crossed zero and was captured
            -- 52% of the residual-stream gates by step 50, 77% at finalisation, the gated network at chance
            before anything was removed (``benchmarks/results/effnet_collapse.md``).
        prune_threshold: at finalisation, gates with ``|g|`` below it prune their channel.
        finalize_step: when the gates below ``prune_threshold`` prune their channels and the others are folded
            into the weights: an optimizer step or a fraction of training (float in [0, 1]; ``1.0`` = at the
            end). Default (neither this nor ``finalize_epoch``): 0.75.
        finalize_epoch: the same as an epoch (at its start) or a fraction of training.
        alternate_every_n_steps: two-phase training (the Habr channel-pruning article's): that many optimizer
            steps of the weights with the gates frozen, then as many of the gates with the weights frozen, and
            so on (``None`` = joint training).
        compress, compress_step, compress_epoch: compress the model inside the fit (right
            after finalisation by default) and train on the smaller model, the optimizer's state carried over
            (see :class:`~lightning_prune.callbacks.gating.GatePruningCallback`).
        input_size: ``(C, H, W)`` used to trace the model (default: the LightningModule's
            ``example_input_array``, else timm's ``pretrained_cfg["input_size"]``).
        analysis_time_limit_s: CPU seconds the channel analysis at ``setup`` may use (``None``: no limit);
            past it the fit stops with an error naming this argument. No signal or timer is used.
        include, exclude: globs over module names; narrow the gated groups (by their producers) and the
            weights under ``weight_l1``/``weight_l2``.
        types, log_media_every_n_epochs, verbose: see
            :class:`~lightning_prune.callbacks.base.PruningCallback`.

    Raises:
        MisconfigurationException: a bad argument, or (at ``setup``) a model with no gateable channel.

    Example::

        pruning = GroupLassoPruning(lam=2e-4, gate_lr=5.0, finalize_step=0.6, compress=True)
        trainer = Trainer(callbacks=[pruning])
    """

    def __init__(
        self,
        lam: float | None = None,
        gate_lr: float = 5.0,
        gate_optimizer: str = "sgd",
        weight_l1: float = 0.0,
        weight_l2: float = 0.0,
        group_lam: Mapping[str, float] | None = None,
        prune_coupled: bool = True,
        target_flops: float | None = None,
        target_params: float | None = None,
        group_targets: dict[str, float] | None = None,
        round_to: int = 8,
        capture_threshold: float = 1e-2,
        max_gate_step: float | str | None = "auto",
        prune_threshold: float = 0.05,
        finalize_step: int | float | None = None,
        finalize_epoch: int | float | None = None,
        alternate_every_n_steps: int | None = None,
        compress: bool = False,
        compress_step: int | float | None = None,
        compress_epoch: int | float | None = None,
        input_size: Sequence[int] | None = None,
        analysis_time_limit_s: float | None = DEFAULT_ANALYSIS_TIME_LIMIT_S,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        types: list[str | type] | None = None,
        log_media_every_n_epochs: int = 1,
        verbose: bool = True,
        *,
        target_latency: float | None = None,
        latency_device: str | None = None,
        latency_batch_size: int | None = None,
        latency_model: Any = None,
        importance: str | Importance | None = None,
        min_group_keep: float = 0.0,
        max_group_sparsity: float | None = None,
        recalibrate_bn_batches: int = 8,
    ) -> None:
        super().__init__(gate_lr=gate_lr, gate_optimizer=gate_optimizer, finalize_step=finalize_step,
                         finalize_epoch=finalize_epoch, alternate_every_n_steps=alternate_every_n_steps,
                         round_to=round_to, prune_coupled=prune_coupled, target_flops=target_flops,
                         target_params=target_params, group_targets=group_targets, compress=compress,
                         compress_step=compress_step, compress_epoch=compress_epoch, input_size=input_size,
                         analysis_time_limit_s=analysis_time_limit_s, include=include, exclude=exclude,
                         importance=importance, min_group_keep=min_group_keep,
                         max_group_sparsity=max_group_sparsity, recalibrate_bn_batches=recalibrate_bn_batches,
                         types=types, log_media_every_n_epochs=log_media_every_n_epochs, verbose=verbose,
                         target_latency=target_latency, latency_device=latency_device,
                         latency_batch_size=latency_batch_size, latency_model=latency_model)
        if lam is None:
            sized = target_flops is not None or target_params is not None or target_latency is not None
            lam = LAM_WITH_TARGET if sized else LAM
        self.lam = check_nonnegative("lam", lam, "lam weighs the L1 penalty on the gates; 0 disables it.")
        self.weight_l1 = check_nonnegative("weight_l1", weight_l1)
        self.weight_l2 = check_nonnegative("weight_l2", weight_l2)
        if group_lam is not None and not isinstance(group_lam, Mapping):
            raise MisconfigurationException(
                f"`group_lam` must be a mapping {{glob: factor}}, got {group_lam!r}.")
        self.group_lam = {str(k): check_nonnegative(f"group_lam[{k!r}]", v)
                          for k, v in dict(group_lam or {}).items()}
        self.prune_threshold = check_fraction(
            "prune_threshold", prune_threshold,
            hint="gates start at 1; channels with |gate| below it are pruned.")
        self.capture_threshold = check_fraction("capture_threshold", capture_threshold)
        self.max_gate_step = max_gate_step if max_gate_step == "auto" else check_optional(
            check_positive, "max_gate_step", max_gate_step,
            hint="the most a gate may move in one step: 'auto' (twice the penalty's drift), e.g. 0.02, or"
                 " None for no limit.")
        if self.capture_threshold > self.prune_threshold:
            raise MisconfigurationException(
                f"`capture_threshold` ({capture_threshold}) must not exceed `prune_threshold`"
                f" ({prune_threshold}). HINT: captured gates are zero and always pruned; capture below the"
                " pruning threshold."
            )

    @override
    def state_key_args(self) -> dict[str, Any]:
        return {**super().state_key_args(), "lam": self.lam, "prune_coupled": self.prune_coupled}

    # ------------------------------------------------------------------ gates
    @override
    def make_gate(self, group: ChannelGroup) -> ScaleGate:
        return ScaleGate(group.size, init=1.0)

    def group_lams(self) -> list[float]:
        """``lam`` times the first ``group_lam`` factor whose glob matches the group (root/site/producer)."""
        out = []
        for group in self.groups or []:
            factor = 1.0
            for pattern, value in self.group_lam.items():
                if any(matches(n, [pattern]) for n in (group.name, *group.producers)):
                    factor = value
                    break
            out.append(self.lam * factor)
        return out

    def alive_units_fit_the_budget(self) -> bool:
        """With ``target_flops``/``target_params``: whether the units whose gates survive
        (:meth:`final_keep`) already fit the budget (predicted by the cost model); then the penalty rests, so
        that it does not drive more gates to zero than the budget needs (units the budget keeps with a zero
        gate would be folded in dead)."""
        target = self.target_flops if self.target_flops is not None else self.target_params
        if target is None or self._cost is None or self.groups is None:
            return False
        removed = {g.name: (~k.cpu()).nonzero().flatten().tolist()
                   for g, k in zip(self.groups, self.final_keep())}
        return self._cost.ratios(removed)[0 if self.target_flops is not None else 1] <= target

    @override
    def gate_penalty_grad_(self, step: int) -> float:
        assert self.gateset is not None
        total = 0.0
        if self.alive_units_fit_the_budget():
            return total
        for gate, lam in zip(self.gateset.gates, self.group_lams()):
            w = gate.weight
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            w.grad.add_(gate_l1_subgradient(w.detach(), lam))
            total += float(gate_l1_penalty(w.detach(), lam))
        return total

    def gate_step_limits(self) -> list[float | None]:
        """Per group, the most a gate moves in one step (``max_gate_step``), ``None`` for no limit."""
        if self.max_gate_step != "auto":
            return [self.max_gate_step] * len(self.groups or [])  # type: ignore[list-item]
        if self.gate_optimizer != "sgd":
            return [None] * len(self.groups or [])
        return [2 * self.gate_lr * lam / (1 - 0.9) if lam > 0 else None for lam in self.group_lams()]

    @override
    @torch.no_grad()
    def after_gate_step(self, step: int) -> None:
        assert self.gateset is not None and self.gate_opt is not None
        previous = getattr(self, "_before_step", None) or [None] * len(self.gateset.gates)
        for gate, before, limit in zip(self.gateset.gates, previous, self.gate_step_limits()):
            w = gate.weight
            if limit is not None and before is not None:
                w.copy_(before + (w - before).clamp(-limit, limit))
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
        return [keep_mask(g.weight, self.prune_threshold) & ~g.frozen for g in self.gateset.gates]

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
