"""Calibrate the shapes benchmark: dense timm models trained from scratch on ``lp.ShapesDataModule``.

For each model: the test accuracy on the 2,000 test images after ``--epochs`` epochs of SGD (the
``ImageClassifier`` defaults: Nesterov momentum 0.9, lr 0.05, weight decay 5e-4, cosine) at batch 64, the
images seen, the process CPU time of the fit and test (at ``--threads`` torch threads) and the load average of
the machine before and after (the CPU is shared: wall time is not a measure here).

Usage::

    python benchmarks/shapes.py --models resnet18 --epochs 8 --train-size 4000
    python benchmarks/shapes.py --models efficientnet_b0 --stem-stride 1 --zero-init-last  # mobile recipe
    python benchmarks/shapes.py --gallery benchmarks/results/shapes.png   # sample images, nothing trained

Writes ``benchmarks/results/<out>.{json,md}`` (merged with the rows already there, by model and settings).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

import lightning_prune as lp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(model_name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    load_before = os.getloadavg()[0]
    started_cpu, started_wall = time.process_time(), time.perf_counter()
    data = lp.ShapesDataModule(batch_size=args.batch_size, train_size=args.train_size, val_size=args.val_size,
                               test_size=args.test_size, difficulty=args.difficulty, data_seed=args.data_seed,
                               seed=args.seed)
    data.setup("fit")
    data_cpu = time.process_time() - started_cpu
    model = lp.ImageClassifier(model_name, num_classes=10, optimizer=args.optimizer, lr=args.lr,
                               stem_stride=args.stem_stride, zero_init_last=args.zero_init_last)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, check_val_every_n_epoch=max(args.epochs, 1))
    trainer.fit(model, datamodule=data)
    val_acc = float(trainer.callback_metrics["val/acc"])
    test_acc = float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])
    return {"model": model_name, "difficulty": args.difficulty, "epochs": args.epochs,
            "train_size": args.train_size, "test_size": args.test_size, "batch_size": args.batch_size,
            "optimizer": args.optimizer, "lr": args.lr, "stem_stride": args.stem_stride,
            "zero_init_last": args.zero_init_last, "seed": args.seed, "data_seed": args.data_seed,
            "threads": args.threads,
            "images_seen": args.epochs * args.train_size, "val_acc": val_acc, "test_acc": test_acc,
            "data_cpu_s": data_cpu, "cpu_min": (time.process_time() - started_cpu) / 60,
            "wall_min": (time.perf_counter() - started_wall) / 60,
            "load_before": load_before, "load_after": os.getloadavg()[0]}


#: the settings a row is known by, with the value of rows written before the setting existed
_KEYS = {"model": None, "difficulty": None, "epochs": None, "train_size": None, "optimizer": "sgd",
         "lr": None, "stem_stride": None, "zero_init_last": False, "seed": None, "data_seed": None}


def _key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k, default) for k, default in _KEYS.items())


def _recipe(row: dict[str, Any]) -> str:
    """The model's changes to timm's architecture and init, in ``ImageClassifier`` arguments."""
    changes = ([f"stem_stride={row['stem_stride']}"] if row.get("stem_stride") else []) \
        + (["zero_init_last"] if row.get("zero_init_last") else [])
    return ", ".join(changes) or "–"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18"])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--difficulty", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--stem-stride", type=int, default=None,
                        help="ImageClassifier(stem_stride=...): 1 adapts the mobile families to 32x32")
    parser.add_argument("--zero-init-last", action="store_true",
                        help="ImageClassifier(zero_init_last=True): residual blocks start as the identity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="shapes")
    parser.add_argument("--merge", nargs="*", default=[], metavar="JSON",
                        help="result files of separate runs to merge into --out (nothing is trained)")
    parser.add_argument("--gallery", metavar="PNG",
                        help="write sample images (a row per difficulty 0, 0.2, 0.5, 1, a column per class)")
    args = parser.parse_args(argv)
    if args.gallery:
        gallery(Path(args.gallery))
        return
    path = ROOT / "benchmarks" / "results" / f"{args.out}.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    for other in args.merge:
        for row in json.loads(Path(other).read_text()):
            rows = [r for r in rows if _key(r) != _key(row)] + [row]
    for name in [] if args.merge else args.models:
        row = run(name, args)
        print(json.dumps(row), flush=True)
        rows = [r for r in rows if _key(r) != _key(row)] + [row]
    rows.sort(key=lambda r: (r["model"], r["difficulty"], _recipe(r), r["epochs"], r["train_size"],
                             r["seed"]))
    path.write_text(json.dumps(rows, indent=1) + "\n")
    path.with_suffix(".md").write_text(render(rows))


def gallery(path: Path, scale: int = 3) -> None:
    import numpy as np
    from PIL import Image

    from lightning_prune.training.shapes import render_shapes

    rows = [render_shapes(np.arange(10), (0, 9), difficulty) for difficulty in (0.0, 0.2, 0.5, 1.0)]
    grid = np.concatenate([np.concatenate(list(row.transpose(0, 2, 3, 1)), axis=1) for row in rows], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | recipe | difficulty | optimizer, lr | epochs | train images | images seen | test acc"
             " | val acc | CPU min | load avg (start/end) |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['model']}` | {_recipe(r)} | {r['difficulty']}"
                     f" | {r.get('optimizer', 'sgd')}, {r['lr']}"
                     f" | {r['epochs']} | {r['train_size']}"
                     f" | {r['images_seen']} | {r['test_acc']:.4f} | {r['val_acc']:.4f} | {r['cpu_min']:.1f}"
                     f" | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    return ("Dense timm models from scratch on `lp.ShapesDataModule` (2,000 test images, 1,000 validation),"
            " `lp.ImageClassifier` (SGD: Nesterov 0.9; weight decay 5e-4; cosine) at batch 64, one thread,"
            " seed 0,"
            " data seed 0; `python benchmarks/shapes.py` (recipe: `--stem-stride 1 --zero-init-last`, the"
            " `ImageClassifier` arguments the mobile families need here,"
            " `benchmarks/results/shapes-mobile.md`). CPU minutes: process CPU time of data, fit and test"
            " on a shared 2-core machine; the load average is the machine's (1 minute) at start and end.\n\n"
            + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
