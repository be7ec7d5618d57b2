"""Every callback (built-in and baselines) on a ``torch.compile``d network, on CPU.

Two ways a user compiles: ``trainer.fit(torch.compile(module))`` (Lightning unwraps it and compiles
``forward``/``training_step``) and a LightningModule that compiles its own network (``self.model =
torch.compile(net)``). A compiled fit must be the eager fit: the same weights at the end, the same callback
state, masks exact zeros after every optimizer step, gates acting inside the compiled graph, λ changing every
step without a recompilation per step, offspring evaluated on their own weights, and an exact resume.

Compiles on 2 CPU cores are slow (inductor: minutes for a tiny resnet's forward and backward), so the default
suite runs five callbacks (the baselines' plugin among them) on a self-compiled network with dynamo's
``eager`` backend (dynamo's graph capture -- hooks, guards, recompilations, graph breaks -- without code
generation), λ's recompilation count and the offspring's evaluation under ``aot_eager`` (AOTAutograd's
functionalised graph, what inductor compiles) and one compiled resume; the ``slow`` tests run every callback
both ways under ``eager`` and ``aot_eager``, every resume, and inductor (``-m slow``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch._dynamo.testing import CompileCounterWithBackend

import lightning_prune as lp
from lightning_prune.callbacks.evolution import EvolutionaryMutation
from lightning_prune.callbacks.gating import GatePruningCallback
from lightning_prune.core.reparam import DecayingActivation
from lightning_prune.testing import TINY_MODELS, assert_state_equal, fit_tiny
from lightning_prune.training.models import ImageClassifier
from tests.helpers import Invariants, Spy, fast_callback

BACKEND = "aot_eager"
STEPS = {"max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 0}
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


NAMES = sorted(lp.list_callbacks())


class SelfCompiled(ImageClassifier):
    """A LightningModule that compiles its own network (``self.model = torch.compile(net)``)."""

    def __init__(self, *args, backend: str = BACKEND, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.model = torch.compile(self.model, backend=backend)


def tiny(mode: str, backend=BACKEND, model_name: str = "test_resnet", seed: int = 0):
    """(what to pass to ``trainer.fit``, the LightningModule) for ``mode`` in eager/outer/inner."""
    torch.manual_seed(seed)
    kwargs = {"model_name": model_name, "num_classes": 10, "model_kwargs": TINY_MODELS.get(model_name, {}),
              "optimizer": "sgd", "lr": 0.05, "scheduler": "none", "weight_decay": 0.0}
    if mode == "inner":
        module = SelfCompiled(backend=backend, **kwargs)
        return module, module
    module = ImageClassifier(**kwargs)
    return (torch.compile(module, backend=backend) if mode == "outer" else module), module


def plain_state(module) -> dict[str, torch.Tensor]:
    """The module's weights under the names of an uncompiled module."""
    return {k.replace("_orig_mod.", ""): v.detach().clone() for k, v in module.state_dict().items()}


def _fit(name: str, mode: str, root: Path, backend=BACKEND, **kwargs):
    fit_model, module = tiny(mode, backend)
    callback = fast_callback(name)
    spy = Invariants(callback)
    fit_tiny([callback, spy], root, model=fit_model, **{**STEPS, **kwargs})
    return module, callback, spy


_EAGER: dict[tuple[str, tuple], tuple[dict, dict]] = {}


def _eager_reference(name: str, root: Path, **kwargs) -> tuple[dict, dict]:
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _EAGER:
        module, callback, _ = _fit(name, "eager", root, **kwargs)
        _EAGER[key] = (plain_state(module), callback.state_dict())
    return _EAGER[key]


def _uncompiled_names(value):
    """A callback state with the names of the uncompiled module (``model._orig_mod.x`` -> ``model.x``)."""
    if isinstance(value, str):
        return value.replace("_orig_mod.", "")
    if isinstance(value, dict):
        return {_uncompiled_names(k): _uncompiled_names(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_uncompiled_names(v) for v in value)
    return value


def _close_states(a, b, path="state") -> None:
    """Callback states equal: booleans/integers/strings exactly, floating tensors and floats to 1e-4."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, path
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=path)
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for key in a:
            _close_states(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close_states(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b)), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


FAST = ["distill", "group_lasso", "lottery_ticket", "magnitude", "random_unstructured"]  # ~5-20 s each
CASES = (
    [pytest.param(n, "inner", "eager", id=f"{n}-inner-eager", marks=() if n in FAST else pytest.mark.slow)
     for n in NAMES]
    + [pytest.param(n, "inner", BACKEND, id=f"{n}-inner-{BACKEND}", marks=pytest.mark.slow) for n in NAMES]
    + [pytest.param(n, "outer", BACKEND, id=f"{n}-outer-{BACKEND}", marks=pytest.mark.slow) for n in NAMES]
)


@pytest.mark.parametrize(("name", "mode", "backend"), CASES)
def test_compiled_fit_equals_the_eager_fit(name, mode, backend, tmp_path):
    torch._dynamo.reset()
    weights, state = _eager_reference(name, tmp_path / "eager")
    module, callback, spy = _fit(name, mode, tmp_path / mode, backend=backend)
    assert spy.steps == 6 and spy.outputs_checked >= 1
    if isinstance(callback, GatePruningCallback):
        assert spy.gates_seen >= 3 and callback.finalized
    got = plain_state(module)
    assert set(got) == set(weights)
    for key, value in weights.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)
    _close_states(_uncompiled_names(callback.state_dict()), state)
    if isinstance(callback, lp.PruningCallback) and not isinstance(callback, GatePruningCallback):
        assert callback.masks.sparsity() > 0, "the callback never pruned"


def test_lambda_changes_every_step_without_recompiling(tmp_path):
    """λ is a tensor the compiled graph reads: the frame count stays put while λ ramps through (0, 1); a
    Python float would recompile at every step until dynamo's cache limit (8) sent the model back to eager."""
    counter = CompileCounterWithBackend(BACKEND)
    torch._dynamo.reset()
    fit_model, module = tiny("outer", backend=counter)
    decay = lp.ActivationDecay(begin_step=0, end_step=6, verbose=False)
    seen: list[tuple[float, int]] = []

    def record(trainer, pl_module, hook):
        seen.append((decay.lam, counter.frame_count))
        wrappers = [m for m in pl_module.modules() if isinstance(m, DecayingActivation)]
        assert wrappers and {m.lam for m in wrappers} == {decay.lam}

    fit_tiny([decay, Spy(record, hooks=("on_train_batch_end",))], tmp_path, model=fit_model,
             max_epochs=1, limit_train_batches=7, limit_val_batches=0)
    ramp = [(lam, frames) for lam, frames in seen if 0.0 < lam < 1.0]
    lams = [lam for lam, _ in ramp]
    assert len(ramp) == 5 and lams == sorted(set(lams)), seen  # a new λ at every step
    assert ramp[-1][1] == ramp[0][1], f"recompiled while λ ramped: {seen}"
    assert counter.frame_count <= 8, seen


class CheckedEvolution(EvolutionaryMutation):
    """Evaluates every offspring twice: as the compiled model runs it, and eagerly on the same weights."""

    pairs: list[tuple[float, float]]

    def evaluate(self, trainer, pl_module, batches):
        compiled = super().evaluate(trainer, pl_module, batches)
        with torch.compiler.set_stance("force_eager"):
            eager = super().evaluate(trainer, pl_module, batches)
        self.pairs = [*getattr(self, "pairs", []), (compiled, eager)]
        return compiled


@pytest.mark.parametrize("mode", ["inner", pytest.param("outer", marks=pytest.mark.slow)])
def test_offspring_are_evaluated_on_their_own_weights(mode, tmp_path):
    fit_model, module = tiny(mode)
    evo = CheckedEvolution(population=4, every_n_steps=2, fitness_batches=1, sigma=0.05, verbose=False)
    fit_tiny([evo], tmp_path, model=fit_model, max_epochs=1, limit_train_batches=4, limit_val_batches=1)
    assert evo.generation == 2
    # per generation: the parent, 4 offspring (select) -> 10 evaluations
    assert len(evo.pairs) == 10
    fitness = [c for c, _ in evo.pairs]
    assert len(set(fitness)) > 2, "the offspring all scored alike: the compiled model did not see them"
    for compiled, eager in evo.pairs:
        assert math.isclose(compiled, eager, rel_tol=1e-5, abs_tol=1e-6), evo.pairs


RESUME = ["magnitude"]


def _resume_check(name: str, mode: str, root: Path, backend=BACKEND) -> None:
    saver = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    fit_model, full = tiny(mode, backend)
    callback = fast_callback(name)
    fit_tiny([callback, saver], root / "full", model=fit_model, **STEPS)
    fit_model, resumed = tiny(mode, backend, seed=1)  # different initial weights: the checkpoint must win
    resumed_cb = fast_callback(name)
    fit_tiny([resumed_cb], root / "resumed", model=fit_model, ckpt_path=root / "ckpt" / "epoch=0.ckpt",
             **STEPS)
    a, b = plain_state(full), plain_state(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{name}/{mode}: resumed run differs at {key}"
    state, resumed_state = callback.state_dict(), resumed_cb.state_dict()
    state.pop("config", None), resumed_state.pop("config", None)
    assert_state_equal(state, resumed_state)


@pytest.mark.parametrize("name", RESUME)
def test_compiled_resume_is_exact(name, tmp_path):
    _resume_check(name, "inner", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["outer", "inner"])
@pytest.mark.parametrize("name", NAMES)
def test_compiled_resume_is_exact_every_callback(name, mode, tmp_path):
    _resume_check(name, mode, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["magnitude", "activation_decay", "group_lasso"])
def test_inductor_fit_equals_the_eager_fit(name, tmp_path):
    """The real CPU compiler (code generation included): the same invariants, weights to 1e-4."""
    torch._dynamo.reset()
    weights, state = _eager_reference(name, tmp_path / "eager")
    module, callback, spy = _fit(name, "inner", tmp_path / "inductor", backend="inductor")
    assert spy.steps == 6
    got = plain_state(module)
    for key, value in weights.items():
        torch.testing.assert_close(got[key], value, rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["l0", "evolution"])
def test_inductor_fit_equals_the_eager_fit_in_float64(name, tmp_path):
    """L0 and evolution under inductor, in float64: the same weights as the eager fit to 1e-7.

    In float32 the two runs end 0.03 (l0) and 0.004 (evolution) apart after 6 steps, yet no decision flips:
    the data, the global RNG, the hard-concrete noise (drawn eagerly at the graph break), L0's kept units and
    every offspring choice are the same, and on the same weights the compiled and the eager step agree (loss
    to 4e-6, gradients to 2e-5 of the largest); the 1e-6 rounding differences of inductor's kernels grow
    10-50x per step on these trajectories (replacing the stem's max-pool by an average pool does not stop
    it). In float64 the rounding starts 1e9 times smaller, so a real difference (other noise, a gate missing
    from the graph, another offspring) still shows and rounding does not."""
    torch._dynamo.reset()
    weights, _ = _eager_reference(name, tmp_path / "eager", precision="64-true")
    module, _, spy = _fit(name, "inner", tmp_path / "inductor", backend="inductor", precision="64-true")
    assert spy.steps == 6
    got = plain_state(module)
    for key, value in weights.items():
        assert value.dtype in (torch.float64, torch.int64), key
        torch.testing.assert_close(got[key], value, rtol=1e-7, atol=1e-7, msg=key)


@pytest.mark.slow
def test_inductor_masks_and_lambda(tmp_path):
    """Inductor on the two hot paths: magnitude masks stay exact zeros at every step and λ ramps without a
    recompilation per step."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    fit_model, module = tiny("inner", backend=counter)
    magnitude = lp.GradualMagnitudePruning(target_sparsity=0.5, every_n_steps=1, sparsity_end_step=1,
                                           verbose=False)
    decay = lp.ActivationDecay(begin_step=0, end_step=7, verbose=False)
    spy = Invariants(magnitude)
    frames: list[int] = []
    fit_tiny([magnitude, decay, spy, Spy(lambda t, m, h: frames.append(counter.frame_count))], tmp_path,
             model=fit_model, max_epochs=1, limit_train_batches=6, limit_val_batches=0)
    assert spy.steps == 6 and magnitude.masks.sparsity() == pytest.approx(0.5, abs=0.01)
    assert frames[1] == frames[-1], frames  # steps 1..5: λ in (0, 1), no new frame
