r"""Channel pruning to a FLOPs budget on ``lp.ShapesDataModule``: group-LASSO gates against torch-pruning.

For each model (timm ``resnet18``, ``resnet50``, ``efficientnet_b0``, ``mobilenetv3_large_100``,
``regnety_002``, ``convnext_atto``, ``vit_tiny_patch16_224`` at 32x32, each with its recipe,
:data:`MODELS`: ``efficientnet_b0`` and ``mobilenetv3_large_100`` with
``ImageClassifier(zero_init_last=True)``, without which efficientnet_b0 barely trains here,
``results/shapes-mobile.md``; regnety_002, convnext_atto and the ViT with AdamW,
``results/shapes-recipes.md``), each seed (``--seeds``) and each budget (``target_flops`` 0.5 and 0.25 of
the dense FLOPs, torch-pruning's ``count_ops_and_params``):

* **dense**: ``E`` epochs from scratch (SGD, cosine LR, unless the model's recipe says otherwise), the
  reference;
* **ours**: ``GroupLassoPruning(target_flops=t, finalize_step=0.5, compress=True)``: the same ``E`` epochs; at
  the middle the units with the largest gates that fit the budget are kept (widths rounded to 8), the rest are
  removed; the second half fine-tunes the compressed model;
* **torch-pruning**: the dense run's weights at ``E/2`` epochs, pruned by ``tp.pruner.MetaPruner`` with its
  best settings -- ``TaylorImportance`` (first-order Taylor, gradients of the loss summed over
  ``--taylor-batches`` training batches), ``global_pruning=True``, ``round_to=8``; whole heads for the ViT,
  the model's ``num_heads`` updated -- to the same FLOPs (its ``pruning_ratio`` found by bisection), then
  fine-tuned ``E/2`` epochs with a fresh optimizer and cosine schedule: the same training budget;
* **ours one-shot**: torch-pruning's protocol with our criterion: the same weights at ``E/2`` epochs,
  ``OneShotPruning("channels", target_flops=t, round_to=8)`` at the first step of an ``E/2``-epoch fit with a
  fresh optimizer and cosine schedule (units ranked by their calibration activations, the readers refitted by
  least squares), so that the two rows differ only in which units go and how the rest is repaired;
* **ours one-shot (NAME)**, one row per ``--one-shot-importance NAME``: the same, the units ranked by
  ``importance=NAME`` (``taylor``: first-order Taylor from the gradients of the training step's loss on the
  calibration batches; ``taylor_elementwise``: ``sum |w * dL/dw|``, torch-pruning's form; ``NAME-nocomp``:
  without the least-squares refit, ``compensate=False``).

At each ``--latency-targets`` fraction ``T`` of the dense model's latency (batch 64; none by default), after
the FLOPs rows:

* **ours one-shot (taylor, compensate=False, target_latency)** (``--methods latency-one-shot``): the one-shot
  protocol above, ``OneShotPruning("channels", target_latency=T, latency_batch_size=64, round_to=8,
  importance="taylor", compensate=False)`` (our best one-shot setting at a FLOPs target; another
  criterion with ``--latency-importance NAME``, a ``--one-shot-importance`` name, named in the row): the units
  chosen with a per-layer latency table and the compressed copy timed against the dense model (thread CPU
  time, one thread; what it measured is recorded, ``latency_callback``, beside the final timing);
* **ours (target_latency)** (``latency-ours``): ``GroupLassoPruning(target_latency=T, latency_batch_size=64,
  finalize_step=0.5, compress=True)``, as the ``ours`` row;
* **torch-pruning (equal latency)** (``latency-torch-pruning``): its MetaPruner as above, its
  ``pruning_ratio`` found by bisection on the *measured* batch-64 latency -- each probe timed with the dense
  model and ours in one interleaved call -- until its model runs as fast as the one ours reached (the
  one-shot row's, else ours'; what ours measured, not ``T``); the probe closest to equal latency, within 2%,
  then ``E/2`` epochs of fine-tuning as above. Its row records the ratio and both latencies at the match
  (``matched``: our row); matched to a one-shot row of another ``--latency-importance`` it is named after it,
  ``torch-pruning (equal latency to taylor_elementwise, compensate=False)``.

The latency-target rows carry ``target_kind: "latency"`` (their ``target`` is ``T``): the summary pairs each
with torch-pruning at equal latency (same seed), never with a FLOPs row of the same number.

All in one process, on the same data (``data_seed`` 0; ``--train-size`` training images, 2,000 test images,
``--difficulty``), each seed seeding the weights and the shuffling of all four methods. Per row: test
accuracy, parameters, FLOPs, and CPU latency at batch 1 and 64 on one thread -- thread CPU time
(``time.thread_time``) per forward, the dense and the pruned models interleaved, medians of ``--reps``
repetitions -- as ratios to the dense model's. The summary gives, per model and budget, the mean and
standard deviation over seeds and the *paired* differences (ours - torch-pruning, ours - dense; the same seed
on both sides).

Usage::

    python benchmarks/channels.py --models resnet18 efficientnet_b0 --targets 0.5 --seeds 0 1 2
    # only some rows (dense always runs: it gives the snapshot), one of them ranked by Taylor
    python benchmarks/channels.py --models resnet18 --one-shot-importance taylor --methods one-shot-taylor
    python benchmarks/channels.py --merge a.json b.json --out channels-shapes   # nothing is trained
    # --plot: also <out>.png, accuracy against measured latency (channels_plot.py, whose docstring has the
    # merge command of the README's shapes tables and plot)
    # accuracy at equal measured latency: ours at target_latency=0.5 against torch-pruning at its latency
    python benchmarks/channels.py --models resnet18 --latency-targets 0.5 --methods latency-one-shot \
        latency-torch-pruning

Writes ``benchmarks/results/<out>.{json,md}`` (default ``channels-shapes``; rows of the same model, seed,
method and target (of the same kind) already there are replaced), with ``--plot`` also ``<out>.png``.
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
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch_pruning as tp  # noqa: E402
from channels_plot import PEER_AT_LATENCY, is_peer_at_latency  # noqa: E402
from torch import Tensor  # noqa: E402

import lightning_prune as lp  # noqa: E402
from lightning_prune.graph import analyse_channels, slice_units  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: the per-model recipe: ``lp.ImageClassifier`` arguments on top of the common ones (SGD, lr, weight decay,
#: cosine), the same for every method (dense, ours, torch-pruning's base model and its fine-tuning). The
#: mobile families get residual blocks that start as the identity: with timm's init, dense efficientnet_b0
#: reached 0.31 here (``results/channels-shapes-effb0-s0.md``), with it 0.87 (mobilenetv3: 0.78 -> 0.89),
#: inside the 80-92% band where methods separate; a stride-1 stem too takes both to 0.99 (the ceiling) at
#: about 4x the FLOPs (the cause and the ablation: ``benchmarks/mobile_from_scratch.py``,
#: ``results/shapes-mobile.md``, ``results/shapes.md``)
MOBILE = {"zero_init_last": True}
#: regnety_002 and convnext_atto: with SGD at lr 0.05 dense reached 0.20 and 0.21 here in 8 epochs, with AdamW
#: 0.48 and, for convnext_atto, its 4x4 stem as 2x2 patches (``patch_size=2``: the first stage on 16x16 maps
#: instead of 8x8, as a stride-1 stem adapts the mobile families to 32x32) and one epoch of linear warm-up,
#: 0.40 (0.18 without the warm-up; ``benchmarks/mobile_from_scratch.py --out shapes-recipes``,
#: ``results/shapes-recipes.md``). The ViT: AdamW with a one-epoch warm-up at lr 0.0003 on 8x8 patches (16
#: tokens) reached 0.50; at lr 0.001 it stayed at 0.18 (16x16 patches) and 0.12 (8x8). resnet50: with SGD
#: 0.405 (``results/channels-shapes.md``, seed 0), with AdamW and the warm-up 0.862
ADAMW = {"optimizer": "adamw", "lr": 0.002, "weight_decay": 0.05}
MODELS: dict[str, dict[str, Any]] = {
    "resnet18": {},
    "resnet50": {**ADAMW, "warmup_epochs": 1},
    "efficientnet_b0": MOBILE,
    "mobilenetv3_large_100": MOBILE,
    "regnety_002": ADAMW,
    "convnext_atto": {**ADAMW, "warmup_epochs": 1, "model_kwargs": {"patch_size": 2}},
    "vit_tiny_patch16_224": {**ADAMW, "lr": 0.0003, "warmup_epochs": 1,
                             "model_kwargs": {"img_size": 32, "patch_size": 8}},
}
SIDE = 32


def trainer(epochs: int, callbacks=(), root: str = "runs/bench_channels", logger: Any = False) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=logger,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks),
                      default_root_dir=root, deterministic=True)


class Metrics(pl.loggers.Logger):
    """The last value of each metric logged: what a latency-target callback measured
    (``prune/latency_remaining``: its own timing of the compressed copy against the dense model)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)


def callback_latency(metrics: Metrics) -> dict[str, float]:
    """``latency_callback`` (measured by the callback) and ``latency_predicted`` (its table's prediction)."""
    names = {"latency_callback": "prune/latency_remaining", "latency_predicted": "prune/latency_predicted"}
    return {key: float(metrics.metrics[name]) for key, name in names.items() if name in metrics.metrics}


def classifier(name: str, lr: float) -> lp.ImageClassifier:
    """The model with its recipe (:data:`MODELS`; ``ImageClassifier``'s default ``head_init="fan_in"``:
    timm's EfficientNet/MobileNet classifier init left ``mobilenetv3_large_100`` at chance here.)"""
    recipe = {"optimizer": "sgd", "lr": lr, "weight_decay": 5e-4, "scheduler": "cosine",
              **MODELS.get(name, {})}  # (a model's recipe may replace the common optimizer settings)
    return lp.ImageClassifier(name, num_classes=10, **recipe)


def accuracy(model: pl.LightningModule, data: pl.LightningDataModule) -> float:
    return float(trainer(1).test(model, datamodule=data, verbose=False)[0]["test/acc"])


def count(model: torch.nn.Module) -> tuple[float, float]:
    flops, params = tp.utils.count_ops_and_params(model.eval(), torch.randn(1, 3, SIDE, SIDE))
    return float(flops), float(params)


@torch.no_grad()
def latency(models: dict[str, torch.nn.Module], batch: int, reps: int, inner: int) -> dict[str, float]:
    """Median thread-CPU milliseconds per forward; the models interleaved so that noise hits them alike."""
    torch.set_num_threads(1)
    x = torch.randn(batch, 3, SIDE, SIDE)
    for m in models.values():
        m.eval()
        for _ in range(2):
            m(x)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(reps):
        for name, m in models.items():
            start = time.thread_time()
            for _ in range(inner):
                m(x)
            times[name].append((time.thread_time() - start) * 1e3 / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def taylor_gradients(net: torch.nn.Module, data: pl.LightningDataModule, batches: int) -> dict[str, Tensor]:
    """The gradient of the cross-entropy summed over the first ``batches`` training batches (train mode, as
    torch-pruning's examples compute Taylor importance), by parameter name."""
    net = copy.deepcopy(net).train()
    net.zero_grad()
    for i, (x, y) in enumerate(data.train_dataloader()):
        if i >= batches:
            break
        torch.nn.functional.cross_entropy(net(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


def torch_pruning_pruner(net: torch.nn.Module, grads: dict[str, Tensor]
                         ) -> Callable[[float], torch.nn.Module]:
    """``prune(ratio)``: a copy of ``net`` pruned by torch-pruning's MetaPruner (TaylorImportance on
    ``grads``, global pruning, round_to=8; whole heads for a ViT) at ``pruning_ratio=ratio``."""
    example = torch.randn(1, 3, SIDE, SIDE)

    def prune(ratio: float) -> torch.nn.Module:
        model = copy.deepcopy(net).eval()
        for name, p in model.named_parameters():
            p.grad = grads[name].clone() if name in grads else None
        heads = {m.qkv: m.num_heads for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "num_heads")}
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.TaylorImportance(), pruning_ratio=ratio,
            global_pruning=True, ignored_layers=[model.get_classifier()], round_to=8, num_heads=heads,
            prune_num_heads=bool(heads), prune_head_dims=not heads,
            head_pruning_ratio=ratio if heads else 0.0)
        pruner.step()
        model.zero_grad(set_to_none=True)
        for m in model.modules():  # MetaPruner updates only its own dict of heads: the model needs them too
            if hasattr(m, "qkv") and m.qkv in pruner.num_heads:
                m.num_heads = pruner.num_heads[m.qkv]
                m.attn_dim = m.num_heads * m.head_dim
        return model

    return prune


def bisect_ratio(prune: Callable[[float], Any], measure: Callable[[Any], float], target: float, *,
                 tol: float = 0.01, steps: int = 12, hi: float = 0.95, closest: bool = False
                 ) -> tuple[Any, float, float]:
    """The ``pruning_ratio`` in ``[0, hi]`` at which ``measure(prune(ratio))`` -- a fraction that falls as the
    ratio grows (FLOPs, a measured latency) -- reaches ``target``, by bisection (at most ``steps`` probes).

    By default the last probe at most ``target`` (the largest value below it), stopping at the first one
    within ``tol`` below (torch-pruning at a FLOPs budget); if none is below, ``prune(hi)``. ``closest=True``:
    the probe closest to ``target`` on either side, stopping at the first one within ``tol`` of it (a noisy
    measured latency matched to another model's: neither side favoured). A ratio whose pruning fails (the
    ViT's global head ranking can leave a layer no head: torch-pruning's model then breaks) is too much: the
    bisection goes lower; with no probe at most ``target``, the highest ratio that worked is kept. Returns
    ``(model, ratio, value)``.
    """
    lo = 0.0
    best: tuple[Any, float, float] | None = None
    worked: tuple[Any, float, float] | None = None
    failed: RuntimeError | None = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        try:
            pruned = prune(mid)
            value = measure(pruned)
        except RuntimeError as err:
            hi, failed = mid, err
            continue
        if worked is None or mid > worked[1]:
            worked = (pruned, mid, value)
        if closest:
            if best is None or abs(value - target) < abs(best[2] - target):
                best = (pruned, mid, value)
            if abs(value - target) < tol:
                break
        elif value <= target:
            best = (pruned, mid, value)
            if target - value < tol:
                break
        if value <= target:
            hi = mid
        else:
            lo = mid
    if best is None and failed is not None:  # the most pruning that works, or the failure
        if worked is None:
            raise failed
        best = worked
    if best is None:
        pruned = prune(hi)
        best = (pruned, hi, measure(pruned))
    return best


def torch_pruning_at(net: torch.nn.Module, target: float, dense_flops: float,
                     grads: dict[str, Tensor]) -> tuple[torch.nn.Module, float]:
    """torch-pruning's MetaPruner (TaylorImportance on ``grads``, global pruning, round_to=8) at ``target`` of
    the FLOPs: the ``pruning_ratio`` by bisection on copies; returns the pruned copy and the ratio used."""
    pruned, ratio, _ = bisect_ratio(torch_pruning_pruner(net, grads), lambda m: count(m)[0] / dense_flops,
                                    target)
    return pruned, ratio


def latency_to(reference: torch.nn.Module, dense: torch.nn.Module, reps: int,
               timing: Callable[..., dict[str, float]] = latency) -> tuple[Callable[[Any], float], list]:
    """``measure(model)``: ``model``'s batch-64 latency over ``reference``'s, the two and ``dense`` timed in
    one interleaved call of ``timing`` (:func:`latency`: thread CPU time, one thread, medians), so that a
    drift of the shared machine's load between probes cancels; 1.0 is equal latency. Each call appends
    ``(that value, model's latency, reference's latency)``, the latencies as fractions of the dense model's,
    to the returned list."""
    probes: list[tuple[float, float, float]] = []

    def measure(model: Any) -> float:
        times = timing({"dense": dense, "reference": reference, "candidate": model}, 64, reps, 2)
        value = times["candidate"] / times["reference"]
        probes.append((value, times["candidate"] / times["dense"], times["reference"] / times["dense"]))
        return value

    return measure, probes


def torch_pruning_at_latency(net: torch.nn.Module, grads: dict[str, Tensor], reference: torch.nn.Module,
                             dense: torch.nn.Module, reps: int,
                             timing: Callable[..., dict[str, float]] = latency
                             ) -> tuple[torch.nn.Module, float, dict[str, float]]:
    """torch-pruning's MetaPruner as in :func:`torch_pruning_at`, its ``pruning_ratio`` bisected on the
    *measured* batch-64 latency until its model runs as fast as ``reference`` (ours at a latency target):
    the probe closest to equal latency, within 2%. Returns the pruned copy, the ratio, and at that probe
    its latency and the reference's as fractions of the dense model's (the same timing call)."""
    measure, probes = latency_to(reference, dense, reps, timing)
    pruned, ratio, value = bisect_ratio(torch_pruning_pruner(net, grads), measure, 1.0, tol=0.02, steps=10,
                                        closest=True)
    at = next(p for p in probes if p[0] == value)
    return pruned, ratio, {"latency_matched": at[1], "matched_to": at[2], "latency_to_ours": value,
                           "probes": len(probes)}


def run_model(name: str, seed: int, args: argparse.Namespace, log: Any) -> list[dict[str, Any]]:
    epochs, targets, lr, reps = args.epochs, args.targets, args.lr, args.reps
    data = lp.ShapesDataModule(batch_size=64, train_size=args.train_size, test_size=2000,
                               difficulty=args.difficulty, data_seed=0, seed=seed)
    data.setup("fit")
    half = max(1, epochs // 2)
    # dense, with its weights at the half kept for torch-pruning
    pl.seed_everything(seed, verbose=False)
    dense = classifier(name, lr)
    snapshot: dict[str, Any] = {}

    class Snapshot(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch + 1 == half:
                snapshot["weights"] = copy.deepcopy(pl_module.model.state_dict())

    trainer(epochs, [Snapshot()]).fit(dense, datamodule=data)
    dense_acc = accuracy(dense, data)
    dense_net = copy.deepcopy(dense.model).eval()
    dense_flops, dense_params = count(dense_net)
    coverage = analyse_channels(dense_net, torch.randn(2, 3, SIDE, SIDE)).coverage
    log(f"{name} seed {seed}: dense acc {dense_acc:.4f}, {dense_params / 1e6:.2f} M params,"
        f" {dense_flops / 1e6:.1f} MFLOPs, coverage {coverage:.3f}")
    rows = [{"model": name, "seed": seed, "method": "dense", "target": 1.0, "acc": dense_acc, "flops": 1.0,
             "params": 1.0, "coverage": coverage}]
    grads: dict[str, Tensor] | None = None
    nets = {"dense": dense_net}
    wanted = set(args.methods)
    for target in targets:
        if "ours" in wanted:
            rows.append(ours_row(name, seed, target, data, args, dense_flops, dense_params, nets, log))
        # torch-pruning
        if "torch-pruning" in wanted:
            try:
                base = classifier(name, lr).model
                base.load_state_dict(snapshot["weights"])
                if grads is None:
                    grads = taylor_gradients(base, data, args.taylor_batches)
                pruned, ratio = torch_pruning_at(base.eval(), target, dense_flops, grads)
                pl.seed_everything(seed, verbose=False)
                module = classifier(name, lr)
                module.model = pruned.train()
                trainer(epochs - half).fit(module, datamodule=data)
                flops, params = count(module.model)
                rows.append({"model": name, "seed": seed, "method": "torch-pruning", "target": target,
                             "acc": accuracy(module, data), "flops": flops / dense_flops,
                             "params": params / dense_params, "pruning_ratio": ratio})
                nets[f"torch-pruning {target}"] = copy.deepcopy(module.model).eval()
                log(f"{name} torch-pruning @ {target}: acc {rows[-1]['acc']:.4f},"
                    f" FLOPs {rows[-1]['flops']:.3f}")
            except Exception as err:  # noqa: BLE001 - its failure is a result too
                rows.append({"model": name, "seed": seed, "method": "torch-pruning", "target": target,
                             "error": f"{type(err).__name__}: {str(err)[:160]}"})
                log(f"{name} torch-pruning @ {target}: {rows[-1]['error']}")
        # ours, one-shot on torch-pruning's protocol (the same snapshot, the same fresh fine-tuning), ranked
        # by the calibration activations ("ours one-shot") and by each --one-shot-importance criterion
        for criterion in one_shot_criteria(args):
            if one_shot_key(criterion) not in wanted:
                continue
            method = one_shot_method(criterion, args.calibration_batches)
            try:
                pl.seed_everything(seed, verbose=False)
                module = classifier(name, lr)
                module.model.load_state_dict(snapshot["weights"])
                one_shot = lp.OneShotPruning("channels", target_flops=target, prune_step=0, round_to=8,
                                             verbose=False, log_media_every_n_epochs=0,
                                             input_size=(3, SIDE, SIDE), importance=importance_of(criterion),
                                             compensate=_split(criterion)[1],
                                             calibration_batches=args.calibration_batches)
                trainer(epochs - half, [one_shot]).fit(module, datamodule=data)
                flops, params = count(module.model)
                rows.append({"model": name, "seed": seed, "method": method, "target": target,
                             "acc": accuracy(module, data), "flops": flops / dense_flops,
                             "params": params / dense_params})
                nets[f"{method} {target}"] = copy.deepcopy(module.model).eval()
                log(f"{name} {method} @ {target}: acc {rows[-1]['acc']:.4f}, FLOPs {rows[-1]['flops']:.3f}")
            except Exception as err:  # noqa: BLE001 - a failure is a row of the table
                rows.append({"model": name, "seed": seed, "method": method, "target": target,
                             "error": f"{type(err).__name__}: {str(err)[:160]}"})
                log(f"{name} {method} @ {target}: {rows[-1]['error']}")
    for target in args.latency_targets:
        # at a latency target: ours, then torch-pruning at the latency ours measured (its one-shot row first)
        reference: tuple[str, torch.nn.Module] | None = None
        if "latency-ours" in wanted:
            rows.append(ours_row(name, seed, target, data, args, dense_flops, dense_params, nets, log,
                                 kind="latency"))
            reference = rows[-1]["method"], nets[_net_key(rows[-1])]
        if "latency-one-shot" in wanted:
            rows.append(latency_one_shot_row(name, seed, target, data, snapshot["weights"], args, dense_flops,
                                             dense_params, nets, log))
            if "error" not in rows[-1]:
                reference = rows[-1]["method"], nets[_net_key(rows[-1])]
        if "latency-torch-pruning" in wanted:
            method = latency_tp_method(reference[0]) if reference is not None else LATENCY_TP
            try:
                if reference is None:
                    raise RuntimeError("no model of ours at this latency target to match (--methods"
                                       " latency-one-shot or latency-ours)")
                base = classifier(name, lr).model
                base.load_state_dict(snapshot["weights"])
                if grads is None:
                    grads = taylor_gradients(base, data, args.taylor_batches)
                pruned, ratio, match = torch_pruning_at_latency(base.eval(), grads, reference[1], dense_net,
                                                                reps)
                pl.seed_everything(seed, verbose=False)
                module = classifier(name, lr)
                module.model = pruned.train()
                trainer(epochs - half).fit(module, datamodule=data)
                flops, params = count(module.model)
                rows.append({"model": name, "seed": seed, "method": method, "target": target,
                             "target_kind": "latency", "acc": accuracy(module, data),
                             "flops": flops / dense_flops, "params": params / dense_params,
                             "pruning_ratio": ratio, "matched": reference[0], **match})
                nets[_net_key(rows[-1])] = copy.deepcopy(module.model).eval()
                log(f"{name} {method} @ latency {target}: pruning_ratio {ratio:.3f}, latency"
                    f" {match['latency_matched']:.3f} where ours measured {match['matched_to']:.3f} (the"
                    f" same timing, {match['probes']} probes); acc {rows[-1]['acc']:.4f},"
                    f" FLOPs {rows[-1]['flops']:.3f}")
            except Exception as err:  # noqa: BLE001 - its failure is a result too
                rows.append({"model": name, "seed": seed, "method": method, "target": target,
                             "target_kind": "latency", "error": f"{type(err).__name__}: {str(err)[:160]}"})
                log(f"{name} {method} @ latency {target}: {rows[-1]['error']}")
    for batch, inner in ((1, 20), (64, 2)):
        times = latency(nets, batch, reps, inner)
        for row in rows:
            key = _net_key(row)
            if key in times:
                row[f"latency_b{batch}"] = times[key] / times["dense"]
                row[f"ms_b{batch}"] = times[key]
    return rows


def ours_row(name: str, seed: int, target: float, data: pl.LightningDataModule, args: argparse.Namespace,
             dense_flops: float, dense_params: float, nets: dict[str, torch.nn.Module], log: Any,
             kind: str = "flops") -> dict[str, Any]:
    """GroupLassoPruning over the whole ``E`` epochs, the units chosen at the middle (``kind="latency"``: to
    ``target_latency`` at batch 64, the row ``ours (target_latency)``)."""
    pl.seed_everything(seed, verbose=False)
    model = classifier(name, args.lr)
    budget = {"target_latency": target, "latency_batch_size": 64} if kind == "latency" else \
        {"target_flops": target}
    cb = lp.GroupLassoPruning(**budget, finalize_step=0.5, compress=True, verbose=False,
                              log_media_every_n_epochs=0, input_size=(3, SIDE, SIDE))
    metrics = Metrics() if kind == "latency" else False
    trainer(args.epochs, [cb], logger=metrics).fit(model, datamodule=data)
    ours = copy.deepcopy(model.model).eval()
    flops, params = count(ours)
    row = {"model": name, "seed": seed, "method": "ours", "target": target, "acc": accuracy(model, data),
           "flops": flops / dense_flops, "params": params / dense_params}
    if kind == "latency":
        row.update(method=LATENCY_OURS, target_kind="latency", **callback_latency(metrics))
    nets[_net_key(row)] = ours
    log(f"{name} {row['method']} @ {kind} {target}: acc {row['acc']:.4f}, FLOPs {row['flops']:.3f},"
        f" params {row['params']:.3f}")
    return row


#: the rows at a latency target (``--latency-targets``): their methods, and the one-shot criterion (Taylor
#: without the least-squares refit: our best one-shot setting on this benchmark at a FLOPs target)
LATENCY_OURS = "ours (target_latency)"
LATENCY_TP = PEER_AT_LATENCY
LATENCY_ONE_SHOT = "taylor-nocomp"
#: their ``--methods`` names
LATENCY_METHODS = ["latency-one-shot", "latency-ours", "latency-torch-pruning"]


def latency_one_shot_method(batches: int = 4, criterion: str = LATENCY_ONE_SHOT) -> str:
    """``ours one-shot (taylor, compensate=False, target_latency)`` (``criterion``: a
    ``--one-shot-importance`` name, ``--latency-importance``)."""
    return one_shot_method(criterion, batches)[:-1] + ", target_latency)"


def latency_tp_method(matched: str) -> str:
    """torch-pruning's row at the latency of our row ``matched``: :data:`LATENCY_TP` where that is
    GroupLasso's or the one-shot row of the default criterion, else named after it (``torch-pruning (equal
    latency to taylor_elementwise, compensate=False)``), so that torch-pruning matched to two of our models
    of one seed are two rows."""
    default = (LATENCY_OURS, latency_one_shot_method())
    if matched in default or not matched.startswith("ours one-shot ("):
        return LATENCY_TP
    return f"{LATENCY_TP[:-1]} to {matched[len('ours one-shot ('):-len(', target_latency)')]})"


def latency_one_shot_row(name: str, seed: int, target: float, data: pl.LightningDataModule,
                         weights: dict[str, Any], args: argparse.Namespace, dense_flops: float,
                         dense_params: float, nets: dict[str, torch.nn.Module], log: Any) -> dict[str, Any]:
    """OneShotPruning to ``target_latency`` (batch 64: the thread CPU time of the compressed copy against the
    dense model's, one thread) on torch-pruning's protocol: the half-trained ``weights``, then ``E - E/2``
    epochs of fine-tuning with a fresh optimizer and schedule; a failure is a row too."""
    criterion = args.latency_importance
    method = latency_one_shot_method(args.calibration_batches, criterion)
    row: dict[str, Any] = {"model": name, "seed": seed, "method": method, "target": target,
                           "target_kind": "latency"}
    try:
        pl.seed_everything(seed, verbose=False)
        module = classifier(name, args.lr)
        module.model.load_state_dict(weights)
        one_shot = lp.OneShotPruning("channels", target_latency=target, latency_batch_size=64, prune_step=0,
                                     round_to=8, importance=importance_of(criterion),
                                     compensate=_split(criterion)[1],
                                     calibration_batches=args.calibration_batches, input_size=(3, SIDE, SIDE),
                                     verbose=False, log_media_every_n_epochs=0)
        metrics = Metrics()
        fit = trainer(args.epochs - max(1, args.epochs // 2), [one_shot], logger=metrics)
        fit.fit(module, datamodule=data)
        flops, params = count(module.model)
        row.update(acc=accuracy(module, data), flops=flops / dense_flops, params=params / dense_params,
                   **callback_latency(metrics))
        nets[_net_key(row)] = copy.deepcopy(module.model).eval()
        log(f"{name} {method} @ latency {target}: acc {row['acc']:.4f}, FLOPs {row['flops']:.3f}, latency"
            f" {row.get('latency_callback', float('nan')):.3f} measured by the callback"
            f" ({row.get('latency_predicted', float('nan')):.3f} predicted)")
    except Exception as err:  # noqa: BLE001 - a failure is a row of the table
        row["error"] = f"{type(err).__name__}: {str(err)[:160]}"
        log(f"{name} {method} @ latency {target}: {row['error']}")
    return row


#: ``--one-shot-importance`` names: ``activations`` is OneShotPruning's own ranking (``importance=None``, the
#: "ours one-shot" row); any other name is passed as ``importance=`` (``taylor_elementwise``: torch-pruning's
#: form, ``sum |w * dL/dw|``); a name ending in ``-nocomp`` is the same without the least-squares refit
#: (``compensate=False``: the ablation)
ONE_SHOT_DEFAULT = ["activations"]
NO_COMPENSATION = "-nocomp"


def one_shot_criteria(args: argparse.Namespace) -> list[str]:
    return ONE_SHOT_DEFAULT + [c for c in args.one_shot_importance if c not in ONE_SHOT_DEFAULT]


def one_shot_method(criterion: str, batches: int = 4) -> str:
    base, compensate = _split(criterion)
    details = ([] if base == "activations" else [base]) + ([] if compensate else ["compensate=False"]) \
        + ([] if batches == 4 else [f"{batches} batches"])
    return "ours one-shot" + (f" ({', '.join(details)})" if details else "")


def _split(criterion: str) -> tuple[str, bool]:
    """``(criterion, compensate)`` of a ``--one-shot-importance`` name."""
    if criterion.endswith(NO_COMPENSATION):
        return criterion[:-len(NO_COMPENSATION)], False
    return criterion, True


def one_shot_key(criterion: str) -> str:
    """The ``--methods`` name of a one-shot row: ``one-shot``, ``one-shot-<criterion>``."""
    return "one-shot" if criterion == "activations" else f"one-shot-{criterion}"


def importance_of(criterion: str) -> Any:
    criterion = _split(criterion)[0]
    return None if criterion == "activations" else criterion


def round_to_sweep(reps: int, log: Any) -> list[dict[str, Any]]:
    """Latency of resnet18 with the same removed share at widths rounded to 1, 8 and 16 (batch 64)."""
    torch.manual_seed(0)
    net = classifier("resnet18", 0.05).model.eval()
    analysis = analyse_channels(net, torch.randn(2, 3, SIDE, SIDE))
    from lightning_prune.core.compression import round_kept

    nets = {}
    for r in (1, 8, 16):
        small = copy.deepcopy(net)
        removed = {}
        for g in analysis.groups:
            gone = list(range(int(g.size * 0.55)))  # 45% kept: widths fall between multiples
            removed[g.name] = round_kept(g, gone, r)
        slice_units(small, analysis.groups, removed)
        nets[f"round_to={r}"] = small
    nets["dense"] = net
    times = latency(nets, 64, reps, 2)
    rows = []
    for r in (1, 8, 16):
        flops = count(nets[f"round_to={r}"])[0] / count(net)[0]
        rows.append({"round_to": r, "flops": flops, "latency_b64": times[f"round_to={r}"] / times["dense"],
                     "ms_b64": times[f"round_to={r}"]})
        log(f"round_to={r}: FLOPs {flops:.3f}, latency {rows[-1]['latency_b64']:.3f}")
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model, method and target: mean and sd of the accuracy over seeds (and of the batch-64 latency
    where measured); for ours and torch-pruning the paired differences to each other and to dense (the same
    seed on both sides). A latency-target row (``target_kind`` ``"latency"``) is paired with torch-pruning at
    equal latency -- the row matched to its model -- never with a FLOPs row of the same number: ``minus_tp``
    is ours minus that row, ``tp_latency_b64`` its measured latency, ``minus_tp_latency_b64`` the paired
    difference of the two latencies (0: equal)."""
    def by(model: str, method: str, target: float, kind: str = "flops") -> dict[int, dict[str, Any]]:
        return {r["seed"]: r for r in rows if r["model"] == model and r["method"] == method
                and r["target"] == target and _kind(r) == kind and "acc" in r}

    def stats(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")

    out = []
    keys = dict.fromkeys((r["model"], r["method"], r["target"], _kind(r)) for r in rows)
    for model, method, target, kind in keys:
        these = by(model, method, target, kind)
        if not these:
            continue
        mean, sd = stats([r["acc"] for r in these.values()])
        entry = {"model": model, "method": method, "target": target, "seeds": sorted(these), "acc": mean,
                 "acc_sd": sd, "flops": statistics.fmean(r["flops"] for r in these.values())}
        measured = [r["latency_b64"] for r in these.values() if "latency_b64" in r]
        if measured:
            entry["latency_b64"], entry["latency_b64_sd"] = stats(measured)
        if kind == "latency":
            entry["target_kind"] = kind
            by_callback = [r["latency_callback"] for r in these.values() if "latency_callback" in r]
            if by_callback:  # (what the callback measured when it chose: its own timing)
                entry["latency_callback"] = statistics.fmean(by_callback)
            refs = [("dense", "minus_dense", by(model, "dense", 1.0))]
            if is_peer_at_latency(method):
                entry["matched"] = sorted({r["matched"] for r in these.values() if "matched" in r})
            else:
                peer = latency_tp_method(method)
                refs.append((peer, "minus_tp", {k: r for k, r in by(model, peer, target, kind).items()
                                                if r.get("matched") == method}))
        else:
            refs = []
            for other, key in (("dense", "minus_dense"), ("torch-pruning", "minus_tp"),
                               ("ours one-shot", "minus_one_shot")):
                if method in (other, "dense") or (key == "minus_one_shot"
                                                  and not method.startswith(other + " (")):
                    continue
                refs.append((other, key, by(model, other, 1.0 if other == "dense" else target)))
        for _, key, ref in refs:
            pairs = [these[k]["acc"] - ref[k]["acc"] for k in these if k in ref]
            if pairs:
                entry[key], entry[key + "_sd"] = stats(pairs)
                entry[key + "_n"] = len(pairs)
            if kind == "latency" and key == "minus_tp":
                timed = [k for k in these if k in ref and "latency_b64" in these[k]
                         and "latency_b64" in ref[k]]
                if timed:
                    entry["tp_latency_b64"] = statistics.fmean(ref[k]["latency_b64"] for k in timed)
                    entry["minus_tp_latency_b64"], entry["minus_tp_latency_b64_sd"] = stats(
                        [these[k]["latency_b64"] - ref[k]["latency_b64"] for k in timed])
        out.append(entry)
    return out


def recipes(rows: list[dict[str, Any]]) -> str:
    """The per-model recipes the rows were run with (rows written before recipes were recorded: none)."""
    found = {r["model"]: r["recipe"] for r in rows if r.get("recipe")}
    if not found:
        return ""
    return (". Per-model recipe (`ImageClassifier` arguments, every method; they replace the common"
            " ones): " + "; ".join(
        f"`{model}`: `{', '.join(f'{k}={v}' for k, v in recipe.items())}`"
        for model, recipe in found.items()))


def markdown(rows: list[dict[str, Any]], rounding: list[dict[str, Any]], config: dict[str, Any]) -> str:
    def pm(mean: float | None, sd: float | None) -> str:
        if mean is None:
            return ""
        return f"{mean:+.4f}" + (f" ± {sd:.4f}" if sd is not None and sd == sd else "")

    entries = summary(rows)
    at_latency = [e for e in entries if e.get("target_kind") == "latency"]
    entries = [e for e in entries if e.get("target_kind") != "latency"]
    criteria = any("minus_one_shot" in e for e in entries)  # rows of --one-shot-importance: their pairs too
    latency_rows = any(_kind(r) == "latency" for r in rows)  # (then the target column says of what)
    sources = config.get("sources") or []
    merged = "; merged from: " + "; ".join(f"`{c}`" for c in sources) if sources else ""
    lines = [f"`lp.ShapesDataModule` (difficulty {config['difficulty']}, {config['train_size']} training"
             f" images, 2,000 test images, data seed 0), 32x32, {config['epochs']} epochs (pruned runs:"
             f" {config['epochs'] // 2} + {config['epochs'] - config['epochs'] // 2}), SGD lr {config['lr']}"
             f" cosine, batch 64, one thread; torch-pruning: TaylorImportance ({config['taylor_batches']}"
             " batches), global pruning, round_to=8, the same fine-tuning budget. Latency: thread CPU time,"
             f" 1 thread, medians of {config['reps']} interleaved repetitions, as ratios to the dense model."
             f" `{config['command']}`" + merged + recipes(rows), "",
             "Mean over seeds; paired differences (same seed) with their standard deviation:", "",
             "| model | method | target FLOPs | seeds | test acc (mean ± sd) | FLOPs | - dense"
             " | - torch-pruning |" + (" - ours one-shot |" if criteria else ""),
             "|---|---|---:|---|---:|---:|---:|---:|" + ("---:|" if criteria else "")]
    for e in entries:
        sd = f" ± {e['acc_sd']:.4f}" if e["acc_sd"] == e["acc_sd"] else ""
        lines.append(f"| `{e['model']}` | {e['method']} | {e['target']:g} | {','.join(map(str, e['seeds']))}"
                     f" | {e['acc']:.4f}{sd} | {e['flops']:.3f}"
                     f" | {pm(e.get('minus_dense'), e.get('minus_dense_sd'))}"
                     f" | {pm(e.get('minus_tp'), e.get('minus_tp_sd'))} |"
                     + (f" {pm(e.get('minus_one_shot'), e.get('minus_one_shot_sd'))} |" if criteria else ""))
    if at_latency:
        lines += ["", "At a latency target (`target_latency`, batch 64): torch-pruning at equal latency is"
                  " its MetaPruner as above, its `pruning_ratio` bisected on the measured batch-64 latency"
                  " until its model runs as fast as ours (the two and dense timed in one interleaved call),"
                  " then the same fine-tuning; latency b64 from the final timing of every model. Paired"
                  " differences (same seed):", "",
                  "| model | method | target latency | seeds | test acc (mean ± sd) | latency b64"
                  " | measured by the callback | FLOPs | - dense | - torch-pruning at equal latency"
                  " | its latency b64 | latency - its |",
                  "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for e in at_latency:
            sd = f" ± {e['acc_sd']:.4f}" if e["acc_sd"] == e["acc_sd"] else ""
            tp_latency = f"{e['tp_latency_b64']:.3f}" if "tp_latency_b64" in e else ""
            by_callback = f"{e['latency_callback']:.3f}" if "latency_callback" in e else ""
            lines.append(f"| `{e['model']}` | {e['method']} | {e['target']:g}"
                         f" | {','.join(map(str, e['seeds']))} | {e['acc']:.4f}{sd}"
                         f" | {e.get('latency_b64', float('nan')):.3f} | {by_callback} | {e['flops']:.3f}"
                         f" | {pm(e.get('minus_dense'), e.get('minus_dense_sd'))}"
                         f" | {pm(e.get('minus_tp'), e.get('minus_tp_sd'))} | {tp_latency}"
                         f" | {pm(e.get('minus_tp_latency_b64'), e.get('minus_tp_latency_b64_sd'))} |")
        matched = [r for r in rows if is_peer_at_latency(r["method"]) and "pruning_ratio" in r]
        if matched:
            lines += ["", "torch-pruning's match (at the probe kept: its latency and ours, one timing):", "",
                      "| model | seed | target latency | matched to | pruning_ratio | its latency | ours"
                      " | its / ours | probes |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
            lines += [f"| `{r['model']}` | {r['seed']} | {r['target']:g} | {r['matched']}"
                      f" | {r['pruning_ratio']:.3f} | {r['latency_matched']:.3f} | {r['matched_to']:.3f}"
                      f" | {r['latency_to_ours']:.3f} | {r['probes']} |" for r in matched]
    lines += ["", "Every run:", "",
              "| model | seed | method | " + ("target" if latency_rows else "target FLOPs") + " | test acc"
              " | FLOPs | params | latency b1 | latency b64 | b64 latency / FLOPs |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]

    def target(r: dict[str, Any]) -> str:  # (which budget, once the file has both)
        return f"{r['target']:g}" if not latency_rows or r["method"] == "dense" else \
            f"{'latency' if _kind(r) == 'latency' else 'FLOPs'} {r['target']:g}"

    for r in rows:
        if "error" in r:
            lines.append(f"| `{r['model']}` | {r['seed']} | {r['method']} | "
                         + (target(r) if latency_rows else f"{r['target']}")
                         + f" | failed: {r['error']} | | | | | |")
            continue
        ratio = r.get("latency_b64", float("nan")) / r["flops"] if r["method"] != "dense" else 1.0
        lines.append(f"| `{r['model']}` | {r['seed']} | {r['method']} | {target(r)} | {r['acc']:.4f}"
                     f" | {r['flops']:.3f} | {r['params']:.3f} | {r.get('latency_b1', float('nan')):.3f} |"
                     f" {r.get('latency_b64', float('nan')):.3f} | {ratio:.2f} |")
    if rounding:
        lines += ["", "Kept widths rounded (resnet18, 45% of every group kept before rounding, batch 64):",
                  "", "| round_to | FLOPs | latency b64 | ms |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['round_to']} | {r['flops']:.3f} | {r['latency_b64']:.3f} | {r['ms_b64']:.1f} |"
                  for r in rounding]
    return "\n".join(lines) + "\n"


def _kind(row: dict[str, Any]) -> str:
    """What a row's ``target`` is a fraction of: ``"flops"`` (rows written before latency targets too) or
    ``"latency"`` (``--latency-targets``)."""
    return row.get("target_kind", "flops")


def _key(row: dict[str, Any]) -> tuple:
    return row["model"], row["seed"], row["method"], row["target"], _kind(row)


def _net_key(row: dict[str, Any]) -> str:
    """The row's model in ``run_model``'s ``nets`` (the final latency timing)."""
    if row["method"] == "dense":
        return "dense"
    return f"{row['method']} {row['target']}" + (" latency" if _kind(row) == "latency" else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--targets", nargs="*", type=float, default=[0.5, 0.25])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--difficulty", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--taylor-batches", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--round-to-sweep", action="store_true")
    parser.add_argument("--one-shot-importance", nargs="+", default=[], metavar="NAME",
                        help="adds an 'ours one-shot (NAME)' row per criterion (OneShotPruning"
                             " importance=NAME; 'taylor_elementwise': sum |w * dL/dw|; NAME-nocomp: with"
                             " compensate=False); 'activations' is the 'ours one-shot' row, which always"
                             " runs")
    parser.add_argument("--calibration-batches", type=int, default=4,
                        help="OneShotPruning's calibration_batches (4, its default; another number is named"
                             " in the one-shot rows' method)")
    parser.add_argument("--latency-importance", default=LATENCY_ONE_SHOT, metavar="NAME",
                        help="the criterion of the latency-one-shot row, a --one-shot-importance name"
                             f" (default {LATENCY_ONE_SHOT}); torch-pruning at equal latency is named after"
                             " it where it is not the default")
    parser.add_argument("--latency-targets", nargs="*", type=float, default=[], metavar="T",
                        help="also prune to these fractions of the dense batch-64 latency (target_latency),"
                             " with torch-pruning at the latency ours measured beside them. Default: none")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="run only these rows: ours, torch-pruning, one-shot, one-shot-NAME (a"
                             " --one-shot-importance row); at --latency-targets: latency-one-shot,"
                             " latency-ours, latency-torch-pruning (matched to latency-one-shot, else to"
                             " latency-ours); dense always runs (the snapshot). Default: all")
    parser.add_argument("--out", default="channels-shapes")
    parser.add_argument("--merge", nargs="*", default=[], metavar="JSON",
                        help="result files of separate runs to merge into --out (nothing is trained)")
    parser.add_argument("--plot", action="store_true",
                        help="also write <out>.png: accuracy against measured batch-64 latency, one panel"
                             " per model, one line per method (channels_plot.py)")
    args = parser.parse_args()
    known = ["dense", "ours", "torch-pruning"] + [one_shot_key(c) for c in one_shot_criteria(args)] \
        + LATENCY_METHODS
    if args.methods is None:
        args.methods = known
    unknown = sorted(set(args.methods) - set(known))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {known}")
    if args.latency_targets and "latency-torch-pruning" in args.methods \
            and not {"latency-one-shot", "latency-ours"} & set(args.methods):
        parser.error("--methods latency-torch-pruning is matched to the latency of ours at the target: add"
                     " latency-one-shot or latency-ours")
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:7.1f}s] {msg}", flush=True)

    path = RESULTS / f"{args.out}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    rows: list[dict[str, Any]] = old.get("rows", [])
    rounding: list[dict[str, Any]] = old.get("round_to", [])
    config = old.get("config") or {}
    new: list[dict[str, Any]] = []
    sources = []
    for other in args.merge:
        loaded = json.loads(Path(other).read_text())
        new += loaded["rows"]
        config = dict(loaded["config"])
        sources += config.pop("sources", None) or [config["command"]]
    if args.merge:  # (the protocol of the last file; every run's command kept)
        config["sources"] = sources
        config["command"] = "python benchmarks/channels.py " + " ".join(sys.argv[1:])
    if not args.merge:
        for seed in args.seeds:
            for name in args.models:
                for row in run_model(name, seed, args, log):
                    new.append({**row, "recipe": MODELS.get(name, {})})
        if args.round_to_sweep:
            rounding = round_to_sweep(args.reps, log)
        config = {"epochs": args.epochs, "train_size": args.train_size, "difficulty": args.difficulty,
                  "targets": args.targets, "lr": args.lr, "taylor_batches": args.taylor_batches,
                  "methods": args.methods, "one_shot_importance": args.one_shot_importance,
                  "calibration_batches": args.calibration_batches, "latency_targets": args.latency_targets,
                  "reps": args.reps, "side": SIDE, "seconds": round(time.time() - started),
                  "command": "python benchmarks/channels.py " + " ".join(sys.argv[1:])}
    new = list({_key(r): r for r in new}.values())  # (merged files may share rows, e.g. dense: the last wins)
    keys = {_key(r) for r in new}
    rows = [r for r in rows if _key(r) not in keys] + new
    rows.sort(key=lambda r: (list(MODELS).index(r["model"]) if r["model"] in MODELS else 99, r["seed"],
                             _kind(r) == "latency", -r["target"], r["method"]))
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps({"config": config, "rows": rows, "summary": summary(rows),
                                "round_to": rounding}, indent=1))
    path.with_suffix(".md").write_text(markdown(rows, rounding, config))
    log(f"wrote {path.with_suffix('')}.{{json,md}}")
    if args.plot:
        from channels_plot import plot

        plot(summary(rows), path.with_suffix(".png"))
        log(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
