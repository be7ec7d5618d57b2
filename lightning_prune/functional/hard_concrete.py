"""Hard-concrete gates and the expected-L0 penalty.

Louizos, Welling & Kingma, "Learning Sparse Neural Networks through L0 Regularization", ICLR 2018,
arXiv:1712.01312; formulas as in AMLab-Amsterdam/L0_regularization ``l0_layers.py``. Every function is
element-wise over a tensor of ``log_alpha`` (one entry per gate).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "GAMMA",
    "ZETA",
    "expected_l0",
    "hard_concrete_gate",
    "hard_concrete_mean",
    "hard_concrete_sample",
    "hard_sigmoid_l0",
    "log_alpha_from_droprate",
]

GAMMA, ZETA = -0.1, 1.1  # the stretch interval (gamma, zeta) of the paper
_EPS = 1e-6


def hard_concrete_sample(log_alpha: Tensor, beta: float = 2 / 3, gamma: float = GAMMA, zeta: float = ZETA,
                         generator: torch.Generator | None = None) -> Tensor:
    """Reparameterised sample ``z ~ HardConcrete(log_alpha, beta)`` (training-time gate).

    ``u ~ U(1e-6, 1 - 1e-6)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
    ``z = min(1, max(0, s (zeta - gamma) + gamma))``; differentiable in ``log_alpha``.
    """
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device, dtype=log_alpha.dtype)
    u = u * (1 - 2 * _EPS) + _EPS
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0)


def expected_l0(log_alpha: Tensor, beta: float = 2 / 3, gamma: float = GAMMA, zeta: float = ZETA) -> Tensor:
    """``P(z > 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))`` per gate, clamped to [1e-6, 1 - 1e-6]."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta)).clamp(_EPS, 1 - _EPS)


def hard_sigmoid_l0(log_alpha: Tensor, beta: float = 2 / 3, gamma: float = GAMMA,
                    zeta: float = ZETA) -> Tensor:
    """The hard-sigmoid penalty: the sigmoid of :func:`expected_l0` replaced by a hard sigmoid.

    The variant of the Habr article «Редукция нейронных сетей при помощи вариационной оптимизации» ("Reducing
    neural networks with variational optimisation", in Russian): linear on [-4, 4]
    (``clamp((x + 4) / 8, 0, 1)``); pair it with ``log_alpha`` clipped to [-4, 4]."""
    x = log_alpha - beta * math.log(-gamma / zeta)
    return torch.clamp((x + 4.0) / 8.0, 0.0, 1.0)


def hard_concrete_gate(log_alpha: Tensor, gamma: float = GAMMA, zeta: float = ZETA) -> Tensor:
    """The deterministic test-time gate (paper eq. 13).

    ``min(1, max(0, sigmoid(log_alpha)(zeta - gamma) + gamma))``.
    """
    return torch.clamp(torch.sigmoid(log_alpha) * (zeta - gamma) + gamma, 0.0, 1.0)


def hard_concrete_mean(log_alpha: Tensor, beta: float = 2 / 3, gamma: float = GAMMA, zeta: float = ZETA,
                       samples: int = 10000, generator: torch.Generator | None = None) -> Tensor:
    """Monte Carlo ``E[z]`` per gate (no closed form), from ``samples`` draws."""
    draws = hard_concrete_sample(log_alpha.expand(samples, *log_alpha.shape), beta, gamma, zeta, generator)
    return draws.mean(dim=0)


def log_alpha_from_droprate(droprate: float) -> float:
    """The paper's initial ``log_alpha = log(1 - p) - log(p)`` for drop rate ``p`` (0.5 -> 0, 0.3 -> 0.85)."""
    if not 0.0 < droprate < 1.0:
        raise ValueError(f"droprate must be in (0, 1), got {droprate}")
    return math.log(1 - droprate) - math.log(droprate)
