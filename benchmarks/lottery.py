"""Lottery tickets on the digits data: accuracy against the fraction of weights remaining, ticket vs control.

For each model and seed, one ``trainer.fit`` with :class:`~lightning_prune.LotteryTicket` runs the whole
iterative procedure; the test accuracy at the end of every round (the round's final weights) is recorded
together with the round's best validation accuracy. Three variants per seed:

* ``ticket``: survivors rewound to the rewind point (Frankle & Carbin);
* ``random``: ``reinit="random"``: the same procedure, with the surviving weights re-drawn (seeded) at every
  round instead of rewound, so its masks come from its own (re-initialised) runs;
* ``same_mask``: Frankle & Carbin's control: the ticket's mask of every round on a fresh initialisation (the
  model's own initialiser under another seed), trained for one round's epochs in a separate fit.

Round 0 is the dense network, identical in both variants: the baseline every ratio in the table refers to.

Models:

* ``mlp``: a plain LightningModule, LeNet-300-100 on 28x28 digits (784 inputs, as MNIST), Glorot-normal
  init, Adam 1.2e-3, layer-wise 20% per round, output layer 10% (Frankle & Carbin's LeNet setting),
  rewound to init;
* ``test_resnet``: timm's small ResNet (``ImageClassifier``), SGD 0.05 with Nesterov momentum, global 20% per
  round (first conv and classifier excluded, as timm's metadata says), late rewinding to 10% of round one.

Usage (from the repository root)::

    python benchmarks/lottery.py --quick     # 8 rounds (16.8% remaining), 3 epochs/round, 2 seeds
    python benchmarks/lottery.py             # 12 rounds (6.9% remaining), 6 epochs/round, 3 seeds

Writes ``benchmarks/results/lottery[.quick].{md,png,json}``.
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
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch import nn  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy  # noqa: E402

from lightning_prune.callbacks.base import PruningCallback  # noqa: E402
from lightning_prune.callbacks.lottery_ticket import LotteryTicket  # noqa: E402
from lightning_prune.training.data import DigitsDataModule  # noqa: E402
from lightning_prune.training.models import ImageClassifier  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {  # name -> (label, plot style)
    "ticket": ("lottery ticket (rewound)", "o-"),
    "random": ("random reinit every round (reinit='random')", "s--"),
    "same_mask": ("ticket's mask, fresh init (Frankle & Carbin's control)", "^:"),
}


class MLP(pl.LightningModule):
    """LeNet-300-100 (Frankle & Carbin's fully connected network), Glorot-normal init, Adam."""

    def __init__(self, in_features: int = 784, lr: float = 1.2e-3) -> None:
        super().__init__()
        self.lr = lr
        self.fc1, self.fc2, self.out = nn.Linear(in_features, 300), nn.Linear(300, 100), nn.Linear(100, 10)
        for layer in (self.fc1, self.fc2, self.out):
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.val_acc = MulticlassAccuracy(10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, 0].flatten(1)  # the digits are one grey channel repeated three times
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val/acc", self.val_acc)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


MODELS: dict[str, dict[str, Any]] = {
    "mlp": {
        "make": lambda: MLP(),
        "data": {"image_size": 28, "batch_size": 60},
        "lottery": {"scope": "layer", "output_layer": "out", "output_round_rate": 0.1,
                    "rewind_round_fraction": 0.0},
    },
    "test_resnet": {
        "make": lambda: ImageClassifier("test_resnet", num_classes=10, optimizer="sgd", lr=0.05, momentum=0.9,
                                        weight_decay=0.0, scheduler="none"),
        "data": {"image_size": 32, "batch_size": 64},
        "lottery": {"scope": "global", "rewind_round_fraction": 0.1},
    },
}


class RoundEnd(Callback):
    """Test accuracy of the weights at the end of every round (before the next prune)."""

    def __init__(self, epochs_per_round: int, test_loader) -> None:
        self.epochs_per_round, self.test_loader = epochs_per_round, test_loader
        self.rows: list[dict[str, float]] = []
        self.masks: list[dict[str, torch.Tensor]] = []  # the masks of every round

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.epochs_per_round:
            return
        lt = next(cb for cb in trainer.callbacks if isinstance(cb, LotteryTicket))
        self.masks.append(lt.masks.state_dict())
        self.rows.append({"round": lt.round, "remaining": lt.weights_remaining,
                          "test_acc": test_accuracy(pl_module, self.test_loader)})


@torch.no_grad()
def test_accuracy(pl_module: pl.LightningModule, loader) -> float:
    was_training = pl_module.training
    pl_module.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((pl_module(x).argmax(-1) == y).sum())
        total += y.numel()
    pl_module.train(was_training)
    return correct / total


class FixedMasks(PruningCallback):
    """Trains a freshly initialised network under given masks (Frankle & Carbin's random-reinit control)."""

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        super().__init__(log_media_every_n_epochs=0, verbose=False)
        self.fixed = masks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.update_masks(self.fixed)


def run_one(model_name: str, variant: str, seed: int, rounds: int, epochs: int, root: Path) -> dict[str, Any]:
    spec = MODELS[model_name]
    pl.seed_everything(seed, verbose=False)
    model = spec["make"]()
    data = DigitsDataModule(seed=0, **spec["data"])  # one split for every seed; seeds change init and order
    data.setup("fit")
    options = dict(spec["lottery"])
    # 20% of the surviving weights per round (and 10% of the output layer's): the final sparsities; the rewind
    # point as a fraction of the whole fit, from a fraction of the first round
    fraction = options.pop("rewind_round_fraction")
    output_rate = options.pop("output_round_rate", None)
    if output_rate is not None:
        options["output_sparsity"] = 1 - (1 - output_rate) ** rounds
    lt = LotteryTicket(rounds=rounds, epochs_per_round=epochs, target_sparsity=1 - 0.8**rounds, seed=seed,
                       rewind_step=fraction / (rounds + 1) if fraction else 0,
                       reinit="random" if variant == "random" else "rewind", verbose=False, **options)
    probe = RoundEnd(epochs, data.test_dataloader())
    trainer = pl.Trainer(
        max_epochs=(rounds + 1) * epochs, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, deterministic=True,
        default_root_dir=str(root), callbacks=[lt, probe],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    best = {r["round"]: r["best"] for r in lt.round_table}
    rows = [{**r, "best_val_acc": best.get(r["round"])} for r in probe.rows]
    return {"model": model_name, "variant": variant, "seed": seed, "seconds": seconds, "rounds": rows,
            "masks": probe.masks}


def run_same_mask(ticket: dict[str, Any], epochs: int, root: Path) -> dict[str, Any]:
    """Frankle & Carbin's control: each round's ticket mask on a fresh initialisation (a new seed), trained
    for one round's epochs. Round 0 (no mask) is the ticket run's dense round."""
    spec = MODELS[ticket["model"]]
    rows = [dict(ticket["rounds"][0])]
    start = time.perf_counter()
    for k, (masks, ref) in enumerate(zip(ticket["masks"][1:], ticket["rounds"][1:]), start=1):
        pl.seed_everything(10_000 + 100 * ticket["seed"] + k, verbose=False)
        model = spec["make"]()
        data = DigitsDataModule(seed=0, **spec["data"])
        data.setup("fit")
        trainer = pl.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
            default_root_dir=str(root), callbacks=[FixedMasks(masks)],
        )
        trainer.fit(model, datamodule=data)
        val = trainer.callback_metrics.get("val/acc")
        rows.append({"round": k, "remaining": ref["remaining"],
                     "test_acc": test_accuracy(model, data.test_dataloader()),
                     "best_val_acc": None if val is None else float(val)})
    return {"model": ticket["model"], "variant": "same_mask", "seed": ticket["seed"],
            "seconds": time.perf_counter() - start, "rounds": rows}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per model and round: mean/std over seeds of test and best-val accuracy, for both variants."""
    table: dict[str, list[dict[str, Any]]] = {}
    for model_name in dict.fromkeys(r["model"] for r in runs):
        rows = []
        by_variant = {v: [r for r in runs if r["model"] == model_name and r["variant"] == v]
                      for v in VARIANTS}
        n_rounds = min(len(r["rounds"]) for rs in by_variant.values() for r in rs)
        by_variant = {v: rs for v, rs in by_variant.items() if rs}
        dense = statistics.fmean(r["rounds"][0]["test_acc"] for r in by_variant["ticket"])
        for k in range(n_rounds):
            row: dict[str, Any] = {"round": k, "remaining": by_variant["ticket"][0]["rounds"][k]["remaining"]}
            for variant, rs in by_variant.items():
                row[variant] = _mean_std([r["rounds"][k]["test_acc"] for r in rs])
                row[f"{variant}_val"] = _mean_std([r["rounds"][k]["best_val_acc"] or 0.0 for r in rs])
                row[f"{variant}_ratio"] = row[variant][0] / dense
            rows.append(row)
        table[model_name] = rows
    return table


def markdown(table: dict[str, list[dict[str, Any]]], runs: list[dict[str, Any]],
             args: argparse.Namespace) -> str:
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        f"Command: `python benchmarks/lottery.py{' --quick' if args.quick else ''}` "
        f"({args.rounds} rounds of 20%, {args.epochs} epochs per round, seeds {seeds}; CPU, digits data).",
        "",
        "Test accuracy (270 held-out digits) of the weights at the end of each round, mean ± std over seeds;"
        " `/dense` is the ratio to the dense network (round 0) of the same runs; best val is the round's best"
        " validation accuracy (for `same_mask`: the last epoch's).",
        "",
        "- `ticket`: `LotteryTicket(reinit=\"rewind\")`, survivors rewound to the rewind point every round;",
        "- `random`: `LotteryTicket(reinit=\"random\")`, the same procedure with the survivors re-drawn"
        " (seeded permutation of each tensor's rewind values) every round, so its masks come from its own"
        " runs;",
        "- `same_mask`: Frankle & Carbin's control, the ticket's mask of each round on a fresh initialisation"
        " (the model's own initialiser, another seed), trained for one round's epochs.",
        "",
    ]
    for model_name, rows in table.items():
        secs = [r["seconds"] for r in runs if r["model"] == model_name and r["variant"] == "ticket"]
        present = [v for v in VARIANTS if v in rows[0]]
        head = ["round", "weights remaining"]
        for v in present:
            head += [f"{v} test acc", f"{v} /dense"]
        head += [f"{v} best val" for v in present]
        lines += [f"**{model_name}** ({statistics.fmean(secs):.0f} s per ticket fit)", "",
                  "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for r in rows:
            cells = [str(r["round"]), f"{r['remaining']:.1%}"]
            for v in present:
                cells += [f"{r[v][0]:.4f} ± {r[v][1]:.4f}", f"{r[v + '_ratio']:.3f}"]
            cells += [f"{r[v + '_val'][0]:.4f}" for v in present]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(table: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(6 * len(table), 4.2), squeeze=False)
    for ax, (model_name, rows) in zip(axes[0], table.items()):
        x = [100 * r["remaining"] for r in rows]
        for variant, (label, style) in VARIANTS.items():
            if variant not in rows[0]:
                continue
            ax.errorbar(x, [r[variant][0] for r in rows], yerr=[r[variant][1] for r in rows], fmt=style,
                        capsize=3, label=label)
        ax.axhline(rows[0]["ticket"][0], color="grey", lw=0.8, ls=":", label="dense (round 0)")
        ax.set_xscale("log")
        ticks = [t for t in (100, 80, 64, 51.2, 41, 32.8, 26.2, 21, 16.8, 13.4, 10.7, 8.6, 6.9, 5.5, 4.4)
                 if min(x) * 0.99 <= t <= max(x) * 1.01]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.invert_xaxis()
        ax.set_xlabel("weights remaining (%)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{model_name}: digits")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 rounds, 3 epochs per round, 2 seeds")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per round")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--replot", action="store_true",
                        help="rewrite the table and plot from the saved json")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (8 if args.quick else 12)
    args.epochs = args.epochs or (3 if args.quick else 6)
    n_seeds = args.seeds or (2 if args.quick else 3)
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / ("lottery.quick" if args.quick else "lottery")
    root = Path(os.environ.get("TMPDIR", "/tmp")) / "lightning_prune_lottery_bench"

    if args.replot:
        saved = json.loads(Path(f"{stem}.json").read_text())
        runs, args = saved["runs"], argparse.Namespace(**{**saved["args"], "replot": True})
        table = summarise(runs)
        Path(f"{stem}.md").write_text(markdown(table, runs, args))
        plot(table, Path(f"{stem}.png"))
        print(Path(f"{stem}.md").read_text())
        return

    runs = []
    ticket = None  # the "ticket" run of the current model and seed (its variant runs first)
    for model_name in args.models:
        for seed in range(n_seeds):
            for variant in ("ticket", "random", "same_mask"):
                if variant == "same_mask":
                    run = run_same_mask(ticket, args.epochs, root)
                else:
                    run = run_one(model_name, variant, seed, args.rounds, args.epochs, root)
                    ticket = run if variant == "ticket" else ticket
                last = run["rounds"][-1]
                print(f"{model_name:12s} seed {seed} {variant:6s}: {len(run['rounds'])} rounds in"
                      f" {run['seconds']:.0f}s, dense {run['rounds'][0]['test_acc']:.4f} ->"
                      f" {last['remaining']:.1%} remaining"
                      f" {last['test_acc']:.4f}", flush=True)
                runs.append({k: v for k, v in run.items() if k != "masks"})
                Path(f"{stem}.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    table = summarise(runs)
    text = markdown(table, runs, args)
    Path(f"{stem}.md").write_text(text)
    plot(table, Path(f"{stem}.png"))
    print(text)
    print(f"wrote {stem}.md, {stem}.png, {stem}.json")


if __name__ == "__main__":
    main()
