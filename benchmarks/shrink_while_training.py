"""Shrink while training: how much faster fine-tuning runs once the pruned channels are gone inside the fit.

timm ``resnet18`` on the embedded digits (32x32, batch 64), ``GroupLassoPruning(target_flops=0.25,
finalize_step=0.5, compress=True)`` for ``E`` epochs, two ways with the same seed:

* **in fit**: the units are removed right after finalisation (the default position): the second half trains
  the small model, every optimizer carrying its state over;
* **at the end**: ``compress_step=1.0``: the second half trains the dense, masked model; the units are removed
  after the last step.

Per run: thread CPU time (``time.thread_time``, one torch thread) of every training step
(``on_train_batch_start`` to ``on_train_batch_end``: forward, backward, optimizer step, the callbacks),
medians before and after the compression step; the whole fit's wall and thread time; the final test accuracy.
The two fits run one after the other, so a third measurement interleaves them: the same training step
(forward, backward, SGD step) on the masked dense model and on the compressed one, alternating, medians of
``--reps`` repetitions. Goal: steps at least 2x faster after compression at 0.25 of the FLOPs.

Usage::

    python benchmarks/shrink_while_training.py              # E=6 (about a minute on 2 CPU cores)
    python benchmarks/shrink_while_training.py --epochs 2 --reps 5

Writes ``benchmarks/results/shrink_while_training.{json,md}``.
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
import torch.nn.functional as F  # noqa: E402
from torch_pruning.utils import count_ops_and_params  # noqa: E402

import lightning_prune as lp  # noqa: E402
from lightning_prune.core.gates import unit_masks  # noqa: E402
from lightning_prune.core.masks import MaskSet  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIDE = 32


class StepTimer(pl.Callback):
    """Thread CPU seconds of every training step, with the global step it ended at and the parameter count."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float, int]] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.thread_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = sum(p.numel() for p in pl_module.parameters())
        self.steps.append((int(trainer.global_step), time.thread_time() - self._start, params))


def fit(epochs: int, at_end: bool, seed: int, lr: float) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    torch.set_num_threads(1)
    data = lp.DigitsDataModule(batch_size=64, seed=seed)
    model = lp.ImageClassifier("resnet18", num_classes=10, optimizer="sgd", lr=lr, weight_decay=5e-4,
                               scheduler="cosine")
    pruner = lp.GroupLassoPruning(target_flops=0.25, finalize_step=0.5, compress=True,
                                  compress_step=1.0 if at_end else None, verbose=False,
                                  log_media_every_n_epochs=0, input_size=(3, SIDE, SIDE))
    timer = StepTimer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[pruner, timer],
                         deterministic=True)
    wall, thread = time.perf_counter(), time.thread_time()
    trainer.fit(model, datamodule=data)
    wall, thread = time.perf_counter() - wall, time.thread_time() - thread
    acc = float(trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"])
    finalised = pruner.finalize_at_step
    before = [t for step, t, _ in timer.steps if step <= finalised]
    # (the compression step itself left out)
    after = [t for step, t, _ in timer.steps if step > finalised + 1]
    flops, params = count_ops_and_params(model.model.eval(), torch.randn(1, 3, SIDE, SIDE))
    return {"run": "at the end" if at_end else "in fit", "acc": acc, "wall_s": wall, "thread_s": thread,
            "finalize_step": finalised, "steps": len(timer.steps),
            "ms_before": 1e3 * statistics.median(before), "ms_after": 1e3 * statistics.median(after),
            "flops": float(flops), "params": float(params), "model": model, "pruner": pruner}


def masked_dense(pruner: lp.GroupLassoPruning) -> tuple[lp.ImageClassifier, MaskSet]:
    """A dense resnet18 masked with the pruner's plan: what the at-the-end run trains after finalisation."""
    module = lp.ImageClassifier("resnet18", num_classes=10)
    masks = MaskSet()
    for name, mask in unit_masks(module, pruner.groups, pruner.keep).items():
        masks.add(name, module.get_parameter(name), mask)
    masks.apply_()
    return module, masks


def interleaved_steps(masked: lp.ImageClassifier, small: lp.ImageClassifier, masks: MaskSet, reps: int,
                      inner: int) -> dict[str, float]:
    """Median thread-CPU milliseconds of one SGD training step (forward, backward, step, masks re-applied for
    the masked model) on each model, alternating."""
    torch.set_num_threads(1)
    x = torch.randn(64, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    models = {"masked dense": (masked.model.train(), masks), "compressed": (small.model.train(), None)}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, (m, _) in models.items()}

    def step(name: str) -> None:
        model, mask_set = models[name]
        optimizers[name].zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizers[name].step()
        if mask_set is not None:
            mask_set.apply_()

    for name in models:
        step(name)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(reps):
        for name in models:
            start = time.thread_time()
            for _ in range(inner):
                step(name)
            times[name].append((time.thread_time() - start) * 1e3 / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def markdown(rows: list[dict[str, Any]], steps: dict[str, float], config: dict[str, Any]) -> str:
    lines = [f"resnet18, digits 32x32, batch 64, {config['epochs']} epochs,"
             f" GroupLassoPruning(target_flops=0.25, finalize_step=0.5), seed {config['seed']}; thread CPU"
             " time at one torch thread.", "",
             "| compressed | test acc | FLOPs | params | ms/step before | ms/step after |"
             " fine-tuning speed-up | fit wall s | fit thread s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['acc']:.4f} | {r['flops'] / 1e6:.1f} M | {r['params'] / 1e6:.2f} M |"
                     f" {r['ms_before']:.0f} | {r['ms_after']:.0f} | {r['ms_before'] / r['ms_after']:.2f}x |"
                     f" {r['wall_s']:.0f} | {r['thread_s']:.0f} |")
    shrunk, at_end = rows
    lines += ["",
              "Fine-tuning steps of the fit that compressed in the fit against those of the fit that"
              f" compressed at the end: {at_end['ms_after'] / shrunk['ms_after']:.2f}x faster; whole fit"
              f" {at_end['thread_s'] / shrunk['thread_s']:.2f}x faster (thread time); test accuracy"
              f" {shrunk['acc']:.4f} vs {at_end['acc']:.4f}."]
    lines += ["",
              f"Interleaved in one process (medians of {config['reps']} repetitions of one SGD step at batch"
              f" 64): masked dense {steps['masked dense']:.0f} ms, compressed {steps['compressed']:.0f} ms:"
              f" **{steps['masked dense'] / steps['compressed']:.2f}x faster** after compression."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=str(RESULTS / "shrink_while_training"))
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    rows = []
    for at_end in (False, True):
        row = fit(args.epochs, at_end, args.seed, args.lr)
        log(f"{row['run']}: acc {row['acc']:.4f}, {row['ms_before']:.0f} -> {row['ms_after']:.0f} ms/step,"
            f" fit {row['wall_s']:.0f} s wall")
        rows.append(row)
    # the masked dense model and the compressed one, one step each in alternation
    masked, masks = masked_dense(rows[0]["pruner"])
    steps = interleaved_steps(masked, rows[0]["model"], masks, args.reps, 2)
    log(f"interleaved: {steps}")
    config = vars(args)
    results = [{k: v for k, v in r.items() if k not in ("model", "pruner")} for r in rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"config": config, "runs": results,
                                                    "interleaved_ms": steps},
                                                   indent=2))
    out.with_suffix(".md").write_text(markdown(results, steps, config))
    print(markdown(results, steps, config))


if __name__ == "__main__":
    main()
