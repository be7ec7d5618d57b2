"""The channel analysis (graph, exactness proof) at one thread against torch's default thread count.

Each measurement runs in a fresh process (``--child``) so neither run warms the other; both are repeated,
interleaved. Wall time and the process' CPU time (all its threads) are recorded, with the load average, in
``benchmarks/results/analysis_threads.{json,md}``.

Usage::

    python benchmarks/analysis_threads.py --models efficientnet_b0 resnet18 --size 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "analysis_threads"


def child(model_name: str, size: int, threads: int | None, pin: bool) -> dict[str, float]:
    import timm
    import torch

    import lightning_prune as lp
    from lightning_prune.graph import example_inputs_for

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10)
    example = example_inputs_for(model, (3, size, size))
    if not pin:  # measure the analysis as it was: at whatever thread count the caller has
        from lightning_prune.core import threads as lp_threads

        lp_threads.ANALYSIS_THREADS = None
    usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    analysis = lp.analyse_channels(model, example, analysis_time_limit_s=None)
    wall = time.perf_counter() - wall0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "groups": len(analysis.groups),
            "threads_after": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["efficientnet_b0"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "SIZE", "THREADS", "PIN"))
    args = parser.parse_args()
    if args.child:
        name, size, threads, pin = args.child
        print(json.dumps(child(name, int(size), None if threads == "default" else int(threads), pin == "1")))
        return
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    arms = {"default threads, unpinned": ("default", "0"), "one thread": ("1", "0"),
            "default threads, the library pins": ("default", "1")}
    rows = []
    for model_name in args.models:
        runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
        loads = []
        for _ in range(args.repeats):
            for arm, (threads, pin) in arms.items():
                loads.append(os.getloadavg()[0])
                command = [sys.executable, __file__, "--child", model_name, str(args.size), threads, pin]
                out = subprocess.run(command, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
                runs[arm].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for arm, rs in runs.items():
            rows.append({"model": model_name, "size": args.size, "arm": arm,
                         "median_wall_s": statistics.median(r["wall_s"] for r in rs),
                         "median_cpu_s": statistics.median(r["cpu_s"] for r in rs),
                         "max_wall_s": max(r["wall_s"] for r in rs), "runs": len(rs),
                         "groups": rs[0]["groups"]})
        rows[-1]["load_average_1min"] = round(statistics.mean(loads), 2)
    result = {"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
              "default_threads": __import__("torch").get_num_threads(), "rows": rows}
    RESULTS.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Channel analysis (`lp.analyse_channels`, graph + exactness proof) at {args.size}x{args.size},"
             f" {result['cpus']} CPUs, torch's default {result['default_threads']} threads;"
             f" medians of {args.repeats} fresh processes, {result['measured']}.", "",
             "| model | threads | wall s (median) | wall s (max) | CPU s (median) | groups |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['model']}` | {r['arm']} | {r['median_wall_s']:.2f} | {r['max_wall_s']:.2f} |"
                     f" {r['median_cpu_s']:.2f} | {r['groups']} |")
    loads_note = ", ".join(f"{r['model']}: {r['load_average_1min']}"
                           for r in rows if "load_average_1min" in r)
    lines += ["", f"Mean 1-minute load average during the runs: {loads_note}."]
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
