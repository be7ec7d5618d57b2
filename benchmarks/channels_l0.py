"""L0 (hard-concrete) channel pruning beside group-LASSO and the first-k baseline, several seeds.

The comparison of the Habr article «Редукция нейронных сетей при помощи вариационной оптимизации» ("Reducing
neural networks with variational optimisation", in Russian), on the digits data.

Self-contained (``benchmarks/channels.py`` has since moved to other data and a recipe table): timm
``resnet18`` at 32x32 (SGD, cosine LR, weight decay 5e-4), the embedded digits (batch 64, seeded split),
accuracy on the test split, FLOPs and parameters by torch-pruning's ``count_ops_and_params``. For each
seed: the dense resnet18 on digits; ``L0Pruning`` at each ``lam`` (gates trained for the first 60% of the
epochs, finalised with the paper's test-time gate, fine-tuned for the rest, compressed); ``GroupLassoPruning``
at one ``lam`` (the group-LASSO engineer's default, for reference); and the *first-k* baseline (dense weights,
the same fraction of each gated group's channels removed, fine-tuned for the same 40% of epochs) at every
fraction L0 reached. Accuracies are compared with the dense model of the same seed.

The first-k baseline is the baselines plugin's ``FirstKChannels`` (``plugins/lightning-prune-baselines``) on
the same channel groups the gates use: in every group ``max(round(size * (1 - f)), 1)`` units kept, the first
ones removed, every tensor a removed unit touches masked for the rest of the fine-tuning. Its masks go in
before the first optimizer step (:class:`FirstKFromStart`; the plugin's own ``prune_step=0`` waits for the end
of the first batch) and the BatchNorm statistics are not recalibrated (``recalibrate_bn_batches=0``), as in
the published runs.

Run from the repository root::

    python benchmarks/channels_l0.py --quick      # 2 seeds, 4 epochs, 2 L0 lambdas
    python benchmarks/channels_l0.py              # 3 seeds, 10 epochs, 3 L0 lambdas
    python benchmarks/channels_l0.py --epochs 6 --lams 0.003 0.01 0.03 --tag 6ep-3seeds   # the published run
    python benchmarks/channels_l0.py --epochs 1 --seeds 0 --lams 0.1 --limit 400 --out /tmp/l0 --tag smoke

Writes ``benchmarks/results/channels_l0[-quick|-TAG].{json,md}`` (``--out`` for another folder).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "plugins" / "lightning-prune-baselines" / "src"))  # (when not pip-installed)

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch_pruning as tp  # noqa: E402
from typing_extensions import override  # noqa: E402

import lightning_prune as lp  # noqa: E402
from lightning_prune_baselines import FirstKChannels  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
INPUT = (3, 32, 32)
BATCH = 64


class FirstKFromStart(FirstKChannels):
    """The plugin's first-k control with its masks installed before the first optimizer step: the fine-tuning
    starts from the dense weights with the first ``fraction`` of every channel group's units removed."""

    def __init__(self, fraction: float) -> None:
        super().__init__(target_sparsity=fraction, input_size=INPUT, recalibrate_bn_batches=0, verbose=False,
                         log_media_every_n_epochs=0)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not self.pruned:
            self.decide(trainer, pl_module, self.target_sparsity)


def trainer(epochs: int, callbacks=(), root: str = "runs/bench_channels") -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks),
                      default_root_dir=root, deterministic=True)


def classifier(lr: float) -> lp.ImageClassifier:
    # head_init="timm": timm's own classifier init, as when the published runs were made (for resnet18 the
    # default "fan_in" leaves it as it is anyway)
    return lp.ImageClassifier("resnet18", num_classes=10, optimizer="sgd", lr=lr, weight_decay=5e-4,
                              scheduler="cosine", head_init="timm")


def test_accuracy(model: pl.LightningModule, data: pl.LightningDataModule) -> float:
    return float(trainer(1).test(model, datamodule=data, verbose=False)[0]["test/acc"])


def cost(model: torch.nn.Module) -> tuple[float, float]:
    """FLOPs and parameters (torch-pruning's ``count_ops_and_params`` at batch 1)."""
    flops, params = tp.utils.count_ops_and_params(model.eval(), torch.randn(1, *INPUT))
    return float(flops), float(params)


def removed_fraction(cb: Any) -> float:
    keep = cb.final_keep()
    return 1 - sum(int(k.sum()) for k in keep) / sum(k.numel() for k in keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--lams", type=float, nargs="*", default=None, help="L0 lambdas")
    parser.add_argument("--gl-lam", type=float, default=2e-4, help="group-LASSO lambda")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--limit", type=int, default=None,
                        help="use only the first LIMIT digits images (all 1797 by default; smoke runs)")
    parser.add_argument("--tag", default="",
                        help="results go to benchmarks/results/channels_l0[-TAG].{json,md}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results folder")
    args = parser.parse_args()
    epochs = args.epochs or (4 if args.quick else 10)
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2])
    lams = args.lams or ([3e-3, 3e-2] if args.quick else [1e-3, 5e-3, 3e-2])
    finalize_at = 0.6
    finetune = max(1, int(round(epochs * (1 - finalize_at))))
    probe = lp.DigitsDataModule(batch_size=BATCH, seed=0, limit=args.limit)
    probe.setup("fit")
    gate_steps = finalize_at * epochs * len(probe.train_dataloader())  # all digits: 1257 images, 20 batches
    # Adam moves log_alpha ~gate_lr per step: enough to go from 2.5 to < -2.4
    l0_gate_lr = round(8.0 / gate_steps, 3)
    gl_gate_lr = round(1.2 / (10 * args.gl_lam * gate_steps), 2)  # benchmarks/channels.py's rule
    started = time.time()
    rows: list[dict[str, Any]] = []

    def log(msg: str) -> None:
        print(f"[{time.time() - started:7.1f}s] {msg}", flush=True)

    def record(seed: int, method: str, lam: float | None, removed: float, module: pl.LightningModule,
               data: pl.LightningDataModule, dense: dict[str, float]) -> None:
        acc = test_accuracy(module, data)
        row = {"seed": seed, "method": method, "lam": lam, "removed": removed, "acc": acc,
               "acc_drop_pts": 100 * (dense["acc"] - acc)}
        if method != "dense":
            flops, params = cost(lp.compress(copy.deepcopy(module.model), input_size=INPUT).eval())
            row.update(flops_ratio=flops / dense["flops"], params_ratio=params / dense["params"])
        rows.append(row)
        log(f"seed {seed} {method} lam={lam}: removed {removed:.1%}, acc {acc:.4f}"
            f" ({row['acc_drop_pts']:+.2f} pts)")

    for seed in seeds:
        data = lp.DigitsDataModule(batch_size=BATCH, seed=seed, limit=args.limit)
        pl.seed_everything(seed, verbose=False)
        dense_model = classifier(args.lr)
        trainer(epochs).fit(dense_model, datamodule=data)
        flops, params = cost(copy.deepcopy(dense_model.model).eval())
        dense = {"acc": 0.0, "flops": flops, "params": params}
        dense["acc"] = test_accuracy(dense_model, data)
        record(seed, "dense", None, 0.0, dense_model, data, dense)
        fractions = []
        for lam in lams:
            pl.seed_everything(seed, verbose=False)
            model = classifier(args.lr)
            cb = lp.L0Pruning(lam=lam, gate_lr=l0_gate_lr, finalize_step=finalize_at, input_size=INPUT,
                              verbose=False, log_media_every_n_epochs=0)
            trainer(epochs, [cb]).fit(model, datamodule=data)
            fractions.append(removed_fraction(cb))
            record(seed, "l0", lam, fractions[-1], model, data, dense)
        pl.seed_everything(seed, verbose=False)
        model = classifier(args.lr)
        cb = lp.GroupLassoPruning(lam=args.gl_lam, gate_lr=gl_gate_lr, finalize_step=finalize_at,
                                  input_size=INPUT, verbose=False, log_media_every_n_epochs=0)
        trainer(epochs, [cb]).fit(model, datamodule=data)
        record(seed, "group_lasso", args.gl_lam, removed_fraction(cb), model, data, dense)
        for lam, removed in zip(lams, fractions):
            if removed <= 0:
                continue
            pl.seed_everything(seed, verbose=False)
            model = classifier(args.lr * 0.2)
            model.model.load_state_dict(dense_model.model.state_dict())
            trainer(finetune, [FirstKFromStart(removed)]).fit(model, datamodule=data)
            # lam: the L0 run whose fraction it matches
            record(seed, "first_k", lam, removed, model, data, dense)

    config = {"epochs": epochs, "seeds": seeds, "lams": lams, "l0_gate_lr": l0_gate_lr, "gl_lam": args.gl_lam,
              "gl_gate_lr": gl_gate_lr, "finalize_at": finalize_at, "finetune_epochs": finetune,
              "lr": args.lr, "quick": args.quick, "limit": args.limit,
              "wall_s": round(time.time() - started, 1)}
    write(config, rows, "channels_l0" + (f"-{args.tag}" if args.tag else "-quick" if args.quick else ""),
          args.out)


def write(config: dict[str, Any], rows: list[dict[str, Any]], name: str, out: Path = RESULTS) -> None:
    """Write ``OUT/NAME.json`` and ``NAME.md`` (a table per method and lam, over seeds)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    lines = ["| method | lam | seeds | gated channels removed (mean) | test acc (mean +- sd)"
             " | drop vs dense (pts, mean) | params | FLOPs |", "|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["method"], r["lam"]) for r in rows):
        group = [r for r in rows if (r["method"], r["lam"]) == key]
        accs = [r["acc"] for r in group]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        fl = [r.get("flops_ratio", 1.0) for r in group]
        pa = [r.get("params_ratio", 1.0) for r in group]
        lam = ("" if key[1] is None
               else format(key[1], "g") + (" (L0's fraction)" if key[0] == "first_k" else ""))
        removed = statistics.mean(r["removed"] for r in group)
        lines.append(f"| {key[0]} | {lam} | {len(group)} | {removed:.1%} |"
                     f" {statistics.mean(accs):.4f} +- {sd:.4f} |"
                     f" {statistics.mean(r['acc_drop_pts'] for r in group):+.2f} | {statistics.mean(pa):.2f}x"
                     f" | {statistics.mean(fl):.2f}x |")
    c = config
    header = (f"digits, timm resnet18 at 32x32, {c['epochs']} epochs, seeds {c['seeds']};"
              f" L0 gate_lr {c['l0_gate_lr']} (Adam), group-LASSO lam {c['gl_lam']}"
              f" gate_lr {c['gl_gate_lr']}; gates finalised at"
              f" {c['finalize_at']:.0%}; first-k fine-tunes the dense model {c['finetune_epochs']} epochs."
              + (f" First {c['limit']} images only." if c.get("limit") else "")
              + f" Wall {c['wall_s']} s.\n\n")
    (out / f"{name}.md").write_text(header + "\n".join(lines) + "\n")
    print(header + "\n".join(lines))


if __name__ == "__main__":
    main()
