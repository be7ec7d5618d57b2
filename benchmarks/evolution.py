"""SGD vs SGD + offspring selection vs SGD + evolution strategies on the embedded digits data.

Part 1 (quality): the same seeded runs of a timm model trained with SGD alone, with
``EvolutionaryMutation(strategy="select")`` and with ``EvolutionaryMutation(strategy="es")``; validation
accuracy after every epoch (plot), final validation accuracy (mean and spread over seeds), and the wall time
of one generation against the time of one SGD epoch measured in the same run. The fitness set is the
datamodule's *test* split (the "evolution on another part of the data" of the Habr article «Спартанское
обучение нейронных сетей», "Spartan training of neural networks", in Russian), so the validation
accuracy plotted is never seen by the selection.

Part 2 (memory): the peak resident memory added by one generation of a timm resnet18 (11.7M parameters) at
population 10 and at population 100, each in a fresh process, for ``select`` and ``es``. RSS is sampled
every millisecond from ``/proc/self/statm`` during the generation; the added peak is compared with the size
of one copy of the parameters. Offspring are regenerated from seeds, so the goal is population 100 within
10% of population 10.

    python benchmarks/evolution.py            # full: 3 seeds x 20 epochs, every 5 epochs, 20 offspring
    python benchmarks/evolution.py --quick    # 2 seeds x 6 epochs, a generation every 2 epochs, 10 offspring
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lightning_prune import DigitsDataModule, EvolutionaryMutation, ImageClassifier  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------- quality
class Recorder(Callback):
    def __init__(self) -> None:
        self.val_acc: list[float] = []
        self.epoch_times: list[float] = []
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_times.append(time.perf_counter() - self._t0)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_acc.append(float(trainer.callback_metrics["val/acc"]))


class TimedEvolution(EvolutionaryMutation):
    """Records the wall time of every generation."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.times: list[float] = []
        self.changed: list[float] = []

    def run_generation(self, trainer, pl_module):
        t0 = time.perf_counter()
        metrics = super().run_generation(trainer, pl_module)
        self.times.append(time.perf_counter() - t0)
        self.changed.append(metrics["prune/evolution/parent_changed"])
        return metrics


def _fitness_loader(dm: DigitsDataModule):
    dm.setup("fit")
    return torch.utils.data.DataLoader(dm.test_set, batch_size=dm.batch_size, shuffle=False)


def run_quality(args) -> dict:
    methods = {
        "sgd": None,
        "select": dict(strategy="select", mutation="uniform", sigma=args.sigma_select),
        "es": dict(strategy="es", mutation="gaussian", sigma=args.sigma_es, es_lr=args.es_lr),
    }
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in args.seeds:
        for method, kwargs in methods.items():  # interleaved, so contention hits every method alike
            pl.seed_everything(seed, verbose=False)
            dm = DigitsDataModule(batch_size=64, seed=seed)
            model = ImageClassifier(args.model, num_classes=10, optimizer="sgd", lr=0.05, weight_decay=5e-4,
                                    scheduler="cosine")
            recorder = Recorder()
            callbacks: list[Callback] = [recorder]
            evo = None
            if kwargs is not None:
                evo = TimedEvolution(population=args.population, every_n_epochs=args.every,
                                     fitness_batches=None, fitness_dataloader=_fitness_loader(dm), seed=seed,
                                     verbose=False, **kwargs)
                callbacks.insert(0, evo)
            trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
                                 callbacks=callbacks)
            t0 = time.perf_counter()
            trainer.fit(model, datamodule=dm)
            total = time.perf_counter() - t0
            gen_times = evo.times if evo else []
            # the epoch timer includes the generation (it runs at the epoch's last batch): take it out
            sgd_epochs = list(recorder.epoch_times)
            if evo:
                for i, t in zip(range(args.every - 1, args.epochs, args.every), gen_times):
                    sgd_epochs[i] -= t
            runs[method].append({"seed": seed, "val_acc": recorder.val_acc, "total_s": total,
                                 "epoch_s": statistics.median(sgd_epochs), "generation_s": gen_times,
                                 "parent_changed": evo.changed if evo else []})
            print(f"[quality] seed {seed} {method:6s}: final val acc {recorder.val_acc[-1]:.4f}"
                  f" (best {max(recorder.val_acc):.4f}), {total:.1f} s", flush=True)
    return runs


def summarise_quality(runs: dict) -> dict:
    out = {}
    base_epoch = statistics.median(r["epoch_s"] for r in runs["sgd"])
    for method, rs in runs.items():
        finals = [r["val_acc"][-1] for r in rs]
        gens = [t for r in rs for t in r["generation_s"]]
        out[method] = {
            "final_val_acc_mean": statistics.mean(finals),
            "final_val_acc_std": statistics.pstdev(finals),
            "best_val_acc_mean": statistics.mean(max(r["val_acc"]) for r in rs),
            "per_seed_final": finals,
            "generation_s_median": statistics.median(gens) if gens else None,
            "generation_over_sgd_epoch": (statistics.median(gens) / base_epoch) if gens else None,
            "parent_changed_fraction": (statistics.mean(c for r in rs for c in r["parent_changed"])
                                        if gens else None),
        }
    out["sgd_epoch_s_median"] = base_epoch
    return out


def plot(runs: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"sgd": "tab:blue", "select": "tab:orange", "es": "tab:green"}
    low = 1.0
    for method, rs in runs.items():
        accs = torch.tensor([r["val_acc"] for r in rs])
        epochs = list(range(1, accs.shape[1] + 1))
        start = len(epochs) // 3  # the zoomed panel: the last two thirds of training
        low = min(low, float(accs[:, start:].min()))
        for ax, first in zip(axes, (0, start)):
            for row in accs:
                ax.plot(epochs[first:], row[first:], color=colors[method], alpha=0.25, lw=1)
            label = f"{method} (mean of {len(rs)} seeds)"
            ax.plot(epochs[first:], accs.mean(0)[first:], color=colors[method], lw=2.2, label=label)
    axes[1].set_ylim(low - 0.002, 1.001)
    for ax, name in zip(axes, ("all epochs", "zoom")):
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy")
        zoom = "zoom: last two thirds (generations run at the end of every n-th epoch, before validation)"
        ax.set_title(zoom if name == "zoom" else title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------- memory
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler(EvolutionaryMutation):
    """Samples RSS every millisecond while a generation runs."""

    def run_generation(self, trainer, pl_module):
        peak, stop = [0], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.001)

        base = _rss()
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        try:
            metrics = super().run_generation(trainer, pl_module)
        finally:
            stop.set()
            thread.join()
        seconds = time.perf_counter() - t0
        self.result = {"base_rss": base, "peak_rss": max(peak[0], _rss()), "seconds": seconds}
        return metrics


def memory_child(population: int, strategy: str, model_name: str) -> None:
    """One generation in this (fresh) process; prints a JSON line."""
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=16, limit=128)
    model = ImageClassifier(model_name, num_classes=10, optimizer="sgd", lr=0.01, scheduler="none")
    evo = PeakSampler(population=population, strategy=strategy, mutation="gaussian", sigma=0.01,
                      every_n_epochs=1, fitness_batches=1, verbose=False, log_media_every_n_epochs=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1,
                         limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=[evo])
    trainer.fit(model, datamodule=dm)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({**evo.result, "param_bytes": params, "population": population, "strategy": strategy}))


def run_memory(args) -> list[dict]:
    rows = []
    for strategy in ("select", "es"):
        for population in (10, 100):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            cmd = [sys.executable, __file__, "--memory-child", str(population), strategy, args.memory_model]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            row["added_mib"] = (row["peak_rss"] - row["base_rss"]) / 2**20
            row["param_mib"] = row["param_bytes"] / 2**20
            rows.append(row)
            print(f"[memory] {strategy:6s} population {population:3d}: +{row['added_mib']:.1f} MiB peak"
                  f" during the generation (parameters {row['param_mib']:.1f} MiB), {row['seconds']:.1f} s",
                  flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds x 6 epochs, population 10")
    parser.add_argument("--model", default="test_resnet", help="timm model of the quality runs")
    parser.add_argument("--memory-model", default="resnet18", help="timm model of the memory runs")
    parser.add_argument("--sigma-select", type=float, default=0.01)
    parser.add_argument("--sigma-es", type=float, default=0.01)
    parser.add_argument("--es-lr", type=float, default=0.001)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", nargs=3, metavar=("POPULATION", "STRATEGY", "MODEL"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(int(args.memory_child[0]), args.memory_child[1], args.memory_child[2])
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.quick:
        args.seeds, args.epochs, args.every, args.population = [0, 1], 6, 2, 10
    else:
        args.seeds, args.epochs, args.every, args.population = [0, 1, 2], 20, 5, 20
    tag = "quick" if args.quick else "full"
    RESULTS.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "command": "python benchmarks/evolution.py" + (" --quick" if args.quick else ""),
        "config": {"model": args.model, "seeds": args.seeds, "epochs": args.epochs,
                   "every_n_epochs": args.every, "population": args.population,
                   "sigma_select": args.sigma_select, "sigma_es": args.sigma_es, "es_lr": args.es_lr,
                   "fitness_set": "digits test split (270 images)",
                   "memory_model": args.memory_model},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu": platform.processor(), "threads": torch.get_num_threads()},
    }
    if not args.skip_quality:
        runs = run_quality(args)
        result["quality_runs"] = runs
        result["quality"] = summarise_quality(runs)
        title = (f"{args.model} on digits, SGD vs SGD+evolution every {args.every} epochs,"
                 f" {args.population} offspring")
        plot(runs, RESULTS / f"evolution.{tag}.png", title)
    if not args.skip_memory:
        rows = run_memory(args)
        result["memory"] = rows
        for strategy in ("select", "es"):
            small, big = (next(r for r in rows if r["strategy"] == strategy and r["population"] == p)
                          for p in (10, 100))
            ratio = big["added_mib"] / max(small["added_mib"], 1e-9)
            result.setdefault("memory_ratio_100_over_10", {})[strategy] = ratio
    (RESULTS / f"evolution.{tag}.json").write_text(json.dumps(result, indent=2))
    summary = {k: result[k] for k in ("quality", "memory_ratio_100_over_10") if k in result}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
