"""L0 (hard-concrete) channel pruning beside group-LASSO and the first-k baseline, several seeds.

The comparison of the Habr article «Редукция нейронных сетей при помощи вариационной оптимизации» ("Reducing
neural networks with variational optimisation", in Russian), on the digits data.

Reuses ``benchmarks/channels.py`` (same model, data, trainer, baseline and accuracy measurement). For each
seed: the dense resnet18 on digits; ``L0Pruning`` at each ``lam`` (gates trained for the first 60% of the
epochs, finalised with the paper's test-time gate, fine-tuned for the rest, compressed); ``GroupLassoPruning``
at one ``lam`` (the group-LASSO engineer's default, for reference); and the *first-k* baseline (dense weights,
the same fraction of each gated group's channels removed, fine-tuned for the same 40% of epochs) at every
fraction L0 reached. Accuracies are compared with the dense model of the same seed.

Run from the repository root::

    python benchmarks/channels_l0.py --quick      # 2 seeds, 4 epochs, 2 L0 lambdas
    python benchmarks/channels_l0.py              # 3 seeds, 10 epochs, 3 L0 lambdas

Writes ``benchmarks/results/channels_l0[-quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
from channels import INPUT, RESULTS, FixedChannelPruning, classifier, cost, test_accuracy, trainer  # noqa: E402

import lightning_prune as lp  # noqa: E402


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
    parser.add_argument("--tag", default="",
                        help="results go to benchmarks/results/channels_l0[-TAG].{json,md}")
    args = parser.parse_args()
    epochs = args.epochs or (4 if args.quick else 10)
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2])
    lams = args.lams or ([3e-3, 3e-2] if args.quick else [1e-3, 5e-3, 3e-2])
    finalize_at = 0.6
    finetune = max(1, int(round(epochs * (1 - finalize_at))))
    gate_steps = finalize_at * epochs * 20  # 1257 training images / 64 per batch
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
        data = lp.DigitsDataModule(batch_size=64, seed=seed)
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
            baseline = FixedChannelPruning(removed, mode="first", seed=seed)
            trainer(finetune, [baseline]).fit(model, datamodule=data)
            # lam: the L0 run whose fraction it matches
            record(seed, "first_k", lam, removed, model, data, dense)

    config = {"epochs": epochs, "seeds": seeds, "lams": lams, "l0_gate_lr": l0_gate_lr, "gl_lam": args.gl_lam,
              "gl_gate_lr": gl_gate_lr, "finalize_at": finalize_at, "finetune_epochs": finetune,
              "lr": args.lr, "quick": args.quick, "wall_s": round(time.time() - started, 1)}
    write(config, rows, "channels_l0" + (f"-{args.tag}" if args.tag else "-quick" if args.quick else ""))


def write(config: dict[str, Any], rows: list[dict[str, Any]], name: str) -> None:
    """Write ``benchmarks/results/NAME.json`` and ``NAME.md`` (a table per method and lam, over seeds)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"config": config, "rows": rows}, indent=2))
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
              f" Wall {c['wall_s']} s.\n\n")
    (RESULTS / f"{name}.md").write_text(header + "\n".join(lines) + "\n")
    print(header + "\n".join(lines))

if __name__ == "__main__":
    main()
