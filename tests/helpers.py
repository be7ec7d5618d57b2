"""Helpers shared by the test modules."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


class Spy(Callback):
    """Calls ``fn(trainer, pl_module, hook_name)`` at each of the hooks named in ``hooks``."""

    HOOKS = ("on_fit_start", "on_train_epoch_start", "on_train_batch_start", "on_before_optimizer_step",
             "on_train_batch_end", "on_train_end")

    def __init__(self, fn: Callable[[pl.Trainer, pl.LightningModule, str], object],
                 hooks: Sequence[str] = ("on_train_batch_end",)) -> None:
        unknown = set(hooks) - set(self.HOOKS)
        assert not unknown, f"Spy cannot watch {sorted(unknown)}"
        self.fn, self.hooks = fn, tuple(hooks)


def _spy_hook(name: str):
    def hook(self: Spy, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if name in self.hooks:
            self.fn(trainer, pl_module, name)

    hook.__name__ = name
    return hook


for _name in Spy.HOOKS:
    setattr(Spy, _name, _spy_hook(_name))


@torch.no_grad()
def eval_logits(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` in eval mode on the module's device, leaving its train/eval mode as it was."""
    was = module.training
    module.eval()
    out = module(x.to(next(module.parameters()).device))
    module.train(was)
    return out.cpu()
