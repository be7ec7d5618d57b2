"""Output channels as groups of parameters, and the pure functions that choose which channels to drop.

A *channel* of a Conv or Linear layer is one output row of its weight (a conv filter, a Linear unit). To
make the channel's output identically zero, the row, the matching bias entry and, when a BatchNorm
directly consumes the layer's output, that BatchNorm's ``weight`` and ``bias`` entries are all zeroed:
a zero input channel normalises to zero in training mode (batch variance 0) and, with ``weight = bias = 0``,
the BatchNorm outputs exactly zero in eval mode too. Which BatchNorm follows which layer is read from one
real forward pass (forward hooks see the same tensor leave the layer and enter the BatchNorm), so no
naming convention or size heuristic is involved.

Everything here is usable on a plain ``nn.Module`` as well as inside the callbacks; the channel-pruning
benchmarks compare against :func:`first_k_channel_masks` and :func:`random_channel_masks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.functional import kept_count
from lightning_prune.masks import MaskSet
from lightning_prune.targets import Target, resolve_targets

__all__ = [
    "BATCHNORM_TYPES",
    "ChannelGroup",
    "ChannelTracer",
    "apply_channel_masks",
    "channel_groups",
    "channel_masks",
    "first_k_channel_masks",
    "first_k_pruned",
    "groups_from_trace",
    "nested_random_keep",
    "random_channel_masks",
]

#: Normalisation layers with one affine pair per channel (timm's BatchNormAct2d subclasses BatchNorm2d).
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)


@dataclass(frozen=True)
class ChannelGroup:
    """The parameters whose entry ``i`` along dim 0 belongs to output channel ``i`` of one layer.

    Attributes:
        weight: the layer's weight (``"model.layer1.0.conv1.weight"``); channel ``i`` is its row ``i``.
        members: the layer's bias and the following BatchNorm's ``weight`` and ``bias``, when they exist.
    """

    weight: str
    members: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.weight, *self.members)


# ---------------------------------------------------------------------- choosing channels
def first_k_pruned(channels: int, sparsity: float) -> int:
    """How many leading channels the first-k baseline drops: ``channels - kept_count(channels, sparsity)``.

    At least one channel always survives (``kept_count`` keeps ``max(round(C (1 - sparsity)), 1)``).

    Example::

        >>> first_k_pruned(48, 0.5), first_k_pruned(10, 0.25), first_k_pruned(3, 0.99)
        (24, 2, 2)
    """
    return channels - kept_count(channels, sparsity)


def nested_random_keep(previous: Tensor, sparsity: float, generator: torch.Generator) -> Tensor:
    """Randomly prune a boolean keep-vector down to ``kept_count(numel, sparsity)`` survivors.

    Entries already pruned in ``previous`` stay pruned (the masks are nested); among the survivors the
    ones with the lowest ``torch.rand`` draws from ``generator`` go. Exactly ``numel`` numbers are drawn,
    whatever the sparsity, so the generator advances the same way on every rank.

    Args:
        previous: a boolean tensor of any shape (``True`` = kept); the result has its shape.
        sparsity: the fraction of all entries to prune, in [0, 1).
        generator: a CPU ``torch.Generator``.
    """
    flat = previous.reshape(-1).cpu()
    scores = torch.rand(flat.numel(), generator=generator)
    scores[~flat] = -1.0  # already pruned: always among the lowest
    keep = min(kept_count(flat.numel(), sparsity), int(flat.sum()))
    kept = torch.zeros_like(flat)
    if keep > 0:
        kept[torch.topk(scores, keep, sorted=False).indices] = True
    return kept.reshape(previous.shape)


def channel_masks(
    groups: Iterable[ChannelGroup], params: Mapping[str, Tensor], kept_channels: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Boolean masks of every parameter of every group from one keep-vector per layer.

    Args:
        groups: the channel groups.
        params: parameters by name (shapes are read from them).
        kept_channels: ``{group.weight: bool[C]}``; groups missing from it are left out of the result.
    """
    masks: dict[str, Tensor] = {}
    for group in groups:
        keep = kept_channels.get(group.weight)
        if keep is None:
            continue
        for name in group.names:
            shape = params[name].shape
            masks[name] = keep.to(torch.bool).reshape(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
    return masks


# ---------------------------------------------------------------------- finding the groups
class ChannelTracer:
    """Records, during real forward passes, which BatchNorm directly consumes each layer's output.

    Example::

        with ChannelTracer(model, ["layer1.0.conv1"]) as tracer:
            model(x)
        tracer.followers   # {"layer1.0.conv1": "layer1.0.bn1"}
    """

    def __init__(self, root: nn.Module, module_names: Iterable[str]) -> None:
        self.root = root
        self.module_names = list(module_names)
        self.followers: dict[str, str] = {}
        self.seen: set[str] = set()
        self._outputs: dict[int, tuple[str, Tensor]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> ChannelTracer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        wanted = set(self.module_names)
        for name, module in self.root.named_modules():
            if name in wanted:
                self._handles.append(module.register_forward_hook(self._producer_hook(name)))
            elif isinstance(module, BATCHNORM_TYPES):
                self._handles.append(module.register_forward_hook(self._norm_hook(name)))

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs.clear()

    def _producer_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.seen.add(name)
            if isinstance(output, Tensor):
                self._outputs[id(output)] = (name, output)  # the tensor itself is held: ids are not reused

        return hook

    def _norm_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not args or not isinstance(args[0], Tensor):
                return
            produced = self._outputs.get(id(args[0]))
            if produced is not None and produced[1] is args[0]:
                self.followers.setdefault(produced[0], name)

        return hook


def groups_from_trace(
    root: nn.Module, targets: Sequence[Target], followers: Mapping[str, str]
) -> list[ChannelGroup]:
    """One :class:`ChannelGroup` per target: its bias and its following BatchNorm's affine pair."""
    groups = []
    for target in targets:
        members = []
        bias = getattr(target.module, "bias", None)
        if isinstance(bias, nn.Parameter) and target.param_name == "weight":
            members.append(f"{target.module_name}.bias")
        norm_name = followers.get(target.module_name)
        if norm_name is not None:
            norm = root.get_submodule(norm_name)
            channels = target.param.shape[0]
            for attr in ("weight", "bias"):
                param = getattr(norm, attr, None)
                if isinstance(param, nn.Parameter) and param.shape == (channels,):
                    members.append(f"{norm_name}.{attr}")
        groups.append(ChannelGroup(target.name, tuple(members)))
    return groups


def channel_groups(
    model: nn.Module,
    example_input: Any = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> list[ChannelGroup]:
    """The channel groups of ``model``'s default targets (or ``include``/``exclude``).

    Args:
        model: any ``nn.Module`` (a timm model, a LightningModule).
        example_input: a batch the model accepts; one forward pass in eval mode, without gradients, finds the
            BatchNorm after each layer. ``None``: groups hold only the layer's weight and bias.
        include, exclude: globs over module names, as in :func:`lightning_prune.targets.resolve_targets`.
    """
    targets = resolve_targets(model, include, exclude)
    followers: dict[str, str] = {}
    if example_input is not None:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), ChannelTracer(model, [t.module_name for t in targets]) as tracer:
                model(example_input)
            followers = tracer.followers
        finally:
            model.train(was_training)
    return groups_from_trace(model, targets, followers)


# ---------------------------------------------------------------------- one-shot helpers
def first_k_channel_masks(
    model: nn.Module,
    sparsity: float,
    example_input: Any = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Masks that drop the first ``first_k_pruned(C, sparsity)`` output channels of every targeted layer.

    The control of the Habr article «Редукция нейронных сетей при помощи вариационной оптимизации» ("Reducing
    neural networks with variational optimisation", in Russian): "remove the first k channels of every layer,
    then fine-tune". Keys are ``model``'s parameter names (weights, biases and, with ``example_input``, the
    following BatchNorms).

    Example::

        masks = first_k_channel_masks(timm_model, 0.5, example_input=torch.randn(2, 3, 32, 32))
        kept = apply_channel_masks(timm_model, masks)   # a MaskSet; call kept.apply_() after optimizer steps
    """
    params = dict(model.named_parameters())
    groups = channel_groups(model, example_input, include, exclude)
    keep = {}
    for group in groups:
        channels = params[group.weight].shape[0]
        keep[group.weight] = torch.arange(channels) >= first_k_pruned(channels, sparsity)
    return channel_masks(groups, params, keep)


def random_channel_masks(
    model: nn.Module,
    sparsity: float,
    seed: int = 0,
    example_input: Any = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Masks that drop ``C - kept_count(C, sparsity)`` random output channels of every targeted layer.

    Layers draw, in module order, from one ``torch.Generator`` seeded with ``seed``: the same seed gives
    the same masks on every machine and rank.
    """
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    groups = channel_groups(model, example_input, include, exclude)
    keep = {
        g.weight: nested_random_keep(
            torch.ones(params[g.weight].shape[0], dtype=torch.bool), sparsity, generator
        )
        for g in groups
    }
    return channel_masks(groups, params, keep)


def apply_channel_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> MaskSet:
    """Zero the masked entries of ``model`` in place; the returned :class:`MaskSet` re-applies them.

    Call ``apply_()`` on it after every optimizer step of a fine-tuning loop.
    """
    mask_set = MaskSet()
    for name, mask in masks.items():
        mask_set.add(name, model.get_parameter(name), mask)
    return mask_set
