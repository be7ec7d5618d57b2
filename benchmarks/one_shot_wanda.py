"""Why Wanda is below magnitude on test_resnet (digits): variants of its score and comparison group, the
layers one at a time, and the mean shift of the most sensitive layer.

Trains ``test_resnet`` on the digits as ``benchmarks/one_shot.py --model test_resnet --epochs 4`` does
(seed 0; saved to ``--dense`` and reused), then prunes copies at 50% (and 2:4) from the same 4 calibration
batches:

1. Wanda as implemented (per output row; a conv's norm per unfolded input column: an input channel at one
   kernel position), with one norm per input channel expanded over the kernel instead, compared per layer
   instead of per row, and magnitude per row (Wanda with every norm 1) beside magnitude per layer (ours);
2. each layer alone (accuracy and relative reconstruction error ``||(W - W') X||^2 / ||W X||^2``);
3. the layer that costs most alone, ``layer2.0.downsample.1`` (a 1x1 conv after an average pool of a ReLU
   output): its output error in units of the next BatchNorm's running std, the part of it that is a shift of
   the mean, and the accuracy once that shift is folded into the BatchNorm's running mean.

    python benchmarks/one_shot_wanda.py > benchmarks/results/one_shot_wanda.txt
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from one_shot import accuracy  # noqa: E402

import lightning_prune as lp  # noqa: E402
import lightning_prune.core.one_shot as one_shot  # noqa: E402
from lightning_prune.core.one_shot import layer_columns, wanda_scores  # noqa: E402


def per_channel(norms: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One norm per input channel (the root mean square over its kernel positions), expanded over them."""
    groups, cols = norms.shape
    kernel = cols // weight.shape[1]
    rms = (norms.reshape(groups, -1, kernel) ** 2).mean(-1, keepdim=True).sqrt()
    return rms.expand(groups, -1, kernel).reshape(groups, cols)


def per_layer(weight: torch.Tensor, norms: torch.Tensor, sparsity: float) -> torch.Tensor:
    groups = norms.shape[0]
    flat = weight.detach().to(norms.dtype).reshape(groups, weight.shape[0] // groups, -1)
    score = wanda_scores(flat, norms).reshape(-1)
    keep = torch.zeros(score.numel(), dtype=torch.bool)
    keep[score.topk(round(score.numel() * (1 - sparsity))).indices] = True
    return keep.reshape(weight.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", default="/tmp/lp-one-shot-dense/test_resnet-digits-4ep-s0.pt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    data = lp.DigitsDataModule(batch_size=32)
    data.setup("fit")
    path = Path(args.dense)
    dense = timm.create_model("test_resnet", num_classes=10)
    if path.exists():
        dense.load_state_dict(torch.load(path))
    else:
        module = lp.ImageClassifier("test_resnet", num_classes=10, lr=0.05, scheduler="cosine")
        pl.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False).fit(module, data)
        dense = module.model
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dense.state_dict(), path)
    dense.eval()
    val = data.val_dataloader()
    batches = [b for _, b in zip(range(4), data.train_dataloader())]
    print(f"dense: {accuracy(dense, val):.4f} ({len(val.dataset)} validation images)\n")

    wanda = one_shot.wanda_mask
    variants = {
        "wanda, per row, norm per unfolded column (ours)": wanda,
        "wanda, per row, norm per input channel": lambda w, n, s, nm=None: wanda(w, per_channel(n, w), s, nm),
        "wanda, per layer, norm per unfolded column": (
            lambda w, n, s, nm=None: wanda(w, n, s, nm) if nm else per_layer(w, n, s)),
        "magnitude, per row (wanda with norms 1)": (
            lambda w, n, s, nm=None: wanda(w, torch.ones_like(n), s, nm)),
    }
    print("| variant | 50%: acc | mean layer error | 2:4: acc | mean layer error |")
    print("|---|---:|---:|---:|---:|")
    errors = {}
    for name, fn in [*variants.items(), ("magnitude, per layer (ours)", None)]:
        cells = []
        for kwargs in ({"target_sparsity": 0.5}, {"pattern": "2:4"}):
            one_shot.wanda_mask = fn or wanda
            model = copy.deepcopy(dense)
            result = lp.prune_one_shot(model, batches, method="wanda" if fn else "magnitude",
                                       calibration_batches=4, **kwargs)
            one_shot.wanda_mask = wanda
            errors.setdefault(name, result.errors)
            mean_error = sum(result.errors.values()) / len(result.errors)
            cells += [f"{accuracy(model, val):.4f}", f"{mean_error:.4f}"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    ours = errors["wanda, per row, norm per unfolded column (ours)"]
    mag = errors["magnitude, per layer (ours)"]

    print("\nEach layer alone at 50% (the others dense):\n")
    print("| layer | weight | error: magnitude | wanda | acc: magnitude | wanda |")
    print("|---|---|---:|---:|---:|---:|")
    for layer in ours:
        accs = []
        for method in ("magnitude", "wanda"):
            model = copy.deepcopy(dense)
            lp.prune_one_shot(model, batches, method=method, calibration_batches=4, target_sparsity=0.5,
                              include=[layer])
            accs.append(accuracy(model, val))
        shape = "x".join(map(str, dense.get_submodule(layer).weight.shape))
        print(f"| {layer} | {shape} | {mag[layer]:.4f} | {ours[layer]:.4f} | {accs[0]:.4f} | {accs[1]:.4f} |",
              flush=True)

    layer = "layer2.0.downsample.1"
    print(f"\nEvery layer but {layer} at 50%:", end=" ")
    for method in ("magnitude", "wanda"):
        model = copy.deepcopy(dense)
        lp.prune_one_shot(model, batches, method=method, calibration_batches=4, target_sparsity=0.5,
                          exclude=[layer])
        print(f"{method} {accuracy(model, val):.4f}", end="; " if method == "magnitude" else "\n")
    conv, bn = dense.get_submodule(layer), dense.layer2[0].downsample[2]
    xs: list[torch.Tensor] = []
    handle = conv.register_forward_pre_hook(lambda m, a: xs.append(layer_columns(m, a[0])[0]))
    with torch.no_grad():
        for x, _ in batches:
            dense(x)
    handle.remove()
    x = torch.cat(xs).double()
    w = conv.weight.detach().double().reshape(conv.weight.shape[0], -1)
    ratio = float((x.mean(0).abs() / x.std(0).clamp_min(1e-12)).median())
    print(f"\n{layer} alone at 50% (its input: median |mean| / std over channels {ratio:.2f}):\n")
    print("| method | output error / BN running var | of it, the mean shift | acc | acc, the shift folded"
          " into the BN's running mean |\n|---|---:|---:|---:|---:|")
    for method in ("magnitude", "wanda"):
        model = copy.deepcopy(dense)
        lp.prune_one_shot(model, batches, method=method, calibration_batches=4, target_sparsity=0.5,
                          include=[layer])
        pruned = model.get_submodule(layer).weight.detach().double().reshape(w.shape)
        err = x @ (w - pruned).T
        std = bn.running_var.double().sqrt()
        total, shift = ((err / std) ** 2).mean(), ((err.mean(0) / std) ** 2).mean()
        folded = copy.deepcopy(model)
        folded.layer2[0].downsample[2].running_mean -= err.mean(0).float()
        print(f"| {method} | {float(total):.4f} | {float(shift):.4f} | {accuracy(model, val):.4f}"
              f" | {accuracy(folded, val):.4f} |", flush=True)


if __name__ == "__main__":
    main()
