"""What kind of layer a module is, as far as channels go: producers (Conv/Linear), depthwise and grouped
convs, weight-standardised convs, GRN, timm's ``Attention``, and the dimension its channels sit on; and the
name of a traced ATen operator (``op_name``, ``VIEW_OPS``), which the label propagation and the shape pass
share."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["PRODUCER_TYPES", "VIEW_OPS", "channel_dim", "op_name"]

VIEW_OPS = frozenset({"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze",
                      "view_as", "reshape_as", "_reshape_alias"})


def op_name(target: Any) -> str:
    """``aten.reshape.default`` -> ``"reshape"``; a Python callable's own name otherwise."""
    name = getattr(target, "__name__", None) or str(target)
    return name.split(".")[0] if isinstance(target, torch._ops.OpOverload) else name

PRODUCER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONV_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def channel_dim(module: nn.Module) -> int:
    """The channel dimension of the tensors a module reads: last for Linear and plain LayerNorm/RMSNorm/GRN
    (channels-last), 1 for convolutions, BatchNorm, GroupNorm and timm's ``LayerNorm2d``."""
    if isinstance(module, nn.Linear):
        return -1
    if is_grn(module):
        return int(module.channel_dim)
    if isinstance(module, nn.LayerNorm) or is_rms_norm(module):
        return 1 if "2d" in type(module).__name__.lower() else -1
    return 1


def is_rms_norm(module: nn.Module | None) -> bool:
    """An RMSNorm over one (the channel) dimension -- ``torch.nn.RMSNorm``, timm's ``RmsNorm`` -- whose
    forward is ``F.rms_norm(x, normalized_shape, weight, eps)``."""
    shape = getattr(module, "normalized_shape", None)
    kind = type(module).__name__.lower().replace("_", "")
    return (module is not None and "rmsnorm" in kind and isinstance(shape, (tuple, list)) and len(shape) == 1
            and hasattr(module, "eps"))


def is_grn(module: nn.Module) -> bool:
    return type(module).__name__ == "GlobalResponseNorm" and hasattr(module, "channel_dim")


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, CONV_TYPES) and module.groups > 1 and module.groups == module.in_channels == \
        module.out_channels


def is_depthwise_transposed(module: nn.Module) -> bool:
    """A depthwise transposed convolution (LowFormer's upsampling): channel by channel, its weight
    ``(C, 1, k, k)`` like a depthwise conv's."""
    return isinstance(module, TRANSPOSED_CONV_TYPES) and module.groups > 1 and \
        module.groups == module.in_channels == module.out_channels


def is_grouped(module: nn.Module) -> bool:
    return isinstance(module, CONV_TYPES) and module.groups > 1 and not is_depthwise(module)


def is_std_conv(module: nn.Module) -> bool:
    """timm's weight-standardised convs (StdConv2d, ScaledStdConv2d...): the standardisation runs over the
    fan-in."""
    return isinstance(module, CONV_TYPES) and "StdConv" in type(module).__name__


def is_timm_attention(module: nn.Module) -> bool:
    linear = all(isinstance(getattr(module, name, None), nn.Linear) for name in ("qkv", "proj"))
    sizes = ("num_heads", "head_dim", "attn_dim")
    return linear and all(isinstance(getattr(module, name, None), int) for name in sizes)
