"""What a new user waits for: ``lightning-prune list`` and ``--help``, the demo, the first set-up, the suite.

Each part runs the real commands in fresh processes and merges its numbers into
``benchmarks/results/first_hour.{json,md}`` (the README's "What to expect" table is rendered from the JSON by
``benchmarks/readme_tables.py``). Wall time and the CPU time of the child processes are both recorded: on a
shared machine the CPU time is the steadier of the two.

Usage::

    python benchmarks/first_hour.py list     # `lightning-prune list` / `--help` latency, 7 runs each
    python benchmarks/first_hour.py demo     # `make demo` after set-up: time and test accuracy
    python benchmarks/first_hour.py busy     # the same with two CPU-burning processes beside it
    python benchmarks/first_hour.py demo --default-threads   # either, at torch's default thread count
                                             # (`--torch_threads null`) instead of the recipe's one thread
    python benchmarks/first_hour.py setup    # `make setup` in a fresh clone: time, size of .venv
    python benchmarks/first_hour.py venv     # the size of this checkout's .venv (what setup installed)
    python benchmarks/first_hour.py test --tests 655 --seconds 243 --source "a fresh clone"
                                             # record a `make test` run measured elsewhere
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "first_hour"
VENV_BIN = Path(sys.executable).parent


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None,
          timeout: float | None = None) -> dict[str, Any]:
    """Run ``command`` to the end: wall seconds, CPU seconds of the children, exit status, its output (rc
    ``None`` when it ran past ``timeout`` seconds and was stopped)."""
    cpu0, wall0 = _children_cpu(), time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False,
                              timeout=timeout)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as stopped:
        rc, out, err = None, str(stopped.stdout or ""), str(stopped.stderr or "")
    return {"wall_s": time.perf_counter() - wall0, "cpu_s": _children_cpu() - cpu0, "rc": rc,
            "stdout": out, "stderr": err}


def _script() -> str:
    script = VENV_BIN / "lightning-prune"
    return str(script) if script.exists() else shutil.which("lightning-prune") or "lightning-prune"


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "load_average_1min": round(os.getloadavg()[0], 2)}


def part_list(repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, args in {"list": ["list"], "help": ["--help"], "list --check": ["list", "--check"]}.items():
        runs = [timed([_script(), *args]) for _ in range(repeats if name != "list --check" else 3)]
        bad = [r for r in runs if r["rc"] != 0]
        if bad:
            raise SystemExit(f"`lightning-prune {' '.join(args)}` failed: {bad[0]['stderr']}")
        out[name] = {"median_wall_s": statistics.median(r["wall_s"] for r in runs),
                     "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
                     "max_wall_s": max(r["wall_s"] for r in runs), "runs": len(runs)}
        if name == "list":
            out[name]["rows"] = len(runs[0]["stdout"].splitlines()) - 1
            probe = subprocess.run([sys.executable, "-c", "import sys; from lightning_prune.cli import main; "
                                    "sys.argv = ['lightning-prune', 'list']; main(); "
                                    "print('torch' in sys.modules, file=sys.stderr)"],
                                   capture_output=True, text=True, check=True, cwd=ROOT)
            out[name]["imports_torch"] = probe.stderr.strip().splitlines()[-1] == "True"
    return out


def _recipe_threads(recipe: str) -> int | None:
    found = re.findall(r"^torch_threads:\s*(\d+)", (ROOT / recipe).read_text(), flags=re.M)
    return int(found[0]) if found else None


def part_demo(recipe: str, default_threads: bool = False, timeout: float | None = None) -> dict[str, Any]:
    extra = ["--torch_threads", "null"] if default_threads else []
    run = timed([_script(), "fit", "--config", recipe, *extra], timeout=timeout)
    threads = None if default_threads else _recipe_threads(recipe)
    entry: dict[str, Any] = {"command": " ".join(["lightning-prune fit --config", recipe, *extra]),
                             "wall_s": run["wall_s"], "cpu_s": run["cpu_s"],
                             "torch_threads": threads if threads is not None
                             else f"default ({os.cpu_count()})"}
    if run["rc"] is None:
        return {**entry, "test_acc": None, "sparsity": None, "stopped_after_s": timeout}
    if run["rc"] != 0:
        raise SystemExit(f"the demo failed:\n{run['stderr'][-3000:]}")
    acc = re.findall(r"^test/acc\s+([0-9.]+)", run["stdout"], flags=re.M)
    sparsity = re.findall(r"^targeted weights\s.*?([0-9.]+)%\s*$", run["stdout"], flags=re.M)
    return {**entry, "test_acc": float(acc[-1]) if acc else None,
            "sparsity": float(sparsity[-1]) / 100 if sparsity else None}


BURNER = "while True:\n    pass\n"


def part_busy(recipe: str, burners: int, default_threads: bool = False,
              timeout: float | None = None) -> dict[str, Any]:
    """The demo with ``burners`` CPU-bound processes (a Python busy loop each) running beside it."""
    procs = [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(burners)]
    try:
        time.sleep(2.0)  # let the load show in the load average a little
        entry = part_demo(recipe, default_threads, timeout)
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
    return {**entry, "burners": burners, "load_average_1min_after": round(os.getloadavg()[0], 2)}


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def part_setup(python: str) -> dict[str, Any]:
    clone = Path(tempfile.mkdtemp(prefix="lp-fresh-clone-"))
    try:
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        run = timed(["make", "setup", f"PYTHON={python}"], cwd=clone)
        if run["rc"] != 0:
            raise SystemExit(f"`make setup` failed:\n{run['stderr'][-3000:]}")
        venv = clone / ".venv"
        torch_build = subprocess.run([str(venv / "bin" / "python"), "-c",
                                      "import torch; print(torch.__version__)"],
                                     capture_output=True, text=True, check=False).stdout.strip()
        return {"command": "git clone ... && make setup", "wall_s": run["wall_s"], "cpu_s": run["cpu_s"],
                "venv_bytes": _du(venv), "torch": torch_build,
                "pip_cache": "reused (the machine had installed these wheels before)"}
    finally:
        shutil.rmtree(clone, ignore_errors=True)


def part_venv() -> dict[str, Any]:
    venv = ROOT / ".venv"
    torch_build = subprocess.run([str(venv / "bin" / "python"), "-c",
                                  "import torch; print(torch.__version__)"],
                                 capture_output=True, text=True, check=False).stdout.strip()
    return {"path": ".venv", "venv_bytes": _du(venv), "torch": torch_build}


def markdown(results: dict[str, Any]) -> str:
    from readme_tables import render_first_hour  # the one renderer of this table (also the README's)

    return ("What a new user waits for (`python benchmarks/first_hour.py ...`); wall time, and CPU time of"
            " the processes.\n\n" + render_first_hour(results) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["list", "demo", "busy", "setup", "venv", "test"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--recipe", default="recipes/digits/magnitude.yaml")
    parser.add_argument("--burners", type=int, default=2, help="busy: CPU-burning processes beside the demo")
    parser.add_argument("--default-threads", action="store_true",
                        help="demo/busy: at torch's default thread count, not the recipe's `torch_threads`")
    parser.add_argument("--timeout", type=float, default=1800.0, help="demo/busy: stop the demo after that")
    parser.add_argument("--python", default="python3", help="the interpreter `make setup` builds .venv from")
    parser.add_argument("--tests", type=int, help="test: how many tests passed")
    parser.add_argument("--seconds", type=float, help="test: wall seconds of `make test`")
    parser.add_argument("--source", default="", help="test: where the number comes from")
    args = parser.parse_args(argv)

    path = RESULTS.with_suffix(".json")
    machine = _machine()  # the load before the part runs
    if args.part == "list":
        entry = part_list(args.repeats)
    elif args.part == "demo":
        entry = part_demo(args.recipe, args.default_threads, args.timeout)
    elif args.part == "busy":
        entry = part_busy(args.recipe, args.burners, args.default_threads, args.timeout)
    elif args.part == "setup":
        entry = part_setup(args.python)
    elif args.part == "venv":
        entry = part_venv()
    else:
        if args.tests is None or args.seconds is None:
            parser.error("test needs --tests and --seconds")
        entry = {"command": "make test", "tests": args.tests, "wall_s": args.seconds, "source": args.source}
    entry["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    entry["machine"] = machine
    results = json.loads(path.read_text()) if path.exists() else {}  # read now: parts may run side by side
    results[args.part + ("_default_threads" if args.default_threads else "")] = entry
    path.write_text(json.dumps(results, indent=2) + "\n")
    RESULTS.with_suffix(".md").write_text(markdown(results))
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
