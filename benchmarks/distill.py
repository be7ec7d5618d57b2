"""Recover what pruning costs: knowledge distillation from the dense model, and layer targets from a scan.

timm ``resnet18`` on the embedded digits (32x32, batch 64). Per seed (the seed also draws the data split and
the batch order, the same for every arm of that seed):

1. **dense**: ``--dense-epochs`` epochs from scratch (SGD, lr 0.05, cosine); its weights start every arm.
2. **arms**, each ``--epochs`` epochs from the dense weights (SGD, lr ``--lr``, cosine), with and without
   ``KnowledgeDistillation()`` (defaults: alpha 1, T 4, the teacher is the dense model the fit starts from):

   * ``GradualMagnitudePruning(target_sparsity=0.95)`` and ``0.98`` (global threshold, TensorFlow's schedule:
     every 10 steps, the ramp ends at 75% of the fit);
   * ``GroupLassoPruning(target_flops=0.25, finalize_step=0.5, compress=True)`` (a quarter of the FLOPs,
     removed inside the fit at half time);
   * ``GradualMagnitudePruning(target_sparsity=0.95, layer_targets=...)`` with the per-layer targets
     ``lp.layer_targets_from_sensitivity(lp.sensitivity(dense, val), 0.95, tolerance=1/270)`` of the dense
     model (scanned on the 270 validation images at 0.5-0.99), against the global threshold above and
     ``scope="layer"`` (every layer at 95%).

Reported: test accuracy (270 images: one image is 0.37 points), mean ± sd over the seeds, and the paired
difference with distillation minus without (same seed, same data, same start).

``--dataset noisy_digits`` runs the same on a harder set made offline from digits: every image (train, val and
test) gets a fixed seeded Gaussian noise of ``sd 1.0`` (in standardised units) and a random shift of up to 3
pixels, so that pruning costs more than on the clean digits.

Usage::

    python benchmarks/distill.py                          # 3 seeds, dense 10 + 10 epochs per arm (~40 min)
    python benchmarks/distill.py --dense-epochs 15 --epochs 15 --tag full
    python benchmarks/distill.py --seeds 0 --dense-epochs 1 --epochs 1 --limit-batches 2 --tag quick  # smoke
    python benchmarks/distill.py --seeds 0 1 --tag s01 & python benchmarks/distill.py --seeds 2 --tag s2
    python benchmarks/distill.py --merge distill-s01 distill-s2          # one table from both

Writes ``benchmarks/results/distill[-TAG].{json,md}``. ``--limit-batches N`` runs N batches per epoch (train
and test) and scans on N batches: a smoke test of every arm, not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch_pruning.utils import count_ops_and_params  # noqa: E402

import lightning_prune as lp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("magnitude 0.95", "magnitude 0.98", "group-LASSO flops 0.25", "magnitude 0.95 layer scope",
        "magnitude 0.95 sensitivity targets")
KD_ARMS = ("magnitude 0.95", "magnitude 0.98", "group-LASSO flops 0.25")


class NoisyDigits(lp.DigitsDataModule):
    """Digits with a fixed seeded Gaussian noise (sd ``noise``) and a random shift of up to ``shift`` pixels
    on every image (the same for every seed and arm: the data set is fixed)."""

    def __init__(self, noise: float = 1.0, shift: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.noise, self.shift = noise, shift

    def _tensors(self):
        images, labels = super()._tensors()
        generator = torch.Generator().manual_seed(1234)
        shifted = torch.empty_like(images)
        moves = torch.randint(-self.shift, self.shift + 1, (len(images), 2), generator=generator)
        for i, (dy, dx) in enumerate(moves.tolist()):
            shifted[i] = torch.roll(images[i], shifts=(dy, dx), dims=(1, 2))
        noise = torch.randn(shifted.shape[0], 1, *shifted.shape[2:], generator=generator) * self.noise
        return shifted + noise, labels  # the same noise on the 3 (repeated) channels


def datamodule(name: str, seed: int) -> lp.DigitsDataModule:
    if name == "noisy_digits":
        return NoisyDigits(batch_size=64, seed=seed)
    return lp.DigitsDataModule(batch_size=64, seed=seed)


def trainer(epochs: int, callbacks: list[pl.Callback], limit: int | None = None) -> pl.Trainer:
    limits = {} if limit is None else {"limit_train_batches": limit, "limit_test_batches": limit}
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, **limits,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=callbacks, deterministic=True)


def model(lr: float) -> lp.ImageClassifier:
    return lp.ImageClassifier("resnet18", num_classes=10, optimizer="sgd", lr=lr, weight_decay=5e-4,
                              scheduler="cosine")


def test_accuracy(fitted: pl.Trainer, module: pl.LightningModule, data: pl.LightningDataModule) -> float:
    return float(fitted.test(module, datamodule=data, verbose=False)[0]["test/acc"])


def pruning_callback(arm: str, targets: dict[str, float] | None) -> pl.Callback:
    quiet = {"verbose": False, "log_media_every_n_epochs": 0}
    if arm == "magnitude 0.95":
        return lp.GradualMagnitudePruning(target_sparsity=0.95, **quiet)
    if arm == "magnitude 0.98":
        return lp.GradualMagnitudePruning(target_sparsity=0.98, **quiet)
    if arm == "magnitude 0.95 layer scope":
        return lp.GradualMagnitudePruning(target_sparsity=0.95, scope="layer", **quiet)
    if arm == "magnitude 0.95 sensitivity targets":
        return lp.GradualMagnitudePruning(target_sparsity=0.95, layer_targets=targets, **quiet)
    return lp.GroupLassoPruning(target_flops=0.25, finalize_step=0.5, compress=True, input_size=(3, 32, 32),
                                **quiet)


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"seed": seed, "arms": {}}
    pl.seed_everything(seed, verbose=False)
    data = datamodule(args.dataset, seed)
    dense = model(0.05)
    start = time.perf_counter()
    fitted = trainer(args.dense_epochs, [], args.limit_batches)
    fitted.fit(dense, datamodule=data)
    out["dense"] = {"test_acc": test_accuracy(fitted, dense, data), "seconds": time.perf_counter() - start}
    weights = {k: v.detach().clone() for k, v in dense.state_dict().items()}
    dense_flops = count_ops_and_params(dense.model.eval(), torch.randn(1, 3, 32, 32))[0]
    print(f"[seed {seed}] dense: {out['dense']['test_acc']:.4f}", flush=True)

    data.setup("validate")
    start = time.perf_counter()
    table = lp.sensitivity(dense.eval(), data.val_dataloader(), sparsities=(0.5, 0.75, 0.9, 0.95, 0.98, 0.99),
                           max_batches=args.limit_batches, progress=False)
    targets = lp.layer_targets_from_sensitivity(table, 0.95, tolerance=1 / len(data.val_set))
    out["sensitivity"] = {"table": table.to_dict(), "layer_targets": targets,
                          "seconds": time.perf_counter() - start}

    for arm in ARMS:
        for distill in ((False, True) if arm in KD_ARMS else (False,)):
            pl.seed_everything(seed, verbose=False)
            student = model(args.lr)
            student.load_state_dict(weights)
            callbacks: list[pl.Callback] = [pruning_callback(arm, targets)]
            if distill:
                callbacks.append(lp.KnowledgeDistillation(verbose=False))
            start = time.perf_counter()
            fitted = trainer(args.epochs, callbacks, args.limit_batches)
            fitted.fit(student, datamodule=data)
            seconds = time.perf_counter() - start
            report = lp.sparsity_report(student)
            flops = count_ops_and_params(student.model.eval(), torch.randn(1, 3, 32, 32))[0]
            key = f"{arm} + distillation" if distill else arm
            out["arms"][key] = {
                "test_acc": test_accuracy(fitted, student, data), "seconds": seconds,
                "sparsity": report.sparsity, "params": sum(p.numel() for p in student.parameters()),
                "flops": float(flops), "dense_flops": float(dense_flops),
                "dense_params": sum(v.numel() for k, v in weights.items() if "running" not in k
                                    and "num_batches" not in k)}
            print(f"[seed {seed}] {key}: {out['arms'][key]['test_acc']:.4f} (sparsity"
                  f" {report.sparsity:.3f}, {seconds:.0f} s)", flush=True)
    return out


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def markdown(results: dict[str, Any]) -> str:
    seeds = results["seeds"]
    runs = results["runs"]
    args = results["args"]
    lines = [f"# Distillation and sensitivity targets ({args['dataset']}, resnet18)", "",
             f"`{results['command']}`: {len(seeds)} seed(s) {seeds}, dense {args['dense_epochs']} epochs from"
             f" scratch, then {args['epochs']} epochs per arm from the dense weights (SGD lr {args['lr']},"
             " cosine); test accuracy on the held-out images, mean ± sd over the seeds.", "",
             "| arm | test acc | with distillation | paired difference | sparsity / size |",
             "|---|---:|---:|---:|---:|",
             f"| dense | {mean_sd([r['dense']['test_acc'] for r in runs])} | | | 0 |"]
    for arm in ARMS:
        plain = [r["arms"][arm]["test_acc"] for r in runs]
        row = f"| {arm} | {mean_sd(plain)} |"
        kd_key = f"{arm} + distillation"
        if all(kd_key in r["arms"] for r in runs) and arm in KD_ARMS:
            kd = [r["arms"][kd_key]["test_acc"] for r in runs]
            diff = [a - b for a, b in zip(kd, plain)]
            row += f" {mean_sd(kd)} | {'+' if statistics.mean(diff) >= 0 else ''}{mean_sd(diff)} |"
        else:
            row += " | |"
        first = runs[0]["arms"][arm]
        size = (f"FLOPs {first['flops'] / first['dense_flops']:.3f}x, params"
                f" {first['params'] / first['dense_params']:.3f}x" if arm.startswith("group")
                else f"{statistics.mean(r['arms'][arm]['sparsity'] for r in runs):.3f}")
        lines.append(row + f" {size} |")
    base = [r["arms"]["magnitude 0.95"]["test_acc"] for r in runs]
    for arm in ("magnitude 0.95 sensitivity targets", "magnitude 0.95 layer scope"):
        diff = [r["arms"][arm]["test_acc"] - b for r, b in zip(runs, base)]
        lines += ["", f"Paired difference, {arm} minus the global threshold (magnitude 0.95):"
                  f" {'+' if statistics.mean(diff) >= 0 else ''}{mean_sd(diff)}."]
    targets = runs[0]["sensitivity"]["layer_targets"]
    lines += ["", f"Sensitivity targets of seed {seeds[0]} (`layer_targets_from_sensitivity(table, 0.95,"
              " tolerance=1/270)`): " + ", ".join(f"`{k.removeprefix('model.')}` {v:.3f}"
                                                     for k, v in sorted(targets.items()))]
    seconds = sum(r["dense"]["seconds"] + sum(a["seconds"] for a in r["arms"].values()) for r in runs)
    lines += ["", f"Total fit time {seconds / 60:.1f} min on {os.cpu_count()} CPU core(s)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--dataset", choices=("digits", "noisy_digits"), default="digits")
    parser.add_argument("--limit-batches", type=int, default=None,
                        help="batches per epoch and scanned (a smoke test)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--merge", nargs="+", metavar="STEM", default=None,
                        help="write one result from the runs of these results/STEM.json (same arguments)")
    args = parser.parse_args()
    command = "python benchmarks/distill.py " + " ".join(sys.argv[1:])
    if args.merge:
        parts = [json.loads((RESULTS / f"{stem}.json").read_text(encoding="utf-8")) for stem in args.merge]
        keys = ("dense_epochs", "epochs", "lr", "dataset", "limit_batches")
        first = {k: parts[0]["args"].get(k) for k in keys}
        if any({k: p["args"].get(k) for k in keys} != first for p in parts):
            raise SystemExit(f"--merge: the runs differ in {keys}")
        runs = sorted((run for p in parts for run in p["runs"]), key=lambda r: r["seed"])
        command = " && ".join(p["command"] for p in parts) + f" && {command}"
        merged_args = {**parts[0]["args"], "seeds": [r["seed"] for r in runs]}
        results = {"command": command, "seeds": merged_args["seeds"], "args": merged_args, "runs": runs}
    else:
        runs = [run_seed(seed, args) for seed in args.seeds]
        results = {"command": command.strip(), "seeds": args.seeds, "args": vars(args), "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    stem = "distill" + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (RESULTS / f"{stem}.md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))


if __name__ == "__main__":
    main()
