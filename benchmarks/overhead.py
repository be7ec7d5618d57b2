"""Training-step overhead of masking: dense vs GradualMagnitudePruning vs Lightning's ModelPruning, eager
and ``torch.compile``d (inductor).

A timm resnet18 at 32x32 on synthetic data, batch 8 and batch 64, each configuration a real Lightning
``Trainer.fit`` (compiled: ``trainer.fit(torch.compile(module))``); the configurations are interleaved (dense,
ours, ModelPruning, dense compiled, ours compiled, ModelPruning compiled, dense, ...) and each step is timed
from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, optimizer step and, for ours, the
in-place mask multiply after the step) in **thread CPU time at one torch thread**: on a machine shared with
other jobs, wall-clock medians of identical runs differ by ±10%, the CPU time of the one thread doing the
work does not. Pruning to 50% happens during the first epoch (and the compiled graphs are built there); only
the steps of the later epochs are timed. Reports medians and ratios against dense (eager against eager,
compiled against compiled) measured in the same run, plus mask memory per masked parameter and the one-off
cost of a mask update.

    python benchmarks/overhead.py            # full: 5 rounds x 30 timed steps per config and batch size
    python benchmarks/overhead.py --quick    # 2 rounds x 8 steps
    python benchmarks/overhead.py --no-compile
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import GradualMagnitudePruning
from lightning_prune.training.models import ImageClassifier

RESULTS = Path(__file__).parent / "results"


class StepTimer(Callback):
    """Times steps after the warm-up epoch and measures mask memory while training is under way."""

    def __init__(self, kind: str, skip_epochs: int = 1) -> None:
        self.kind, self.skip_epochs, self.times, self._t0 = kind, skip_epochs, [], 0.0
        self.mask_bytes_per_param = 0.0
        self._seen = 0

    def on_train_batch_start(self, trainer, *args) -> None:
        self._t0 = time.thread_time()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.current_epoch < self.skip_epochs:
            return
        self._seen += 1
        if self._seen == 1:
            # the first step after the warm-up epoch is not timed: ModelPruning's pruning at the end of the
            # warm-up recompiles a compiled module there (its weight_orig * mask hooks change)
            self.mask_bytes_per_param = _mask_bytes_per_param(self.kind, pl_module, trainer.callbacks)
            return
        self.times.append(time.thread_time() - self._t0)


def _data(batch: int, steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch * steps, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch * steps,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _callbacks(kind: str, warmup_steps: int) -> list[Callback]:
    if kind == "ours":
        # 50% at the first update (step 1), masks refreshed during the warm-up epoch only
        return [GradualMagnitudePruning(target_sparsity=0.5, initial_sparsity=0.5, every_n_steps=1,
                                        end_step=warmup_steps, sparsity_end_step=1, verbose=False,
                                        log_media_every_n_epochs=0)]
    if kind == "model_pruning":
        return [ModelPruning("l1_unstructured", amount=0.5, use_global_unstructured=True, verbose=0)]
    return []


def _fit(kind: str, batch: int, steps: int, compiled: bool = False) -> tuple[list[float], float]:
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier("resnet18", num_classes=10, scheduler="none", weight_decay=0.0)
    fit_model = torch.compile(model) if compiled else model
    callbacks = _callbacks(kind, steps)
    timer = StepTimer(kind)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, timer],
                         limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(fit_model, train_dataloaders=_data(batch, steps))
    return timer.times, timer.mask_bytes_per_param


def _mask_bytes_per_param(kind: str, model: pl.LightningModule, callbacks: list[Callback]) -> float:
    if kind == "ours":
        masks = next(cb for cb in callbacks if isinstance(cb, GradualMagnitudePruning)).masks
        return masks.memory_bytes() / sum(m.numel() for _, m in masks.items())
    if kind == "model_pruning":  # during training: weight_orig (a full copy) + a float mask per parameter
        pruned = [(m, n) for m in model.modules() for n, _ in m.named_buffers(recurse=False)
                  if n.endswith("_mask")]
        nbytes = sum(getattr(m, n).numel() * getattr(m, n).element_size() for m, n in pruned)
        nbytes += sum(getattr(m, n.replace("_mask", "_orig")).numel() * 4 for m, n in pruned)
        return nbytes / sum(getattr(m, n).numel() for m, n in pruned)
    return 0.0


def _mask_update_seconds() -> float:
    model = ImageClassifier("resnet18", num_classes=10)
    pruner = GradualMagnitudePruning(target_sparsity=0.5, verbose=False)
    pruner.setup(None, model, "fit")  # type: ignore[arg-type]
    start = time.perf_counter()
    for _ in range(5):
        pruner.masks.update(pruner.compute_masks(0.5))
    return (time.perf_counter() - start) / 5


def _row(times: dict[str, list[float]], memory: dict[str, float], kinds: list[str]) -> dict[str, object]:
    medians = {k: statistics.median(times[k]) for k in kinds}
    return {
        "median_step_ms": {k: round(v * 1000, 2) for k, v in medians.items()},
        "ratio_vs_dense": {k: round(v / medians["dense"], 4) for k, v in medians.items()},
        "mask_bytes_per_masked_param": {k: memory[k] for k in kinds},
        "timed_steps": {k: len(times[k]) for k in kinds},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled configurations")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = args.rounds or (2 if args.quick else 5)
    steps = args.steps or (8 if args.quick else 30)
    kinds = ["dense", "ours", "model_pruning"]
    modes = [False] if args.no_compile else [False, True]
    results: dict[str, dict[str, object]] = {}
    for batch in (8, 64):
        times: dict[tuple[str, bool], list[float]] = {(k, c): [] for k in kinds for c in modes}
        memory: dict[tuple[str, bool], float] = {}
        for _ in range(rounds):
            for compiled in modes:
                for kind in kinds:  # interleaved, so drifts in machine load hit every configuration alike
                    step_times, memory[kind, compiled] = _fit(kind, batch, steps, compiled)
                    times[kind, compiled].extend(step_times)
        results[str(batch)] = _row({k: times[k, False] for k in kinds}, {k: memory[k, False] for k in kinds},
                                   kinds)
        if True in modes:
            results[f"{batch}_compiled"] = _row({k: times[k, True] for k in kinds},
                                                {k: memory[k, True] for k in kinds}, kinds)
    results["mask_update_ms"] = round(_mask_update_seconds() * 1000, 1)
    results["machine"] = {"cpu": platform.processor() or platform.machine(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": rounds,
                          "steps": steps, "clock": "thread CPU time (time.thread_time)",
                          "compiler": "inductor (torch.compile defaults)" if True in modes else None}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| batch | compiled | dense ms/step | ours ms/step (ratio) | ModelPruning ms/step (ratio)"
             " | mask bytes/param ours / ModelPruning |",
             "|---|---|---:|---:|---:|---:|"]
    for batch in ("8", "64"):
        for key, label in ((batch, "no"), (f"{batch}_compiled", "inductor")):
            if key not in results:
                continue
            r = results[key]
            ms, ratio, mem = r["median_step_ms"], r["ratio_vs_dense"], r["mask_bytes_per_masked_param"]
            lines.append(f"| {batch} | {label} | {ms['dense']} | {ms['ours']} ({ratio['ours']:.3f}) |"
                         f" {ms['model_pruning']} ({ratio['model_pruning']:.3f}) |"
                         f" {mem['ours']:.1f} / {mem['model_pruning']:.1f} |")
    lines.append(f"\nThread CPU time at 1 torch thread, medians of {rounds} interleaved rounds x {steps}"
                 f" timed steps per configuration. One mask update (global 50%, resnet18, 11.2M weights):"
                 f" {results['mask_update_ms']} ms.")
    table = "\n".join(lines)
    (RESULTS / "overhead.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
