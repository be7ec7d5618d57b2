"""Why ``mobilenetv3_large_100`` stayed at chance on ``lp.ShapesDataModule``: the classifier's init.

Prints, for each model, the logits' standard deviation, the loss and the gradient norm of one batch at
initialisation, with timm's classifier init (``head_init="timm"``) and with ``lp.ImageClassifier``'s default
(``"fan_in"``); with ``--train``, also trains one model for ``--epochs`` epochs (a plain loop: SGD Nesterov
0.9, lr 0.05, weight decay 5e-4, cosine per step, batch 64, one thread) and prints the training loss and
accuracy per epoch and the test accuracy in eval mode, in train mode (batch statistics) and after the
BatchNorm statistics are recalibrated on 30 batches -- which tells a training failure from a BatchNorm one.

Usage::

    python benchmarks/mobile_from_scratch.py                       # init statistics only
    python benchmarks/mobile_from_scratch.py --train mobilenetv3_large_100 --head-init timm
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lightning_prune as lp  # noqa: E402


def init_statistics(models: list[str]) -> None:
    data = lp.ShapesDataModule(batch_size=64, train_size=512, difficulty=0.2)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    for name in models:
        for head_init in ("timm", "fan_in"):
            torch.manual_seed(0)
            net = lp.ImageClassifier(name, num_classes=10, head_init=head_init).model.train()
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            norm = sum(float(p.grad.norm()) ** 2 for p in net.parameters() if p.grad is not None) ** 0.5
            print(f"{name:24s} head_init={head_init:6s} logit sd {float(logits.detach().std()):.3f}"
                  f"  loss {float(loss.detach()):.3f}  grad norm {norm:.1f}", flush=True)


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    data = lp.ShapesDataModule(batch_size=64, train_size=args.train_size, difficulty=args.difficulty)
    data.setup("fit")
    net = lp.ImageClassifier(args.train, num_classes=10, head_init=args.head_init).model
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loader = data.train_dataloader()
    steps, step = args.epochs * len(loader), 0
    started = time.process_time()
    for epoch in range(args.epochs):
        net.train()
        total = right = seen = 0.0
        for x, y in loader:
            for group in opt.param_groups:
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            out = net(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            total += float(loss) * len(y)
            right += int((out.argmax(1) == y).sum())
            seen += len(y)
        print(f"epoch {epoch}: loss {total / seen:.3f}, train acc {right / seen:.3f}", flush=True)

    @torch.no_grad()
    def accuracy(train_mode: bool) -> float:
        net.train(train_mode)
        right = seen = 0
        for x, y in data.test_dataloader():
            right += int((net(x).argmax(1) == y).sum())
            seen += len(y)
        return right / seen

    result = {"eval": accuracy(False)}
    saved = copy.deepcopy(net.state_dict())
    result["train_mode"] = accuracy(True)
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
    result["recalibrated"] = accuracy(False)
    print(vars(args), result, f"CPU {(time.process_time() - started) / 60:.1f} min", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["mobilenetv3_large_100", "efficientnet_b0",
                                                        "regnety_002", "resnet18"])
    parser.add_argument("--train", metavar="MODEL")
    parser.add_argument("--head-init", default="fan_in", choices=["fan_in", "timm"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--difficulty", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.train:
        train(args)
    else:
        init_statistics(args.models)


if __name__ == "__main__":
    main()
