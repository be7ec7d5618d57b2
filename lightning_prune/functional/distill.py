"""Knowledge-distillation losses: pure functions of logits and features.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015, arXiv:1503.02531 (soft targets
at temperature ``T``, the loss scaled by ``T²`` so that its gradients keep their size as ``T`` changes);
Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, arXiv:1412.6550 (matching intermediate
features).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_prune.errors import InvalidArgumentError

__all__ = ["at_least_float32", "distillation_loss", "feature_matching_loss", "logit_rows", "output_logits",
           "top1_agreement"]


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32, or in its own dtype when that is wider (a float64 model keeps float64 terms).

    Example::

        >>> at_least_float32(torch.ones(1, dtype=torch.bfloat16)).dtype
        torch.float32
        >>> at_least_float32(torch.ones(1, dtype=torch.float64)).dtype
        torch.float64
    """
    return x.to(torch.promote_types(x.dtype, torch.float32))


def logit_rows(logits: Tensor) -> Tensor:
    """The logits as ``(rows, classes)``: classes are the last dimension, every other dimension is a row (a
    classifier's ``(N, C)`` stays as it is, a language model's ``(N, L, C)`` becomes ``(N * L, C)``)."""
    if logits.dim() == 0:
        raise InvalidArgumentError("logits must have a class dimension, got a scalar tensor.")
    return logits.reshape(-1, logits.shape[-1]) if logits.dim() != 2 else logits


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                      alpha: float = 1.0) -> Tensor:
    """``alpha * T² * KL(softmax(teacher / T) ‖ softmax(student / T))``, averaged over rows, in float32
    (float64 for float64 logits).

    The same value as ``alpha * T**2 * F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1),
    reduction="batchmean")``; its gradient with respect to the student's logits is
    ``alpha * T * (softmax(s / T) - softmax(t / T)) / rows``.

    Example::

        >>> s = torch.tensor([[2.0, 0.0, -1.0]]); t = torch.tensor([[1.0, 0.5, -1.0]])
        >>> round(float(distillation_loss(s, t, temperature=2.0)), 6)
        0.232907
        >>> float(distillation_loss(t, t, temperature=4.0))
        0.0
    """
    s = at_least_float32(logit_rows(student_logits)) / temperature
    t = at_least_float32(logit_rows(teacher_logits)) / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)
    return alpha * temperature**2 * kl


def feature_matching_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Mean squared difference of two feature tensors of the same shape, in float32 or wider (FitNets' hint
    loss).

    Example::

        >>> float(feature_matching_loss(torch.ones(2, 3), torch.zeros(2, 3)))
        1.0
    """
    return F.mse_loss(at_least_float32(student_features), at_least_float32(teacher_features))


@torch.no_grad()
def top1_agreement(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Fraction of rows whose top-1 class is the same for student and teacher.

    Example::

        >>> s, t = torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([[3.0, 0.0], [2.0, 1.0]])
        >>> float(top1_agreement(s, t))
        0.5
    """
    s, t = logit_rows(student_logits), logit_rows(teacher_logits)
    return (s.argmax(dim=-1) == t.argmax(dim=-1)).float().mean()


def output_logits(output: Any) -> tuple[Tensor | None, Callable[[Tensor], Any]]:
    """The logits in a module's output -- the tensor itself, the first element of a tuple/list, or the
    ``"logits"`` entry of a mapping -- and a function that returns the output with that tensor replaced
    (``None`` and the identity when there is none).

    Example::

        >>> logits, put = output_logits((torch.zeros(2, 3), "aux"))
        >>> logits.shape, put(torch.ones(2, 3))[1]
        (torch.Size([2, 3]), 'aux')
    """
    if isinstance(output, Tensor):
        return output, lambda new: new
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        if hasattr(output, "_fields"):  # a namedtuple
            return output[0], lambda new: type(output)(new, *output[1:])
        return output[0], lambda new: type(output)([new, *output[1:]])
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        def put(new: Tensor) -> Any:
            replaced = copy.copy(output)
            replaced["logits"] = new  # type: ignore[index]
            return replaced

        return output["logits"], put
    return None, lambda new: output
