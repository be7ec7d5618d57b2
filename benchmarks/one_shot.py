"""One-shot pruning of a densely trained model: accuracy before any fine-tuning, per method.

Trains a timm model densely on the digits data here first (the issue's "pretrained" stand-in), then prunes a
copy with every method of :func:`lightning_prune.prune_one_shot` from 4 calibration batches and reports the
validation accuracy without fine-tuning (and after ``--finetune-epochs`` epochs with the masks kept).

    python benchmarks/one_shot.py --model test_resnet --epochs 4
    python benchmarks/one_shot.py --model resnet18 --epochs 10 --finetune-epochs 1   # GPU

Not measured here (open): torch-pruning's ``MetaPruner`` beside ``channels`` at the same FLOPs, 3 seeds,
resnet50 / convnext_atto / vit_tiny.
"""

from __future__ import annotations

import argparse
import copy
import time

import lightning.pytorch as pl
import torch

import lightning_prune as lp
from lightning_prune.core.masks import MaskSet
from lightning_prune.testing import TINY_MODELS

CASES = [
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pl.seed_everything(args.seed, verbose=False)
    data = lp.DigitsDataModule(batch_size=32)
    data.setup("fit")
    module = lp.ImageClassifier(args.model, num_classes=10, model_kwargs=TINY_MODELS.get(args.model, {}),
                                lr=0.05, scheduler="cosine")
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    dense = module.model.eval()
    val = data.val_dataloader()
    base = accuracy(dense, val)
    print(f"| {args.model} | dense | - | {base:.4f} | - | - |")
    print("| model | method | setting | val acc (no fine-tune) | after fine-tune | seconds |")
    print("|---|---|---|---|---|---|")
    for method, kwargs in CASES:
        model = copy.deepcopy(dense)
        start = time.monotonic()
        result = lp.prune_one_shot(model, data.train_dataloader(), method=method, calibration_batches=4,
                                   **kwargs)
        seconds = time.monotonic() - start
        acc = accuracy(model, val)
        tuned = "-"
        if args.finetune_epochs:
            masks = None
            if method != "channels":
                masks = MaskSet()
                for name, mask in result.masks.items():
                    masks.add(name, model.get_parameter(name), mask)
            finetune(model, masks, data.train_dataloader(), args.finetune_epochs, 0.01)
            tuned = f"{accuracy(model, val):.4f}"
        setting = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        print(f"| {args.model} | {method} | {setting} | {acc:.4f} | {tuned} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
