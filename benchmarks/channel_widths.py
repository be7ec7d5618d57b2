"""Which widths each criterion keeps at the same FLOPs: torch-pruning against our one-shot Taylor rankings.

The shapes benchmark (``benchmarks/channels.py``) compares accuracies after fine-tuning, which are noisy;
this shows what the methods *choose*, deterministically, on the same weights: a model trained ``--epochs``
epochs on ``lp.ShapesDataModule`` (the benchmark's recipe for the model), then pruned to ``--target`` of its
FLOPs

* by torch-pruning (``TaylorImportance`` on the gradient summed over 8 training batches, global pruning,
  ``round_to=8``; its ``pruning_ratio`` bisected to the FLOPs), as the benchmark does;
* by ``lp.prune_one_shot(method="channels", importance=NAME, compensate=False, round_to=8)`` for each NAME
  (``taylor``: ``|sum w * dL/dw|`` per unit; ``taylor_elementwise``: ``sum |w * dL/dw|``, torch-pruning's
  form), 4 calibration batches;

and writes, per Conv/Linear layer, the output width each kept, with the FLOPs and parameters of each model as
fractions of the dense one::

    python benchmarks/channel_widths.py --model resnet18 --target 0.5  # results/channel-widths-resnet18-e1.md
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import channels  # noqa: E402  (the benchmark's recipes, torch-pruning's protocol, counting)

import lightning_prune as lp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def widths(net: torch.nn.Module) -> dict[str, int]:
    """Output width of every Conv/Linear layer by name."""
    return {name: (m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features)
            for name, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--target", type=float, default=0.5, help="fraction of the dense FLOPs")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--importance", nargs="+", default=["taylor", "taylor_elementwise"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = lp.ShapesDataModule(batch_size=64, train_size=args.train_size, test_size=2000, data_seed=0,
                               seed=args.seed)
    data.setup("fit")
    pl.seed_everything(args.seed, verbose=False)
    module = channels.classifier(args.model, 0.05)
    channels.trainer(args.epochs).fit(module, datamodule=data)
    base = module.model.eval()
    dense = channels.count(base)
    kept = {"dense": widths(base)}
    sizes = {"dense": (1.0, 1.0)}
    grads = channels.taylor_gradients(base, data, 8)
    pruned, ratio = channels.torch_pruning_at(base, args.target, dense[0], grads)
    kept["torch-pruning"] = widths(pruned)
    sizes["torch-pruning"] = tuple(v / d for v, d in zip(channels.count(pruned), dense))
    loader = data.train_dataloader()
    for name in args.importance:
        net = copy.deepcopy(base).train()
        lp.prune_one_shot(net, loader, method="channels", target_flops=args.target, round_to=8,
                          importance=name, compensate=False, calibration_batches=4,
                          input_size=(3, channels.SIDE, channels.SIDE),
                          loss_fn=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]))
        kept[name] = widths(net)
        sizes[name] = tuple(v / d for v, d in zip(channels.count(net), dense))
    methods = list(kept)
    command = "python benchmarks/channel_widths.py " + " ".join(sys.argv[1:])
    lines = [f"`{args.model}` trained {args.epochs} epoch(s) on {args.train_size} `lp.ShapesDataModule`"
             f" images (seed {args.seed}), pruned to {args.target:g} of its FLOPs; torch-pruning's"
             f" pruning_ratio {ratio:.3f}; ours: `lp.prune_one_shot(method=\"channels\", importance=NAME,"
             " compensate=False, round_to=8)`, 4 calibration batches. `" + command + "`", "",
             "| layer | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    lines += ["| FLOPs · params | " + " | ".join(f"{sizes[m][0]:.3f} · {sizes[m][1]:.3f}" for m in methods)
              + " |"]
    lines += [f"| `{layer}` | " + " | ".join(str(kept[m].get(layer, "")) for m in methods) + " |"
              for layer in kept["dense"]]
    out = RESULTS / f"channel-widths-{args.model}-e{args.epochs}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
