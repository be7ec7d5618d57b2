"""Why GroupLassoPruning loses to torch-pruning on ``lp.ShapesDataModule``: the penalty's strength, the
ranking, the schedule -- one factor at a time on resnet18 at ``target_flops=0.5``.

Every run is ``benchmarks/channels.py``'s "ours" row (8 epochs of SGD lr 0.05 cosine, batch 64, 5,000 training
and 2,000 test images, ``GroupLassoPruning(target_flops=0.5, finalize_step=0.5, compress=True)``) with one
change, named by ``--variant``:

* ``lam=2e-5`` (or any ``--kwargs`` JSON of the callback's arguments, e.g. ``{"importance": "taylor"}``);
* ``--restart``: the removal at the end of a 4-epoch fit, then a second 4-epoch fit with a fresh optimizer
  and cosine schedule (torch-pruning's fine-tuning protocol);
* ``--one-shot``: no penalty at all: ``OneShotPruning("channels", target_flops=0.5, round_to=8)`` at the
  middle of the same 8-epoch fit (units ranked by their calibration activations, readers refitted).

Per run: test accuracy, FLOPs and parameters as fractions of dense (torch-pruning's counter), the kept
width of every Conv/Linear that lost channels, CPU minutes. The dense and torch-pruning rows of the same
seeds are in ``benchmarks/results/channels-shapes-r18b.md``.

Usage::

    python benchmarks/lasso_strength.py --variant lam2e-5 --kwargs '{"lam": 2e-5}' --seed 0
    python benchmarks/lasso_strength.py --summary   # results/lasso_strength.{json,md} from the runs
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

import lightning_prune as lp

sys.path.insert(0, str(Path(__file__).parent))
import channels as bench  # noqa: E402 - the "ours" row's trainer, classifier, accuracy and counter

RESULTS = Path(__file__).parent / "results"
RUNS = RESULTS / "lasso_strength"


def widths(net: torch.nn.Module) -> dict[str, int]:
    return {n: m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features
            for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


def run(variant: str, seed: int, kwargs: dict, restart: bool, one_shot: bool, target: float) -> dict:
    torch.set_num_threads(1)
    data = lp.ShapesDataModule(batch_size=64, train_size=5000, test_size=2000, difficulty=0.0, data_seed=0,
                               seed=seed)
    data.setup("fit")
    pl.seed_everything(seed, verbose=False)
    model = bench.classifier("resnet18", 0.05)
    dense_net = copy.deepcopy(model.model).eval()
    dense_flops, dense_params = bench.count(dense_net)
    before = widths(dense_net)
    start = time.process_time()
    if one_shot:
        cb = lp.OneShotPruning("channels", target_flops=target, prune_step=0.5, round_to=8, verbose=False,
                               log_media_every_n_epochs=0, input_size=(3, 32, 32), **kwargs)
        bench.trainer(8, [cb]).fit(model, datamodule=data)
    else:
        args = dict(target_flops=target, finalize_step=1.0 if restart else 0.5, compress=True, verbose=False,
                    log_media_every_n_epochs=0, input_size=(3, 32, 32))
        cb = lp.GroupLassoPruning(**{**args, **kwargs})
        if restart:
            bench.trainer(4, [cb]).fit(model, datamodule=data)
            bench.trainer(4).fit(model, datamodule=data)
        else:
            bench.trainer(8, [cb]).fit(model, datamodule=data)
    flops, params = bench.count(model.model)
    after = widths(model.model)
    return {"variant": variant, "seed": seed, "kwargs": kwargs, "restart": restart, "one_shot": one_shot,
            "acc": bench.accuracy(model, data), "flops": flops / dense_flops, "params": params / dense_params,
            "cpu_min": (time.process_time() - start) / 60,
            "widths": {n: f"{after[n]}/{before[n]}" for n in before if n in after and after[n] != before[n]}}


def summary() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]
    (RESULTS / "lasso_strength.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["resnet18 on `lp.ShapesDataModule`, `target_flops=0.5`, 8 epochs (see"
             " `benchmarks/lasso_strength.py`); dense and torch-pruning on the same seeds:"
             " `channels-shapes-r18b.md`.", "",
             "| variant | seeds | test acc (mean ± sd) | FLOPs | params |", "|---|---|---:|---:|---:|"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        these = [r for r in rows if r["variant"] == variant]
        accs = [r["acc"] for r in these]
        sd = f" ± {statistics.stdev(accs):.4f}" if len(accs) > 1 else ""
        seeds = ",".join(str(r["seed"]) for r in these)
        lines.append(f"| {variant} | {seeds} | {statistics.fmean(accs):.4f}{sd}"
                     f" | {statistics.fmean(r['flops'] for r in these):.3f}"
                     f" | {statistics.fmean(r['params'] for r in these):.3f} |")
    lines += ["", "The runs of 2026-12-06 were made with this script's prototype (the same calls; the"
              " library at cce10e0-860eea8, before `lam`'s default changed: every run's `kwargs` in the"
              " JSON name `lam`), `OMP_NUM_THREADS=1`, on the shared 2-core machine (3-8 CPU minutes"
              " each). The default row's seeds 1 and 2 are the *ours* rows of `channels-shapes-r18b.md`"
              " (0.7245, 0.7380). The `lam=2e-5, restart` run was made later with this script at 6071118"
              " (`--variant 'lam=2e-5, restart' --kwargs '{\"lam\": 2e-5}' --restart --seed 0`).", "",
              "Kept widths (Conv/Linear that lost channels), per run:", ""]
    lines += [f"- {r['variant']} seed {r['seed']}: acc {r['acc']:.4f}; "
              + ", ".join(f"`{n}` {w}" for n, w in r["widths"].items()) for r in rows]
    (RESULTS / "lasso_strength.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="default")
    parser.add_argument("--kwargs", default="{}", help="JSON of the callback's arguments")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--restart", action="store_true")
    parser.add_argument("--one-shot", action="store_true")
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    if args.summary:
        summary()
        return
    row = run(args.variant, args.seed, json.loads(args.kwargs), args.restart, args.one_shot, args.target)
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / f"{args.variant}-s{args.seed}.json").write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
