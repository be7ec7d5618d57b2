"""``ImageClassifier``: a LightningModule around ``timm.create_model`` with torchmetrics accuracy."""

from __future__ import annotations

import difflib
import math
from typing import Any

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

# Registers the ReduceNet-style models with timm, so `ImageClassifier("reducenet_20")` works.
import lightning_prune.training.reducenet  # noqa: F401
from lightning_prune.validation import check_nonnegative

__all__ = ["ImageClassifier"]

_OPTIMIZERS = ("sgd", "adamw", "adam")
_SCHEDULERS = ("cosine", "multistep", "none")
_HEAD_INITS = ("fan_in", "timm")


def set_stem_stride_(model: torch.nn.Module, stride: int) -> None:
    """Set the stride of the stem convolution ``model.conv_stem`` of timm's EfficientNet family
    (EfficientNet, MobileNetV2/V3/V4, MixNet, MNASNet, FBNet, LCNet, ...); its padding is unchanged."""
    stem = getattr(model, "conv_stem", None)
    if not isinstance(stem, torch.nn.Conv2d):
        raise MisconfigurationException(
            "`stem_stride` needs a model with a stem convolution `conv_stem` (timm's EfficientNet and"
            f" MobileNet families), and {type(model).__name__} has none. HINT: leave `stem_stride=None`, or"
            " pass the model's own option through `model_kwargs` if it has one.")
    stem.stride = (stride, stride)


@torch.no_grad()
def zero_init_last_(model: torch.nn.Module) -> int:
    """Zero the scale of the last BatchNorm of every residual block of timm's EfficientNet family
    (``InvertedResidual``, ``DepthwiseSeparableConv``, ``EdgeResidual`` with a skip connection), so that each
    block starts as the identity, as timm's ResNets do (their ``zero_init_last``); the number of blocks."""
    done = 0
    for block in model.modules():
        last = getattr(block, "bn3", None) or getattr(block, "bn2", None)  # InvertedResidual: bn3, others bn2
        if getattr(block, "has_skip", False) and isinstance(last, torch.nn.modules.batchnorm._BatchNorm) \
                and last.weight is not None:
            last.weight.zero_()
            done += 1
    if not done:
        raise MisconfigurationException(
            "`zero_init_last=True` found no residual block of timm's EfficientNet family (an"
            " InvertedResidual, DepthwiseSeparableConv or EdgeResidual with a skip connection) in"
            f" {type(model).__name__}. HINT: timm's ResNets zero-initialise theirs already; leave"
            " `zero_init_last=False` for this model.")
    return done


@torch.no_grad()
def fan_in_head_(model: torch.nn.Module) -> bool:
    """Re-draw ``model.get_classifier()`` (a Linear or 1x1 conv) from PyTorch's default init,
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, when the standard deviation of its weights exceeds
    ``1/sqrt(fan_in)`` (``sqrt(3)`` times the default's: timm's ``_init_weight_goog`` scales it by the
    number of classes instead); True when it did."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, (torch.nn.Linear, torch.nn.Conv2d)) or head.weight.numel() == 0:
        return False
    fan_in = head.weight[0].numel()
    if float(head.weight.std()) <= fan_in ** -0.5:
        return False
    head.reset_parameters()
    return True


class ImageClassifier(pl.LightningModule):
    """Any timm model as a classifier: cross-entropy, SGD/Adam(W), cosine or step LR, top-1 accuracy.

    The timm model is ``self.model``; its ``state_dict`` (keys prefixed ``model.``) loads into a fresh
    ``timm.create_model(model_name, num_classes=...)``.

    Args:
        model_name: any name from ``timm.list_models()``.
        num_classes: output classes.
        pretrained: load timm's pretrained weights (needs the network).
        model_kwargs: passed on to ``timm.create_model`` (e.g. ``{"img_size": 32}`` for a ViT).
        optimizer: ``"sgd"`` (Nesterov momentum), ``"adamw"`` or ``"adam"``.
        lr, momentum, weight_decay: optimizer settings.
        scheduler: ``"cosine"`` over ``trainer.max_epochs``, ``"multistep"`` (x0.1 at ``milestones``),
            ``"none"``.
        milestones: epochs of the multistep schedule.
        warmup_epochs: a linear warm-up over the first ``warmup_epochs`` epochs' optimizer steps (fractions
            allowed), from ``lr / steps`` up to ``lr``; then the ``scheduler``, updated every step (the cosine
            over the steps that remain). ``0`` (default): no warm-up, the scheduler steps once an epoch.
            ConvNeXt trained from scratch with AdamW needed it on ``ShapesDataModule`` (dense 0.40 with one
            epoch of warm-up, 0.18 without; ``benchmarks/results/shapes-recipes.md``).
        label_smoothing: for the cross-entropy.
        head_init: ``"fan_in"`` (default): a new classifier layer whose initial weights exceed PyTorch's
            default's standard deviation by more than ``sqrt(3)`` is re-drawn from PyTorch's default
            ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (:func:`fan_in_head_`); ``"timm"`` keeps timm's.
            timm's EfficientNet/MobileNet/MixNet init draws the classifier from
            ``U(-1/sqrt(num_classes), ...)`` (made for 1,000 classes): with 10 classes the logits start at a
            standard deviation of 3-4 and the gradient is 40-80x a ResNet's, and SGD at lr 0.05 left
            ``mobilenetv3_large_100`` at chance on ``ShapesDataModule`` (``benchmarks/results/shapes.md``).
            Models whose head is already in that range (ResNet, RegNet, ConvNeXt, ViT) are untouched, as is a
            pretrained head kept for its classes.
        stem_stride: the stride of the stem convolution (``conv_stem``) of timm's EfficientNet and MobileNet
            families (``None``: the model's, 2). ``1`` adapts them to small images, as is usual on CIFAR: the
            feature maps are twice as large in every stage (at 32x32 the last stage works on 2x2 maps instead
            of 1x1), for about 4x the FLOPs. A model without ``conv_stem`` is an error. The stride is not in
            the ``state_dict``: a model rebuilt outside this class (e.g. for
            :func:`~lightning_prune.load_compressed`) needs ``model.conv_stem.stride = (1, 1)`` too.
        zero_init_last: zero the scale of the last BatchNorm of each residual block of timm's EfficientNet
            and MobileNet families, so that every block starts as the identity (timm's ResNets do this
            already, their ``zero_init_last``); a model without such a block, or ``pretrained=True``, is an
            error.
            With ``stem_stride=1`` and ``zero_init_last=True``, ``mobilenetv3_large_100`` and
            ``efficientnet_b0`` reach 0.99 from scratch on ``ShapesDataModule`` in 6 and 11 CPU minutes
            (``benchmarks/results/shapes.md``, with each change alone), where timm's architecture and init
            left ``efficientnet_b0`` at 0.31 (``channels-shapes-effb0-s0.md``).
    """

    def __init__(
        self,
        model_name: str = "resnet18",
        num_classes: int = 10,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        scheduler: str = "cosine",
        milestones: list[int] | None = None,
        warmup_epochs: float = 0.0,
        label_smoothing: float = 0.0,
        head_init: str = "fan_in",
        stem_stride: int | None = None,
        zero_init_last: bool = False,
    ) -> None:
        super().__init__()
        if optimizer not in _OPTIMIZERS:
            raise MisconfigurationException(
                f"`optimizer` must be one of {list(_OPTIMIZERS)}, got {optimizer!r}.")
        if scheduler not in _SCHEDULERS:
            raise MisconfigurationException(
                f"`scheduler` must be one of {list(_SCHEDULERS)}, got {scheduler!r}.")
        if lr <= 0:
            raise MisconfigurationException(f"`lr` must be > 0, got {lr}.")
        check_nonnegative("warmup_epochs", warmup_epochs)
        if head_init not in _HEAD_INITS:
            raise MisconfigurationException(
                f"`head_init` must be one of {list(_HEAD_INITS)}, got {head_init!r}.")
        if stem_stride is not None and (isinstance(stem_stride, bool) or not isinstance(stem_stride, int)
                                        or stem_stride < 1):
            raise MisconfigurationException(
                f"`stem_stride` must be None or an int >= 1, got {stem_stride!r}.")
        if zero_init_last and pretrained:
            raise MisconfigurationException(
                "`zero_init_last=True` is an initialisation for training from scratch: with"
                " `pretrained=True` it would zero trained weights. HINT: leave `zero_init_last=False` for"
                " pretrained weights.")
        _check_model_name(model_name)
        self.save_hyperparameters()
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes,
                                       **(model_kwargs or {}))
        pretrained_head = pretrained and num_classes == getattr(self.model, "pretrained_cfg", {}).get(
            "num_classes")
        if head_init == "fan_in" and not pretrained_head:
            fan_in_head_(self.model)
        if stem_stride is not None:
            set_stem_stride_(self.model, stem_stride)
        if zero_init_last:
            zero_init_last_(self.model)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("test/acc", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=-1)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from lightning_prune.core.compression import (
            has_state_structure,
            resuming_state_keys,
            take_recorded_removal,
        )

        if self._trainer is not None:  # warn once when the pruning state of the checkpoint has no callback
            from lightning_prune._registry import warn_ignored_states

            warn_ignored_states(self._trainer, checkpoint)
            if resuming_state_keys(self._trainer.strategy) & set(checkpoint.get("callbacks") or {}) \
                    or has_state_structure(self, checkpoint.get("state_dict") or {}):
                return  # the Trainer's channel callbacks take the checkpoint's shapes, or the model has them
        # load_from_checkpoint, or a Trainer without the callback (trainer.test(fresh_module, ckpt_path=...)):
        # a checkpoint written after a callback removed units inside the fit loads as the compressed model
        # (as lp.load_compressed)
        take_recorded_removal(self, checkpoint, "the checkpoint")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                                  nesterov=hp.momentum > 0)
        elif hp.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.get("warmup_epochs", 0.0) > 0:
            per_step = {"scheduler": self._warmup_schedule(opt), "interval": "step"}
            return {"optimizer": opt, "lr_scheduler": per_step}
        if hp.scheduler == "none":
            return opt
        if hp.scheduler == "cosine":
            epochs = max(int(self.trainer.max_epochs or 1), 1) if self.trainer.max_epochs != -1 else 1
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        else:
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(hp.milestones or []), gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def _warmup_schedule(self, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """Per step: linear warm-up over ``warmup_epochs`` epochs of steps, then the cosine over the steps
        left, the multistep decay at its epochs, or a constant."""
        hp, trainer = self.hparams, self.trainer
        total = trainer.estimated_stepping_batches
        epochs = trainer.max_epochs
        if not math.isfinite(total) or epochs is None or epochs < 1:
            raise MisconfigurationException(
                "`warmup_epochs` needs a finite training length in epochs (Trainer(max_epochs=...)), got"
                f" max_epochs={epochs}. HINT: set `max_epochs`, or `warmup_epochs=0`.")
        per_epoch = max(total / epochs, 1.0)
        warmup = max(1, round(hp.warmup_epochs * per_epoch))
        milestones = sorted(hp.milestones or [])
        cosine_steps = max(total - warmup, 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if hp.scheduler == "cosine":
                return 0.5 * (1 + math.cos(math.pi * min(step - warmup, cosine_steps) / cosine_steps))
            if hp.scheduler == "multistep":
                return 0.1 ** sum(step // per_epoch >= m for m in milestones)
            return 1.0

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _check_model_name(model_name: Any) -> None:
    """A name timm does not know fails here, with the closest names of ``timm.list_models()``, instead of
    deep inside ``timm.create_model``. Hub names (``hf-hub:...``, ``timm/...``) are left to timm."""
    if not isinstance(model_name, str):
        raise MisconfigurationException(f"`model_name` must be a timm model name (str), got {model_name!r}.")
    if ":" in model_name or "/" in model_name or timm.is_model(model_name):
        return
    arch = model_name.split(".")[0]
    names = timm.list_models()
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
    if not close:
        close = timm.list_models(f"{arch[:4]}*")[:5]
    if close:
        raise MisconfigurationException(
            f"`model_name` must be a model of `timm.list_models()`, got {model_name!r}. Did you mean"
            f" {', '.join(repr(c) for c in close)}? HINT: `python -c \"import timm;"
            f" print(timm.list_models('{arch[:3]}*'))\"` lists the names that start the same way.")
    raise MisconfigurationException(
        f"`model_name` must be a model of `timm.list_models()`, got {model_name!r}: no timm model has a name"
        f" like it (timm {timm.__version__} has {len(names)}, e.g. 'resnet18', 'efficientnet_b0',"
        " 'convnext_tiny', 'vit_tiny_patch16_224'). HINT: `python -c \"import timm;"
        " print(timm.list_models('*resnet*'))\"` lists the names that match a pattern.")
