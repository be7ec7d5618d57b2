"""2:4 semi-structured sparse Linear layers on NVIDIA GPUs (Ampere and newer).

A Linear weight with at most 2 non-zeros in every block of 4 input weights -- what
``GradualMagnitudePruning(pattern="2:4")`` trains -- runs on the sparse tensor cores of a GPU of compute
capability 8.0 or newer once it is a ``torch.sparse.SparseSemiStructuredTensor`` (Mishra et al.,
"Accelerating Sparse Deep Neural Networks", 2021, arXiv:2104.08378; PyTorch's
``torch.sparse.to_sparse_semi_structured``, cuSPARSELt or CUTLASS kernels). :func:`semi_structured_plan` says,
on any machine, which Linear layers qualify and why the others do not; :func:`to_semi_structured` converts
them on the GPU.

Example::

    model = model.half().cuda().eval()
    converted = lp.to_semi_structured(model)   # {"blocks.0.mlp.fc1": "cusparselt", ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.core.targets import as_patterns, matches
from lightning_prune.errors import CompressionError, InvalidArgumentError, UnsupportedDeviceError
from lightning_prune.functional.nm import nm_violations

__all__ = ["MIN_CAPABILITY", "semi_structured_plan", "to_semi_structured"]

#: the compute capability of the first GPUs with sparse tensor cores (Ampere, e.g. A100)
MIN_CAPABILITY = (8, 0)


def _backend_class(backend: str) -> Any:
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    return SparseSemiStructuredTensorCUTLASS if backend == "cutlass" else SparseSemiStructuredTensorCUSPARSELT


def _resolve_backend(backend: str) -> str:
    if backend not in ("auto", "cusparselt", "cutlass"):
        raise InvalidArgumentError(
            f"`backend` must be one of ['auto', 'cusparselt', 'cutlass'], got {backend!r}.")
    if backend != "auto":
        return backend
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return "cusparselt" if cusparselt is not None and cusparselt.is_available() else "cutlass"


def _reason(weight: Tensor, backend: str) -> str | None:
    """Why ``weight`` cannot become a semi-structured tensor with ``backend`` (None: it can)."""
    constraints = _backend_class(backend)._DTYPE_SHAPE_CONSTRAINTS
    if weight.dtype not in constraints:
        names = ", ".join(str(d).removeprefix("torch.") for d in constraints)
        return f"dtype {str(weight.dtype).removeprefix('torch.')} (the {backend} kernels take {names})"
    limits = constraints[weight.dtype]
    rows, cols = weight.shape
    if rows % limits.sparse_min_rows or cols % limits.sparse_min_cols:
        return (f"shape {rows}x{cols}: rows must be a multiple of {limits.sparse_min_rows} and columns of"
                f" {limits.sparse_min_cols} ({str(weight.dtype).removeprefix('torch.')}, {backend})")
    violations = nm_violations(weight, 2, 4)
    if violations:
        return (f"not 2:4 sparse: {violations} blocks of 4 input weights hold more than 2 non-zeros"
                " (train with GradualMagnitudePruning(pattern='2:4'))")
    return None


def semi_structured_plan(model: nn.Module, include: str | Sequence[str] | None = None,
                         exclude: str | Sequence[str] | None = None, backend: str = "auto"
                         ) -> dict[str, str | None]:
    """For every ``nn.Linear`` of ``model`` (narrowed by ``include``/``exclude`` globs over module names):
    ``None`` if :func:`to_semi_structured` converts it, else why not (dtype, shape, not 2:4). Runs anywhere;
    ``backend="auto"`` means cuSPARSELt when this PyTorch has it, else CUTLASS.

    Example::

        >>> plan = semi_structured_plan(nn.Sequential(nn.Linear(64, 32)), backend="cutlass")
        >>> plan["0"].startswith("not 2:4 sparse")
        True
    """
    backend = _resolve_backend(backend)
    includes, excludes = as_patterns(include), as_patterns(exclude)
    plan: dict[str, str | None] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (includes and not matches(name, includes)):
            continue
        if excludes and matches(name, excludes):
            continue
        if isinstance(module.weight, torch.sparse.SparseSemiStructuredTensor):
            plan[name] = "already semi-structured"
            continue
        plan[name] = _reason(module.weight.detach(), backend)
    return plan


def _check_device(model: nn.Module) -> torch.device:
    if not torch.cuda.is_available():
        raise UnsupportedDeviceError(
            "to_semi_structured needs a CUDA GPU of compute capability >= 8.0 (Ampere or newer: A100, H100,"
            " RTX 30xx/40xx) for 2:4 sparse tensor cores, and this machine has none"
            " (torch.cuda.is_available() is False). HINT: prune with GradualMagnitudePruning(pattern='2:4')"
            " anywhere, save it (lp.save_sparse), and convert on the GPU you deploy to; on a CPU the 2:4"
            " model runs as a dense one.")
    param = next(iter(model.parameters()), None)
    if param is None or param.device.type != "cuda":
        raise UnsupportedDeviceError(
            f"The model is on {param.device if param is not None else 'no device'}, not on the GPU."
            " HINT: model.half().cuda().eval() first (semi-structured kernels take float16, bfloat16, int8"
            " and, with CUTLASS, float32).")
    capability = torch.cuda.get_device_capability(param.device)
    if tuple(capability) < MIN_CAPABILITY:
        raise UnsupportedDeviceError(
            f"{torch.cuda.get_device_name(param.device)} has compute capability"
            f" {capability[0]}.{capability[1]}; 2:4 sparse tensor cores need"
            f" {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ampere: A100, RTX 30xx; Hopper: H100)."
            " HINT: the 2:4 model still runs there, dense.")
    return param.device


@torch.no_grad()
def to_semi_structured(model: nn.Module, include: str | Sequence[str] | None = None,
                       exclude: str | Sequence[str] | None = None, backend: str = "auto",
                       example_inputs: Any = None, rtol: float = 1e-2) -> dict[str, str]:
    """Replace the weight of every eligible ``nn.Linear`` (see :func:`semi_structured_plan`) by a
    ``torch.sparse.SparseSemiStructuredTensor``, in place, for inference on the sparse tensor cores.

    Args:
        model: on a CUDA GPU of compute capability >= 8.0, in a dtype the kernels take (``model.half()``).
        include, exclude: globs over module names narrowing the Linear layers considered.
        backend: ``"auto"`` (cuSPARSELt when available, else CUTLASS), ``"cusparselt"`` or ``"cutlass"``.
        example_inputs: if given, the outputs before and after are compared (``rtol`` relative to the largest
            output); a difference raises.
        rtol: that tolerance (half-precision kernels accumulate differently).

    Returns:
        ``{module name: backend}`` of the converted layers (the others keep dense weights).

    Raises:
        UnsupportedDeviceError: no CUDA GPU, the model is not on it, or its compute capability is below 8.0.
        InvalidArgumentError: nothing eligible (the message lists why per layer), or a bad ``backend``.
        CompressionError: the outputs changed beyond ``rtol``.
    """
    device = _check_device(model)
    resolved = _resolve_backend(backend)
    plan = semi_structured_plan(model, include, exclude, resolved)
    eligible = [name for name, why in plan.items() if why is None]
    if not eligible:
        shown = "; ".join(f"{n}: {why}" for n, why in list(plan.items())[:6]) or "the model has no nn.Linear"
        raise InvalidArgumentError(f"No Linear layer can become 2:4 semi-structured: {shown}.")
    reference = _call(model, example_inputs) if example_inputs is not None else None
    cls = _backend_class(resolved)
    for name in eligible:
        linear = model.get_submodule(name)
        sparse = cls.from_dense(linear.weight.detach().to(device).contiguous())
        linear.weight = nn.Parameter(sparse, requires_grad=False)
    if reference is not None:
        after = _call(model, example_inputs)
        error = float((after.float() - reference.float()).abs().max() / reference.float().abs().max()
                      .clamp_min(1e-12))
        if error > rtol:
            raise CompressionError(
                f"After the semi-structured conversion the outputs differ by {error:.3g} relative (> {rtol})."
                " HINT: check the dtype; float16 accumulates differently, a larger `rtol` may be right.")
    return dict.fromkeys(eligible, resolved)


def _call(model: nn.Module, example: Any) -> Tensor:
    out = model(*example) if isinstance(example, (tuple, list)) else model(example)
    return out if isinstance(out, Tensor) else out[0]
