"""L0 channel pruning with hard-concrete gates.

Louizos, Welling & Kingma, "Learning Sparse Neural Networks through L0 Regularization", ICLR 2018,
arXiv:1712.01312 (code: AMLab-Amsterdam/L0_regularization, ``l0_layers.py``), on the channel groups of the
group-LASSO machinery (:mod:`lightning_prune.core.gates`,
:class:`~lightning_prune.callbacks.gating.GatePruningCallback`), with the practical variants of the Habr
article «Редукция нейронных сетей при помощи вариационной оптимизации» ("Reducing neural networks with
variational optimisation", in Russian; its second half, "L0-регуляризация", i.e. "L0 regularisation") as
options.

One gate ``z_j`` per unit of every exactly removable channel group (a channel, a residual-stream channel, an
attention head, a conv group) scales the unit wherever a layer reads it. In training ``z`` is a
reparameterised hard-concrete sample (stretched to ``(gamma, zeta) = (-0.1, 1.1)`` and clamped to [0, 1], so
that it is exactly 0 or 1 with finite probability); in validation, test and predict it is the deterministic
test-time gate ``z_hat = clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)`` (paper eq. 13). The loss
gains ``lam * sum_j P(z_j > 0)``, the expected number of open channels (added as a gradient on ``log_alpha``,
like the group-LASSO penalty). At ``finalize_step`` the gates are binarised, the kept channels' ``z_hat`` is
folded into the weights, the others become channel masks, and training continues as fine-tuning;
``compress=True`` compresses the model inside the fit
(:mod:`lightning_prune.callbacks.shrink`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_prune.callbacks.gating import GatePruningCallback
from lightning_prune.callbacks.logging import PREFIX, log_histograms, log_scalars
from lightning_prune.callbacks.schedules import ramp, training_steps
from lightning_prune.callbacks.state import resolve_seed
from lightning_prune.core.gates import Gate
from lightning_prune.core.importance import Importance
from lightning_prune.errors import NonFiniteGateError
from lightning_prune.functional.hard_concrete import (
    GAMMA,
    ZETA,
    expected_l0,
    hard_concrete_gate,
    hard_concrete_sample,
    hard_sigmoid_l0,
    log_alpha_from_droprate,
)
from lightning_prune.graph import DEFAULT_ANALYSIS_TIME_LIMIT_S, ChannelGroup
from lightning_prune.validation import check_bool, check_int, check_nonnegative, check_optional

__all__ = ["HardConcreteGate", "L0Pruning", "NonFiniteGateError"]

#: the paper's clamp of ``log_alpha`` after every step: [log 1e-2, log 1e2] (``constrain_parameters``)
PAPER_LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))
#: the Habr channel-pruning article's clip for the hard-sigmoid penalty (linear on [-4, 4])
HARD_LOG_ALPHA_RANGE = (-4.0, 4.0)
#: the Habr channel-pruning article's initial ``log_alpha`` ("large enough that neurons are kept more often
#: than dropped")
SEED_LOG_ALPHA_INIT = 2.5
_MIX = 0x9E3779B97F4A7C15
_MASK64 = (1 << 63) - 1


class HardConcreteGate(Gate):
    """A hard-concrete gate per channel (Louizos et al. 2018): learnable ``log_alpha``, temperature ``beta``.

    ``compute(True)`` draws ``z ~ HardConcrete(log_alpha, beta)`` stretched to ``(gamma, zeta)`` and clamped
    (:func:`~lightning_prune.functional.hard_concrete_sample`, differentiable in ``log_alpha``);
    ``compute(False)`` is the test-time gate :func:`~lightning_prune.functional.hard_concrete_gate`. The noise
    comes from ``generator`` (a ``torch.Generator`` on the gate's device that the callback re-seeds every
    batch), so runs are reproducible and resumable. With ``binary`` set, :meth:`deterministic` returns the
    Habr channel-pruning article's final gate ``1[log_alpha >= 0]`` instead of ``z_hat``.

    Args:
        size: number of channels.
        log_alpha: initial values, a float or a ``(size,)`` tensor.
        beta: temperature of the concrete distribution (paper 2/3).
        gamma, zeta: the stretch interval (paper -0.1, 1.1).
    """

    def __init__(self, size: int, log_alpha: float | Tensor = SEED_LOG_ALPHA_INIT, beta: float = 2 / 3,
                 gamma: float = GAMMA, zeta: float = ZETA) -> None:
        super().__init__(size)
        init = log_alpha if isinstance(log_alpha, Tensor) else torch.full((size,), float(log_alpha))
        if init.shape != (size,):
            raise ValueError(f"log_alpha of shape {tuple(init.shape)} for a gate of {size} channels")
        self.log_alpha = nn.Parameter(init.detach().clone().float())
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        self.binary = False
        self.generator: torch.Generator | None = None

    def compute(self, training: bool) -> Tensor:
        if training:
            gen = self.generator
            if gen is None or gen.device == self.log_alpha.device:
                return hard_concrete_sample(self.log_alpha, self.beta, self.gamma, self.zeta, generator=gen)
            z = hard_concrete_sample(self.log_alpha.to(gen.device), self.beta, self.gamma, self.zeta,
                                     generator=gen)
            return z.to(self.log_alpha.device)
        return hard_concrete_gate(self.log_alpha, self.gamma, self.zeta)

    def deterministic(self) -> Tensor:
        if self.binary:
            return (self.log_alpha.detach() >= 0).to(self.log_alpha.dtype)
        return super().deterministic()

    def score(self) -> Tensor:
        """``log_alpha``: ranks the units when they are chosen to meet a size target (``z_hat`` saturates at
        1)."""
        return self.log_alpha.detach()

    def open_probability(self) -> Tensor:
        """``P(z > 0)`` per channel at the current temperature.

        See :func:`~lightning_prune.functional.expected_l0`.
        """
        return expected_l0(self.log_alpha.detach(), self.beta, self.gamma, self.zeta)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["generator"] = None  # process-local; the callback re-attaches its own
        return state


def _check_range(name: str, value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
          and value[0] < value[1])
    if not ok:
        raise MisconfigurationException(
            f"`{name}` must be None or a pair (low, high) of finite numbers with low < high, got {value!r}."
            " HINT: the paper clamps to [log 1e-2, log 1e2] = [-4.605, 4.605]; the Habr channel-pruning"
            " article's hard penalty to [-4, 4]."
        )
    return float(value[0]), float(value[1])


class L0Pruning(GatePruningCallback):
    """L0 channel pruning: a hard-concrete gate per channel unit under the expected-L0 penalty.

    Gates sit where :class:`~lightning_prune.GroupLassoPruning` puts its gates (on every unit of every exactly
    removable channel group, residual streams included unless ``prune_coupled=False``). They are stochastic in
    training and deterministic in validation, test and predict (they follow the module's ``training`` flag),
    have their own optimizer, get AMP-unscaled and DDP-averaged gradients, and their noise is re-seeded every
    batch from ``seed``, the epoch, the batch index and the rank: a resumed run draws the same noise as an
    uninterrupted one.

    Each option says where it comes from: "paper" is Louizos et al. 2018 and its code, "Habr" is the Habr
    channel-pruning article.

    ``torch.compile``: the hard-concrete noise comes from the callback's own ``torch.Generator`` (so that runs
    are reproducible and resume exactly), and dynamo cannot put a generator into a graph, so a compiled
    network breaks its graph at every group's sample while the gates are open (test_resnet, 11 groups: 22
    graphs instead of 2). Measured with ``aot_eager`` on test_resnet, batch 32, one CPU thread (thread CPU
    time, median of 18 steps): 71 ms per compiled step against 52 ms eager and 42 ms for compiled group-LASSO
    gates. After finalisation the gates are folded and detached, and the graph is whole again.

    Args:
        lam: weight of the penalty ``lam * sum_j P(z_j > 0)`` (the expected number of open channels). The
            paper weighs each gate by its group's parameter count and divides by the training-set size N
            (``lamba / N``, lamba = 1 for LeNet-5 with N = 60000); here ``lam`` is per channel and absorbs
            ``1/N``.
        penalty: ``"expected_l0"`` (paper: ``sigmoid(log_alpha - beta log(-gamma/zeta))``) or ``"hard"``
            (Habr: the sigmoid replaced by a hard sigmoid linear on [-4, 4], with ``log_alpha`` clipped to
            [-4, 4]).
        temperature: ``beta`` of the concrete distribution (paper: 2/3, fixed).
        temperature_final: if set, ``beta`` goes linearly (:func:`~lightning_prune.callbacks.schedules.ramp`)
            from ``temperature`` to it until finalisation (Habr: start small, e.g. 0.05, and decrease it
            linearly).
        log_alpha_init: constant initial ``log_alpha`` (Habr: about 2.5, "gates kept more often than dropped,
            but not so large that the sigmoid of the loss saturates"). The default when ``droprate_init`` is
            not set.
        droprate_init: initialise ``log_alpha = log(1 - p) - log(p)`` from a drop rate ``p`` (paper: 0.5 gives
            0, 0.3 for the Wide-ResNet); exclusive with ``log_alpha_init``.
        init_std: standard deviation of the Gaussian noise added at initialisation (paper: 0.01).
        log_alpha_range: ``(low, high)`` clamp of ``log_alpha`` after every gate step (paper's
            ``constrain_parameters``: [log 1e-2, log 1e2] = +-4.605); default: that for ``"expected_l0"`` and
            [-4, 4] for ``"hard"`` (Habr). ``clamp_log_alpha=False`` disables it.
        clamp_log_alpha: whether to clamp at all.
        final_rule: how gates are binarised at finalisation: ``"test_gate"`` (paper eq. 13: keep where
            ``z_hat > 0``, i.e. ``log_alpha > -log(11)``, and fold ``z_hat`` into the kept channels' weights)
            or ``"log_alpha"`` (Habr: keep where ``log_alpha >= 0``, binary mask, nothing folded).
        gate_lr: learning rate of the gates' optimizer (paper: Adam 1e-3 for all parameters; the gates of a
            short run need a larger one).
        gate_optimizer: ``"adam"`` (paper) or ``"sgd"`` (momentum 0.9).
        seed: seed of the gates' noise and initialisation (default: ``torch.initial_seed()``, i.e. what
            ``seed_everything`` set; rank 0's is used on every rank).
        prune_coupled, target_flops, target_params, group_targets, round_to, finalize_step, finalize_epoch,
            alternate_every_n_steps, compress, compress_step, compress_epoch, input_size,
            analysis_time_limit_s, include, exclude, types, log_media_every_n_epochs,
            verbose, target_latency, latency_device, latency_batch_size, latency_model: as in
            :class:`~lightning_prune.GroupLassoPruning`.

    Raises:
        MisconfigurationException: a bad argument, or (at ``setup``) a model with no gateable channel.
        NonFiniteGateError: a ``log_alpha`` or the penalty became NaN/inf (the message names the group and
            step).

    Example::

        trainer = Trainer(callbacks=[L0Pruning(target_flops=0.5, finalize_step=0.6, compress=True)])
    """

    #: the gates are random in train mode only (what the setup checks warn about for a module left in eval)
    gates_sampled = True


    def __init__(
        self,
        lam: float = 2e-3,
        penalty: str = "expected_l0",
        temperature: float = 2 / 3,
        temperature_final: float | None = None,
        log_alpha_init: float | None = None,
        droprate_init: float | None = None,
        init_std: float = 0.01,
        log_alpha_range: Sequence[float] | None = None,
        clamp_log_alpha: bool = True,
        final_rule: str = "test_gate",
        gate_lr: float = 0.05,
        gate_optimizer: str = "adam",
        seed: int | None = None,
        prune_coupled: bool = True,
        target_flops: float | None = None,
        target_params: float | None = None,
        group_targets: dict[str, float] | None = None,
        round_to: int = 8,
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
        self.lam = check_nonnegative("lam", lam,
                                     "lam weighs the expected number of open channels; 0 disables it.")
        if penalty not in ("expected_l0", "hard"):
            raise MisconfigurationException(
                f"`penalty` must be one of ['expected_l0', 'hard'], got {penalty!r}. HINT: 'expected_l0' is"
                " the paper's P(z > 0); 'hard' is the Habr channel-pruning article's hard-sigmoid variant.")
        self.penalty = penalty
        self.temperature = self._check_temperature("temperature", temperature)
        self.temperature_final = (None if temperature_final is None
                                  else self._check_temperature("temperature_final", temperature_final))
        if log_alpha_init is not None and droprate_init is not None:
            raise MisconfigurationException(
                f"`log_alpha_init` ({log_alpha_init}) and `droprate_init` ({droprate_init}) are exclusive."
                " HINT: set one: a constant log_alpha (the Habr channel-pruning article: 2.5) or a drop rate"
                " (paper: 0.5 gives log_alpha = 0).")
        if log_alpha_init is not None and (not isinstance(log_alpha_init, (int, float)) or isinstance(
                log_alpha_init, bool) or not math.isfinite(log_alpha_init)):
            raise MisconfigurationException(
                f"`log_alpha_init` must be a finite number, got {log_alpha_init!r}.")
        if droprate_init is not None and (not isinstance(droprate_init, (int, float)) or isinstance(
                droprate_init, bool) or not 0.0 < droprate_init < 1.0):
            raise MisconfigurationException(
                f"`droprate_init` must be in (0, 1), got {droprate_init!r}. HINT: the paper uses 0.5"
                " (log_alpha 0).")
        self.log_alpha_init = log_alpha_init
        self.droprate_init = droprate_init
        self.init_std = check_nonnegative("init_std", init_std)
        self.clamp_log_alpha = check_bool("clamp_log_alpha", clamp_log_alpha)
        self.log_alpha_range = _check_range("log_alpha_range", log_alpha_range)
        if final_rule not in ("test_gate", "log_alpha"):
            raise MisconfigurationException(
                f"`final_rule` must be one of ['test_gate', 'log_alpha'], got {final_rule!r}. HINT:"
                " 'test_gate' keeps channels with z_hat > 0 (paper); 'log_alpha' keeps log_alpha >= 0 (the"
                " Habr channel-pruning article).")
        self.final_rule = final_rule
        self.seed = check_optional(check_int, "seed", seed, 0,
                                   hint="None uses torch.initial_seed(), i.e. what seed_everything set.")
        self._seed_used: int | None = seed
        self._generator: torch.Generator | None = None
        self._beta = self.temperature
        self._horizon: int | None = None

    @staticmethod
    def _check_temperature(name: str, value: Any) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value < float("inf"):
            raise MisconfigurationException(
                f"`{name}` must be a number > 0, got {value!r}. HINT: the paper uses 2/3; the Habr"
                " channel-pruning article starts at 0.05 and decreases it linearly (temperature=0.05,"
                " temperature_final=0.01).")
        return float(value)

    @override
    def state_key_args(self) -> dict[str, Any]:
        return {**super().state_key_args(), "lam": self.lam, "penalty": self.penalty,
                "prune_coupled": self.prune_coupled}

    # ------------------------------------------------------------------ gates
    @property
    def clamp_range(self) -> tuple[float, float] | None:
        """The ``(low, high)`` clamp of ``log_alpha`` after every gate step (None = no clamping)."""
        if not self.clamp_log_alpha:
            return None
        if self.log_alpha_range is not None:
            return self.log_alpha_range
        return HARD_LOG_ALPHA_RANGE if self.penalty == "hard" else PAPER_LOG_ALPHA_RANGE

    def initial_log_alpha(self) -> float:
        if self.droprate_init is not None:
            return log_alpha_from_droprate(self.droprate_init)
        return SEED_LOG_ALPHA_INIT if self.log_alpha_init is None else float(self.log_alpha_init)

    @property
    def generator(self) -> torch.Generator:
        """The gates' noise generator, on the gates' device (no host round trip per forward)."""
        device = torch.device("cpu")
        if self.gateset is not None and len(self.gateset):
            device = self.gateset.gates[0].log_alpha.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._resolved_seed())
        return self._generator

    def _resolved_seed(self) -> int:
        if self._seed_used is None:
            self._seed_used = resolve_seed(None)
        return self._seed_used

    @override
    def make_gate(self, group: ChannelGroup) -> HardConcreteGate:
        # paper: log_alpha ~ N(log(1 - p) - log p, 1e-2); the init noise is seeded per group name (as in the
        # uncompiled network, so that compiling it, `self.model = torch.compile(net)`, changes nothing)
        name = group.name.replace("._orig_mod.", ".").removeprefix("_orig_mod.")
        gen = torch.Generator().manual_seed(self._mix(self._resolved_seed(), *map(ord, name)))
        init = self.initial_log_alpha() + self.init_std * torch.randn(group.size, generator=gen)
        gate = HardConcreteGate(group.size, init, self._beta)
        gate.generator = self.generator
        gate.binary = self.final_rule == "log_alpha" and self.finalized
        return gate

    @staticmethod
    def _mix(*values: int) -> int:
        h = 0
        for v in values:
            h = ((h ^ (int(v) & _MASK64)) * _MIX + 0x632BE5AB) & _MASK64
        return h

    def _attach_generator(self) -> None:
        if self.gateset is not None:
            for gate in self.gateset.gates:
                gate.generator = self.generator

    def penalty_terms(self) -> list[Tensor]:
        """Per group, the differentiable per-channel penalty ``P(z > 0)`` (or its hard-sigmoid variant)."""
        assert self.gateset is not None
        fn = expected_l0 if self.penalty == "expected_l0" else hard_sigmoid_l0
        return [fn(g.log_alpha, g.beta, g.gamma, g.zeta) for g in self.gateset.gates]

    def expected_active_channels(self) -> float:
        """``sum_j P(z_j > 0)`` over every gate at the current temperature (the paper's expected L0 norm)."""
        if self.gateset is None:
            return 0.0
        return float(sum(g.open_probability().sum() for g in self.gateset.gates))

    def check_finite(self, step: int, where: str) -> None:
        """Raise :class:`NonFiniteGateError` naming the first group whose ``log_alpha`` is NaN/inf."""
        if self.gateset is None:
            return
        if bool(torch.stack([torch.isfinite(g.log_alpha.detach()).all() for g in self.gateset.gates]).all()):
            return  # one device sync in the common case
        for group, gate in self.gateset:
            bad = ~torch.isfinite(gate.log_alpha.detach())
            if bad.any():
                raise NonFiniteGateError(
                    f"[L0Pruning] non-finite log_alpha in layer {group.name!r} (channels"
                    f" {bad.nonzero().flatten().tolist()[:8]}) at step {step} ({where}). HINT: lower"
                    " `gate_lr`, keep `clamp_log_alpha=True`, or check the model's loss for NaNs."
                )

    @override
    def gate_penalty_grad_(self, step: int) -> float:
        assert self.gateset is not None
        self.check_finite(step, "before the gate step")
        total = 0.0
        with torch.enable_grad():
            for (group, gate), term in zip(self.gateset, self.penalty_terms()):
                value = self.lam * term.sum()
                if not bool(torch.isfinite(value)):
                    raise NonFiniteGateError(
                        f"[L0Pruning] non-finite L0 penalty ({float(value)}) in layer {group.name!r} at step"
                        f" {step}. HINT: lower `gate_lr` or `lam`, keep `clamp_log_alpha=True`.")
                (grad,) = torch.autograd.grad(value, gate.log_alpha)
                if gate.log_alpha.grad is None:
                    gate.log_alpha.grad = torch.zeros_like(gate.log_alpha)
                gate.log_alpha.grad.add_(grad)
                total += float(value.detach())
        return total

    @override
    @torch.no_grad()
    def after_gate_step(self, step: int) -> None:
        assert self.gateset is not None
        bounds = self.clamp_range
        if bounds is not None:
            for gate in self.gateset.gates:
                gate.log_alpha.clamp_(*bounds)
        self.check_finite(step, "after the gate step")

    @override
    def final_keep(self) -> list[Tensor]:
        assert self.gateset is not None
        if self.final_rule == "log_alpha":
            return [g.log_alpha.detach() >= 0 for g in self.gateset.gates]
        return [hard_concrete_gate(g.log_alpha.detach(), g.gamma, g.zeta) > 0 for g in self.gateset.gates]

    @override
    @torch.no_grad()
    def finalize(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> None:
        if self.finalized or self.gateset is None:
            return
        self.check_finite(trainer.global_step if trainer is not None else -1, "at finalisation")
        if self.final_rule == "log_alpha":  # the Habr channel-pruning article: binary masks, nothing folded
            for gate in self.gateset.gates:
                gate.binary = True
        super().finalize(trainer, pl_module)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self.finalized and self.gateset is not None:
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            # without a loss scaler a NaN gradient is a real NaN
            if scaler is None or not scaler.is_enabled():
                grads = [g.log_alpha.grad for g in self.gateset.gates]
                checks = [torch.isfinite(x).all() for x in grads if x is not None]
                if checks and not bool(torch.stack(checks).all()):
                    group = next(gr for gr, x in zip(self.gateset.groups, grads)
                                 if x is not None and not bool(torch.isfinite(x).all()))
                    raise NonFiniteGateError(
                        f"[L0Pruning] non-finite gradient of log_alpha in layer {group.name!r} at step"
                        f" {trainer.global_step}. HINT: the loss is NaN/inf; lower the learning rates or use"
                        " AMP with a loss scaler.")
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    # ------------------------------------------------------------------ temperature and noise
    def temperature_at(self, step: int) -> float:
        """``beta`` at a global step: fixed, or linear from ``temperature`` to ``temperature_final``."""
        if self.temperature_final is None or not self._horizon:
            return self.temperature
        p = ramp(step / self._horizon, "linear")
        return self.temperature + (self.temperature_final - self.temperature) * p

    def _set_temperature(self, beta: float) -> None:
        self._beta = beta
        if self.gateset is not None:
            for gate in self.gateset.gates:
                gate.beta = beta

    def _resolve_horizon(self, trainer: pl.Trainer) -> None:
        """The step at which ``temperature_final`` is reached: finalisation, or the end of training."""
        if self.finalize_at_step is not None:
            self._horizon = self.finalize_at_step
        else:
            total = training_steps(trainer)
            self._horizon = total if total is not None else None

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._attach_generator()
        self._set_temperature(self._beta)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:  # every rank uses rank 0's seed
            self._seed_used = int(trainer.strategy.broadcast(self._resolved_seed(), src=0))
            self._generator = None
            self._attach_generator()
        super().on_fit_start(trainer, pl_module)  # moves the gates to the module's device
        self._attach_generator()
        self._resolve_horizon(trainer)
        if not self.finalized:  # (finalised: the restored temperature stands; global_step comes later)
            self._set_temperature(self.temperature_at(trainer.global_step))

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.finalized or self.gateset is None:
            return
        step = trainer.global_step
        self.check_finite(step, "before the forward pass")
        self._set_temperature(self.temperature_at(step))
        # fresh noise per (epoch, batch, rank): reproducible, identical after a resume, independent
        # across ranks
        self.generator.manual_seed(self._mix(self._resolved_seed(), trainer.current_epoch, batch_idx,
                                             trainer.global_rank))

    # ------------------------------------------------------------------ logging
    @override
    def gate_metrics(self) -> dict[str, float]:
        metrics = super().gate_metrics()
        metrics[f"{PREFIX}/expected_active_channels"] = self.expected_active_channels()
        metrics[f"{PREFIX}/temperature"] = self._beta
        return metrics

    @override
    def log_gate_media(self, trainer: pl.Trainer) -> None:
        super().log_gate_media(trainer)
        if self.gateset is None or not trainer.loggers:
            return
        hist = {}
        for group, gate in self.gateset:
            hist[f"{PREFIX}/open_probability/{group.name}"] = gate.open_probability().cpu()
            hist[f"{PREFIX}/log_alpha/{group.name}"] = gate.log_alpha.detach().cpu()
        log_histograms(trainer, hist)
        log_scalars(trainer, {f"{PREFIX}/expected_active_channels": self.expected_active_channels()})

    # ------------------------------------------------------------------ state
    @override
    def extra_state_dict(self) -> dict[str, Any]:
        state = super().extra_state_dict()
        state["seed"] = self._resolved_seed() if self.gateset is not None else self._seed_used
        state["generator"] = self.generator.get_state() if self._generator is not None else None
        state["generator_device"] = self._generator.device.type if self._generator is not None else None
        state["temperature"] = self._beta
        return state

    @override
    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        super().load_extra_state_dict(state)
        if state.get("seed") is not None:
            self._seed_used = int(state["seed"])
            self._generator = None
        if state.get("generator") is not None and state.get("generator_device") == self.generator.device.type:
            # (a different device re-seeds at the next batch anyway)
            self.generator.set_state(state["generator"])
        if state.get("temperature") is not None:
            self._set_temperature(float(state["temperature"]))
        self._attach_generator()
        if self.gateset is not None and self.final_rule == "log_alpha" and self.finalized:
            for gate in self.gateset.gates:
                gate.binary = True

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_generator"] = None  # rebuilt from the seed in the worker
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._generator is None and self.gateset is not None and self._seed_used is not None:
            self._attach_generator()
