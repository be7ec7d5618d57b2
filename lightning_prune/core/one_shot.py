"""One-shot pruning of a trained model from a few calibration batches, without Lightning.

Four methods, each layer by layer (the inputs of one layer at a time are summarised by forward hooks; nothing
but that layer's statistics is kept in memory), each layer seeing the outputs of the layers pruned before it:

- ``"magnitude"``: the smallest ``|W|`` of every layer (the baseline; needs no data).
- ``"wanda"``: Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", 2023,
  arXiv:2306.11695: score ``|W_ij| * ||X_j||_2`` (``X_j``: input feature ``j`` over every calibration token,
  every spatial position of a conv), compared **per output row**; no weight update.
- ``"sparsegpt"``: Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
  One-Shot", 2023, arXiv:2301.00774: the layer's Hessian ``H = 2 X X^T / n`` (float64), damped by
  ``damping * mean(diag H)``, the upper Cholesky factor ``U`` of ``H^-1``; columns are processed left to
  right, the mask of every block of ``block_size`` columns chosen at the block's start by
  ``w^2 / U_jj^2`` (N:M: per block of ``M`` at its first column), and every pruned weight's error is spread
  over the columns to its right (optimal brain surgeon), with lazy batch updates.
- ``"channels"``: structured. Every exactly removable channel group of the model
  (:func:`lightning_prune.graph.analyse_channels`) is scored by its units' contribution to the layers that
  read them (``E[x_c^2] * ||W[:, c]||^2`` summed over the reading layers, normalised per group); the lowest
  units across groups go until ``target_flops``/``target_params`` is met (counted by torch-pruning on the
  sliced model). ``importance=`` ranks by another criterion instead, e.g. ``"taylor"`` (``|sum w * dL/dw|``
  per unit, the gradients of ``loss_fn`` summed over the calibration batches). With ``compensate=True``
  every reading Linear/Conv is then refit by least squares on the calibration activations:
  ``[W_K, b] = [W, b] A[:, K] (A[K, K] + λI)^-1`` with ``A = E[x x^T]`` of its input augmented by a constant
  (FLAP / "least-squares compensation"), so the kept channels (and the bias) absorb what the removed ones
  contributed.

Sharded models (FSDP2's ``fully_shard``: ``DTensor`` parameters; the weight methods only): every forward runs
to the end on every rank (a forward is a collective), the statistics are summed over the ranks by ``reduce``
as under DDP, each layer's weight is gathered whole (one layer at a time) for its mask and update, and every
rank keeps its shard of the result and of the mask: the unsharded result, bit for bit.

Unstructured and N:M sparsity are reached **per layer** (every targeted layer at ``target_sparsity``, as the
papers do). N:M blocks run along the input dimension, as everywhere in lightning-prune
(:mod:`lightning_prune.functional.nm`).

Example::

    result = prune_one_shot(model, loader, method="sparsegpt", target_sparsity=0.5)
    result = prune_one_shot(model, loader, method="wanda", pattern="2:4")
    result = prune_one_shot(model, loader, method="channels", target_flops=0.5)   # units removed
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune.core.sharding import is_sharded, local_slice, local_tensor, reshard
from lightning_prune.core.targets import PRUNABLE_TYPES, Target, resolve_targets
from lightning_prune.errors import InvalidArgumentError
from lightning_prune.functional.nm import nm_mask, parse_pattern

__all__ = [
    "METHODS",
    "OneShotResult",
    "channel_plan",
    "layer_hessian",
    "magnitude_mask",
    "one_shot_latency_model",
    "prune_one_shot",
    "reconstruction_error",
    "refit_least_squares",
    "sharded_model",
    "sparsegpt_prune",
    "wanda_mask",
    "wanda_scores",
]

METHODS = ("magnitude", "wanda", "sparsegpt", "channels")
#: relative damping of the least-squares refit (ridge): ``damping * mean(diag A[K, K])`` on the diagonal
REFIT_DAMPING = 0.01

Reduce = Callable[[Tensor], Tensor]
LossFn = Callable[[nn.Module, Any], Any]
Progress = Callable[[int, int, str, float], None]


@dataclass
class OneShotResult:
    """What :func:`prune_one_shot` did.

    Attributes:
        method: the method.
        masks: parameter name -> boolean mask (``True`` = kept) of every pruned weight (unstructured, N:M, and
            the channel masks before compression).
        removed: channel group name -> removed units (``method="channels"``).
        groups: the channel groups (``method="channels"``).
        errors: layer name -> relative reconstruction error of its output on the calibration inputs,
            ``||(W - W') X||^2 / ||W X||^2``.
        sparsity: fraction of the targeted weights that are zero (unstructured / N:M).
        flops_remaining, params_remaining: of the dense model (``method="channels"``; 1.0 otherwise).
        latency_remaining, latency_predicted: with ``target_latency``, the latency of the compressed model as
            a fraction of the dense one's, measured (``None`` when the latency model does not measure) and
            predicted by the latency table.
    """

    method: str
    masks: dict[str, Tensor] = field(default_factory=dict)
    removed: dict[str, list[int]] = field(default_factory=dict)
    groups: list[Any] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)
    sparsity: float = 0.0
    flops_remaining: float = 1.0
    params_remaining: float = 1.0
    latency_remaining: float | None = None
    latency_predicted: float | None = None


# ---------------------------------------------------------------------------------------------- inputs
def model_input(batch: Any) -> Any:
    """What the model is called with for a loader's ``batch``: a tensor itself, the first element of a
    tuple/list (``(x, y)``), a dict's ``"x"``/``"image"``/``"input"``/``"pixel_values"`` entry."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        for key in ("x", "image", "images", "input", "inputs", "pixel_values"):
            if key in batch:
                return batch[key]
    raise InvalidArgumentError(
        f"Cannot tell the model's input in a calibration batch of type {type(batch).__name__}."
        " HINT: the loader yields a tensor, an (x, y) tuple or a dict with an 'x'/'image'/'input' entry;"
        " otherwise pass `forward=lambda model, batch: model(...)`.")


def _to_model(value: Any, model: nn.Module) -> Any:
    param = next(iter(model.parameters()), None)
    if param is None:
        return value
    if isinstance(value, Tensor):
        value = value.to(param.device)
        return value.to(param.dtype) if value.is_floating_point() and param.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_model(v, model) for v in value)
    if isinstance(value, Mapping):
        return {k: _to_model(v, model) for k, v in value.items()}
    return value


def default_forward(model: nn.Module, batch: Any) -> Any:
    x = _to_model(model_input(batch), model)
    return model(**x) if isinstance(x, Mapping) else model(x)


def draw_batches(loader: Iterable[Any] | None, count: int, who: str = "prune_one_shot") -> list[Any]:
    """The first ``count`` batches of ``loader``, with torch's, Python's and NumPy's random states left as
    they were (a shuffling sampler draws its seed from them)."""
    if loader is None:
        raise InvalidArgumentError(
            f"{who} needs calibration data: no loader was given. HINT: pass the training DataLoader (a few"
            " batches of it are enough), or method='magnitude', which needs none.")
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()), None)
    elif isinstance(loader, (list, tuple)) and loader and not isinstance(loader[0], (Tensor, list, tuple)):
        loader = loader[0]  # several loaders: the first
    py_state = random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover
        np, np_state = None, None
    # the CUDA generator of the current device only where CUDA is already in use: forking every visible GPU
    # would create a context on each of them on every DDP rank
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            batches = list(itertools.islice(iter(loader), count))  # type: ignore[arg-type]
    finally:
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)
    if not batches:
        raise InvalidArgumentError(
            f"{who}: the calibration loader yielded no batch. HINT: check the data set is not empty.")
    if len(batches) < count:
        raise InvalidArgumentError(
            f"`calibration_batches` ({count}) is more than the {len(batches)} batches the loader has."
            f" HINT: calibration_batches={len(batches)}, or a smaller batch size.")
    return batches


def _column_norms(weight: Tensor) -> Tensor:
    """Per input column (dim 1) of a reader's weight, its squared norm in float64."""
    w = weight.detach().to(torch.float64)
    return (w ** 2).transpose(0, 1).reshape(w.shape[1], -1).sum(1)


def _reader_weight(root: nn.Module, name: str) -> Tensor:
    """The weight ``name`` of ``root`` as its layer uses it: the weight a weight-standardised conv or a
    ``weight_norm`` Linear computes from its parameters (:func:`lightning_prune.graph.effective_weight`)."""
    from lightning_prune.graph import effective_weight

    owner, _, pname = name.rpartition(".")
    if pname == "weight":
        return effective_weight(root.get_submodule(owner))
    return root.get_parameter(name)


def _strip(name: str, prefix: str) -> str:
    """``name`` relative to the module at ``prefix`` (group names are full names in the LightningModule)."""
    if prefix and name.startswith(prefix + "."):
        return name[len(prefix) + 1:]
    return "" if name == prefix else name


class _Stop(Exception):
    """Raised by a hook once the layer's input was seen: the rest of the forward is not needed."""


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    from lightning_prune.graph import evaluating

    with evaluating(model):  # (every module's mode kept)
        yield


def sharded_model(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` shard (FSDP2)."""
    return any(is_sharded(p) for p in model.parameters())


def _run(model: nn.Module, batches: Sequence[Any], forward: Callable[[nn.Module, Any], Any]) -> None:
    sharded = sharded_model(model)
    if sharded:  # gather the shards as written now, not a unit's copy still gathered from before
        reshard(model)
    with torch.no_grad(), _eval(model):
        for batch in batches:
            try:
                forward(model, batch)
            except _Stop:
                pass
    if sharded:  # (FSDP2 keeps the root unit gathered after a forward: its parameters back to the shards)
        reshard(model)


def _whole(param: Tensor) -> Tensor:
    """``param`` whole (a ``DTensor`` gathered: a collective on every rank), detached."""
    return (param.full_tensor() if is_sharded(param) else param).detach()  # type: ignore[attr-defined]


@torch.no_grad()
def _write(param: Tensor, value: Tensor) -> None:
    """``param = value`` (the whole tensor); a sharded parameter keeps its part."""
    local = local_tensor(param)
    local.copy_(local_slice(value.to(device=local.device, dtype=local.dtype), param))


# ---------------------------------------------------------------------------------------------- layer maths
def _check_layer(module: nn.Module, name: str) -> None:
    if isinstance(module, nn.Conv3d) or not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        raise InvalidArgumentError(
            f"One-shot pruning handles Linear, Conv1d and Conv2d layers; {name!r} is a"
            f" {type(module).__name__}. HINT: exclude=[{name!r}].")


def layer_columns(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as a ``(groups, n, columns)`` matrix whose columns are those of the flattened weight
    ``(out, in/groups * kernel)`` of each conv group: a Linear's features, a conv's unfolded patches."""
    if isinstance(module, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    conv1d = isinstance(module, nn.Conv1d)
    if conv1d:
        x = x.unsqueeze(-2)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pad = module._reversed_padding_repeated_twice
    if conv1d:
        pad = [pad[0], pad[1], 0, 0]
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    kernel = (1, *module.kernel_size) if conv1d else module.kernel_size
    dilation = (1, *module.dilation) if conv1d else module.dilation
    stride = (1, *module.stride) if conv1d else module.stride
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, C * kk, L)
    groups = module.groups
    n, d, length = cols.shape
    cols = cols.reshape(n, groups, d // groups, length).permute(1, 0, 3, 2)  # (G, N, L, d/G)
    return cols.reshape(groups, n * length, d // groups)


class _HessianHook:
    """Accumulates ``sum_x x x^T`` (float64) of one layer's input columns, then stops the forward."""

    def __init__(self, module: nn.Module, augment: bool = False, stop: bool = True) -> None:
        self.module, self.augment, self.stop = module, augment, stop
        self.hessian: Tensor | None = None
        self.count = 0

    def __call__(self, module: nn.Module, args: Any) -> None:
        cols = layer_columns(module, args[0].detach()).to(torch.float64)
        if self.augment:
            cols = torch.cat([cols, cols.new_ones(*cols.shape[:-1], 1)], dim=-1)
        h = cols.transpose(1, 2) @ cols
        self.hessian = h if self.hessian is None else self.hessian + h
        self.count += cols.shape[1]
        if self.stop:
            raise _Stop


def layer_hessian(model: nn.Module, module: nn.Module, batches: Sequence[Any],
                  forward: Callable[[nn.Module, Any], Any] = default_forward, reduce: Reduce | None = None,
                  augment: bool = False) -> tuple[Tensor, int]:
    """``(sum_x x x^T, n)`` of ``module``'s input columns over the calibration ``batches`` (float64, shape
    ``(groups, d, d)``; with ``augment`` a constant 1 is the last column), summed over ranks by ``reduce``.

    The forward stops right after ``module`` has seen its input (sharded models: it runs to the end, every
    rank's forward being a collective of all ranks)."""
    hook = _HessianHook(module, augment, stop=not sharded_model(model))
    handle = module.register_forward_pre_hook(hook)
    try:
        _run(model, batches, forward)
    finally:
        handle.remove()
    if hook.hessian is None:
        raise InvalidArgumentError(
            f"{type(module).__name__} layer was never called by the model's forward on the calibration"
            " batches. HINT: exclude it, or pass `forward=` calling the model as in training.")
    hessian, count = hook.hessian, torch.tensor([float(hook.count)], dtype=torch.float64,
                                                device=hook.hessian.device)
    if reduce is not None:
        hessian, count = reduce(hessian), reduce(count)
    return hessian, int(count.item())


def _flat_weight(module: nn.Module) -> Tensor:
    """The weight as ``(groups, out/groups, columns)`` (float64)."""
    w = _whole(module.weight).to(torch.float64)
    groups = getattr(module, "groups", 1)
    return w.reshape(groups, w.shape[0] // groups, -1)


def reconstruction_error(w: Tensor, w_new: Tensor, hessian: Tensor) -> float:
    """``||(W - W') X||^2 / ||W X||^2`` from ``H = X^T X`` (``(G, R, d)`` weights, ``(G, d, d)`` Hessian)."""
    delta = w - w_new
    num = torch.einsum("grd,gde,gre->", delta, hessian, delta)
    den = torch.einsum("grd,gde,gre->", w, hessian, w)
    return float(num / den.clamp_min(1e-300))


def magnitude_mask(weight: Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> Tensor:
    """Keep the largest ``|W|`` of the layer (``round(numel (1 - s))`` of them), or of every N:M block."""
    score = weight.detach().abs().float()
    if nm is not None:
        return nm_mask(score, nm[0], nm[1])
    keep = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    k = round(score.numel() * (1.0 - sparsity))
    if k > 0:
        keep[score.reshape(-1).topk(k).indices] = True
    return keep.reshape(score.shape)


def wanda_scores(weight: Tensor, column_norms: Tensor) -> Tensor:
    """``|W_ij| * ||X_j||_2``, the flattened weight's columns (``(G, R, d)`` weight, ``(G, d)`` norms)."""
    return weight.abs() * column_norms.unsqueeze(1)


def wanda_mask(weight: Tensor, column_norms: Tensor, sparsity: float, nm: tuple[int, int] | None = None
               ) -> Tensor:
    """Wanda's mask of a module weight (its shape): per output row, the ``round(cols (1 - s))`` largest
    scores; with ``nm`` the N largest of every block of M inputs. ``column_norms``: ``(groups, columns)``."""
    groups = column_norms.shape[0]
    flat = weight.detach().to(column_norms.dtype).reshape(groups, weight.shape[0] // groups, -1)
    score = wanda_scores(flat, column_norms).reshape(weight.shape[0], -1)
    if nm is not None:
        return nm_mask(score.reshape(weight.shape), nm[0], nm[1])
    cols = score.shape[1]
    k = round(cols * (1.0 - sparsity))
    keep = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, score.topk(k, dim=1).indices, True)
    return keep.reshape(weight.shape)


def _nm_blocks(columns: int, kernel: int, m: int) -> dict[int, int]:
    """Column start -> length of every N:M block, in the column order of :func:`_kernel_major`."""
    channels = columns // kernel
    starts = {}
    for p in range(kernel):
        for j in range(0, channels, m):
            starts[p * channels + j] = min(m, channels - j)
    return starts


def _kernel_major(columns: int, kernel: int) -> Tensor:
    """The permutation that orders a conv's ``(channel, kernel position)`` columns by kernel position first,
    so that N:M blocks (consecutive input channels at one position) are consecutive columns."""
    channels = columns // kernel
    return torch.arange(columns).reshape(channels, kernel).t().reshape(-1)


@torch.no_grad()
def sparsegpt_prune(weight: Tensor, hessian: Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                    block_size: int = 128, damping: float = 0.01, kernel: int = 1) -> tuple[Tensor, Tensor]:
    """SparseGPT on one layer; returns ``(new weight, keep mask)`` (float64, ``(G, R, d)``).

    Args:
        weight: ``(groups, rows, columns)``.
        hessian: ``X^T X`` of the input columns, ``(groups, columns, columns)`` (any positive scale).
        sparsity: the fraction of every block of ``block_size`` columns pruned (unstructured).
        nm: ``(N, M)``: keep N of every M consecutive input channels instead.
        block_size: columns per lazy batch (and per mask selection).
        damping: ``damping * mean(diag H)`` is added to the diagonal.
        kernel: kernel positions per input channel (a conv's columns are ``(channel, position)``; N:M blocks
            run along channels at one position).
    """
    w = weight.to(torch.float64).clone()
    h = hessian.to(torch.float64).clone()
    groups, rows, cols = w.shape
    perm = _kernel_major(cols, kernel) if (nm is not None and kernel > 1) else None
    if perm is not None:
        w, h = w[:, :, perm], h[:, perm][:, :, perm]
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag == 0
    diag[dead] = 1.0
    # an input that never fired on the calibration data costs nothing to prune there: its weights score 0, so
    # they are pruned first (the paper's code zeroes them; w^2 / U_jj^2 would rank them above live weights)
    live = (~dead).to(w.dtype).unsqueeze(1)  # (G, 1, cols)
    diag += damping * diag.mean(dim=1, keepdim=True)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    prune = torch.zeros_like(w, dtype=torch.bool)
    blocks = _nm_blocks(cols, kernel if perm is not None else 1, nm[1]) if nm is not None else {}
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        w1 = w[:, :, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[:, i1:i2, i1:i2]
        d1 = torch.diagonal(u1, dim1=1, dim2=2)  # (G, count)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:
            score = (w1 ** 2 / d1.unsqueeze(1) ** 2 * live[:, :, i1:i2]).reshape(groups, -1)
            k = round(score.shape[1] * sparsity)
            if k > 0:
                flat = mask1.reshape(groups, -1)
                flat.scatter_(1, score.topk(k, dim=1, largest=False).indices, True)
        for i in range(count):
            col = i1 + i
            if nm is not None and col in blocks:
                length = blocks[col]
                drop = length - min(nm[0], length)
                if drop > 0:
                    score = (w1[:, :, i:i + length] ** 2 / d1[:, None, i:i + length] ** 2
                             * live[:, :, col:col + length])
                    idx = score.topk(drop, dim=2, largest=False).indices + i
                    mask1.scatter_(2, idx, True)
            wcol = w1[:, :, i]
            d = d1[:, i].unsqueeze(1)  # (G, 1)
            q = wcol.masked_fill(mask1[:, :, i], 0.0)
            q1[:, :, i] = q
            err = (wcol - q) / d
            w1[:, :, i:] -= err.unsqueeze(2) * u1[:, i, i:].unsqueeze(1)
            err1[:, :, i] = err
        w[:, :, i1:i2] = q1
        prune[:, :, i1:i2] = mask1
        w[:, :, i2:] -= err1 @ u[:, i1:i2, i2:]
    keep = ~prune
    if perm is not None:
        inverse = torch.argsort(perm)
        w, keep = w[:, :, inverse], keep[:, :, inverse]
    return w, keep


# ---------------------------------------------------------------------------------------------- unstructured
def _prune_layer(model: nn.Module, target: Target, method: str, batches: Sequence[Any], sparsity: float,
                 nm: tuple[int, int] | None, forward: Callable[[nn.Module, Any], Any], reduce: Reduce | None,
                 damping: float, block_size: int) -> tuple[Tensor, float]:
    """Prune one layer in place; returns its keep mask and relative reconstruction error (nan: no data).
    A sharded weight is gathered whole for the choice and keeps its part of the result; its mask is the
    local shard's part."""
    module, param = target.module, target.param
    if method == "magnitude" and not batches:
        keep = magnitude_mask(_whole(param), sparsity, nm)
        _write(param, _whole(param) * keep.to(param.dtype))
        return local_slice(keep, param), float("nan")
    _check_layer(module, target.module_name)
    hessian, _ = layer_hessian(model, module, batches, forward, reduce)
    param = target.param  # (after the forwards: the sharded parameter again)
    w = _flat_weight(module)
    if method == "sparsegpt":
        kernel = w.shape[2] // (param.shape[1])
        new, keep_flat = sparsegpt_prune(w, hessian, sparsity, nm, block_size, damping, kernel)
        keep = keep_flat.reshape(param.shape)
    else:
        if method == "wanda":
            norms = torch.diagonal(hessian, dim1=1, dim2=2).clamp_min(0).sqrt()
            keep = wanda_mask(w.reshape(param.shape), norms, sparsity, nm)
        else:
            keep = magnitude_mask(w.reshape(param.shape), sparsity, nm)
        new = w * keep.reshape(w.shape).to(w.dtype)
    error = reconstruction_error(w, new, hessian)
    keep = keep.to(local_tensor(param).device)
    _write(param, new.reshape(param.shape).to(param.dtype) * keep.to(param.dtype))
    return local_slice(keep, param), error


# ---------------------------------------------------------------------------------------------- channels
def _channel_scores(model: nn.Module, root: nn.Module, prefix: str, groups: Sequence[Any],
                    batches: Sequence[Any], forward: Callable[[nn.Module, Any], Any],
                    reduce: Reduce | None) -> list[Tensor]:
    """Per group, each unit's contribution to the layers that read it: ``sum E[x_c^2] ||W[:, c]||^2``, the
    group's scores divided by their mean (so that groups compare)."""
    sites: dict[str, tuple[nn.Module, int]] = {}
    readers: dict[str, set[str]] = {}  # the weights that read a site's input (an LSTM's two directions)
    for group in groups:
        for site in group.input_sites():
            sites.setdefault(site.module, (root.get_submodule(_strip(site.module, prefix)), site.dim))
            readers.setdefault(site.module, set()).add(_strip(site.weight_name, prefix))
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, (module, dim) in sites.items():
        def hook(m: nn.Module, args: Any, name: str = name, dim: int = dim) -> None:
            x = args[0].detach().to(torch.float64)
            moved = x.movedim(dim % x.dim(), -1).reshape(-1, x.shape[dim])
            sq = (moved ** 2).sum(0)
            sums[name] = sums[name] + sq if name in sums else sq
            counts[name] = counts.get(name, 0) + moved.shape[0]
        handles.append(module.register_forward_pre_hook(hook))
    try:
        _run(model, batches, forward)
    finally:
        for h in handles:
            h.remove()
    energy: dict[str, Tensor] = {}
    for name, (module, _) in sites.items():
        if name not in sums:
            continue
        total = sums[name]
        n = torch.tensor([float(counts[name])], dtype=torch.float64, device=total.device)
        if reduce is not None:
            total, n = reduce(total), reduce(n)
        mean_sq = total / n.clamp_min(1.0)
        groups_m = getattr(module, "groups", 1)
        col_norm = sum((_column_norms(_reader_weight(root, r)) for r in sorted(readers[name])),
                       torch.zeros((), dtype=torch.float64))
        if groups_m > 1:  # a grouped reader: channel c of the input is column c % (C/G) of group c // (C/G)
            w = module.weight.detach().to(torch.float64)
            per = w.shape[1]
            col = torch.stack([(w[g * (w.shape[0] // groups_m):(g + 1) * (w.shape[0] // groups_m)] ** 2)
                               .transpose(0, 1).reshape(per, -1).sum(1) for g in range(groups_m)]).reshape(-1)
            col_norm = col
        energy[name] = (mean_sq * col_norm.to(mean_sq.device)).cpu()
    scores = []
    for group in groups:
        score = torch.zeros(group.size, dtype=torch.float64)
        for site in group.input_sites():
            e = energy.get(site.module)
            if e is None:
                continue
            for c, u in zip(site.channels, site.units):  # (energy: per input channel, grouped readers' too)
                if c < e.numel():
                    score[u] += e[c]
        mean = score.mean()
        scores.append(score / mean if mean > 0 else torch.ones_like(score))
    return scores


def channel_plan(groups: Sequence[Any], scores: Sequence[Tensor], cost: Any, target_flops: float | None,
                 target_params: float | None, sparsity: float, round_to: int = 1,
                 target_latency: float | None = None, latency: Any = None) -> dict[str, list[int]]:
    """The units to remove: the lowest ``scores`` across groups (each group keeps a unit), as few as meet
    ``target_flops``/``target_params`` (fractions of the dense model; checked on a sliced copy, the most
    important of them given back while the target holds: :func:`~lightning_prune.core.allocation.budget_plan`)
    or ``target_latency`` (with ``latency``, a :class:`~lightning_prune.graph.latency.LatencyPredictor`:
    :func:`~lightning_prune.graph.latency.latency_plan`), or, with none, ``round(sparsity * units)`` of
    them."""
    from lightning_prune.core.allocation import RankedRemoval, budget_plan

    removal = RankedRemoval(groups, scores, [1] * len(groups), round_to)
    if target_latency is not None:
        from lightning_prune.graph.latency import latency_plan

        plan = latency_plan(removal, removal.total, latency, target_latency)
        if plan.floor is not None and plan.measured is not None:
            import warnings

            warnings.warn(f"`target_latency={target_latency:g}` is not reached: the compressed model keeps"
                          f" {plan.measured:.3f} of the dense measured latency (removing every removable unit"
                          f" but one per group would keep {plan.floor:.3f}).", UserWarning, stacklevel=2)
        return plan.removed
    if target_flops is None and target_params is None:
        return removal(min(round(sparsity * sum(g.size for g in groups)), removal.total))
    which = 0 if target_flops is not None else 1
    target = float(target_flops if target_flops is not None else target_params)  # type: ignore[arg-type]
    return budget_plan(removal, lambda plan: cost.ratios(plan)[which],
                       lambda plan: cost.measured_ratios(plan)[which], target).removed


def refit_least_squares(weight: Tensor, bias: Tensor | None, hessian: Tensor, keep_columns: Tensor,
                        damping: float = REFIT_DAMPING) -> tuple[Tensor, Tensor | None]:
    """The reader's weight (and bias) refit on its kept input columns, ``[W_K, b] = [W, b] A[:,K] A[K,K]^-1``.

    Args:
        weight: ``(out, d)`` float64.
        bias: ``(out,)`` or ``None``; with a bias, ``hessian`` is augmented (its last column the constant).
        hessian: ``A = sum x x^T`` of the input columns, ``(d, d)`` or ``(d + 1, d + 1)`` with a bias.
        keep_columns: boolean ``(d,)``.

    Returns:
        the new weight (zeros at the removed columns) and bias.
    """
    full = weight if bias is None else torch.cat([weight, bias.unsqueeze(1)], dim=1)
    keep = keep_columns if bias is None else torch.cat([keep_columns, keep_columns.new_ones(1)])
    idx = keep.nonzero().flatten()
    a_kk = hessian[idx][:, idx]
    lam = damping * torch.diagonal(a_kk).mean().clamp_min(1e-12)
    a_kk = a_kk + lam * torch.eye(len(idx), dtype=a_kk.dtype, device=a_kk.device)
    rhs = full @ hessian[:, idx]  # (out, |K|)
    solved = torch.linalg.solve(a_kk, rhs.t()).t()
    new = torch.zeros_like(full)
    new[:, idx] = solved
    if bias is None:
        return new, None
    return new[:, :-1], new[:, -1]


def _site_columns(module: nn.Module, channels: set[int]) -> Tensor:
    """The flattened weight columns of input ``channels`` (a groups=1 reader)."""
    width = module.weight.shape[1]
    kernel = module.weight[0].numel() // width
    keep = torch.ones(width * kernel, dtype=torch.bool)
    for c in channels:
        keep[c * kernel:(c + 1) * kernel] = False
    return keep


def _compensate(model: nn.Module, root: nn.Module, prefix: str, groups: Sequence[Any],
                removed: Mapping[str, Sequence[int]], batches: Sequence[Any],
                forward: Callable[[nn.Module, Any], Any], reduce: Reduce | None, compensate: bool,
                progress: Progress | None, damping: float = REFIT_DAMPING) -> dict[str, float]:
    """Zero (and, with ``compensate``, refit) every reader of a removed unit, reader by reader in module
    order, each on the inputs of the model as refit so far; returns the readers' reconstruction errors."""
    dead: dict[str, set[int]] = {}
    weights: dict[str, set[str]] = {}  # the weights that read a site's input (an LSTM's two directions)
    for group in groups:
        gone = set(removed.get(group.name, ()))
        for site in group.input_sites():
            dead.setdefault(site.module, set()).update(  # weight columns (a paired grouped conv's: c % ipg)
                c for c, u in zip(site.weight_columns, site.units) if u in gone)
            weights.setdefault(site.module, set()).add(_strip(site.weight_name, prefix))
    order = {name: i for i, (name, _) in enumerate(root.named_modules())}
    readers = sorted((n for n, chs in dead.items() if chs), key=lambda n: order.get(_strip(n, prefix), 0))
    errors: dict[str, float] = {}
    for i, name in enumerate(readers):
        module = root.get_submodule(_strip(name, prefix))
        if weights[name] != {_strip(f"{name}.weight", prefix)}:  # read by other weights: their columns zeroed
            for reader in sorted(weights[name]):
                weight = root.get_parameter(reader)
                keep_cols = torch.ones(weight.shape[1], dtype=torch.bool)
                keep_cols[sorted(dead[name])] = False
                with torch.no_grad():
                    weight.mul_(keep_cols.view(1, -1, *([1] * (weight.dim() - 2))).to(weight))
            continue
        grouped = getattr(module, "groups", 1) > 1
        fit = (compensate and batches and not grouped
               and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)))
        w = module.weight.detach().to(torch.float64)
        flat = w.reshape(w.shape[0], -1)
        if grouped or not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            keep_cols = torch.ones(w.shape[1], dtype=torch.bool)
            keep_cols[sorted(dead[name])] = False
            with torch.no_grad():
                module.weight.mul_(keep_cols.view(1, -1, *([1] * (w.dim() - 2))).to(module.weight))
            continue
        keep_cols = _site_columns(module, dead[name]).to(flat.device)
        has_bias = getattr(module, "bias", None) is not None
        if batches:
            hessian, _ = layer_hessian(model, module, batches, forward, reduce, augment=has_bias)
            hessian = hessian[0]
        else:
            hessian = None
        bias = module.bias.detach().to(torch.float64) if has_bias else None
        if fit:
            new_w, new_b = refit_least_squares(flat, bias, hessian, keep_cols, damping)
        else:
            new_w, new_b = flat * keep_cols.to(flat.dtype), bias
        if hessian is not None:
            full_old = flat if bias is None else torch.cat([flat, bias.unsqueeze(1)], 1)
            full_new = new_w if new_b is None else torch.cat([new_w, new_b.unsqueeze(1)], 1)
            errors[name] = reconstruction_error(full_old[None], full_new[None], hessian[None])
        with torch.no_grad():
            module.weight.copy_(new_w.reshape(module.weight.shape).to(module.weight.dtype))
            if new_b is not None:
                module.bias.copy_(new_b.to(module.bias.dtype))
        if progress is not None:
            progress(i + 1, len(readers), name, errors.get(name, float("nan")))
    return errors


# ---------------------------------------------------------------------------------------------- driver
def check_method(method: Any, error: type[Exception] = InvalidArgumentError) -> str:
    if method not in METHODS:
        raise error(f"`method` must be one of {list(METHODS)}, got {method!r}. HINT: 'wanda' and 'sparsegpt'"
                    " prune weights (unstructured or N:M), 'channels' removes units, 'magnitude' is the"
                    " baseline.")
    return str(method)


def check_pattern(pattern: Any, sparsity: float, error: type[Exception] = InvalidArgumentError
                  ) -> tuple[int, int] | None:
    if pattern is None:
        return None
    try:
        return parse_pattern(pattern)
    except ValueError:
        raise error(f"`pattern` must be 'N:M' with integers 1 <= N < M, got {pattern!r}. HINT: '2:4' is what"
                    " NVIDIA's sparse tensor cores run; None prunes unstructured.") from None


def check_importance(importance: Any, method: str, who: str, error: type[Exception] = InvalidArgumentError
                     ) -> Any:
    """The ``importance`` criterion of a one-shot pruning (``None``: the calibration activations rank the
    units); it ranks channel units, so only ``method="channels"`` takes one."""
    if importance is None:
        return None
    if method != "channels":
        raise error(f"`importance`={importance!r} ranks channel units: it needs method='channels', got"
                    f" method={method!r}. HINT: leave importance=None for the weight methods.")
    from lightning_prune.core.importance import get_importance

    return get_importance(importance, None, who)


def prune_unstructured(model: nn.Module, targets: Sequence[Target], method: str, batches: Sequence[Any],
                       sparsity: float, nm: tuple[int, int] | None = None,
                       forward: Callable[[nn.Module, Any], Any] = default_forward,
                       reduce: Reduce | None = None, damping: float = 0.01, block_size: int = 128,
                       progress: Progress | None = None
                       ) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Prune ``targets`` one after the other (each on the inputs of the model pruned so far); returns the
    masks and the per-layer reconstruction errors."""
    masks: dict[str, Tensor] = {}
    errors: dict[str, float] = {}
    for i, target in enumerate(targets):
        keep, error = _prune_layer(model, target, method, batches, sparsity, nm, forward, reduce, damping,
                                   block_size)
        masks[target.name] = keep
        if error == error:  # not nan
            errors[target.module_name] = error
        if progress is not None:
            progress(i + 1, len(targets), target.module_name, error)
    return masks, errors


def find_channel_groups(model: nn.Module, include: Any = None, exclude: Any = None,
                        input_size: Sequence[int] | None = None, example_inputs: Any = None
                        ) -> tuple[str, nn.Module, list[Any], Any, Any]:
    """``(prefix, traced root, groups, cost model, example)`` of ``model``'s removable channel groups."""
    from lightning_prune.graph import CostModel, analyse_channels, example_inputs_for, traced_root

    prefix, root = traced_root(model)
    example = example_inputs if example_inputs is not None else example_inputs_for(root, input_size)
    analysis = analyse_channels(root, example, include, exclude, prefix=prefix)
    if not analysis.groups:
        reasons = sorted(set(analysis.skipped.values()))[:4]
        raise InvalidArgumentError(
            f"method='channels' found no removable channel group in {type(model).__name__}"
            f" (include={include or 'default'}, exclude={exclude}). What blocked them: {reasons}."
            " HINT: `include=[...]` selects other layers, or prune weights with method='wanda'.")
    return prefix, root, analysis.groups, CostModel(root, example, analysis.groups, prefix=prefix), example


def one_shot_latency_model(root: nn.Module, example: Any, groups: Sequence[Any], prefix: str,
                           batches: Sequence[Any], device: str | torch.device | None = None,
                           batch_size: int | None = None, reduce: Reduce | None = None) -> Any:
    """The measured latency model of ``target_latency``: on ``device`` (default: where ``root`` is), at
    ``batch_size`` (default: the first calibration batch's); under ``reduce`` (DDP) every timing is the mean
    over the processes, so every rank plans the same."""
    from lightning_prune.graph.inputs import example_batch_size
    from lightning_prune.graph.latency import measure_latency_model

    if batch_size is None and batches:
        batch_size = example_batch_size(model_input(batches[0]))
    share = None
    if reduce is not None:
        def share(obj: Any) -> Any:
            world = float(reduce(torch.ones(1, dtype=torch.float64)).item())
            if isinstance(obj, float):
                return float(reduce(torch.tensor([obj], dtype=torch.float64)).item()) / world
            dense, tables = obj
            flat = torch.tensor([dense] + [t for table in tables for t in table.seconds], dtype=torch.float64)
            flat = (reduce(flat) / world).tolist()
            out, i = [], 1
            for table in tables:
                n = len(table.seconds)
                out.append(type(table)(table.module, table.roles, table.sizes, table.widths,
                                       tuple(flat[i:i + n]), table.follows))
                i += n
            return flat[0], out
    return measure_latency_model(root, example, groups, prefix=prefix, device=device, batch_size=batch_size,
                                 share=share)


def _warn(message: str) -> None:
    import warnings

    warnings.warn(message, UserWarning, stacklevel=3)


@contextlib.contextmanager
def _calibration_backward(model: nn.Module) -> Iterator[None]:
    """Gradients on for every parameter (their ``.grad`` cleared), every module in training mode; afterwards
    the ``.grad`` tensors, ``requires_grad`` flags, each module's mode, the buffers (BatchNorm statistics) and
    torch's random state (dropout) are as they were: the fit's next optimizer step does not see this."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    # the CUDA generators of the model's devices only (none on CPU): forking every visible GPU would create a
    # context on each of them on every DDP rank
    devices = sorted({t.device.index if t.device.index is not None else torch.cuda.current_device()
                      for t in itertools.chain(params, model.buffers()) if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            for p in params:
                p.grad = None
                p.requires_grad_(True)
            model.train()
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, mode in modes:
            m.training = mode
        for p, grad, flag in zip(params, grads, flags):
            p.grad = grad
            p.requires_grad_(flag)


def calibration_gradient_scores(importance: Any, model: nn.Module, root: nn.Module, prefix: str,
                                groups: Sequence[Any], batches: Sequence[Any], loss_fn: LossFn,
                                reduce: Reduce | None = None) -> None:
    """Feed a gradient criterion (``importance.needs_gradients``, e.g. ``"taylor"``) the gradients of
    ``loss_fn(model, batch)`` summed over the calibration ``batches``: one :meth:`~Importance.accumulate`
    after the backwards (the model in training mode, as torch-pruning computes Taylor importance; see
    :func:`_calibration_backward` for what is restored). Under ``reduce`` (DDP: a sum over the ranks) the
    per-unit statistics are averaged over the ranks (an elementwise Taylor's gradients, before the absolute
    value), so every rank ranks alike."""
    from lightning_prune.core.importance import ImportanceContext

    if not batches:
        raise InvalidArgumentError(
            f"importance={importance.name or type(importance).__name__!r} needs calibration batches: the"
            " gradients of the loss on them rank the units.")
    mean = None
    if reduce is not None:
        world = float(reduce(torch.ones(1, dtype=torch.float64)).item())

        def mean(t: Tensor) -> Tensor:
            return reduce(t) / world

    with _calibration_backward(model):
        for i, batch in enumerate(batches):
            loss = loss_fn(model, batch)
            if isinstance(loss, Mapping):
                loss = loss.get("loss")
            if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise InvalidArgumentError(
                    f"importance={importance.name!r} needs the loss of calibration batch {i} as a scalar"
                    f" tensor that requires grad, got {type(loss).__name__}"
                    f"{'' if not isinstance(loss, Tensor) else f' of shape {tuple(loss.shape)}'}. HINT: the"
                    " loss function (the LightningModule's training_step) returns the loss, or a dict with"
                    " its 'loss'.")
            loss.reshape(()).backward()
        context = ImportanceContext(model=root, prefix=prefix, warn=_warn)
        if mean is not None:
            if getattr(importance, "elementwise", False):  # |w * g| needs the whole gradient reduced first
                with torch.no_grad():
                    for p in model.parameters():
                        if p.grad is not None:
                            p.grad.copy_(mean(p.grad.double()).to(p.grad.dtype))
            else:
                context.reduce = mean
        importance.reset()
        importance.accumulate(groups, context)
    if getattr(importance, "steps", 1) == 0:
        raise InvalidArgumentError(
            f"importance={importance.name!r}: the gradients of the calibration loss are not finite (nan or"
            " inf), so no unit could be ranked. HINT: check the loss on the training batches, or rank by the"
            " calibration activations (importance=None).")


def prune_channels(model: nn.Module, batches: Sequence[Any], groups: Sequence[Any], cost: Any, prefix: str,
                   root: nn.Module, target_flops: float | None = None, target_params: float | None = None,
                   sparsity: float = 0.5, compensate: bool = True, round_to: int = 1,
                   forward: Callable[[nn.Module, Any], Any] = default_forward, reduce: Reduce | None = None,
                   progress: Progress | None = None, damping: float = REFIT_DAMPING,
                   target_latency: float | None = None, latency: Any = None,
                   importance: Any = None, generator: torch.Generator | None = None,
                   loss_fn: LossFn | None = None,
                   ) -> tuple[dict[str, list[int]], dict[str, float]]:
    """Choose the units to remove and refit their readers (the model keeps its shapes; the removed units are
    zero at every reader). Returns the plan and the readers' reconstruction errors. ``importance``: an
    :class:`~lightning_prune.core.importance.Importance` that ranks the units instead of the calibration
    activations (``generator``: the seeded generator a random criterion draws from; a gradient criterion,
    ``"taylor"``, is fed the gradients of ``loss_fn(model, batch)`` summed over ``batches`` first:
    :func:`calibration_gradient_scores`). The ranking and the refit are independent: the readers are refit
    whatever ranked the units."""
    from lightning_prune.core.importance import ImportanceContext
    from lightning_prune.graph import freeze_modules, restricted_norm_hooks

    if importance is not None and importance.needs_gradients:
        if loss_fn is None:
            raise InvalidArgumentError(
                f"importance={importance.name!r} ranks units by the gradients of the loss on the calibration"
                " batches: pass `loss_fn(model, batch) -> loss`.")
        calibration_gradient_scores(importance, model, root, prefix, groups, batches, loss_fn, reduce)
    if importance is not None:
        ranked = importance.scores(groups, ImportanceContext(model=root, prefix=prefix, generator=generator))
        scores = [ranked[g.name].double() for g in groups]
    elif batches:
        scores = _channel_scores(model, root, prefix, groups, batches, forward, reduce)
    else:
        scores = [_magnitude_unit_scores(root, prefix, g) for g in groups]
    removed = channel_plan(groups, scores, cost, target_flops, target_params, sparsity, round_to,
                           target_latency, latency)
    # readers that compute their weight (weight standardisation) become plain layers holding it: the refit
    # and the masks act on that weight (lightning_prune.graph.frozen)
    freeze_modules(root, groups, removed, prefix)
    handles = restricted_norm_hooks(root, groups, removed, prefix=prefix)
    try:
        errors = _compensate(model, root, prefix, groups, removed, batches, forward, reduce, compensate,
                             progress, damping)
    finally:
        for h in handles:
            h.remove()
    return removed, errors


def _magnitude_unit_scores(root: nn.Module, prefix: str, group: Any) -> Tensor:
    """Without data: each unit's squared weight norm at its readers."""
    score = torch.zeros(group.size, dtype=torch.float64)
    for site in group.input_sites():
        per = _column_norms(_reader_weight(root, _strip(site.weight_name, prefix))).cpu()
        for c, u in zip(*site.column_units()):
            score[u] += per[c]
    mean = score.mean()
    return score / mean if mean > 0 else torch.ones_like(score)


def prune_one_shot(
    model: nn.Module,
    loader: Iterable[Any] | None = None,
    method: str = "sparsegpt",
    target_sparsity: float = 0.5,
    pattern: str | None = None,
    target_flops: float | None = None,
    target_params: float | None = None,
    calibration_batches: int = 4,
    compensate: bool = True,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: Sequence[type[nn.Module]] | None = None,
    damping: float = 0.01,
    block_size: int = 128,
    round_to: int = 1,
    compress: bool = True,
    input_size: Sequence[int] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    reduce: Reduce | None = None,
    progress: Progress | None = None,
    target_latency: float | None = None,
    latency_device: str | torch.device | None = None,
    latency_batch_size: int | None = None,
    latency_model: Any = None,
    importance: Any = None,
    loss_fn: LossFn | None = None,
) -> OneShotResult:
    """Prune a trained ``model`` in one shot from ``calibration_batches`` batches of ``loader`` (in place).

    Args:
        model: any ``nn.Module`` (a timm model, a LightningModule holding one).
        loader: an iterable of batches (a ``DataLoader``): tensors, ``(x, y)`` tuples or dicts. Optional for
            ``method="magnitude"``.
        method: ``"magnitude"``, ``"wanda"``, ``"sparsegpt"`` (weights: unstructured or ``pattern``) or
            ``"channels"`` (units removed; see the module docstring).
        target_sparsity: the fraction of every targeted layer's weights pruned (``"channels"`` without a
            size target: the fraction of units removed).
        pattern: ``"N:M"`` (e.g. ``"2:4"``): N of every M consecutive input weights kept instead.
        target_flops, target_params: ``"channels"``: the fraction of the dense FLOPs/parameters to keep.
        target_latency: ``"channels"``: the fraction of the dense model's inference latency to keep, measured
            on ``latency_device`` (default: where the model is) at ``latency_batch_size`` (default: the
            calibration batch size) with a per-layer latency table
            (:func:`lightning_prune.graph.latency.measure_latency_model`), or predicted by ``latency_model``
            (a :class:`~lightning_prune.graph.latency.LatencyPredictor`); exclusive with the two above.
        calibration_batches: how many batches of ``loader`` are used.
        compensate: ``"channels"``: refit the readers by least squares (``False``: the ablation, only zeroed).
        include, exclude, types: which layers (the rule of :mod:`lightning_prune.core.targets`; for
            ``"channels"`` the groups whose producers match).
        damping: relative damping of SparseGPT's Hessian (1% in the paper) and of the least-squares refit
            (ridge: ``damping * mean(diag)``; without it nearly collinear kept inputs give huge weights).
        block_size: SparseGPT's columns per lazy batch and mask selection (128 in the paper).
        round_to: ``"channels"``: kept widths multiples of it.
        compress: ``"channels"``: remove the units physically (:func:`lightning_prune.compress`); ``False``
            leaves them zero (a LayerNorm-normalised stream then still counts them).
        input_size: ``(C, H, W)`` to trace the model for ``"channels"`` (default: timm's config).
        forward: ``forward(model, batch)`` runs the model on a batch (default: ``model(x)`` with ``x`` the
            batch, its first element, or its ``"x"``/``"image"``/``"input"`` entry).
        reduce: sums a tensor over processes (DDP: every rank gets the same statistics, so the same result).
        progress: ``progress(i, n, layer, error)`` after every layer.
        importance: ``"channels"``: what ranks the units instead of the calibration activations (``None``):
            ``"taylor"`` (first-order Taylor, ``|sum w * dL/dw|`` per unit with the gradients of ``loss_fn``
            summed over the calibration batches, the model in training mode and restored after),
            ``"weight_norm"``, ``"bn_scale"``, ``"random"`` (seeded by ``torch.initial_seed()``), a plugin's
            criterion or an :class:`~lightning_prune.core.importance.Importance` object
            (:mod:`lightning_prune.core.importance`); each group's scores divided by their mean. The
            least-squares refit (``compensate``) runs whatever ranked the units.
        loss_fn: ``loss_fn(model, batch) -> loss`` (a scalar tensor, or a dict with ``"loss"``): the loss
            whose gradients a gradient criterion (``importance="taylor"``) ranks by; required by it.

    Returns:
        :class:`OneShotResult` (masks to keep during fine-tuning, the removed units, per-layer errors).

    Raises:
        InvalidArgumentError: an unknown method, no calibration data, fewer batches than asked, an unknown
            ``importance`` or one that needs gradients without ``loss_fn``.
    """
    from lightning_prune.validation import (
        check_bool,
        check_fraction,
        check_int,
        check_optional,
        check_positive,
    )

    err = InvalidArgumentError
    method = check_method(method)
    sparsity = check_fraction("target_sparsity", target_sparsity, error=err)
    nm = check_pattern(pattern, sparsity)
    target_flops = check_optional(check_fraction, "target_flops", target_flops, 0.0, 1.0, True, error=err)
    target_params = check_optional(check_fraction, "target_params", target_params, 0.0, 1.0, True, error=err)
    target_latency = check_optional(check_fraction, "target_latency", target_latency, 0.0, 1.0, True,
                                    error=err)
    for name, value in (("target_flops", target_flops), ("target_params", target_params),
                        ("target_latency", target_latency)):
        if value == 0.0:
            raise err(f"`{name}` must be a number in (0, 1], got 0.0. HINT: a fraction of the dense model.")
    if sum(t is not None for t in (target_flops, target_params, target_latency)) > 1:
        raise err("Pass one of `target_flops`, `target_params`, `target_latency`, not several.")
    if (target_flops is not None or target_params is not None or target_latency is not None) \
            and method != "channels":
        raise err("`target_flops`/`target_params`/`target_latency` ask for a size: they need"
                  " method='channels'. HINT: weights are pruned to `target_sparsity`.")
    latency_batch_size = check_optional(check_int, "latency_batch_size", latency_batch_size, 1, error=err)
    if latency_model is not None and not callable(getattr(latency_model, "predict", None)):
        raise err(f"`latency_model` must have a `predict(removed)` method, got"
                  f" {type(latency_model).__name__}. HINT: lightning_prune.graph.latency.LatencyPredictor.")
    if latency_device is not None:
        try:
            latency_device = torch.device(latency_device)
        except (RuntimeError, TypeError) as error:
            raise err(f"`latency_device` must be a device, got {latency_device!r} ({error}).") from None
    if nm is not None and method == "channels":
        raise err("`pattern` prunes weights N:M: it does not go with method='channels'.")
    calibration_batches = check_int("calibration_batches", calibration_batches, 1, error=err)
    check_bool("compensate", compensate, error=err)
    check_positive("damping", damping, error=err)
    block_size = check_int("block_size", block_size, 1, error=err)
    round_to = check_int("round_to", round_to, 1, error=err)
    criterion = check_importance(importance, method, "prune_one_shot", err)
    if criterion is not None and criterion.needs_gradients and loss_fn is None:
        raise err(f"importance={importance!r} ranks the units by the gradients of the loss on the"
                  " calibration batches: pass `loss_fn(model, batch) -> loss`, e.g."
                  " `loss_fn=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])`.")
    if loss_fn is not None and not callable(loss_fn):
        raise err(f"`loss_fn` must be a callable `loss_fn(model, batch) -> loss`, got"
                  f" {type(loss_fn).__name__}.")
    forward = forward or default_forward
    batches: list[Any] = []
    if loader is not None or method != "magnitude":
        batches = draw_batches(loader, calibration_batches)
    result = OneShotResult(method)
    if method == "channels":
        from lightning_prune.core.compression import compress as compress_fn
        from lightning_prune.core.gates import unit_masks
        from lightning_prune.graph import restricted_norm_hooks

        example = _to_model(model_input(batches[0]), model) if batches else None
        prefix, root, groups, cost, example = find_channel_groups(model, include, exclude, input_size,
                                                                  example)
        latency = None
        if target_latency is not None:
            latency = latency_model or one_shot_latency_model(root, example, groups, prefix, batches,
                                                              latency_device, latency_batch_size, reduce)
        generator = None
        if criterion is not None and criterion.needs_generator:
            generator = torch.Generator().manual_seed(torch.initial_seed() % 2 ** 63)
        removed, errors = prune_channels(model, batches, groups, cost, prefix, root, target_flops,
                                         target_params, sparsity, compensate, round_to, forward, reduce,
                                         progress, damping, target_latency, latency, importance=criterion,
                                         generator=generator, loss_fn=loss_fn)
        if latency is not None:
            result.latency_predicted = float(latency.predict(removed))
            measure = getattr(latency, "measure", None)
            measured = measure(removed) if measure is not None else None
            result.latency_remaining = float(measured) if measured is not None else None
        keep = [torch.tensor([u not in set(removed.get(g.name, ())) for u in range(g.size)]) for g in groups]
        result.masks = unit_masks(model, groups, keep)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, mask in result.masks.items():
                params[name].mul_(mask.to(params[name]))
        result.removed, result.groups, result.errors = removed, list(groups), errors
        result.flops_remaining, result.params_remaining = cost.measured_ratios(removed)
        if compress:
            handles = restricted_norm_hooks(root, groups, removed, prefix=prefix)
            try:
                compress_fn(model, example, groups=groups, removed=removed, round_to=1)
            finally:
                for h in handles:
                    h.remove()
        return result
    targets = resolve_targets(model, include, exclude, types=tuple(types) if types else PRUNABLE_TYPES)
    masks, errors = prune_unstructured(model, targets, method, batches, sparsity, nm, forward, reduce,
                                       damping, block_size, progress)
    result.masks, result.errors = masks, errors
    total = sum(m.numel() for m in masks.values())
    result.sparsity = sum(int((~m).sum()) for m in masks.values()) / max(total, 1)
    return result
