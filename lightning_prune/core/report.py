"""Sparsity of a model as plain numbers: what the final tables print and what the loggers receive."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_prune.core.targets import resolve_targets
from lightning_prune.errors import NoTargetsError

__all__ = ["LayerSparsity", "SparsityReport", "sparsity_report"]


@dataclass(frozen=True)
class LayerSparsity:
    """Zeros of one layer's weight; a channel is an output row (a conv filter, a Linear unit)."""

    name: str
    shape: tuple[int, ...]
    params: int
    zeros: int
    channels: int
    zero_channels: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Global and per-layer zeros, parameters and channels of a model's targeted Conv and Linear weights."""

    layers: list[LayerSparsity] = field(default_factory=list)
    total_params: int = 0

    @property
    def params(self) -> int:
        """Weights of the targeted Conv and Linear layers."""
        return sum(layer.params for layer in self.layers)

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of the targeted Conv and Linear weights that are zero (what ``prune/sparsity`` logs)."""
        return self.zeros / self.params if self.params else 0.0

    @property
    def nonzero_params(self) -> int:
        """Parameters of the whole model that are not zero-weights of the targeted layers."""
        return self.total_params - self.zeros

    def to_dict(self) -> dict[str, float]:
        out: dict[str, float] = {"sparsity": self.sparsity, "params": self.total_params,
                                 "nonzero_params": self.nonzero_params}
        out.update({f"sparsity/{layer.name}": layer.sparsity for layer in self.layers})
        return out

    def format_table(self, extra: dict[str, float] | None = None) -> str:
        """A fixed-width table: one row per layer, then the global numbers and any ``extra`` ones."""
        width = max([len(layer.name) for layer in self.layers] + [12])
        head = (f"{'layer':<{width}}  {'shape':>20}  {'params':>10}  {'zeros':>10}  {'sparsity':>8}"
                f"  {'zero ch':>9}")
        lines = [head, "-" * len(head)]
        for layer in self.layers:
            shape = "x".join(map(str, layer.shape))
            lines.append(
                f"{layer.name:<{width}}  {shape:>20}  {layer.params:>10,}  {layer.zeros:>10,}  "
                f"{layer.sparsity:>8.2%}  {layer.zero_channels:>4}/{layer.channels:<4}"
            )
        lines.append("-" * len(head))
        lines.append(f"{'targeted weights':<{width}}  {'':>20}  {self.params:>10,}  {self.zeros:>10,}  "
                     f"{self.sparsity:>8.2%}")
        lines.append(f"{'all parameters':<{width}}  {'':>20}  {self.total_params:>10,}  "
                     f"{'nonzero ' + format(self.nonzero_params, ','):>20}")
        for key, value in (extra or {}).items():
            lines.append(f"{key:<{width}}  {value:>20.4f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_table()


@torch.no_grad()
def sparsity_report(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: Sequence[type[nn.Module]] | None = None,
) -> SparsityReport:
    """Count the zeros of the targeted weights of ``model``: by default every Conv and Linear weight except
    each timm model's first conv and classifier -- the weights the callbacks prune and ``prune/sparsity``
    describes (``include``/``exclude``/``types`` as for the callbacks,
    :func:`~lightning_prune.resolve_targets`).

    Example::

        report = lightning_prune.sparsity_report(model)
        print(report)            # per-layer table
        report.sparsity          # fraction of the targeted weights that are zero
    """
    try:
        targets = resolve_targets(model, include, exclude, types)
    except NoTargetsError:
        targets = []
    layers = []
    for target in targets:
        weight = target.param
        zero = weight == 0
        per_channel = zero.reshape(weight.shape[0], -1).all(dim=1) if weight.dim() > 1 else zero
        layers.append(LayerSparsity(target.module_name, tuple(weight.shape), weight.numel(), int(zero.sum()),
                                    int(weight.shape[0]), int(per_channel.sum())))
    return SparsityReport(layers, sum(p.numel() for p in model.parameters()))
