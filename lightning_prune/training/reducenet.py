"""ReduceNet-style networks, registered as timm models: train deep, deploy as a plain stack of 3×3 convs.

ReduceNet (ohmydroid/reducenet, May 2023; described in the ReduceNet author's blog post, in Chinese, on
VanillaNet-style deep training) applies VanillaNet's deep-training strategy (Chen et al., "VanillaNet: the
Power of Minimalism in Deep Learning", 2023, arXiv:2305.12972) to a CIFAR ResNet layout. A block is

    conv3×3(stride) + BN  →  decaying activation  →  conv1×1 + BN  (+ x when the shape is kept)

with the block's only activation decaying to the identity during training (``ActivationDecay``). Once it is
the identity, the block is linear: conv+BN fold, the 3×3 and the 1×1 compose into one 3×3 conv, and the
identity residual becomes part of that kernel (RepVGG). ``reducenet_56`` trains with 56 layers
(stem + 27 × (3×3, 1×1) + classifier) and deploys with 29 (stem + 27 × 3×3 + classifier).

Fused, the ReduceNet post's design has no activation left but the stem's: the deployed backbone is linear.
``reducenet_<depth>_act`` adds a permanent ReLU after each block's residual sum (VanillaNet keeps one
nonlinearity per block too); it fuses into exactly the architecture of ``reducenet_<depth>_plain``, the
baseline of the ReduceNet post's comparison: the *deployed* shape (one 3×3 conv + BN per block, residual,
ReLU) trained directly.

The models are registered with timm when this module is imported: by ``import
lightning_prune.training.reducenet``, by :class:`~lightning_prune.training.models.ImageClassifier`, or by the
first ``lightning_prune.<name>`` looked up (``lp.ImageClassifier``, ``lp.compress``, ...; a bare
``import lightning_prune`` imports no torch and registers nothing)::

    import lightning_prune.training.reducenet
    import timm
    model = timm.create_model("reducenet_20", num_classes=10)
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import get_act_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from lightning_prune.functional.fusion import fold_bn, fuse_conv_1x1, identity_kernel

__all__ = ["PlainBlock", "ReduceBlock", "ReduceNet"]


def _is_identity(act: nn.Module) -> bool:
    from lightning_prune.core.reparam import DecayingActivation

    return isinstance(act, nn.Identity) or (isinstance(act, DecayingActivation) and act.lam == 1.0)


class ReduceBlock(nn.Module):
    """conv3×3+BN → activation → conv1×1+BN (+ x): one 3×3 conv once the activation has decayed.

    Args:
        in_chs, out_chs: block input and output channels.
        stride: stride of the 3×3 conv; the residual is used when ``stride == 1`` and ``in_chs == out_chs``.
        mid_ratio: width of the hidden map relative to ``out_chs`` (wider trains more parameters, deploys the
            same 3×3 conv).
        act_layer: the (decaying) activation.
        out_act: add a permanent activation after the residual sum (``act_out``), which never decays: the
            block then fuses into exactly a :class:`PlainBlock` (3×3 conv + residual + activation).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, mid_ratio: float = 1.0,
                 act_layer: type[nn.Module] = nn.ReLU, out_act: bool = False) -> None:
        super().__init__()
        mid = max(int(round(out_chs * mid_ratio)), 1)
        self.in_chs, self.out_chs, self.stride = in_chs, out_chs, stride
        self.conv1 = nn.Conv2d(in_chs, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act = act_layer()
        self.conv2 = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.has_skip = stride == 1 and in_chs == out_chs
        self.act_out = act_layer() if out_act else nn.Identity()
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.act_out(self.reparam_conv(x))
        y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act_out(y + x if self.has_skip else y)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fuse into one 3×3 conv (conv+BN, 3×3∘1×1, identity residual); needs the activation at identity.

        Raises:
            RuntimeError: the activation has not decayed (λ < 1).
        """
        if self.reparam_conv is not None:
            return
        if not _is_identity(self.act):
            raise RuntimeError(
                f"ReduceBlock cannot fuse: its activation {self.act!r} is not the identity. HINT: train with"
                " lightning_prune.ActivationDecay until λ = 1, or fuse with lightning_prune.reparameterize.")
        w1, b1 = fold_bn(self.conv1.weight, None, self.bn1.running_mean, self.bn1.running_var,
                         self.bn1.weight, self.bn1.bias, self.bn1.eps)
        w2, b2 = fold_bn(self.conv2.weight, None, self.bn2.running_mean, self.bn2.running_var,
                         self.bn2.weight, self.bn2.bias, self.bn2.eps)
        weight, bias = fuse_conv_1x1(w1, b1, w2, b2)
        if self.has_skip:
            weight = weight + identity_kernel(self.out_chs, 3, dtype=weight.dtype, device=weight.device)
        conv = nn.Conv2d(self.in_chs, self.out_chs, 3, self.stride, 1, bias=True).to(weight)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        self.reparam_conv = conv
        for name in ("conv1", "bn1", "act", "conv2", "bn2"):
            delattr(self, name)


class PlainBlock(nn.Module):
    """The deployed shape trained directly: ``act(BN(conv3×3(x)) + x)`` (residual when the shape is kept)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, mid_ratio: float = 1.0,
                 act_layer: type[nn.Module] = nn.ReLU, out_act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = act_layer()
        self.has_skip = stride == 1 and in_chs == out_chs

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        return self.act(y + x if self.has_skip else y)


class ReduceNet(nn.Module):
    """A CIFAR-style ResNet layout of :class:`ReduceBlock` (or :class:`PlainBlock`) with a timm interface.

    Args:
        blocks_per_stage: blocks in each of the three stages (depth = 2 + 2 × 3 × blocks for ReduceBlocks).
        widths: output channels of the three stages.
        block: ``"reduce"`` or ``"plain"``.
        mid_ratio: hidden width of a ReduceBlock relative to its output.
        num_classes, in_chans, drop_rate, global_pool: as in every timm model.
        act_layer: activation (name or class) of the stem and the blocks.
        out_act: ReduceBlocks also get a permanent activation after their residual sum
            (``reducenet_<d>_act``).
    """

    def __init__(
        self,
        blocks_per_stage: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
        block: str = "reduce",
        mid_ratio: float = 1.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        act_layer: str | type[nn.Module] = "relu",
        out_act: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if block not in ("reduce", "plain"):
            raise ValueError(f"`block` must be 'reduce' or 'plain', got {block!r}")
        act = get_act_layer(act_layer) if isinstance(act_layer, str) else act_layer
        block_cls = ReduceBlock if block == "reduce" else PlainBlock
        self.num_classes, self.drop_rate, self.global_pool = num_classes, drop_rate, global_pool
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), act())
        layers, in_chs = [], widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(block_cls(in_chs, width, stride, mid_ratio=mid_ratio, act_layer=act,
                                        **({"out_act": out_act} if block == "reduce" else {})))
                in_chs = width
        self.blocks = nn.Sequential(*layers)
        self.num_features = self.head_hidden_size = in_chs
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=w, reduction=2 ** i,
                                  module=f"blocks.{(i + 1) * blocks_per_stage - 1}")
                             for i, w in enumerate(widths)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean((2, 3))
        if self.drop_rate:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {"url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616),
            "first_conv": "stem.0", "classifier": "fc", **kwargs}


_DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}

default_cfgs = generate_default_cfgs(
    {f"reducenet_{d}{suffix}": _cfg() for d in _DEPTHS for suffix in ("", "_act", "_plain")}
)


def _create(variant: str, depth: int, default_block: str, pretrained: bool = False,
            **kwargs: Any) -> ReduceNet:
    kwargs.setdefault("blocks_per_stage", _DEPTHS[depth])
    kwargs.setdefault("block", default_block)
    return build_model_with_cfg(ReduceNet, variant, pretrained, **kwargs)


@register_model
def reducenet_20(pretrained: bool = False, **kwargs: Any) -> ReduceNet:
    """ReduceNet-20: 3 blocks per stage; trains 20 layers, deploys 11."""
    return _create("reducenet_20", 20, "reduce", pretrained, **kwargs)


@register_model
def reducenet_32(pretrained: bool = False, **kwargs: Any) -> ReduceNet:
    """ReduceNet-32: 5 blocks per stage; trains 32 layers, deploys 17."""
    return _create("reducenet_32", 32, "reduce", pretrained, **kwargs)


@register_model
def reducenet_44(pretrained: bool = False, **kwargs: Any) -> ReduceNet:
    """ReduceNet-44: 7 blocks per stage; trains 44 layers, deploys 23."""
    return _create("reducenet_44", 44, "reduce", pretrained, **kwargs)


@register_model
def reducenet_56(pretrained: bool = False, **kwargs: Any) -> ReduceNet:
    """ReduceNet-56 (the ReduceNet post's experiment): 9 blocks per stage; trains 56 layers, deploys 29."""
    return _create("reducenet_56", 56, "reduce", pretrained, **kwargs)


@register_model
def reducenet_110(pretrained: bool = False, **kwargs: Any) -> ReduceNet:
    """ReduceNet-110: 18 blocks per stage; trains 110 layers, deploys 56."""
    return _create("reducenet_110", 110, "reduce", pretrained, **kwargs)


@register_model
def reducenet_20_act(pretrained: bool = False, **kwargs: Any) -> ReduceNet:
    """ReduceNet-20 with a permanent ReLU after each block: fuses into exactly ``reducenet_20_plain``."""
    return _create("reducenet_20_act", 20, "reduce", pretrained, **{"out_act": True, **kwargs})


@register_model
def reducenet_56_act(pretrained: bool = False, **kwargs: Any) -> ReduceNet:
    """ReduceNet-56 with a permanent ReLU after each block: fuses into exactly ``reducenet_56_plain``."""
    return _create("reducenet_56_act", 56, "reduce", pretrained, **{"out_act": True, **kwargs})


@register_model
def reducenet_20_plain(pretrained: bool = False, **kwargs: Any) -> ReduceNet:
    """Baseline: the 11-layer deployed shape of ReduceNet-20 with ReLUs, trained directly."""
    return _create("reducenet_20_plain", 20, "plain", pretrained, **kwargs)


@register_model
def reducenet_32_plain(pretrained: bool = False, **kwargs: Any) -> ReduceNet:
    """Baseline: the 17-layer deployed shape of ReduceNet-32 with ReLUs, trained directly."""
    return _create("reducenet_32_plain", 32, "plain", pretrained, **kwargs)


@register_model
def reducenet_44_plain(pretrained: bool = False, **kwargs: Any) -> ReduceNet:
    """Baseline: the 23-layer deployed shape of ReduceNet-44 with ReLUs, trained directly."""
    return _create("reducenet_44_plain", 44, "plain", pretrained, **kwargs)


@register_model
def reducenet_56_plain(pretrained: bool = False, **kwargs: Any) -> ReduceNet:
    """Baseline: the 29-layer deployed shape of ReduceNet-56 with ReLUs (the ReduceNet post's "ResNet29")."""
    return _create("reducenet_56_plain", 56, "plain", pretrained, **kwargs)


@register_model
def reducenet_110_plain(pretrained: bool = False, **kwargs: Any) -> ReduceNet:
    """Baseline: the 56-layer deployed shape of ReduceNet-110 with ReLUs, trained directly."""
    return _create("reducenet_110_plain", 110, "plain", pretrained, **kwargs)
