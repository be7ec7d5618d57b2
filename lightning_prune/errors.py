"""The exceptions lightning-prune raises.

Callbacks follow Lightning's convention and raise ``MisconfigurationException`` for bad arguments (at
construction) and for models they cannot work on (at ``setup``). The functions that work on a plain
``nn.Module`` -- :func:`~lightning_prune.compress`, :func:`~lightning_prune.reparameterize`,
:func:`~lightning_prune.resolve_targets`, channel-group analysis and gates -- know nothing of Lightning and
raise the classes below, which are ``ValueError`` / ``TypeError`` subclasses so that ordinary ``except``
clauses catch them.
"""

from __future__ import annotations

__all__ = [
    "CompressionError",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "LightningPruneError",
    "NoTargetsError",
    "NonFiniteGateError",
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
