"""Helpers shared by the test modules."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).parents[1]
SCRIPT = Path(sys.executable).with_name("lightning-prune")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "lightning_prune.cli"]


def lightning_prune_command(*args: object, env: dict[str, str] | None = None, cwd: Path = ROOT,
                            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The real console script in a fresh process."""
    return subprocess.run([*COMMAND, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          check=False)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The run failed with one ``lightning-prune: error: ...`` line and no traceback or usage dump."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("lightning-prune: error: "), errors
    assert len(result.stderr.strip().splitlines()) <= 4, result.stderr  # "Seed set to 0" and the like
    return errors[0]


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


def assert_amp_step_matches_fp32(step_delta: Callable[..., torch.Tensor], root, rel: float,
                                 min_cosine: float) -> None:
    """``step_delta(root, **trainer_kwargs)`` returns what one optimizer step changed (e.g. the gates). Under
    16-mixed with a 2**12 loss scale and under bf16-mixed it must match the full-precision step: the loss
    scale must not reach the callback's own parameters."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    ref = step_delta(root / "fp32")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    fp16 = step_delta(root / "fp16", plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    bf16 = step_delta(root / "bf16", precision="bf16-mixed")
    assert ref.abs().sum() > 0
    for delta in (fp16, bf16):
        assert torch.isfinite(delta).all()
        ratio = float(delta.abs().sum() / ref.abs().sum())
        assert abs(ratio - 1.0) <= rel, ratio
        assert torch.nn.functional.cosine_similarity(delta, ref, dim=0) > min_cosine
