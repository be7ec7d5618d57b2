"""A quick comparison of the channel callbacks' ``importance=`` criteria and of BatchNorm recalibration.

One small model, a seed per call, a few epochs on ``lp.ShapesDataModule``: ``GroupLassoPruning(target_flops=t,
finalize_step=0.5, compress=True, importance=..., recalibrate_bn_batches=...)``; for each configuration the
test accuracy right after the decision (before any fine-tuning step: what the criterion and the
recalibration alone leave) and at the end. This is the evidence for the defaults, not the benchmark
(``benchmarks/channels.py`` compares methods and peers on several models and seeds)::

    nice -n 10 python benchmarks/importance.py --seed 0      # test_resnet, 4 epochs, 2,000 images
    nice -n 10 python benchmarks/importance.py --seed 1
    python benchmarks/importance.py --merge A.json B.json    # runs made apart, into importance.json/md

(``resnet18`` at this budget stays at chance on the shapes: it needs ~8 epochs of 5,000 images,
``benchmarks/results/shapes.md``.)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

import lightning_prune as lp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class AfterDecision(pl.Callback):
    """The test accuracy right after the units are decided (the masked model, before fine-tuning)."""

    def __init__(self, pruning: Any, data: Any) -> None:
        self.pruning, self.data, self.acc = pruning, data, None

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.acc is not None or not getattr(self.pruning, "finalized", False):
            return
        was = pl_module.training
        pl_module.eval()
        correct = total = 0
        for x, y in self.data.test_dataloader():
            correct += int((pl_module(x).argmax(1) == y).sum())
            total += len(y)
        pl_module.train(was)
        self.acc = correct / total


def run(importance: str, recalibrate: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    pl.seed_everything(args.seed, verbose=False)
    started = time.process_time()
    data = lp.ShapesDataModule(batch_size=64, train_size=args.train_size, val_size=500,
                               test_size=args.test_size, difficulty=args.difficulty, seed=args.seed)
    data.setup("fit")
    data.setup("test")
    model = lp.ImageClassifier(args.model, num_classes=10, optimizer="sgd", lr=0.05, weight_decay=5e-4)
    pruning = lp.GroupLassoPruning(target_flops=args.target, finalize_step=0.5, compress=True, verbose=False,
                                   importance=importance, recalibrate_bn_batches=recalibrate)
    probe = AfterDecision(pruning, data)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[pruning, probe])
    trainer.fit(model, datamodule=data)
    test_acc = float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])
    return {"model": args.model, "target_flops": args.target, "importance": importance,
            "recalibrate_bn_batches": recalibrate, "epochs": args.epochs, "train_size": args.train_size,
            "test_size": args.test_size, "difficulty": args.difficulty, "seed": args.seed,
            "flops_remaining": pruning.size_metrics().get("prune/flops_remaining"),
            "acc_after_decision": probe.acc, "test_acc": test_acc,
            "cpu_min": (time.process_time() - started) / 60}


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["`GroupLassoPruning(target_flops=t, finalize_step=0.5, compress=True, importance=..., "
             "recalibrate_bn_batches=...)` from scratch on `lp.ShapesDataModule`, one thread; "
             "`python benchmarks/importance.py` (`--seed`). *after decision*: test accuracy of the masked "
             "model right after the units are chosen (and the BatchNorms recalibrated), before any "
             "fine-tuning step.",
             "",
             "| model | epochs | train images | target FLOPs | seed | importance | BN recalibration batches "
             "| FLOPs kept | acc. after decision | test acc. | CPU min |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['model']}` | {r['epochs']} | {r['train_size']} | {r['target_flops']} | "
                     f"{r['seed']} | `{r['importance']}` | {r['recalibrate_bn_batches']} | "
                     f"{r['flops_remaining']:.3f} | "
                     f"{r['acc_after_decision']:.4f} | {r['test_acc']:.4f} | {r['cpu_min']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--difficulty", type=float, default=0.0)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", nargs="+", default=["gate:8", "weight_norm:8", "taylor:8", "bn_scale:8",
                                                      "random:8", "gate:0", "taylor:0"],
                        help="importance:recalibrate_bn_batches pairs")
    parser.add_argument("--out", default="importance")
    parser.add_argument("--merge", nargs="*", default=None, metavar="JSON",
                        help="result files of runs made apart (in parallel) to merge into --out")
    args = parser.parse_args(argv)
    path = ROOT / "benchmarks" / "results" / f"{args.out}.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    if args.merge is not None:  # (with no file: re-render --out)
        order = {name: i for i, name in enumerate(["gate", "weight_norm", "taylor", "bn_scale", "random"])}
        for other in args.merge:
            rows += json.loads(Path(other).read_text())
        rows.sort(key=lambda r: (r["model"], r["target_flops"], r["seed"], -r["recalibrate_bn_batches"],
                                 order.get(r["importance"], 9)))
        path.write_text(json.dumps(rows, indent=1) + "\n")
        path.with_suffix(".md").write_text(render(rows))
        return
    for spec in args.runs:
        importance, _, recalibrate = spec.partition(":")
        row = run(importance, int(recalibrate or 8), args)
        print(json.dumps(row), flush=True)
        key = ("model", "target_flops", "importance", "recalibrate_bn_batches", "epochs", "train_size",
               "seed")
        rows = [r for r in rows if tuple(r[k] for k in key) != tuple(row[k] for k in key)] + [row]
        path.write_text(json.dumps(rows, indent=1) + "\n")
        path.with_suffix(".md").write_text(render(rows))


if __name__ == "__main__":
    main()
