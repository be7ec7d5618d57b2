"""Why the mobile families (``mobilenetv3_large_100``, ``efficientnet_b0``) learn slowly on shapes.

Two parts:

* without ``--train``: for each model, the logits' standard deviation, the loss and the gradient norm of
  one batch at initialisation, with timm's classifier init (``head_init="timm"``) and with
  ``lp.ImageClassifier``'s default (``"fan_in"``): why ``mobilenetv3_large_100`` first stayed at chance;
* ``--train MODEL``: trains one model from scratch on ``lp.ShapesDataModule`` with a plain loop (batch 64,
  one thread, cosine learning rate per step after an optional linear warm-up) and one change of the recipe
  at a time -- the stem's stride (``--stem-stride 1``: the feature maps twice as large in every stage, the
  last stage on 2x2 instead of 1x1 at 32x32), the image side (``--image-size``), the optimizer and learning
  rate, weight decay on BatchNorm, biases and depthwise kernels or not (``--no-decay-norm-dw``), dropout and
  drop-path, the activation, the residual blocks' last BatchNorm zero-initialised (``--zero-init-last``:
  timm's ResNets do it, its EfficientNets and MobileNets do not), the epochs -- and prints the training loss
  and accuracy per epoch and the test accuracy (``--bn-check``: also in train mode and after the BatchNorm
  statistics are recalibrated on 30 batches, which tells a training failure from a BatchNorm one). Each run
  is a row of ``benchmarks/results/<out>.{json,md}`` (default ``shapes-mobile``) with the command that made
  it, its process CPU time and the machine's load average. Any timm model trains this way (``--model-kwargs``
  passes more ``timm.create_model`` arguments, e.g. a ViT's ``img_size``): the recipes of ``regnety_002`` and
  ``convnext_atto`` in ``benchmarks/channels.py`` come from ``--out shapes-recipes``.

Usage::

    python benchmarks/mobile_from_scratch.py                       # init statistics only
    python benchmarks/mobile_from_scratch.py --train mobilenetv3_large_100 --head-init timm --difficulty 0.2
    python benchmarks/mobile_from_scratch.py --train mobilenetv3_large_100 --stem-stride 1 --epochs 4 \\
        --train-size 3000
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lightning_prune as lp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


INIT_VARIANTS = (("timm", False), ("fan_in", False), ("fan_in", True))


def init_statistics(models: list[str], out: str) -> None:
    """One training batch at initialisation: the logits' sd, the loss, the gradient norm of all weights and
    of the stem, per head init and with the residual blocks' last BatchNorm zeroed or not."""
    data = lp.ShapesDataModule(batch_size=64, train_size=512, difficulty=0.2)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    rows = []
    for name in models:
        for head_init, zero in INIT_VARIANTS:
            if zero and not name.startswith(("mobilenet", "efficientnet")):
                continue
            torch.manual_seed(0)
            net = lp.ImageClassifier(name, num_classes=10, head_init=head_init, zero_init_last=zero).model
            net.train()
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            norm = sum(float(p.grad.norm()) ** 2 for p in net.parameters() if p.grad is not None) ** 0.5
            stem = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
            rows.append({"model": name, "head_init": head_init, "zero_init_last": zero,
                         "logit_sd": round(float(logits.detach().std()), 3),
                         "loss": round(float(loss.detach()), 3), "grad_norm": round(norm, 1),
                         "stem_grad_norm": round(float(stem.weight.grad.norm()), 2)})
            print(json.dumps(rows[-1]), flush=True)
    path = RESULTS / f"{out}-init.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| model | head init | zero_init_last | logit sd | loss | gradient norm | stem gradient norm |",
             "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| `{r['model']}` | {r['head_init']} | {r['zero_init_last']} | {r['logit_sd']:.3f}"
              f" | {r['loss']:.3f} | {r['grad_norm']:.1f} | {r['stem_grad_norm']:.2f} |" for r in rows]
    path.with_suffix(".md").write_text(
        "One training batch (64 images of `lp.ShapesDataModule`, difficulty 0.2) through each model at"
        " initialisation (seed 0), in train mode: the logits' standard deviation, the loss, the norm of the"
        " gradient of every parameter together and of the stem convolution's alone; `python"
        f" benchmarks/mobile_from_scratch.py --models {' '.join(models)}`.\n\n" + "\n".join(lines) + "\n")


def build(args: argparse.Namespace) -> torch.nn.Module:
    kwargs: dict[str, Any] = json.loads(args.model_kwargs) if args.model_kwargs else {}
    if args.drop_rate:
        kwargs["drop_rate"] = args.drop_rate
    if args.drop_path_rate:
        kwargs["drop_path_rate"] = args.drop_path_rate
    if args.act_layer:
        kwargs["act_layer"] = args.act_layer
    return lp.ImageClassifier(args.train, num_classes=10, head_init=args.head_init, model_kwargs=kwargs,
                              stem_stride=args.stem_stride or None, zero_init_last=args.zero_init_last).model


def param_groups(net: torch.nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    if not args.no_decay_norm_dw:
        return [{"params": list(net.parameters()), "weight_decay": args.weight_decay}]
    depthwise = {id(m.weight) for m in net.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels}
    plain = [p for p in net.parameters() if p.ndim <= 1 or id(p) in depthwise]
    decayed = [p for p in net.parameters() if not (p.ndim <= 1 or id(p) in depthwise)]
    return [{"params": decayed, "weight_decay": args.weight_decay}, {"params": plain, "weight_decay": 0.0}]


def train(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    started = time.process_time()
    torch.manual_seed(args.seed)
    data = lp.ShapesDataModule(batch_size=args.batch_size, train_size=args.train_size,
                               difficulty=args.difficulty,
                               image_size=args.image_size, seed=args.seed)
    data.setup("fit")
    net = build(args)
    groups = param_groups(net, args)
    if args.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=args.lr)
    loader = data.train_dataloader()
    steps, step = args.epochs * len(loader), 0
    warmup = round(args.warmup * len(loader))
    curve = []
    for epoch in range(args.epochs):
        net.train()
        total = right = seen = 0.0
        for x, y in loader:
            if step < warmup:
                scale = (step + 1) / warmup
            else:
                scale = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))
            for group in opt.param_groups:
                group["lr"] = args.lr * scale
            out = net(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            total += float(loss.detach()) * len(y)
            right += int((out.argmax(1) == y).sum())
            seen += len(y)
        curve.append((round(total / seen, 4), round(right / seen, 4)))
        print(f"epoch {epoch}: loss {total / seen:.3f}, train acc {right / seen:.3f}", flush=True)

    @torch.no_grad()
    def accuracy(train_mode: bool) -> float:
        net.train(train_mode)
        right = seen = 0
        for x, y in data.test_dataloader():
            right += int((net(x).argmax(1) == y).sum())
            seen += len(y)
        return right / seen

    result: dict[str, Any] = {"test_acc": accuracy(False)}
    if args.bn_check:
        saved = copy.deepcopy(net.state_dict())
        result["train_mode_acc"] = accuracy(True)
        net.load_state_dict(saved)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.reset_running_stats()
                    m.momentum = None
            net.train()
            for i, (x, _) in enumerate(loader):
                if i >= 30:
                    break
                net(x)
        result["recalibrated_acc"] = accuracy(False)
    settings = {k: v for k, v in vars(args).items() if k not in ("models", "out", "bn_check", "label")}
    row = {"label": args.label or describe(settings), **settings, **result, "curve": curve,
           "images_seen": args.epochs * args.train_size,
           "cpu_min": round((time.process_time() - started) / 60, 2),
           "load_before": round(load_before, 1), "load_after": round(os.getloadavg()[0], 1),
           "command": "python benchmarks/mobile_from_scratch.py " + shlex.join(sys.argv[1:])}
    print(json.dumps(row), flush=True)
    return row


DEFAULTS = {"stem_stride": 0, "image_size": 32, "optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4,
            "no_decay_norm_dw": False, "warmup": 0.0, "drop_rate": 0.0, "drop_path_rate": 0.0,
            "act_layer": "", "model_kwargs": "", "batch_size": 64, "zero_init_last": False,
            "head_init": "fan_in"}


def describe(settings: dict[str, Any]) -> str:
    """The settings that differ from the channels benchmark's recipe, in words."""
    changed = [f"{k}={settings[k]}" for k, v in DEFAULTS.items() if settings.get(k, v) != v]
    return ", ".join(changed) or "baseline"


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | change from the baseline recipe | difficulty | epochs x images | test acc"
             " | final train loss | CPU min | load (start/end) | command |",
             "|---|---|---:|---|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| `{r['train']}` | {r['label'] or describe(r)} | {r['difficulty']}"
                     f" | {r['epochs']} x {r['train_size']}"
                     f" | {r['test_acc']:.4f} | {r['curve'][-1][0]:.3f} | {r['cpu_min']:.1f}"
                     f" | {r['load_before']} / {r['load_after']} | `{r['command']}` |")
    return ("Dense models from scratch on `lp.ShapesDataModule` (2,000 test images, data seed 0),"
            " one change at a time from the channels benchmark's recipe (baseline: SGD Nesterov 0.9, lr 0.05,"
            " weight decay 5e-4 on every parameter, cosine per step, no warm-up, batch 64, 32x32, timm's"
            " architecture with `lp.ImageClassifier`'s fan-in classifier init), a plain training loop on one"
            " thread, seed 0; `python benchmarks/mobile_from_scratch.py --train ...` (command per row). CPU"
            " minutes: process CPU time of data, training and test on a shared 2-core machine (load average"
            " at start and end).\n\n"
            + "\n".join(lines) + "\n")


def record(row: dict[str, Any], out: str) -> None:
    path = RESULTS / f"{out}.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    rows = [r for r in rows if r["command"] != row["command"]] + [row]
    path.write_text(json.dumps(rows, indent=1) + "\n")
    path.with_suffix(".md").write_text(render(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["mobilenetv3_large_100", "efficientnet_b0",
                                                        "regnety_002", "resnet18"])
    parser.add_argument("--train", metavar="MODEL")
    parser.add_argument("--head-init", default="fan_in", choices=["fan_in", "timm"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--difficulty", type=float, default=0.0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--no-decay-norm-dw", action="store_true",
                        help="no weight decay on BatchNorm, biases and depthwise kernels")
    parser.add_argument("--warmup", type=float, default=0.0, help="epochs of linear warm-up")
    parser.add_argument("--stem-stride", type=int, default=0, help="the stride of `conv_stem` (0: timm's, 2)")
    parser.add_argument("--drop-rate", type=float, default=0.0)
    parser.add_argument("--drop-path-rate", type=float, default=0.0)
    parser.add_argument("--model-kwargs", default="",
                        help='more `timm.create_model` arguments as JSON, e.g. \'{"img_size": 32}\'')
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--act-layer", default="", help="timm `act_layer` (e.g. relu; default: the model's)")
    parser.add_argument("--zero-init-last", action="store_true",
                        help="zero-init the last BatchNorm of each residual block")
    parser.add_argument("--bn-check", action="store_true",
                        help="also the test accuracy in train mode and after BatchNorm recalibration")
    parser.add_argument("--label", default="", help="the row's description (default: the changed settings)")
    parser.add_argument("--out", default="shapes-mobile")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.train:
        record(train(args), args.out)
    else:
        init_statistics(args.models, args.out)


if __name__ == "__main__":
    main()
