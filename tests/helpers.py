"""Helpers shared by the test modules."""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_prune as lp
from lightning_prune.callbacks.evolution import EvolutionaryMutation
from lightning_prune.callbacks.gating import GatePruningCallback
from lightning_prune.graph import analyse_channels, masked_and_sliced, randomised_copy
from lightning_prune.graph.proof import compare_outputs
from lightning_prune.testing import tiny_classifier

ROOT = Path(__file__).parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPT = Path(sys.executable).with_name("lightning-prune")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "lightning_prune.cli"]


def benchmark_script(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script ``benchmarks/<name>.py`` imported from its path, its ``main`` not run (``benchmarks/`` is
    not a package). The scripts put the repository first on ``sys.path`` (and ``benchmarks/``, for one
    another's helpers) and set ``OMP_NUM_THREADS`` when unset: ``monkeypatch`` undoes both."""
    monkeypatch.setattr(sys, "path", [str(BENCHMARKS), *sys.path])
    monkeypatch.setattr(os, "environ", os.environ.copy())
    spec = importlib.util.spec_from_file_location(f"_benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lightning_prune_command(*args: object, env: dict[str, str] | None = None, cwd: Path = ROOT,
                            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The real console script in a fresh process."""
    return subprocess.run([*COMMAND, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          check=False)


def in_process_error(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The exit status and the one stderr line of ``lightning-prune ARGS`` run in this process (its ``main``:
    the console script's code without a fresh interpreter's ~10 s of imports)."""
    from lightning_prune.cli import main

    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err) and "usage:" not in "\n".join(err), err
    assert errors[0].startswith("lightning-prune: error: "), errors
    return exited.value.code, errors[0]


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


def trained_looking(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """A float32 copy of ``model`` in eval mode with trained-looking BatchNorm statistics and affines, norm
    affines, biases and layer scales (:func:`lightning_prune.graph.randomised_copy`), so that no zero and no
    negligible branch passes a check by chance."""
    return randomised_copy(model, seed=seed, dtype=torch.float32)


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


# ---------------------------------------------------------------------------------------------- compiled fits
#: the input the compiled and eager outputs are compared on
COMPILE_X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def fast_callback(name: str):
    """Each callback configured to act within the 6 steps of :data:`STEPS`."""
    quiet = {"verbose": False}
    if name == "magnitude":
        return lp.GradualMagnitudePruning(target_sparsity=0.5, every_n_steps=1, sparsity_end_step=2, **quiet)
    if name == "lottery_ticket":
        return lp.LotteryTicket(rounds=1, epochs_per_round=1, **quiet)
    if name == "group_lasso":
        return lp.GroupLassoPruning(lam=0.05, finalize_step=4, **quiet)
    if name == "l0":
        return lp.L0Pruning(lam=0.05, finalize_step=4, **quiet)
    if name == "activation_decay":
        return lp.ActivationDecay(begin_step=1, end_step=5, **quiet)
    if name == "evolution":
        return EvolutionaryMutation(population=3, every_n_steps=2, fitness_batches=1, **quiet)
    if name == "distill":
        return lp.create_callback("distill", **quiet)
    return lp.create_callback(name)  # the baselines act at their first step by default


def _like(module, x):
    return x.to(next(module.parameters()).dtype)


def eager_output(module, x=COMPILE_X) -> torch.Tensor:
    """The module's eval-mode output with every compiled function run eagerly (hooks and all)."""
    x = _like(module, x)
    was = module.training
    module.eval()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        out = module(x)
    module.train(was)
    return out


def compiled_output(module, x=COMPILE_X) -> torch.Tensor:
    x = _like(module, x)
    was = module.training
    module.eval()
    with torch.no_grad():
        out = module(x)
    module.train(was)
    return out


class Invariants(Spy):
    """After every optimizer step: masked weights are exact zeros, masks have their weight's layout, gates are
    attached until finalisation, and the compiled network computes what the eager one computes."""

    def __init__(self, callback) -> None:
        super().__init__(self.check)
        self.callback, self.steps, self.gates_seen, self.outputs_checked = callback, 0, 0, 0

    def check(self, trainer, pl_module, hook) -> None:
        cb = self.callback
        self.steps += 1
        masks = getattr(cb, "masks", None)
        if isinstance(cb, lp.PruningCallback) and masks is not None:
            for name, mask in masks.items():
                param = masks.param(name)
                assert mask.stride() == param.stride(), name
                assert not param.detach()[~mask].any(), f"step {trainer.global_step}: {name} not zero"
        if isinstance(cb, GatePruningCallback) and not cb.finalized:
            assert cb.gateset is not None and cb.gateset.attached
            self.gates_seen += 1
        if isinstance(cb, (GatePruningCallback, lp.ActivationDecay)) or self.steps == 1:
            torch.testing.assert_close(compiled_output(pl_module), eager_output(pl_module), rtol=1e-4,
                                       atol=1e-5)
            self.outputs_checked += 1


# ------------------------------------------------------------------------------------------- kill and resume
#: 3 epochs of 4 batches: 12 optimizer steps
KILL_FIT = {"max_epochs": 3, "limit_train_batches": 4, "limit_val_batches": 1}

#: kill/resume cases (tests/test_kill_resume.py and its child tests/_kill_child.py), per case: the callback's
#: arguments, the checkpoint cadence and the steps the kill is drawn from. One runs by default (a real kill
#: costs two fresh processes); the other callbacks' mid-schedule resumes are checked in this process by their
#: own tests (e.g. test_magnitude.py::test_resume_mid_schedule_equals_uninterrupted_with_derived_schedule,
#: test_lottery_ticket.py::test_resume_mid_round_ends_with_the_same_ticket)
KILL_CASES = {
    # masks change every 2 steps until step 10
    "magnitude": {"name": "magnitude", "kwargs": {"every_n_steps": 2, "sparsity_end_step": 10},
                  "every": 3, "kill": (4, 10), "slow": True},
    # round 1 is epoch 1 (steps 4-7): killed inside it, after its prune and rewind
    "lottery_ticket": {"name": "lottery_ticket", "kwargs": {"rounds": 2, "rewind_step": 2},
                       "every": 2, "kill": (5, 7), "slow": True},
    # gates are captured from the first steps on, finalised at step 10
    "group_lasso": {"name": "group_lasso", "kwargs": {"lam": 0.05, "finalize_step": 10}, "every": 2,
                    "kill": (5, 9)},
    "l0": {"name": "l0", "kwargs": {"finalize_step": 9}, "every": 2, "kill": (4, 10), "slow": True},
    "activation_decay": {"name": "activation_decay", "kwargs": {"begin_step": 2, "end_step": 10}, "every": 3,
                         "kill": (4, 10), "slow": True},
    "evolution": {"name": "evolution", "kwargs": {"every_n_steps": 4, "population": 4, "fitness_batches": 1},
                  "every": 3, "kill": (4, 10), "slow": True},
    "distill": {"name": "distill", "kwargs": {}, "every": 3, "kill": (4, 10), "slow": True},
    "first_k": {"name": "first_k", "kwargs": {"prune_step": 8}, "every": 3, "kill": (4, 10), "slow": True},
    "random_channels": {"name": "random_channels", "kwargs": {"every_n_steps": 2, "sparsity_end_step": 10},
                        "every": 3, "kill": (4, 10), "slow": True},
    # pruned at step 5 from batches drawn at the start of fit
    "one_shot": {"name": "one_shot", "kwargs": {"method": "wanda", "prune_step": 5, "calibration_batches": 2},
                 "every": 3, "kill": (4, 10), "slow": True},
    "random_unstructured": {"name": "random_unstructured",
                            "kwargs": {"every_n_steps": 2, "sparsity_end_step": 10}, "every": 3,
                            "kill": (4, 10), "slow": True},
}


def make_kill_case(case):
    spec = KILL_CASES[case]
    callback = lp.create_callback(spec["name"], verbose=False, **spec["kwargs"])
    pl.seed_everything(0, verbose=False)
    return [callback], tiny_classifier()


# ---------------------------------------------------------------------------------------------- data
def fake_cifar(root, n_train=60, n_test=20):
    """The torchvision CIFAR-10 layout with a few random images (no network)."""
    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n):
        return {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                "labels": rng.integers(0, 10, n).tolist()}

    per = n_train // 5
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(per), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)


def analyse_and_prove_each_group(model: torch.nn.Module, x: torch.Tensor):
    """``analyse_channels`` with the traced engine, then every group alone: masked == sliced (float64, random
    statistics) with every other unit removed; returns the analysis."""
    analysis = analyse_channels(model.eval(), x, engine="traced")
    for group in analysis.groups:
        removed = {group.name: list(range(0, group.size, 2))[: group.size - 1]}
        masked, _, sliced = masked_and_sliced(model, x, [group], removed, seed=1)
        assert compare_outputs(masked, sliced, 1e-6) <= 1e-6, group.name
    return analysis


def random_gates(groups, seed: int = 2):
    """A :class:`~lightning_prune.core.gates.GateSet` over ``groups`` with ~40% of every group's gates closed
    (the first unit always open) and the open ones drawn in [0.5, 1.5); returns ``(gates, keep)``."""
    from lightning_prune.core.gates import GateSet, ScaleGate

    gates = GateSet(groups, [ScaleGate(g.size) for g in groups])
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for group, gate in zip(groups, gates.gates):
        kept = torch.rand(group.size, generator=gen) > 0.4
        kept[0] = True
        keep.append(kept)
        with torch.no_grad():
            gate.weight.copy_(kept.float() * (0.5 + torch.rand(group.size, generator=gen)))
    return gates, keep


def logits_around_train_end(callback, x: torch.Tensor):
    """``[Spy, callback, Spy]`` recording the eval logits on ``x`` at ``on_train_end`` before the callback's
    own (``seen["gated"]``) and after it (``seen["compressed"]``); returns ``(callbacks, seen)``."""
    seen: dict[str, torch.Tensor] = {}

    def record(key: str):
        def store(trainer, module, hook):
            seen[key] = eval_logits(module, x)

        return Spy(store, ("on_train_end",))

    return [record("gated"), callback, record("compressed")], seen
