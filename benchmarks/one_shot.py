"""One-shot pruning of a densely trained model: accuracy before any fine-tuning and after it, per method.

Trains a timm model densely here first (the issue's "pretrained" stand-in; saved once to ``--dense-dir`` and
reused by every later run with the same model, data, recipe and seed), then prunes a copy with every method of
:func:`lightning_prune.prune_one_shot` from ``--calibration-batches`` training batches and reports the
evaluation accuracy without fine-tuning and after ``--finetune-epochs`` epochs of SGD (masks kept).

    # the runs of benchmarks/results/one_shot.md (one file per run, then merged)
    python benchmarks/one_shot.py --data digits --batch-size 32 --model resnet50 --epochs 8 --seeds 0 \\
        --finetune-epochs 1 --finetune-methods channels torch-pruning --out /tmp/r50.json
    python benchmarks/one_shot.py --data digits --batch-size 32 --model vit_tiny_patch16_224 \\
        --model-kwargs '{"img_size": 32}' --epochs 10 --seeds 0 1 2 --finetune-epochs 1 --out /tmp/vit.json
    python benchmarks/one_shot.py --data shapes --train-size 4000 --test-size 1000 --batch-size 64 \\
        --model convnext_atto --optimizer adamw --lr 0.002 --epochs 8 --finetune-epochs 1 --out /tmp/cnx.json
    python benchmarks/one_shot.py --out one_shot --merge /tmp/r50.json /tmp/vit.json /tmp/cnx.json  # table
    # the first, digits-only runs
    python benchmarks/one_shot.py --model test_resnet --epochs 4 --finetune-epochs 1

Beside ``channels``: torch-pruning's one-shot ``MetaPruner`` (``--tp-importance``: L2 magnitude and/or first
order Taylor from the calibration batches' loss; no compensation) at the same FLOPs, its ``pruning_ratio``
bisected until the FLOPs are at most the target. On timm's ViT the attention heads are declared to it
(``num_heads``, head dims pruned) as in torch-pruning's own timm example, and the attention modules' head
sizes are updated after its step.

Every run writes its rows (one per model, method, setting, seed) into ``benchmarks/results/<out>.json``
(replacing rows with the same key) after each method, and prints the table of mean +- std over seeds (in
points; the change against the dense model of the same seed) that ``benchmarks/results/one_shot.md`` shows.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

import lightning_prune as lp  # noqa: E402
from lightning_prune.core.masks import MaskSet  # noqa: E402
from lightning_prune.testing import TINY_MODELS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CASES: list[tuple[str, dict[str, Any]]] = [
    ("magnitude", {"target_sparsity": 0.5}), ("wanda", {"target_sparsity": 0.5}),
    ("sparsegpt", {"target_sparsity": 0.5}),
    ("magnitude", {"pattern": "2:4"}), ("wanda", {"pattern": "2:4"}), ("sparsegpt", {"pattern": "2:4"}),
    ("channels", {"target_flops": 0.5, "compensate": False}), ("channels", {"target_flops": 0.5}),
]


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    right = total = 0
    for x, y in loader:
        right += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return right / total


def _vit_heads(model: torch.nn.Module) -> dict[torch.nn.Module, int]:
    """``{qkv Linear: heads}`` of timm's attention modules (empty for other models)."""
    return {m.qkv: m.num_heads for m in model.modules()
            if hasattr(m, "qkv") and hasattr(m, "num_heads") and isinstance(m.qkv, torch.nn.Linear)}


def _vit_update_heads(model: torch.nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "qkv") and hasattr(m, "num_heads") and isinstance(m.qkv, torch.nn.Linear):
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            if hasattr(m, "scale"):
                m.scale = m.head_dim ** -0.5
            if hasattr(m, "attn_dim"):
                m.attn_dim = m.head_dim * m.num_heads


def torch_pruning_one_shot(model: torch.nn.Module, example: torch.Tensor, target_flops: float,
                           importance: str, batches: list[Any]) -> tuple[torch.nn.Module, float]:
    """torch-pruning's one-shot MetaPruner (``importance``: ``"l2"`` or ``"taylor"``; the classifier left
    alone) at ``target_flops``, its uniform ``pruning_ratio`` bisected (12 steps)."""
    import torch_pruning as tp

    dense_flops, _ = tp.utils.count_ops_and_params(model, example)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):
        ratio = (lo + hi) / 2
        trial = copy.deepcopy(model)
        heads = _vit_heads(trial)
        imp = (tp.importance.TaylorImportance() if importance == "taylor"
               else tp.importance.MagnitudeImportance(p=2))
        extra: dict[str, Any] = {"num_heads": heads, "prune_head_dims": True, "prune_num_heads": False} \
            if heads else {}
        pruner = tp.pruner.MetaPruner(trial, example, importance=imp, pruning_ratio=ratio,
                                      ignored_layers=[trial.get_classifier()], **extra)
        if importance == "taylor":
            trial.eval()
            trial.zero_grad()
            for x, y in batches:
                torch.nn.functional.cross_entropy(trial(x), y).backward()
        pruner.step()
        trial.zero_grad(set_to_none=True)
        if heads:
            for qkv, n in pruner.num_heads.items():
                for m in trial.modules():
                    if getattr(m, "qkv", None) is qkv:
                        m.num_heads = n
            _vit_update_heads(trial)
        flops, _ = tp.utils.count_ops_and_params(trial, example)
        if flops / dense_flops <= target_flops:
            hi, best = ratio, (trial, flops / dense_flops)
        else:
            lo = ratio
    assert best is not None
    return best[0], best[1]


def finetune(model: torch.nn.Module, masks: MaskSet | None, loader, epochs: int, lr: float) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if masks is not None:
                masks.apply_()


def make_data(args: argparse.Namespace, seed: int) -> pl.LightningDataModule:
    if args.data == "shapes":
        data = lp.ShapesDataModule(batch_size=args.batch_size, train_size=args.train_size,
                                   val_size=args.val_size, test_size=args.test_size,
                                   difficulty=args.difficulty, data_seed=args.data_seed, seed=seed)
    else:
        data = lp.DigitsDataModule(batch_size=args.batch_size, seed=seed)
    data.setup("fit")
    return data


def eval_loader(data: pl.LightningDataModule, args: argparse.Namespace):
    return data.test_dataloader() if args.data == "shapes" else data.val_dataloader()


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return json.loads(args.model_kwargs) if args.model_kwargs else dict(TINY_MODELS.get(args.model, {}))


def dense_path(args: argparse.Namespace, seed: int) -> Path:
    data = (f"shapes-d{args.difficulty}-n{args.train_size}-ds{args.data_seed}" if args.data == "shapes"
            else "digits")
    kw = "-".join(f"{k}{v}" for k, v in sorted(model_kwargs(args).items()))
    name = (f"{args.model}{'-' + kw if kw else ''}-{data}-{args.optimizer}{args.lr}-{args.epochs}ep"
            f"-b{args.batch_size}-s{seed}.pt")
    return Path(args.dense_dir) / name


def dense_model(args: argparse.Namespace, seed: int, data: pl.LightningDataModule
                ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The densely trained model of ``seed``: loaded from ``--dense-dir`` when saved there, else trained."""
    import timm

    path = dense_path(args, seed)
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        model = timm.create_model(args.model, num_classes=10, **model_kwargs(args))
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved["info"]
    pl.seed_everything(seed, verbose=False)
    started = time.process_time()
    module = lp.ImageClassifier(args.model, num_classes=10, model_kwargs=model_kwargs(args),
                                optimizer=args.optimizer, lr=args.lr, scheduler="cosine")
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    info = {"dense_cpu_min": (time.process_time() - started) / 60, "epochs": args.epochs,
            "optimizer": args.optimizer, "lr": args.lr, "train_size": args.train_size}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.model.state_dict(), "info": info}, path)
    return module.model.eval(), info


def run_seed(args: argparse.Namespace, seed: int, save: Any = None) -> list[dict[str, Any]]:
    """The rows of one seed; ``save(rows)`` after every row (a run cut short keeps what it measured)."""
    torch.set_num_threads(args.threads)
    data = make_data(args, seed)
    dense, info = dense_model(args, seed, data)
    evaluate = eval_loader(data, args)
    base = accuracy(dense, evaluate)
    common = {"model": args.model, "data": args.data, "seed": seed, "dense_epochs": args.epochs,
              "train_size": args.train_size if args.data == "shapes" else None,
              "eval_images": len(evaluate.dataset), "calibration_batches": args.calibration_batches,
              "batch_size": args.batch_size, "finetune_epochs": args.finetune_epochs,
              "dense_cpu_min": info.get("dense_cpu_min")}
    rows = [{**common, "method": "dense", "setting": "-", "acc": base, "acc_finetuned": None,
             "flops_remaining": 1.0, "seconds": None}]
    print(json.dumps(rows[-1]), flush=True)
    save = save or (lambda rows: None)
    save(rows)

    def record(method: str, setting: str, model: torch.nn.Module, masks: MaskSet | None, seconds: float,
               flops: float | None) -> None:
        acc = accuracy(model, evaluate)
        tuned = None
        if args.finetune_epochs and (not args.finetune_methods
                                     or any(method.startswith(m) for m in args.finetune_methods)):
            pl.seed_everything(seed, verbose=False)
            finetune(model, masks, data.train_dataloader(), args.finetune_epochs, args.finetune_lr)
            tuned = accuracy(model, evaluate)
        rows.append({**common, "method": method, "setting": setting, "acc": acc, "acc_finetuned": tuned,
                     "flops_remaining": flops, "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
        save(rows)

    def calibration() -> list[Any]:
        pl.seed_everything(seed, verbose=False)  # the same calibration batches for every method
        loader = iter(data.train_dataloader())
        return [next(loader) for _ in range(args.calibration_batches)]

    for method, kwargs in CASES:
        if args.methods and method not in args.methods:
            continue
        model = copy.deepcopy(dense)
        batches = calibration()
        start = time.process_time()
        result = lp.prune_one_shot(model, batches, method=method, calibration_batches=len(batches), **kwargs)
        seconds = time.process_time() - start
        masks = None
        if method != "channels":
            masks = MaskSet()
            for name, mask in result.masks.items():
                masks.add(name, model.get_parameter(name), mask)
        setting = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        record(method, setting, model, masks, seconds,
               result.flops_remaining if method == "channels" else None)
    example = next(iter(evaluate))[0][:2]
    for importance in args.tp_importance:
        name = f"torch-pruning MetaPruner ({'Taylor' if importance == 'taylor' else 'L2'})"
        start = time.process_time()
        try:
            model, flops = torch_pruning_one_shot(copy.deepcopy(dense), example, 0.5, importance,
                                                  calibration())
        except Exception as err:  # (its default MetaPruner does not handle every model: say so)
            rows.append({**common, "method": name, "setting": "target_flops=0.5", "acc": None,
                         "acc_finetuned": None, "flops_remaining": None, "seconds": None,
                         "error": f"{type(err).__name__}: {str(err)[:120]}"})
            print(json.dumps(rows[-1]), flush=True)
            save(rows)
            continue
        record(name, "target_flops=0.5", model, None, time.process_time() - start, flops)
    return rows


# ---------------------------------------------------------------------------------------------- results
def _key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in ("model", "data", "method", "setting", "seed", "dense_epochs",
                                      "train_size", "finetune_epochs"))


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{100 * mean:.1f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std (in points) over seeds, per model, method and setting, in the order of ``rows``."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["data"], r["method"], r["setting"]), []).append(r)
    out = []
    for (model, data, method, setting), rs in groups.items():
        dense = {d["seed"]: d["acc"] for d in rows if d["model"] == model and d["data"] == data
                 and d["method"] == "dense"}
        ok = [r for r in rs if r["acc"] is not None]
        drop = [r["acc"] - dense[r["seed"]] for r in ok if r["seed"] in dense]
        drop_ft = [r["acc_finetuned"] - dense[r["seed"]] for r in ok
                   if r["acc_finetuned"] is not None and r["seed"] in dense]
        flops = [r["flops_remaining"] for r in ok if r.get("flops_remaining") is not None]
        out.append({"model": model, "data": data, "method": method, "setting": setting,
                    "seeds": sorted(r["seed"] for r in rs),
                    "acc": [r["acc"] for r in ok], "acc_finetuned": [r["acc_finetuned"] for r in ok
                                                                     if r["acc_finetuned"] is not None],
                    "delta": drop, "delta_finetuned": drop_ft,
                    "flops_remaining": sum(flops) / len(flops) if flops else None,
                    "errors": sorted({r["error"] for r in rs if r.get("error")})})
    return out


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| data | model | method | setting | seeds | FLOPs left | acc, no fine-tune | Δ vs dense | acc"
             " after fine-tune | Δ vs dense |", "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for a in aggregate(rows):
        head = f"| {a['data']} | {a['model']} | {a['method']} | {a['setting']} | {len(a['seeds'])}"
        flops = f"{a['flops_remaining']:.3f}" if a["flops_remaining"] is not None else "-"
        if a["errors"]:
            lines.append(f"{head} | - | failed: {'; '.join(a['errors'])[:100]} | - | - | - |")
            continue
        lines.append(f"{head} | {flops}"
                     f" | {_stat(a['acc'])} | {'-' if a['method'] == 'dense' else _stat(a['delta'])}"
                     f" | {_stat(a['acc_finetuned'])}"
                     f" | {'-' if a['method'] == 'dense' else _stat(a['delta_finetuned'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--model-kwargs", default=None,
                        help='JSON for timm.create_model, e.g. \'{"img_size": 32}\'')
    parser.add_argument("--data", default="digits", choices=["digits", "shapes"])
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--val-size", type=int, default=100)
    parser.add_argument("--test-size", type=int, default=2000, help="shapes: the evaluation images")
    parser.add_argument("--difficulty", type=float, default=0.0)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4, help="dense training epochs")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--dense-dir", default=os.environ.get("LP_DENSE_DIR", "/tmp/lp-one-shot-dense"),
                        help="where dense models are saved once and reused")
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=0)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--finetune-methods", nargs="*", default=None,
                        help="fine-tune only the methods starting with these (default: all)")
    parser.add_argument("--methods", nargs="*", default=None, help="only these methods (default: all)")
    parser.add_argument("--tp-importance", nargs="*", default=["l2", "taylor"], choices=["l2", "taylor"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None,
                        help="write rows to benchmarks/results/<out>.json (or to <out> if a .json path)")
    parser.add_argument("--merge", nargs="*", default=[], metavar="JSON",
                        help="rows of separate runs (one file each: runs in parallel must not share --out) to"
                             " merge into --out; nothing is run")
    args = parser.parse_args(argv)
    path = None if not args.out else (Path(args.out) if args.out.endswith(".json")
                                      else ROOT / "benchmarks" / "results" / f"{args.out}.json")
    rows = json.loads(path.read_text()) if path is not None and path.exists() else []
    for other in args.merge:
        new = json.loads(Path(other).read_text())
        keys = {_key(r) for r in new}
        rows = [r for r in rows if _key(r) not in keys] + new
    if args.merge and path is not None:
        path.write_text(json.dumps(rows, indent=1) + "\n")
    if not args.merge:
        for seed in args.seeds:
            before = list(rows)

            def save(new: list[dict[str, Any]], before: list[dict[str, Any]] = before) -> None:
                nonlocal rows
                keys = {_key(r) for r in new}
                rows = [r for r in before if _key(r) not in keys] + new
                if path is not None:
                    path.write_text(json.dumps(rows, indent=1) + "\n")

            run_seed(args, seed, save)
    print(render(rows))


if __name__ == "__main__":
    main()
