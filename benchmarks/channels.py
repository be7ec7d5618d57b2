"""Channel pruning on the embedded digits with timm ``resnet18``: group-LASSO gates against two baselines.

For each penalty ``lam``, ``GroupLassoPruning`` trains with gates, finalises at 60% of training (gates below
threshold prune their channels, the rest are folded in), fine-tunes the remaining 40% and compresses the
model physically. The baselines (the CIFAR comparison of the Habr article «Редукция нейронных сетей при помощи
вариационной оптимизации», "Reducing neural networks with variational optimisation", in Russian) start from
the dense model trained for the same number of epochs, remove the same fraction of each gated layer's channels
-- the *first k* channels, or *random* ones -- and fine-tune for the same 40% of epochs. Every compressed
model is measured against the dense one in the same run: test accuracy, parameters, FLOPs (torch-pruning's
``count_ops_and_params``) and CPU inference latency (one thread, batch 64 at 32x32, dense and pruned timed
alternately, median).

Run from the repository root::

    python benchmarks/channels.py --quick        # 3 lambdas, 6 epochs (~10 min on a busy 2-core CPU)
    python benchmarks/channels.py                # 5 lambdas, 15 epochs

Writes ``benchmarks/results/channels.{json,md,png}`` (``--tag full`` -> ``channels-full.*``).
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch_pruning as tp  # noqa: E402
from typing_extensions import override  # noqa: E402

import lightning_prune as lp  # noqa: E402
from lightning_prune.callbacks.base import PruningCallback  # noqa: E402
from lightning_prune.gates import GateSet, ScaleGate, example_inputs_for, find_channel_groups, traced_root  # noqa: E402
from lightning_prune.targets import Target  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
INPUT = (3, 32, 32)


class FixedChannelPruning(PruningCallback):
    """Baseline: remove a fraction of each gateable group's channels at the start, then fine-tune.

    ``mode="first"`` removes the first ``k`` channels of every group (the Habr channel-pruning article's
    baseline), ``"random"`` a seeded random ``k``; removal is a mask on every weight/BatchNorm slice of the
    channel (kept at zero after every step), so :func:`lightning_prune.compress` deletes them at the end.
    """

    def __init__(self, fraction: float, mode: str = "first", seed: int = 0) -> None:
        super().__init__(verbose=False, log_media_every_n_epochs=0)
        self.fraction, self.mode, self.seed = fraction, mode, seed
        self.groups: list[Any] = []

    @override
    def select_targets(self, pl_module):
        targets = super().select_targets(pl_module)
        prefix, root = traced_root(pl_module)
        self.groups, _ = find_channel_groups(root, example_inputs_for(root, INPUT), prefix=prefix,
                                             exclusion_root=pl_module)
        names = {t.name for t in targets}
        for group in self.groups:
            for module_name, pname in group.channel_params():
                module = pl_module.get_submodule(module_name)
                if isinstance(getattr(module, pname, None), torch.nn.Parameter):
                    target = Target(module_name, module, pname)
                    if target.name not in names:
                        targets.append(target)
                        names.add(target.name)
        return targets

    @override
    def on_fit_start(self, trainer, pl_module):
        gen = torch.Generator().manual_seed(self.seed)
        keep = []
        for group in self.groups:
            k = min(int(round(self.fraction * group.size)), group.size - 1)
            kept = torch.ones(group.size, dtype=torch.bool)
            idx = torch.arange(k) if self.mode == "first" else torch.randperm(group.size, generator=gen)[:k]
            kept[idx] = False
            keep.append(kept)
        masks = GateSet(self.groups, [ScaleGate(g.size) for g in self.groups]).channel_masks(pl_module, keep)
        self.masks.update({n: m for n, m in masks.items() if n in self.masks})
        super().on_fit_start(trainer, pl_module)


def trainer(epochs: int, callbacks=(), root: str = "runs/bench_channels") -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks),
                      default_root_dir=root, deterministic=True)


def classifier(lr: float) -> lp.ImageClassifier:
    return lp.ImageClassifier("resnet18", num_classes=10, optimizer="sgd", lr=lr, weight_decay=5e-4,
                              scheduler="cosine")


def test_accuracy(model: pl.LightningModule, data: pl.LightningDataModule) -> float:
    out = trainer(1).test(model, datamodule=data, verbose=False)
    return float(out[0]["test/acc"])


@torch.no_grad()
def latency_ms(models: dict[str, torch.nn.Module], rounds: int, batch: int = 64,
               size: int = 32) -> dict[str, float]:
    """Median ms per batch, models timed alternately so that contention hits them alike."""
    torch.set_num_threads(1)
    x = torch.randn(batch, INPUT[0], size, size)
    for m in models.values():
        m.eval()
        for _ in range(2):
            m(x)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            start = time.perf_counter()
            m(x)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def cost(model: torch.nn.Module) -> tuple[float, float]:
    flops, params = tp.utils.count_ops_and_params(model.eval(), torch.randn(1, *INPUT))
    return float(flops), float(params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 lambdas, 6 epochs")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lams", type=float, nargs="*", default=None)
    parser.add_argument("--coupled-lams", type=float, nargs="*", default=None,
                        help="extra runs with prune_coupled=True (residual channels gated too)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="",
                        help="results go to benchmarks/results/channels[-TAG].{json,md,png}")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--gate-lr", type=float, default=None,
                        help="default: 1.2 / (10 * lam_median * steps until finalisation), i.e. the gates"
                             " could reach 0")
    parser.add_argument("--latency-rounds", type=int, default=None)
    args = parser.parse_args()
    epochs = args.epochs or (6 if args.quick else 15)
    lams = args.lams or ([1e-4, 2e-4, 4e-4] if args.quick else [5e-5, 1e-4, 2e-4, 4e-4, 8e-4])
    coupled_lams = args.coupled_lams if args.coupled_lams is not None else [2e-4]
    rounds = args.latency_rounds or (15 if args.quick else 40)
    finalize_at = 0.6
    finetune = max(1, int(round(epochs * (1 - finalize_at))))
    data = lp.DigitsDataModule(batch_size=64, seed=args.seed)
    steps_per_epoch = 20  # 1257 training images / 64
    lam_median = sorted(lams)[len(lams) // 2]
    gate_lr = args.gate_lr or round(1.2 / (10 * lam_median * finalize_at * epochs * steps_per_epoch), 2)
    started = time.time()
    rows: list[dict[str, Any]] = []

    def log(msg: str) -> None:
        print(f"[{time.time() - started:7.1f}s] {msg}", flush=True)

    # dense
    pl.seed_everything(args.seed, verbose=False)
    dense = classifier(args.lr)
    trainer(epochs).fit(dense, datamodule=data)
    dense_acc = test_accuracy(dense, data)
    dense_net = copy.deepcopy(dense.model).eval()
    dense_flops, dense_params = cost(dense_net)
    log(f"dense: acc {dense_acc:.4f}, {dense_params:,.0f} params, {dense_flops / 1e6:.1f} MFLOPs")
    compressed: dict[str, torch.nn.Module] = {"dense": dense_net}
    rows.append({"method": "dense", "lam": None, "removed": 0.0, "acc": dense_acc, "params": dense_params,
                 "flops": dense_flops, "params_r8": dense_params, "flops_r8": dense_flops, "key": "dense"})

    def measure(key: str, method: str, lam: float | None, removed: float, module: pl.LightningModule) -> None:
        """Accuracy of the masked model; its compressed copies (widths as they fall, and rounded up to 8)."""
        row = {"method": method, "lam": lam, "removed": removed, "acc": test_accuracy(module, data),
               "key": key}
        for r, suffix in ((1, ""), (8, "_r8")):
            net = lp.compress(copy.deepcopy(module.model), input_size=INPUT, round_to=r).eval()
            row["flops" + suffix], row["params" + suffix] = cost(net)
            compressed[key + suffix] = net
        rows.append(row)
        log(f"{key}: removed {removed:.1%} of gated channels, acc {row['acc']:.4f},"
            f" params {row['params'] / dense_params:.2f}x, FLOPs {row['flops'] / dense_flops:.2f}x")

    # group lasso (and with the residual channels gated too: prune_coupled=True)
    fractions = []
    for lam, coupled in [(lam, False) for lam in lams] + [(lam, True) for lam in coupled_lams]:
        pl.seed_everything(args.seed, verbose=False)
        model = classifier(args.lr)
        cb = lp.GroupLassoPruning(lam=lam, gate_lr=gate_lr, finalize_step=finalize_at, input_size=INPUT,
                                  prune_coupled=coupled, verbose=False, log_media_every_n_epochs=0)
        trainer(epochs, [cb]).fit(model, datamodule=data)
        keep = cb.final_keep()
        removed = 1 - sum(int(k.sum()) for k in keep) / sum(k.numel() for k in keep)
        method = "group_lasso_coupled" if coupled else "group_lasso"
        if not coupled:
            fractions.append(removed)
        measure(f"{method} lam={lam:g}", method, lam, removed, model)

    # baselines at the same fractions, from the dense weights
    for removed in fractions:
        for mode in ("first", "random"):
            pl.seed_everything(args.seed, verbose=False)
            model = classifier(args.lr * 0.2)
            model.model.load_state_dict(dense.model.state_dict())
            baseline = FixedChannelPruning(removed, mode=mode, seed=args.seed)
            trainer(finetune, [baseline]).fit(model, datamodule=data)
            measure(f"{mode}_k {removed:.0%}", f"{mode}_k", None, removed, model)

    lat = latency_ms(compressed, rounds)
    lat224 = latency_ms({k: v for k, v in compressed.items() if not k.endswith("_r8")}, max(3, rounds // 3),
                        batch=8, size=224)
    for row in rows:
        key = row.pop("key")
        row["latency224_ms"] = lat224[key]
        row["latency224_ratio"] = lat224[key] / lat224["dense"]
        row["latency_ms"] = lat[key]
        row["latency_ratio"] = lat[key] / lat["dense"]
        row["latency_ratio_r8"] = lat.get(key + "_r8", lat[key]) / lat["dense"]
        row["flops_ratio"] = row["flops"] / dense_flops
        row["flops_ratio_r8"] = row["flops_r8"] / dense_flops
        row["params_ratio"] = row["params"] / dense_params
        row["acc_drop_pts"] = 100 * (dense_acc - row["acc"])
    write(rows, {"epochs": epochs, "lams": lams, "coupled_lams": coupled_lams, "gate_lr": gate_lr,
                 "finetune_epochs": finetune, "finalize_at": finalize_at, "seed": args.seed,
                 "quick": args.quick, "latency_rounds": rounds, "lr": args.lr,
                 "torch_threads": torch.get_num_threads(), "wall_s": round(time.time() - started, 1)},
          name="channels" + (f"-{args.tag}" if args.tag else ""))
    log("done")


def write(rows: list[dict[str, Any]], config: dict[str, Any], name: str = "channels") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    lines = [
        "| method | lam | gated channels removed | test acc | drop (pts) | params | FLOPs | CPU latency |"
        " latency / FLOPs | widths rounded to 8: FLOPs, latency | CPU latency at 224x224 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {'' if r['lam'] is None else format(r['lam'], 'g')} | {r['removed']:.1%} |"
            f" {r['acc']:.4f} | {r['acc_drop_pts']:+.2f} | {r['params_ratio']:.2f}x | {r['flops_ratio']:.2f}x"
            f" | {r['latency_ratio']:.2f}x ({r['latency_ms']:.1f} ms) |"
            f" {r['latency_ratio'] / r['flops_ratio']:.2f} | {r['flops_ratio_r8']:.2f}x,"
            f" {r['latency_ratio_r8']:.2f}x | {r['latency224_ratio']:.2f}x ({r['latency224_ms']:.0f} ms) |"
        )
    header = (f"digits, timm resnet18 at 32x32, {config['epochs']} epochs (group-LASSO finalises at"
              f" {config['finalize_at']:.0%}, gate_lr {config['gate_lr']}; baselines fine-tune the dense"
              f" model {config['finetune_epochs']} epochs), seed"
              f" {config['seed']}{', --quick' if config['quick'] else ''}. Ratios are against the dense model"
              " measured in the same run; latency: 1 thread, batch 64 at 32x32 (median of"
              f" {config['latency_rounds']}) and batch 8 at 224x224 (the same models on ImageNet-size"
              " inputs).\n\n")
    (RESULTS / f"{name}.md").write_text(header + "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    dense_acc = rows[0]["acc"]
    ax1.axhline(dense_acc, color="gray", ls="--", label="dense")
    ax1.axhline(dense_acc - 0.01, color="gray", ls=":", label="dense - 1 pt")
    markers = (("group_lasso", "o"), ("group_lasso_coupled", "D"), ("first_k", "s"), ("random_k", "^"))
    for method, marker in markers:
        pts = sorted((r["removed"], r["acc"]) for r in rows if r["method"] == method)
        if pts:
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=method)
    ax1.set_xlabel("fraction of gated channels removed")
    ax1.set_ylabel("test accuracy")
    ax1.legend()
    pruned = [r for r in rows if r["method"] != "dense"]
    ax2.scatter([r["flops_ratio"] for r in pruned], [r["latency_ratio"] for r in pruned], label="as pruned")
    ax2.scatter([r["flops_ratio_r8"] for r in pruned], [r["latency_ratio_r8"] for r in pruned], marker="x",
                label="widths rounded to 8")
    ax2.scatter([r["flops_ratio"] for r in pruned], [r["latency224_ratio"] for r in pruned], marker="+",
                label="at 224x224, batch 8")
    ax2.plot([0, 1], [0, 1], color="gray", ls="--", label="latency = FLOPs")
    ax2.plot([0, 1], [0, 1.25], color="gray", ls=":", label="1.25x FLOPs")
    ax2.set_xlabel("FLOPs / dense")
    ax2.set_ylabel("CPU latency / dense")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)


if __name__ == "__main__":
    main()
