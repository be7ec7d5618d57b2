"""benchmarks/gpu_check.py without CUDA: says so and exits 0 (on a GPU machine it runs the real check)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_without_cuda_says_so_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CUDA is not available" in done.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.slow
def test_gpu_check_on_a_gpu():
    done = subprocess.run([sys.executable, str(SCRIPT), "--only", "magnitude,l0", "--budget", "200"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


@pytest.mark.slow
def test_gpu_check_fsdp2_rows_dry_run_on_cpu(tmp_path):
    """The FSDP2 rows (ModelParallelStrategy with fully_shard, one rank) run their code paths on the CPU."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--accelerator", "cpu", "--fsdp2-only", "--only",
                           "magnitude,evolution", "--budget", "500"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    for name in ("dense", "magnitude", "evolution"):
        assert f"| {name} (FSDP2) | bf16-mixed | no |" in done.stdout and "FAIL" not in done.stdout
