"""Sanity check of the baselines: dense vs first_k vs random channels vs random weights at 50%.

Trains timm's ``test_resnet`` on the embedded digits data (offline, CPU), once per configuration, from
the same seed, and prints test accuracy, the sparsity of the targeted weights and, for the channel
baselines, the fraction of channel units removed (a pruned unit takes its filters' rows *and* its readers'
columns, so half the units is about three quarters of the weights). One seed and a 270-image test split: a
sanity check that the baselines prune and fine-tune, not a benchmark.

    OMP_NUM_THREADS=1 python plugins/lightning-prune-baselines/examples/compare_digits.py --epochs 6
"""

from __future__ import annotations

import argparse
import time

import lightning_prune as lp
from lightning_prune.testing import fit_tiny, tiny_classifier, tiny_datamodule

CONFIGS = [
    ("dense", None),
    ("first_k", {"target_sparsity": 0.5}),
    ("random_channels", {"target_sparsity": 0.5}),
    ("random_unstructured", {"target_sparsity": 0.5}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="2 epochs")
    parser.add_argument("--root", default="runs/baselines_digits")
    args = parser.parse_args()
    epochs = 2 if args.quick else args.epochs
    print(f"{'callback':<20} {'test acc':>8} {'sparsity':>8} {'units':>8} {'seconds':>8}")
    for name, kwargs in CONFIGS:
        callbacks = [] if kwargs is None else [lp.create_callback(name, verbose=False, **kwargs)]
        model = tiny_classifier("test_resnet", optimizer="sgd", lr=0.05, momentum=0.9)
        data = tiny_datamodule(limit=1797, batch_size=64)
        start = time.time()
        trainer, model = fit_tiny(
            callbacks,
            f"{args.root}/{name}",
            model=model,
            datamodule=data,
            max_epochs=epochs,
            limit_val_batches=0,
        )
        seconds = time.time() - start
        acc = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
        sparsity = lp.sparsity_report(model).sparsity
        units = callbacks[0].sparsity_metrics().get("prune/channel_sparsity") if callbacks else None
        shown = f"{units:>8.2%}" if units is not None else f"{'-':>8}"
        print(f"{name:<20} {acc:>8.3f} {sparsity:>8.2%} {shown} {seconds:>8.0f}")


if __name__ == "__main__":
    main()
