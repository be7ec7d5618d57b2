"""``target_latency=0.5`` against ``target_flops=0.5``: the measured latency each gives (issue 24, point 4).

For each model (timm, 10 classes, 32x32 inputs, untrained weights: the latency does not depend on them) the
units are chosen by :func:`lightning_prune.prune_one_shot` ``method="channels"`` (the same ranking for both
targets: activation energy on two random calibration batches, no refit), once with ``target_latency`` (the
per-layer latency table measured at batch ``--batch`` on this CPU, one thread, then corrected by timing the
compressed copy) and once with ``target_flops``; the dense model and the two compressed ones are then timed
together: thread CPU time (``time.thread_time``) at one intra-op thread, batch ``--batch``, interleaved
(every round times each model once), the median of ``--reps`` rounds. Results in
``benchmarks/results/latency_target.{json,md}``.

Usage::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/latency_target.py
    python benchmarks/latency_target.py --models resnet18 --reps 7   # the other models' rows are kept
    python benchmarks/latency_target.py --render        # the .md again from the .json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "latency_target"
MODELS = {"resnet18": {}, "resnet50": {}, "efficientnet_b0": {}, "mobilenetv3_large_100": {},
          "regnety_002": {}, "convnext_atto": {}, "vit_tiny_patch16_224": {"img_size": 32}}  # issue 24's
SIDE = 32


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(name: str, target: float, batch: int, reps: int) -> dict[str, object]:
    import timm

    import lightning_prune as lp
    from lightning_prune.graph.latency import interleaved_medians

    torch.manual_seed(0)
    dense = timm.create_model(name, num_classes=10, **MODELS.get(name, {})).eval()
    calibration = [torch.randn(8, 3, SIDE, SIDE) for _ in range(2)]
    row: dict[str, object] = {"model": name, "target": target, "batch": batch}
    pruned = {}
    for kind in ("latency", "flops"):
        model = copy.deepcopy(dense)
        started, cpu = time.perf_counter(), time.process_time()
        result = lp.prune_one_shot(model, calibration, method="channels", calibration_batches=2,
                                   compensate=False, input_size=(3, SIDE, SIDE), latency_batch_size=batch,
                                   **{f"target_{kind}": target})
        row[f"{kind}_plan_s"] = round(time.perf_counter() - started, 1)
        row[f"{kind}_plan_cpu_s"] = round(time.process_time() - cpu, 1)
        row[f"{kind}_flops"] = result.flops_remaining
        if kind == "latency":
            row["latency_predicted"] = result.latency_predicted
            row["latency_measured_at_plan"] = result.latency_remaining
        pruned[kind] = model.eval()
        log(f"{name} target_{kind}={target}: FLOPs {result.flops_remaining:.3f}"
            + (f", latency predicted {result.latency_predicted:.3f}, measured {result.latency_remaining:.3f}"
               if kind == "latency" else "") + f" ({row[f'{kind}_plan_s']} s)")
    x = torch.randn(batch, 3, SIDE, SIDE)
    models = [dense, pruned["latency"], pruned["flops"]]
    times = interleaved_medians([lambda m=m: m(x) for m in models], "cpu", reps)
    row["dense_ms"] = times[0] * 1e3
    row["latency_target_ratio"] = times[1] / times[0]
    row["flops_target_ratio"] = times[2] / times[0]
    log(f"{name}: dense {row['dense_ms']:.1f} ms; measured latency / dense: target_latency={target}"
        f" {row['latency_target_ratio']:.3f}, target_flops={target} {row['flops_target_ratio']:.3f}")
    return row


def write(rows: list[dict[str, object]], config: dict[str, object]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps({"config": config, "rows": rows}, indent=2) + "\n")
    lines = [
        "# target_latency against target_flops (one-shot channels, this CPU)", "",
        f"Batch {config['batch']}, {SIDE}x{SIDE} inputs, one thread; thread CPU time, the three models"
        f" interleaved, median of {config['reps']} rounds; {config['machine']}, load average"
        f" {config['load']}. Written by `benchmarks/latency_target.py`.", "",
        "| model | dense ms | target | target_latency: latency | at the choice: measured / predicted"
        " | FLOPs | target_flops: latency | FLOPs | CPU s to choose (latency / flops) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dense_ms']:.1f} | {r['target']} | {r['latency_target_ratio']:.3f} |"
            f" {r['latency_measured_at_plan']:.3f} / {r['latency_predicted']:.3f} |"
            f" {r['latency_flops']:.3f} | {r['flops_target_ratio']:.3f} | {r['flops_flops']:.3f} |"
            f" {r['latency_plan_cpu_s']} / {r['flops_plan_cpu_s']} |")
    lines += ["", "Latency and FLOPs as fractions of the dense model's. *latency*: the three models timed"
              " together at the end; *at the choice*: what the plan's own timing measured (against a dense"
              " copy) and what the latency table predicted for the plan chosen. The goal of issue 24: a"
              " measured latency <= 0.52 of dense at `target_latency=0.5`."]
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--render", action="store_true", help="rewrite the .md from the .json only")
    args = parser.parse_args()
    if args.render:
        data = json.loads(RESULTS.with_suffix(".json").read_text())
        write(data["rows"], data["config"])
        return
    torch.set_num_threads(1)
    rows = [run(name, args.target, args.batch, args.reps) for name in args.models]
    if RESULTS.with_suffix(".json").exists():  # the rows of the models not run this time are kept
        previous = json.loads(RESULTS.with_suffix(".json").read_text())["rows"]
        rows = [r for r in previous if r["model"] not in args.models] + rows
        rows.sort(key=lambda r: list(MODELS).index(r["model"]) if r["model"] in MODELS else len(MODELS))
    config = {"target": args.target, "batch": args.batch, "reps": args.reps, "threads": 1,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "load": " ".join(f"{v:.1f}" for v in os.getloadavg()), "torch": torch.__version__}
    write(rows, config)
    log(f"wrote {RESULTS.with_suffix('.md')}")


if __name__ == "__main__":
    main()
