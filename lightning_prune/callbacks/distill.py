"""Knowledge distillation from the dense model while it is pruned.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015, arXiv:1503.02531 (the
soft-target loss ``T² KL``). Used to recover what pruning costs by Sanh, Wolf & Rush, "Movement Pruning:
Adaptive Sparsity by Fine-Tuning", NeurIPS 2020, arXiv:2005.07683, and by Muralidharan et al., "Compact
Language Models via Pruning and Knowledge Distillation" (Minitron), 2024, arXiv:2407.14679. Feature matching:
Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, arXiv:1412.6550.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_prune.callbacks._resume import resume_loader_position
from lightning_prune.callbacks.logging import log_scalars
from lightning_prune.callbacks.schedules import resolve_step, until_the_end
from lightning_prune.callbacks.sharding import SHARDED_STRATEGY, check_sharding
from lightning_prune.callbacks.state import CallbackState
from lightning_prune.checkpoint_io import load_file
from lightning_prune.core.sharding import full_copy
from lightning_prune.core.targets import matches
from lightning_prune.functional.distill import (
    at_least_float32,
    distillation_loss,
    feature_matching_loss,
    output_logits,
    top1_agreement,
)
from lightning_prune.validation import (
    check_bool,
    check_nonnegative,
    check_patterns,
    check_positive,
    check_window,
    window_positions,
)

__all__ = ["KnowledgeDistillation"]

#: where the logged scalars go
DISTILL_PREFIX = "distill"
#: strategies whose model cannot be copied whole on every rank (the default teacher is such a copy; under
#: ModelParallelStrategy, FSDP2, the student's shards are gathered into a replicated teacher)
SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "XLAFSDPStrategy")
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")


class _AddGradient(torch.autograd.Function):
    """The identity in the forward pass; the backward pass adds ``grad * factor()`` to the incoming gradient.

    This puts a loss term into the backward pass of the loss the user's ``training_step`` returns, without
    touching that loss: ``grad`` is the term's gradient with respect to this tensor, ``factor()`` the scaling
    Lightning applied to the user's loss before ``backward`` (``1 / accumulate_grad_batches``, the AMP loss
    scale), read when the backward pass runs.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, grad: Tensor, factor: Callable[[], Any]) -> Tensor:
        ctx.grad, ctx.factor = grad, factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        return g + (ctx.grad * ctx.factor()).to(g.dtype), None, None


def _no_autocast(device: torch.device) -> Any:
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def _loss_and_grad(fn: Callable[[Tensor], Tensor], student: Tensor) -> tuple[Tensor, Tensor]:
    """``fn(student)`` (float32 or wider, outside autocast) and its gradient with respect to ``student``."""
    with torch.enable_grad(), _no_autocast(student.device):
        leaf = at_least_float32(student.detach()).requires_grad_(True)
        loss = fn(leaf)
        (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def _default_student(pl_module: nn.Module) -> str:
    """The timm model inside the LightningModule (``"model"`` of ``ImageClassifier``), or ``""`` (the
    LightningModule's own forward)."""
    for name, module in pl_module.named_modules():
        if isinstance(getattr(module, "pretrained_cfg", None), dict):
            return name
    return ""


def _clean_copy(module: nn.Module, trainer: pl.Trainer | None) -> nn.Module:
    """A deep copy of ``module`` without any hook (other callbacks' gates, masks, our own) and without the
    Trainer a LightningModule refers to."""
    memo: dict[int, Any] = {}
    if trainer is not None:
        memo[id(trainer)] = None
    for sub in module.modules():
        for attr in _HOOK_DICTS:
            hooks = sub.__dict__.get(attr)
            if hooks is not None:
                memo[id(hooks)] = OrderedDict()
    return copy.deepcopy(module, memo)


def _floating_dtype(module: nn.Module) -> torch.dtype | None:
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _device(module: nn.Module) -> torch.device:
    tensor = next((t for t in (*module.parameters(), *module.buffers())), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class KnowledgeDistillation(CallbackState):
    """Knowledge distillation from the dense model into the one being pruned (Hinton et al. 2015).

    At every training step inside ``[begin, end)``, the teacher sees the inputs the student's forward sees and
    the term ``alpha * T² * KL(softmax(teacher / T) ‖ softmax(student / T))`` (averaged over the batch;
    :func:`~lightning_prune.functional.distill.distillation_loss`) joins the loss that ``training_step``
    returns, in the same backward pass, with no change to the LightningModule: a forward hook on the student
    computes the term's gradient with respect to the logits and a pass-through autograd node adds it to the
    logits' gradient, scaled as Lightning scaled the user's loss (``1 / accumulate_grad_batches`` under
    automatic optimisation, the loss scale of ``16-mixed``). The parameters' gradients are exactly those of
    ``loss + alpha * T² * KL``: DDP averages them with the rest, AMP unscales them, clipping sees them. With
    ``features``, FitNets-style hints add ``feature_alpha`` times the mean squared difference of the named
    layers' outputs (averaged over the layers) the same way.

    The **teacher** is, by default, a frozen copy of the student taken at fit start -- before any pruning:
    start the fit from trained weights (``pretrained=True``, a dense checkpoint) -- or the ``nn.Module`` given
    (a ``LightningModule`` holding the student's submodule contributes that submodule), or a file: a Lightning
    checkpoint or a ``state_dict`` of the student's architecture (keys with or without the student's prefix),
    or a pickled ``nn.Module``. It runs in eval mode under ``torch.no_grad`` on the student's device, in its
    dtype and under the same autocast, outside the LightningModule (never wrapped by DDP, never
    synchronised). Only the default copy is saved in the checkpoint (a module or a file is given again when
    resuming); hooks other callbacks put on the student (gates, norms restricted to kept channels) are not
    copied.

    The **student** is the module whose output is the logits: by default the timm model inside the
    LightningModule (``model`` of :class:`~lightning_prune.ImageClassifier`), else the LightningModule's own
    forward. Its output is a tensor, a tuple whose first element is the logits, or a mapping with
    ``"logits"``; classes are the last dimension. The term acts only when the student's output reaches the
    returned loss, and for every forward of the student in ``training_step`` (with gradients enabled).

    Logs ``distill/loss`` (the added term, hints included), ``distill/agreement`` (top-1 agreement with the
    teacher on the training batch) and, with ``features``, ``distill/feature_loss`` to every logger, at the
    optimizer step they belong to (averaged over the batches of an accumulated step), every
    ``log_every_n_steps``; nothing outside the window.

    Positions follow the unit rule: ``*_step`` in optimizer steps, ``*_epoch`` in epochs, either as a float in
    [0, 1] a fraction of the whole training; give at most one of each pair.

    Args:
        teacher: ``None`` (a copy of the student at fit start), an ``nn.Module``, or a path to a checkpoint or
            state-dict file (a trusted one: it is unpickled).
        alpha: weight of the distillation term, ``>= 0`` (``0`` with ``features``: hints only).
        temperature: the softmax temperature ``T > 0`` (Hinton et al.: 1-20; 4 is common for images).
        begin_step: the first step with distillation (default 0).
        begin_epoch: the same in epochs.
        end_step: the first step without it (default 1.0: until the end of training).
        end_epoch: the same in epochs.
        student: name of the submodule whose output is the logits (``""``: the LightningModule itself);
            default: the timm model inside the LightningModule.
        features: globs over the student's module names (relative to ``student``) whose outputs are matched
            to those of the teacher's modules of the same names (same shapes).
        feature_alpha: weight of the feature term, ``> 0``.
        verbose: print the setup at fit start (rank zero).
        weights_only: how a teacher file is read: ``True`` (default) refuses a file that holds Python objects
            other than tensors and plain data; ``False`` unpickles them, which runs the code the file holds
            (only for files you trust).

    Raises:
        MisconfigurationException: bad arguments; at setup, a student or feature layer that does not exist, a
            teacher that does not load, a sharded strategy (FSDP, DeepSpeed) with the default teacher; at the
            first step, teacher and student outputs of different shapes.

    Example::

        model = lp.ImageClassifier("resnet18", pretrained=True)   # start from trained weights
        trainer = Trainer(callbacks=[lp.GradualMagnitudePruning(target_sparsity=0.95),
                                     lp.KnowledgeDistillation(alpha=1.0, temperature=4.0)])
    """

    def __init__(
        self,
        teacher: nn.Module | str | None = None,
        alpha: float = 1.0,
        temperature: float = 4.0,
        begin_step: int | float | None = None,
        begin_epoch: int | float | None = None,
        end_step: int | float | None = None,
        end_epoch: int | float | None = None,
        student: str | None = None,
        features: str | list[str] | None = None,
        feature_alpha: float = 1.0,
        verbose: bool = True,
        weights_only: bool = True,
    ) -> None:
        super().__init__()
        if teacher is not None and not isinstance(teacher, (nn.Module, str, os.PathLike)):
            raise MisconfigurationException(
                "`teacher` must be None, an nn.Module or a path to a checkpoint, got"
                f" {type(teacher).__name__}."
                " HINT: None distils from a copy of the model taken at fit start.")
        self.teacher = os.fspath(teacher) if isinstance(teacher, os.PathLike) else teacher
        self.weights_only = check_bool("weights_only", weights_only,
                                       hint="False unpickles a teacher file's Python objects, which runs the"
                                            " code it holds: only for files you trust.")
        self.alpha = check_nonnegative("alpha", alpha,
                                       hint="1.0 adds T² KL as it is; 0 keeps only the feature hints.")
        self.temperature = check_positive("temperature", temperature,
                                          hint="T = 1 is the plain softmax; Hinton et al. use 1-20.")
        hint = "end_step=0.5 distils during the first half of training; end_epoch=3 up to epoch 3."
        self.begin_step = self.begin_epoch = self.end_step = self.end_epoch = None
        for name, value in check_window(begin_step, begin_epoch, end_step, end_epoch, 1.0, hint):
            setattr(self, name, value)
        if student is not None and not isinstance(student, str):
            raise MisconfigurationException(
                f"`student` must be None or a module name (str), got {student!r}. HINT: 'model' is the timm"
                " model of ImageClassifier; '' is the LightningModule itself.")
        self.student = student
        self.features = check_patterns("features", features)
        self.feature_alpha = check_positive("feature_alpha", feature_alpha,
                                            hint="1.0 adds the mean squared feature difference as it is.")
        if self.alpha == 0.0 and not self.features:
            raise MisconfigurationException(
                "`alpha` is 0 and no `features` are matched: nothing would be distilled. HINT: alpha=1.0 adds"
                " the T² KL term; features=['layer4'] matches the outputs of layer4.")
        self.verbose = check_bool("verbose", verbose)
        # state
        self._bounds: tuple[int, int | None] | None = None  # resolved [begin, end) in optimizer steps
        self._pending_teacher: dict[str, Tensor] | None = None
        # per fit
        self._teacher: nn.Module | None = None
        self._template: nn.Module | None = None
        self._student: nn.Module | None = None
        self._student_name = ""
        self._feature_names: list[str] = []
        self._handles: list[Any] = []
        self._trainer: pl.Trainer | None = None
        self._active = False
        self._capturing = False
        self._teacher_logits: list[Tensor] = []
        self._teacher_features: dict[str, list[Tensor]] = {}
        self._batch: dict[str, list[Tensor]] = {}
        self._step_stats: list[dict[str, list[Tensor]]] = []
        self._step = 0

    # ------------------------------------------------------------------ identity
    def _begin_end(self) -> tuple[tuple[str, int | float], tuple[str, int | float]]:
        return window_positions(self.begin_step, self.begin_epoch, self.end_step, self.end_epoch)

    @property
    def teacher_source(self) -> str:
        """``"snapshot"`` (a copy of the student at fit start), ``"module"`` or ``"file"``."""
        if self.teacher is None:
            return "snapshot"
        return "module" if isinstance(self.teacher, nn.Module) else "file"

    @property
    @override
    def state_key(self) -> str:
        teacher = self.teacher if isinstance(self.teacher, str) else (
            "snapshot" if self.teacher is None else type(self.teacher).__name__)
        return self._generate_state_key(teacher=teacher, alpha=self.alpha, temperature=self.temperature,
                                        student=self.student)

    @property
    def teacher_module(self) -> nn.Module | None:
        """The teacher of the current (or last) fit."""
        return self._teacher

    # ------------------------------------------------------------------ setup
    def _student_of(self, pl_module: pl.LightningModule) -> tuple[str, nn.Module]:
        name = self.student if self.student is not None else _default_student(pl_module)
        try:
            return name, (pl_module.get_submodule(name) if name else pl_module)
        except AttributeError:
            names = [n for n, _ in pl_module.named_modules() if n and "." not in n][:8]
            raise MisconfigurationException(
                f"`student`={name!r} is not a submodule of {type(pl_module).__name__}. Its submodules:"
                f" {', '.join(names) or 'none'}. HINT: name the module whose output is the logits, or '' for"
                " the LightningModule itself.") from None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        # a new fit: the window and the teacher come from this fit's start, or from the checkpoint it resumes
        # (Lightning restores callback state after setup)
        self._bounds, self._pending_teacher = None, None
        if self.teacher is None and type(trainer.strategy).__name__ in SHARDED_STRATEGIES:
            raise MisconfigurationException(
                f"KnowledgeDistillation cannot copy the model under {type(trainer.strategy).__name__}: its"
                " parameters are sharded. HINT: pass `teacher=` (an nn.Module or a checkpoint path), or use"
                " ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1) with"
                " fully_shard in configure_model (FSDP2: the snapshot is gathered from the shards), or"
                " strategy='ddp'.")
        check_sharding(trainer, "KnowledgeDistillation", supported=True)
        resume_loader_position(trainer)
        if type(trainer.strategy).__name__ == SHARDED_STRATEGY:
            compressing = [type(cb).__name__ for cb in getattr(trainer, "callbacks", [])
                           if getattr(getattr(cb, "shrink", None), "enabled", False)]
            if compressing:
                raise MisconfigurationException(
                    f"KnowledgeDistillation cannot follow {compressing[0]}(compress=True) under"
                    f" {SHARDED_STRATEGY}: the compression inside the fit replaces the sharded network with a"
                    " new module tree, which the distillation hooks would no longer see. HINT: compress=False"
                    " (the units stay masked; compress after the fit), or strategy='ddp'.")
        if isinstance(self.teacher, str):
            from lightning.fabric.utilities.cloud_io import get_filesystem

            if not get_filesystem(self.teacher).exists(self.teacher):
                raise MisconfigurationException(
                    f"`teacher`={self.teacher!r}: no such file. HINT: a Lightning checkpoint or a state_dict"
                    " saved with torch.save.")
        name, student = self._student_of(pl_module)
        self._student_name = name
        # the architecture of the teacher, taken before a checkpoint's (maybe smaller) weights are restored
        self._template = _clean_copy(student, trainer) if not isinstance(self.teacher, nn.Module) else None

    def _load_file(self) -> Any:
        try:
            return load_file(self.teacher, weights_only=self.weights_only)
        except Exception as err:  # noqa: BLE001 - whatever the file is, say which one failed
            raise MisconfigurationException(
                f"`teacher`={self.teacher!r} could not be loaded: {' '.join(str(err).split())}") from None

    def _strip_prefix(self, state: Mapping[str, Any], expected: set[str]) -> Mapping[str, Any]:
        """``state`` with the student's prefix removed from its keys when that is what makes them match (a
        Lightning checkpoint's ``model.conv1.weight`` for the student ``model``)."""
        prefix = f"{self._student_name}." if self._student_name else ""
        if set(state) == expected or not prefix:
            return state
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        return stripped if set(stripped) >= expected else state

    def _load_weights(self, module: nn.Module, state: Mapping[str, Any], source: str) -> None:
        wanted = module.state_dict()
        state = self._strip_prefix(state, set(wanted))
        missing = [k for k in wanted if k not in state]
        unexpected = [k for k in state if k not in wanted]
        resized = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in wanted.items()
                   if isinstance(state.get(k), Tensor) and state[k].shape != v.shape]
        if missing or unexpected or resized:
            problems = "; ".join(
                f"{what} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("other shapes", resized)) if keys)
            raise MisconfigurationException(
                f"The teacher's weights from {source} do not fit the student's architecture"
                f" ({type(module).__name__}): {problems}. HINT: pass the teacher as an nn.Module (e.g."
                " timm.create_model(name, checkpoint_path=...)) when it differs from the student.")
        module.load_state_dict(dict(state), strict=True)

    def _fits(self, module: nn.Module, state: Mapping[str, Any]) -> bool:
        wanted = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        given = self._strip_prefix(state, set(wanted))
        return all(isinstance(given.get(k), Tensor) and tuple(given[k].shape) == shape
                   for k, shape in wanted.items())

    def _architecture(self, student: nn.Module, trainer: pl.Trainer, state: Mapping[str, Any]) -> nn.Module:
        """A copy of the student's architecture that takes ``state``: the copy taken at setup -- before a
        checkpoint of a model compressed inside the fit made the student smaller -- or, when that does not fit
        (a LightningModule that builds its model in its own ``setup``), a copy of the student now."""
        module = (self._template if self._template is not None and self._fits(self._template, state)
                  else _clean_copy(student, trainer))
        module.to(device=_device(student))
        dtype = _floating_dtype(student)
        if dtype is not None:
            module.to(dtype=dtype)
        return module

    def _build_teacher(self, trainer: pl.Trainer, student: nn.Module) -> nn.Module:
        source = self.teacher
        if isinstance(source, str):
            payload = self._load_file()
            if isinstance(payload, nn.Module):
                teacher = self._own_part(payload)
            else:
                state = payload.get("state_dict", payload) if isinstance(payload, Mapping) else None
                if not isinstance(state, Mapping):
                    raise MisconfigurationException(
                        f"`teacher`={source!r} holds neither a module nor a state_dict"
                        f" ({type(payload).__name__}).")
                teacher = self._architecture(student, trainer, state)
                self._load_weights(teacher, state, repr(source))
        elif isinstance(source, nn.Module):
            teacher = self._own_part(source)
        else:
            # (a sharded student, FSDP2: its shards gathered whole; the teacher is replicated on every rank)
            state = (self._pending_teacher if self._pending_teacher is not None
                     else full_copy(student.state_dict()))
            teacher = self._architecture(student, trainer, state)
            self._load_weights(teacher, state, "the checkpoint" if self._pending_teacher is not None
                               else "the student")
            self._pending_teacher = None
        self._template = None
        teacher.to(device=_device(student))
        dtype = _floating_dtype(student)
        if dtype is not None and _floating_dtype(teacher) != dtype:
            teacher.to(dtype=dtype)
        teacher.eval()
        teacher.requires_grad_(False)
        return teacher

    def _own_part(self, module: nn.Module) -> nn.Module:
        """A LightningModule given as the teacher contributes its submodule of the student's name."""
        if isinstance(module, pl.LightningModule) and self._student_name:
            try:
                return module.get_submodule(self._student_name)
            except AttributeError:
                return module
        return module

    def _resolve_features(self, student: nn.Module, teacher: nn.Module) -> list[str]:
        if not self.features:
            return []
        names = [n for n, _ in student.named_modules() if n and matches(n, self.features)]
        if not names:
            shown = ", ".join([n for n, _ in student.named_modules() if n][:10])
            raise MisconfigurationException(
                f"`features`={self.features} matched no module of the student. Its modules: {shown}, ..."
                " HINT: globs over module names relative to the student, e.g. ['layer4', 'blocks.11'].")
        for name in names:
            try:
                teacher.get_submodule(name)
            except AttributeError:
                raise MisconfigurationException(
                    f"The teacher has no module {name!r} to match the student's. HINT: feature matching pairs"
                    " modules by name; choose layers both models have.") from None
        return names

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._remove_hooks()
        name, student = self._student_of(pl_module)
        self._student_name = name
        self._teacher = self._build_teacher(trainer, student)
        self._student = student
        self._feature_names = self._resolve_features(student, self._teacher)
        self._install_hooks(student, self._teacher)
        if self.verbose:
            params = sum(p.numel() for p in self._teacher.parameters())
            where = f"`{name}`" if name else type(pl_module).__name__
            feats = f", hints on {len(self._feature_names)} layer(s)" if self._feature_names else ""
            rank_zero_info(
                f"[KnowledgeDistillation] teacher: {self.teacher_source} ({type(self._teacher).__name__},"
                f" {params:,} parameters, frozen) -> student {where}: alpha={self.alpha:g},"
                f" T={self.temperature:g}{feats}")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bounds is None:
            (begin_name, begin), (end_name, end) = self._begin_end()
            start = int(resolve_step(begin_name, begin, trainer) or 0)
            stop = None if until_the_end(end) else resolve_step(end_name, end, trainer)
            if stop is not None and stop < start:
                raise MisconfigurationException(
                    f"`{end_name}` ({end}) resolves to step {stop}, before `{begin_name}` ({begin}) at step"
                    f" {start}.")
            self._bounds = (start, stop)

    def active_at(self, step: int) -> bool:
        """Whether the term is added at optimizer step ``step`` (after train start)."""
        start, stop = self._bounds if self._bounds is not None else (0, None)
        return step >= start and (stop is None or step < stop)

    # ------------------------------------------------------------------ hooks on the models
    def _grad_factor(self) -> Any:
        """What Lightning multiplied the user's loss by before ``backward``."""
        trainer = self._trainer
        if trainer is None:
            return 1.0
        factor = 1.0
        if trainer.lightning_module.automatic_optimization:
            factor = 1.0 / max(int(trainer.accumulate_grad_batches), 1)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
            return (scale if scale is not None else scaler.get_scale()) * factor
        return factor

    def _install_hooks(self, student: nn.Module, teacher: nn.Module) -> None:
        this = self  # closures, not bound methods: a deep copy of the model must not copy the callback

        def before_student(module: nn.Module, args: Any, kwargs: Any) -> None:
            if not (this._active and module is this._student and torch.is_grad_enabled()):
                return
            assert this._teacher is not None
            this._teacher_features = {n: [] for n in this._feature_names}
            this._capturing = True
            try:
                with torch.no_grad():
                    out = this._teacher(*args, **kwargs)
            finally:
                this._capturing = False
            logits, _ = output_logits(out)
            if logits is None:
                raise MisconfigurationException(
                    f"The teacher returned {type(out).__name__}, not logits. HINT: a tensor, a tuple whose"
                    " first element is the logits, or a mapping with 'logits'.")
            this._teacher_logits.append(logits.detach())

        def after_student(module: nn.Module, args: Any, output: Any) -> Any:
            if not (this._active and module is this._student and this._teacher_logits):
                return None
            teacher_logits = this._teacher_logits.pop(0)
            this._teacher_features = {}
            logits, put = output_logits(output)
            if logits is None or not logits.requires_grad:
                return None
            if logits.shape != teacher_logits.shape:
                raise MisconfigurationException(
                    f"The teacher's logits have shape {tuple(teacher_logits.shape)}, the student's"
                    f" {tuple(logits.shape)}. HINT: the teacher must predict the student's classes.")
            this._record("agreement", top1_agreement(logits.detach(), teacher_logits))
            if this.alpha == 0.0:
                return None
            loss, grad = _loss_and_grad(
                lambda s: distillation_loss(s, teacher_logits, this.temperature, this.alpha), logits)
            this._record("loss", loss)
            return put(_AddGradient.apply(logits, grad, this._grad_factor))

        self._handles.append(student.register_forward_pre_hook(before_student, with_kwargs=True))
        self._handles.append(student.register_forward_hook(after_student))
        weight = self.feature_alpha / max(len(self._feature_names), 1)
        for name in self._feature_names:
            def capture(module: nn.Module, args: Any, output: Any, name: str = name) -> None:
                if this._capturing:
                    value, _ = output_logits(output)
                    if value is not None:
                        this._teacher_features.setdefault(name, []).append(value.detach())

            def match(module: nn.Module, args: Any, output: Any, name: str = name) -> Any:
                queue = this._teacher_features.get(name)
                if not (this._active and queue):
                    return None
                target = queue.pop(0)
                value, put = output_logits(output)
                if value is None or not value.requires_grad:
                    return None
                if value.shape != target.shape:
                    raise MisconfigurationException(
                        f"Feature layer {name!r}: the student's output has shape {tuple(value.shape)}, the"
                        f" teacher's {tuple(target.shape)}. HINT: match layers whose width no callback"
                        " changes (channel pruning with compress=True compresses the model).")
                loss, grad = _loss_and_grad(lambda s: weight * feature_matching_loss(s, target), value)
                this._record("feature_loss", loss)
                return put(_AddGradient.apply(value, grad, this._grad_factor))

            self._handles.append(teacher.get_submodule(name).register_forward_hook(capture))
            self._handles.append(student.get_submodule(name).register_forward_hook(match))

    def _record(self, key: str, value: Tensor) -> None:
        self._batch.setdefault(key, []).append(value.detach())

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ training hooks
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch = {}
        self._teacher_logits = []
        self._step = trainer.global_step
        self._active = self._teacher is not None and self.active_at(trainer.global_step)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._active = False
        self._teacher_logits = []
        batch_stats, self._batch = self._batch, {}
        if batch_stats:
            self._step_stats.append(batch_stats)
        if trainer.global_step != self._step:  # the optimizer stepped: the step's batches are all in
            self._flush(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)

    def _flush(self, trainer: pl.Trainer) -> None:
        """Log what the term was at the step just taken (averaged over its batches, summed over the student's
        forwards in a batch), every ``log_every_n_steps``."""
        stats, self._step_stats = self._step_stats, []
        every = max(int(getattr(trainer, "log_every_n_steps", 50) or 1), 1)
        if not stats or self._step % every != 0:
            return
        metrics: dict[str, float] = {}
        for key, reduce in (("loss", "sum"), ("feature_loss", "sum"), ("agreement", "mean")):
            per_batch = [torch.stack(b[key]).sum() if reduce == "sum" else torch.stack(b[key]).mean()
                         for b in stats if b.get(key)]
            if per_batch:
                metrics[key] = float(torch.stack(per_batch).float().mean())
        if "feature_loss" in metrics:
            metrics["loss"] = metrics.get("loss", 0.0) + metrics["feature_loss"]
        log_scalars(trainer, {f"{DISTILL_PREFIX}/{k}": v for k, v in metrics.items()}, step=self._step)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._remove_hooks()
            self._active = False
            self._student = None
            self._template = None

    # ------------------------------------------------------------------ state
    @override
    def extra_state_dict(self) -> dict[str, Any]:
        teacher = None
        if self.teacher is None:
            if self._teacher is not None:
                teacher = {k: v.detach().cpu().clone() for k, v in self._teacher.state_dict().items()}
            elif self._pending_teacher is not None:
                teacher = dict(self._pending_teacher)
        return {"bounds": list(self._bounds) if self._bounds is not None else None,
                "teacher_source": self.teacher_source, "teacher": teacher}

    @override
    def load_extra_state_dict(self, state_dict: dict[str, Any]) -> None:
        bounds = state_dict.get("bounds")
        self._bounds = ((int(bounds[0]), None if bounds[1] is None else int(bounds[1]))
                        if bounds is not None else None)
        teacher = state_dict.get("teacher")
        if teacher is None:
            if self.teacher is None and state_dict.get("teacher_source", "snapshot") == "snapshot":
                rank_zero_warn("KnowledgeDistillation: the checkpoint holds no teacher; the teacher is a copy"
                               " of the model as the resumed fit starts.")
            return
        if self.teacher is not None:
            return  # the teacher is given (a module or a file): the checkpoint's copy is not needed
        if self._teacher is not None:  # strategies that restore after fit start (FSDP, DeepSpeed)
            self._load_weights(self._teacher, teacher, "the checkpoint")
        else:
            self._pending_teacher = dict(teacher)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_handles", "_teacher_logits"):
            state[key] = []
        for key in ("_teacher", "_template", "_student", "_trainer"):
            state[key] = None
        state.update(_teacher_features={}, _batch={}, _step_stats=[], _active=False)
        return state
