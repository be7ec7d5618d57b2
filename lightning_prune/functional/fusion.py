"""Linear fusion formulas: conv+BN folding, conv∘conv composition and identity kernels.

The formulas of VanillaNet (Chen et al., "VanillaNet: the Power of Minimalism in Deep Learning", 2023,
arXiv:2305.12972; ``huawei-noah/VanillaNet`` ``models/vanillanet.py``), RepVGG (Ding et al., "RepVGG: Making
VGG-style ConvNets Great Again", 2021, arXiv:2101.03697) and DiverseBranchBlock (Ding et al., 2021,
arXiv:2103.13425, ``transIII_1x1_kxk``).

Every function is a pure function of tensors: a weight ``(out, in/groups, kh, kw)`` for a conv or
``(out, in)`` for a linear layer, and a bias ``(out,)`` or ``None`` (zero). Which compositions are exact:

========================  =========================================================================
``fuse_conv_1x1``         any conv (any stride, padding, groups) then a 1×1 conv (stride 1, no padding),
                          or linear then linear: always exact.
``fuse_1x1_kxk``          1×1 conv (stride 1) then k×k conv: exact only when the k×k conv has no
                          padding; zero padding leaves a border error (the padded map should hold b1).
``fuse_kxk_kxk``          k1×k1 conv (stride 1, no padding) then k2×k2 conv (no padding): exact for
                          valid convs; with "same" padding only the interior matches.
``identity_kernel``       the identity (a residual ``+ x``) as a k×k kernel, RepVGG style.
========================  =========================================================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "expand_groups",
    "fold_bn",
    "fuse_1x1_kxk",
    "fuse_conv_1x1",
    "fuse_kxk_kxk",
    "identity_kernel",
    "pad_kernel",
]


def _bias(bias: Tensor | None, weight: Tensor) -> Tensor:
    return torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if bias is None else bias


def fold_bn(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the conv/linear layer before it.

    ``t = gamma / sqrt(var + eps)``, ``W' = W * t`` (per output channel), ``b' = beta + (b - mean) * t``.

    Example::

        >>> w, b = fold_bn(torch.ones(2, 1, 1, 1), None, torch.zeros(2), torch.ones(2), None, None, 0.0)
        >>> w.flatten().tolist(), b.tolist()
        ([1.0, 1.0], [0.0, 0.0])
    """
    gamma = torch.ones_like(running_var) if gamma is None else gamma
    beta = torch.zeros_like(running_mean) if beta is None else beta
    t = gamma / torch.sqrt(running_var + eps)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight * t.reshape(shape), beta + (_bias(bias, weight) - running_mean) * t


def expand_groups(weight: Tensor, groups: int) -> Tensor:
    """The dense ``(out, in, kh, kw)`` weight of a grouped conv (zeros between groups)."""
    if groups == 1:
        return weight
    out_ch, in_per_group = weight.shape[:2]
    out_per_group = out_ch // groups
    dense = weight.new_zeros((out_ch, in_per_group * groups, *weight.shape[2:]))
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        dense[rows, g * in_per_group:(g + 1) * in_per_group] = weight[rows]
    return dense


def fuse_conv_1x1(w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> tuple[Tensor, Tensor]:
    """Any conv ``(w1, b1)`` followed by a 1×1 conv ``(w2, b2)``, or linear followed by linear.

    ``W = einsum('om,mihw->oihw', W2[:, :, 0, 0], W1)``, ``b = W2 b1 + b2``. Exact for any stride, padding
    and groups of the first conv (expand grouped weights with :func:`expand_groups` first); the result has
    the first conv's geometry.
    """
    m2 = w2.reshape(w2.shape[0], w2.shape[1])
    if w1.shape[0] != m2.shape[1]:
        raise ValueError(f"channel mismatch: first layer has {w1.shape[0]} outputs, second expects"
                         f" {m2.shape[1]}")
    weight = torch.einsum("om,mi...->oi...", m2, w1)
    return weight, m2 @ _bias(b1, w1) + _bias(b2, w2)


def fuse_1x1_kxk(w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> tuple[Tensor, Tensor]:
    """A 1×1 conv (stride 1) followed by a k×k conv: DiverseBranchBlock's ``transIII_1x1_kxk``.

    ``K = conv2d(W2, W1.permute(1, 0, 2, 3))``, ``b = sum_{m,h,w} W2[o, m, h, w] b1[m] + b2``. Exact only when
    the k×k conv has no padding (its zero padding of the intermediate map would have to hold ``b1``).
    """
    if w1.shape[-2:] != (1, 1):
        raise ValueError(f"the first conv must be 1x1, got kernel {tuple(w1.shape[-2:])}")
    kernel = F.conv2d(w2, w1.permute(1, 0, 2, 3))
    bias = (w2 * _bias(b1, w1)[None, :, None, None]).sum((1, 2, 3)) + _bias(b2, w2)
    return kernel, bias


def fuse_kxk_kxk(w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> tuple[Tensor, Tensor]:
    """A k1×k1 conv (stride 1) followed by a k2×k2 conv: one (k1+k2-1)² conv.

    ``M = conv2d(W1.permute(1, 0, 2, 3), W2.flip(2, 3), padding=k2 - 1).permute(1, 0, 2, 3)``,
    ``b = b2 + W2.sum((2, 3)) b1``. Exact for valid (unpadded) convs; with "same" zero padding only the
    interior matches.
    """
    k2h, k2w = w2.shape[-2:]
    kernel = F.conv2d(w1.permute(1, 0, 2, 3), w2.flip(2, 3), padding=(k2h - 1, k2w - 1)).permute(1, 0, 2, 3)
    bias = w2.sum((2, 3)) @ _bias(b1, w1) + _bias(b2, w2)
    return kernel, bias


def identity_kernel(channels: int, kernel_size: int = 3, groups: int = 1, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> Tensor:
    """The identity map as a ``(channels, channels/groups, k, k)`` kernel.

    ``K[i, i % (C/g), k//2, k//2] = 1``.

    Adding it to a stride-1, "same"-padded conv kernel folds a residual ``+ x`` into the conv (RepVGG).
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"`kernel_size` must be odd for a centred identity, got {kernel_size}")
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size, dtype=dtype, device=device)
    idx = torch.arange(channels, device=device)
    kernel[idx, idx % per_group, kernel_size // 2, kernel_size // 2] = 1
    return kernel


def pad_kernel(weight: Tensor, kernel_size: int) -> Tensor:
    """Zero-pad a smaller odd kernel (e.g. 1×1) to ``kernel_size`` × ``kernel_size``, centred."""
    pad_h, pad_w = (kernel_size - weight.shape[-2]) // 2, (kernel_size - weight.shape[-1]) // 2
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"kernel {tuple(weight.shape[-2:])} is larger than {kernel_size}")
    return F.pad(weight, (pad_w, pad_w, pad_h, pad_h))
