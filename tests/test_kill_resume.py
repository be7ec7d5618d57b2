"""Survive a kill: a real fit in a subprocess, checkpointing every few steps, is SIGKILLed at a seeded moment
(a step and a hook drawn from a seeded generator, bounded to the part of the schedule that matters); the fit
resumed from its last checkpoint ends exactly like the uninterrupted run."""

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lightning_prune as lp
from lightning_prune.testing import assert_state_equal, fit_tiny
from tests.helpers import KILL_CASES as CASES
from tests.helpers import KILL_FIT as FIT
from tests.helpers import make_kill_case as make_case

HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")

def kill_moment(case, seed=15):
    """The seeded moment: a step in the case's bounds and one of three hooks of that step."""
    rng = random.Random(f"{case}-{seed}")
    low, high = CASES[case]["kill"]
    return rng.randint(low, high), rng.choice(HOOKS)


def _kill_at(case, root, step, hook, timeout=240.0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    script = str(Path(__file__).with_name("_kill_child.py"))
    child = subprocess.Popen([sys.executable, script, case, str(root), str(step), hook],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline, seen = time.monotonic() + timeout, []
    try:
        for line in child.stdout:
            seen.append(line)
            if line.startswith("KILLME"):
                os.kill(child.pid, signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "the child never reached the kill moment"
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, "".join(seen[-30:])
    assert line.split()[1:] == [str(step), hook]


def _last_checkpoint(root):
    found = sorted((int(re.search(r"step=(\d+)", p.name).group(1)), p)
                   for p in (root / "ckpt").glob("*.ckpt"))
    assert found, "the killed fit left no checkpoint"
    return found[-1]


def _params():
    return [pytest.param(case, marks=[pytest.mark.slow] if spec.get("slow") else [])
            for case, spec in CASES.items()]


def test_every_registered_callback_has_a_case():
    assert {spec["name"] for spec in CASES.values()} == set(lp.list_callbacks())


@pytest.mark.parametrize("case", _params())
def test_killed_fit_resumes_to_the_uninterrupted_result(case, tmp_path):
    step, hook = kill_moment(case)
    _kill_at(case, tmp_path, step, hook)
    ckpt_step, ckpt = _last_checkpoint(tmp_path)
    assert ckpt_step <= step

    callbacks, model = make_case(case)
    _, full = fit_tiny(callbacks, tmp_path / "full", model=model, **FIT)
    resumed_callbacks, resumed_model = make_case(case)
    _, resumed = fit_tiny(resumed_callbacks, tmp_path / "resumed", model=resumed_model, ckpt_path=ckpt, **FIT)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert a.shape == b.shape and torch.equal(a, b), (
            f"killed at step {step} ({hook}), resumed from step {ckpt_step}: differs at {name}")
    for a, b in zip(callbacks, resumed_callbacks):
        assert_state_equal(a.state_dict(), b.state_dict(), f"{type(a).__name__}.state")
    if case == "lottery_ticket":  # the checkpoint lies inside round 1, after its prune
        state = torch.load(ckpt, weights_only=False)["callbacks"]
        (lt,) = [s for k, s in state.items() if k.startswith("LotteryTicket")]
        assert lt["round"] == 1 and lt["rewind_state"] is not None
    if case == "group_lasso":  # captured gates, not yet finalised
        state = torch.load(ckpt, weights_only=False)["callbacks"]
        (gl,) = [s for k, s in state.items() if k.startswith("GroupLassoPruning")]
        assert not gl["finalized"]
        frozen = [gate[k] for gate in gl["gates"]["gates"] for k in gate if k.endswith("frozen")]
        assert frozen and any(bool(f.any()) for f in frozen), "no gate was captured yet"
