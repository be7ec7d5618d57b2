"""What to trace and with what: the traced root inside a LightningModule, an example input, calling the
model with it, and moving it to the model's device and dtype."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.core.targets import uncompiled
from lightning_prune.errors import InvalidArgumentError

__all__ = ["call_model", "evaluating", "example_arguments", "example_inputs_for", "like_model",
           "module_modes", "restore_modes", "traced_root"]


def traced_root(module: nn.Module) -> tuple[str, nn.Module]:
    """Where to trace: ``module`` itself when it has an ``example_input_array`` or is a timm model, else the
    first timm model inside it (``("model", ImageClassifier.model)``). A network the LightningModule compiled
    (``self.model = torch.compile(net)``) is traced through its original module
    (``("model._orig_mod", net)``, :func:`~lightning_prune.core.targets.uncompiled`)."""
    if getattr(module, "example_input_array", None) is not None or isinstance(
            getattr(module, "pretrained_cfg", None), dict):
        return uncompiled("", module)
    for name, sub in module.named_modules():
        if isinstance(getattr(sub, "pretrained_cfg", None), dict):
            return uncompiled(name, sub)
    return "", module


def example_inputs_for(module: nn.Module, input_size: Sequence[int] | None = None,
                       batch_size: int = 2) -> Any:
    """An input to trace ``module`` with: its ``example_input_array`` (a floating tensor of one value in it,
    Lightning's habitual ``torch.zeros(...)``, drawn at random in its shape: :func:`varied_example`), else a
    random batch of ``input_size`` (default: timm's ``pretrained_cfg["input_size"]``, at the ViT's fixed
    ``img_size`` when it has one)."""
    example = getattr(module, "example_input_array", None)
    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if example is not None and input_size is None:  # (in the model's dtype: "bf16-true", "64-true" precision)
        moved = example.to(device) if isinstance(example, Tensor) else example
        return varied_example(cast_example(moved, dtype))
    if input_size is None:
        cfg = getattr(module, "pretrained_cfg", None)
        if not isinstance(cfg, dict) or "input_size" not in cfg:
            raise InvalidArgumentError(
                f"Cannot tell what {type(module).__name__} takes as input."
                " HINT: pass `input_size=(3, 32, 32)` or set `example_input_array` on the LightningModule."
            )
        input_size = tuple(cfg["input_size"])
        img_size = getattr(getattr(module, "patch_embed", None), "img_size", None)
        if img_size is not None:
            input_size = (input_size[0], *tuple(img_size))
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, *input_size, generator=generator).to(device=device, dtype=dtype)


def example_arguments(example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments ``example`` stands for: a dict is keywords, a tuple/list the
    positional arguments, anything else the one positional argument."""
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, (list, tuple)):
        return tuple(example), {}
    return (example,), {}


def call_model(model: nn.Module, example: Any) -> Any:
    """``model(example)``, unpacking a tuple/list into positional and a dict into keyword arguments."""
    args, kwargs = example_arguments(example)
    return model(*args, **kwargs)


def like_model(example: Any, model: nn.Module) -> Any:
    """``example`` on the device of ``model``'s parameters, its floating tensors in their dtype (the strategy
    may have moved or converted the model since the example was made)."""
    param = next(iter(model.parameters()), None)
    if param is None:
        return example
    dtype = param.dtype if param.is_floating_point() else None

    def move(value: Any) -> Any:
        if isinstance(value, Tensor):
            value = value.to(param.device)
            return value.to(dtype) if dtype is not None and value.is_floating_point() else value
        if isinstance(value, (list, tuple)):
            return type(value)(move(v) for v in value)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    return move(example)


def varied_example(example: Any, seed: int = 0) -> Any:
    """``example`` with every floating tensor that holds one value throughout (zeros) replaced by a seeded
    normal draw of its shape, dtype and device: traced on constants, tensors of equal shape are equal too, and
    which of them a size was read from (:mod:`lightning_prune.graph.shapes`) cannot be told; integer inputs
    (token ids, masks) are kept."""
    if isinstance(example, Tensor):
        constant = example.numel() > 1 and not bool((example != example.flatten()[0]).any())
        if not example.is_floating_point() or not constant:
            return example
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(example.shape, generator=generator, dtype=torch.float32).to(example)
    if isinstance(example, (list, tuple)):
        return type(example)(varied_example(e, seed + i + 1) for i, e in enumerate(example))
    if isinstance(example, dict):
        return {k: varied_example(v, seed + i + 1) for i, (k, v) in enumerate(example.items())}
    return example


def cast_example(example: Any, dtype: torch.dtype) -> Any:
    if isinstance(example, Tensor):
        return example.to(dtype) if example.is_floating_point() else example
    if isinstance(example, (list, tuple)):
        return type(example)(cast_example(e, dtype) for e in example)
    if isinstance(example, dict):
        return {k: cast_example(v, dtype) for k, v in example.items()}
    return example


def example_batch_size(example: Any) -> int:
    if isinstance(example, Tensor):
        return max(int(example.shape[0]), 1) if example.dim() else 1
    if isinstance(example, (list, tuple)) and example:
        return example_batch_size(example[0])
    if isinstance(example, dict) and example:
        return example_batch_size(next(iter(example.values())))
    return 1


def module_modes(model: nn.Module) -> dict[str, bool]:
    """Every module's ``training`` flag under its name (each place a module is registered): what
    :func:`restore_modes` gives back."""
    return {name: m.training for name, m in model.named_modules(remove_duplicate=False)}


def restore_modes(model: nn.Module, modes: Mapping[str, bool]) -> None:
    """Give every module of ``model`` the ``training`` flag ``modes`` recorded under its name
    (:func:`module_modes`); a module put there
    since (a layer frozen or replaced under the same name keeps the recorded flag, a new name takes its
    parent's). ``model.train(<its own flag>)`` runs first, so that what the modules' own ``train`` does
    (timm's LeViT drops its cached attention biases) happens as before; then the flags that differ (a
    submodule the user keeps in eval mode, a frozen BatchNorm, under a model in train mode) are set back."""
    model.train(modes.get("", model.training))
    restored: dict[str, bool] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        mode = modes.get(name)
        if mode is None:
            mode = restored.get(name.rpartition(".")[0], module.training) if name else module.training
        restored[name] = module.training = mode


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside; after, every module's ``training`` flag as it was
    (:func:`restore_modes`), not the model's own flag pushed down to all of them (which would put a
    submodule the user keeps in eval mode back in train mode)."""
    modes = module_modes(model)
    model.eval()
    try:
        yield model
    finally:
        restore_modes(model, modes)
