"""The exceptions lightning-prune raises.

Callbacks follow Lightning's convention and raise ``MisconfigurationException`` for bad arguments (at
construction) and for models they cannot work on (at ``setup``). The functions that work on a plain
``nn.Module`` -- :func:`~lightning_prune.compress`, :func:`~lightning_prune.reparameterize`,
:func:`~lightning_prune.resolve_targets`, channel-group analysis and gates -- know nothing of Lightning and
raise the classes below, which are ``ValueError`` / ``TypeError`` subclasses so that ordinary ``except``
clauses catch them.
"""

from __future__ import annotations

import pickle

__all__ = [
    "UnsafeFileError",
    "CompressionError",
    "ExportError",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "LightningPruneError",
    "MissingDependencyError",
    "NoTargetsError",
    "NonFiniteGateError",
    "NonFiniteWeightError",
    "UnsupportedDeviceError",
]


class LightningPruneError(Exception):
    """Base class of every exception lightning-prune defines."""


class InvalidArgumentError(LightningPruneError, ValueError):
    """An argument of a model-level function has a value outside its allowed range."""


class InvalidArgumentTypeError(LightningPruneError, TypeError):
    """An argument of a model-level function has the wrong type."""


class NoTargetsError(InvalidArgumentError):
    """``include``/``exclude`` (or the model) left nothing to act on."""


class CompressionError(LightningPruneError, ValueError):
    """Removing channels (or fusing layers) would change, or changed, the model's outputs."""


class NonFiniteGateError(LightningPruneError, FloatingPointError):
    """A gate parameter or a gate penalty became NaN/inf; raised instead of training on silently."""


class NonFiniteWeightError(LightningPruneError, FloatingPointError):
    """A targeted weight holds NaN/inf when masks are about to be computed from it; raised (naming the layers
    and the step) instead of ranking NaNs, with the masks left as they were."""


class ExportError(LightningPruneError, ValueError):
    """An exported model (ONNX) failed to export, or computes outputs that differ from the PyTorch model's
    beyond the tolerance."""


class MissingDependencyError(LightningPruneError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it
    (``pip install 'lightning-prune[export]'``)."""


class UnsupportedDeviceError(LightningPruneError, RuntimeError):
    """The hardware a function needs is not there (2:4 semi-structured kernels need a CUDA GPU of compute
    capability 8.0 or newer)."""


class UnsafeFileError(LightningPruneError, pickle.UnpicklingError):
    """A file holds pickled Python objects that ``torch.load(weights_only=True)`` refuses to build; loading it
    would run the code it carries, so it is refused unless the caller passes ``weights_only=False``."""
