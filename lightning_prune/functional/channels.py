"""Channel-level math shared by the gate callbacks and :func:`lightning_prune.compress`.

Pure functions of tensors: the L1 (group-LASSO) penalty on channel gates and its subgradient, capture
masks (from the Habr article «Редукция нейронных сетей при помощи вариационной оптимизации», "Reducing neural
networks with variational optimisation", in Russian), thresholding, folding a per-channel scale into the
weights that produce the channel, and the test "is this output channel identically zero". References: He et
al., "Channel Pruning for Accelerating Very Deep Neural Networks", 2017, arXiv:1707.06168; Liu et al.,
"Learning Efficient Convolutional Networks through Network Slimming", 2017, arXiv:1708.06519
(``grad += s * sign(gamma)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "capture_mask",
    "channel_view",
    "fold_scale",
    "gate_l1_penalty",
    "gate_l1_subgradient",
    "keep_mask",
    "zero_channels",
]


def channel_view(scale: Tensor, ndim: int, dim: int = 1) -> Tensor:
    """Reshape a ``(C,)`` vector so that it broadcasts along dimension ``dim`` of an ``ndim``-D tensor.

    Example::

        >>> channel_view(torch.ones(3), 4).shape
        torch.Size([1, 3, 1, 1])
    """
    dim = dim % ndim
    shape = [1] * ndim
    shape[dim] = -1
    return scale.reshape(shape)


def gate_l1_penalty(gates: Tensor, lam: float | Tensor) -> Tensor:
    """The group-LASSO term on channel gates, ``lam * sum(|g|)`` (``lam`` may be a per-channel tensor)."""
    return (lam * gates.abs()).sum()


def gate_l1_subgradient(gates: Tensor, lam: float | Tensor) -> Tensor:
    """``d/dg lam*|g| = lam * sign(g)`` (0 at g = 0, so a captured zero gate receives no push).

    This is what Network Slimming adds to ``bn.weight.grad`` after ``backward()``.
    """
    return lam * torch.sign(gates)


def capture_mask(gates: Tensor, captured: Tensor, threshold: float, previous: Tensor | None = None) -> Tensor:
    """The Habr channel-pruning article's capture masks: a gate stays captured once ``|g| < threshold``.

    Returns the new mask.

    With ``previous`` (the values before the step), a gate whose sign flipped is captured too: it crossed
    zero during the step (what a proximal L1 step would set to exactly zero), however large the step was.
    """
    new = captured | (gates.detach().abs() < threshold)
    if previous is not None:
        new |= (torch.sign(gates.detach()) * torch.sign(previous.detach())) < 0
    return new


def keep_mask(gates: Tensor, threshold: float) -> Tensor:
    """Channels that survive finalisation: ``|g| >= threshold`` (threshold 0 keeps every nonzero gate)."""
    values = gates.detach().abs()
    return values > 0 if threshold <= 0 else values >= threshold


def fold_scale(weight: Tensor, bias: Tensor | None, scale: Tensor) -> tuple[Tensor, Tensor | None]:
    """Fold a per-output-channel scale into the layer that produces the channel.

    For an affine per-channel output ``y_c = w_c * x + b_c`` (a Conv/Linear row, or BatchNorm's affine
    part), ``s_c * y_c = (s_c w_c) * x + s_c b_c``: scaling the weight row and the bias gives exactly the
    gated output (the oracle "folding beta into W keeps outputs unchanged").

    Args:
        weight: ``(C, ...)`` weight; dimension 0 indexes output channels.
        bias: ``(C,)`` bias or ``None``.
        scale: ``(C,)`` scale.

    Returns:
        the new ``(weight, bias)``.
    """
    s = scale.to(weight.dtype).reshape([-1] + [1] * (weight.dim() - 1))
    new_bias = None if bias is None else bias * scale.to(bias.dtype)
    return weight * s, new_bias


def zero_channels(weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Output channels (dimension 0) whose weight row and bias are exactly zero: a ``(C,)`` bool tensor."""
    zero = (weight.detach().reshape(weight.shape[0], -1) == 0).all(dim=1)
    if bias is not None:
        zero &= bias.detach() == 0
    return zero
