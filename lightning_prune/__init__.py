"""lightning-prune: PyTorch Lightning callbacks that prune, sparsify and reparameterise any timm model.

Example::

    import lightning.pytorch as pl
    import lightning_prune as lp

    trainer = pl.Trainer(callbacks=[lp.GradualMagnitudePruning(target_sparsity=0.9)])
    trainer.fit(lp.ImageClassifier("resnet18"), lp.DigitsDataModule())
    print(lp.sparsity_report(trainer.lightning_module))
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from lightning_prune.__about__ import __version__
from lightning_prune._registry import CallbackInfo, create_callback, get_callback, list_callbacks
from lightning_prune.errors import (
    CompressionError,
    ExportError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    LightningPruneError,
    MissingDependencyError,
    NonFiniteGateError,
    NonFiniteWeightError,
    NoTargetsError,
    UnsafeFileError,
    UnsupportedDeviceError,
)

# Everything that needs torch is imported on first access, so `import lightning_prune` (and the
# `lightning-prune list` command) stays fast. The ReduceNet-style timm models
# (`timm.create_model("reducenet_20")`) are registered by `lp.ImageClassifier`, by the first of these names
# used, or by `import lightning_prune.training.reducenet`.
_LAZY = {
    "SparsityReport": "lightning_prune.core.report",
    "sparsity_report": "lightning_prune.core.report",
    # callbacks (also importable from `lightning_prune.callbacks`)
    "PruningCallback": "lightning_prune.callbacks.base",
    "GatePruningCallback": "lightning_prune.callbacks.gating",
    "GradualMagnitudePruning": "lightning_prune.callbacks.magnitude",
    "LotteryTicket": "lightning_prune.callbacks.lottery_ticket",
    "GroupLassoPruning": "lightning_prune.callbacks.group_lasso",
    "L0Pruning": "lightning_prune.callbacks.l0",
    "ActivationDecay": "lightning_prune.callbacks.activation_decay",
    "EvolutionaryMutation": "lightning_prune.callbacks.evolution",
    "KnowledgeDistillation": "lightning_prune.callbacks.distill",
    "OneShotPruning": "lightning_prune.callbacks.one_shot",
    # model-level functions
    "compress": "lightning_prune.core.compression",
    "prune_one_shot": "lightning_prune.core.one_shot",
    "OneShotResult": "lightning_prune.core.one_shot",
    "dead_units": "lightning_prune.core.compression",
    "silent_units": "lightning_prune.core.compression",
    "save_compressed": "lightning_prune.core.compression",
    "load_compressed": "lightning_prune.core.compression",
    "reparameterize": "lightning_prune.core.reparam",
    "resolve_targets": "lightning_prune.core.targets",
    "analyse_channels": "lightning_prune.graph",
    "MaskSet": "lightning_prune.core.masks",
    # channel importance criteria (importance= of the channel callbacks) and BatchNorm recalibration
    "Importance": "lightning_prune.core.importance",
    "ImportanceContext": "lightning_prune.core.importance",
    "register_importance": "lightning_prune.core.importance",
    "importance_names": "lightning_prune.core.importance",
    "unit_reduce": "lightning_prune.core.importance",
    "recalibrate_batchnorm": "lightning_prune.core.batchnorm",
    # deployment: ONNX with proof, sparse checkpoints, 2:4 semi-structured weights
    "export": "lightning_prune.deploy.onnx",
    "ExportReport": "lightning_prune.deploy.onnx",
    "restore_run": "lightning_prune.deploy.restore",
    "save_sparse": "lightning_prune.deploy.sparse_io",
    "load_sparse": "lightning_prune.deploy.sparse_io",
    "to_semi_structured": "lightning_prune.core.semi_structured",
    "semi_structured_plan": "lightning_prune.core.semi_structured",
    "sensitivity": "lightning_prune.core.sensitivity",
    "layer_targets_from_sensitivity": "lightning_prune.core.sensitivity",
    "SensitivityTable": "lightning_prune.core.sensitivity",
    # training helpers
    "ImageClassifier": "lightning_prune.training.models",
    "DigitsDataModule": "lightning_prune.training.data",
    "CIFAR10DataModule": "lightning_prune.training.data",
    "ShapesDataModule": "lightning_prune.training.data",
}

__all__ = [
    "CallbackInfo",
    "CompressionError",
    "ExportError",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "LightningPruneError",
    "MissingDependencyError",
    "NoTargetsError",
    "NonFiniteGateError",
    "NonFiniteWeightError",
    "SparsityReport",
    "UnsafeFileError",
    "UnsupportedDeviceError",
    "__version__",
    "create_callback",
    "get_callback",
    "list_callbacks",
    "sparsity_report",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import_module("lightning_prune.training.reducenet")  # registers the ReduceNet models with timm
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_prune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
