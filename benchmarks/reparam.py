"""Train deep, deploy shallow: what activation decay + fusion buys, measured on the digits data (CPU).

For each architecture, in one run:

* **decay**: the model trained with ``ActivationDecay`` (cosine, per step, λ = 1 at 60% of training), then
  fused with ``lightning_prune.reparameterize``; layer count, parameters, FLOPs and CPU latency before and
  after fusion, and test accuracy of both (they must agree: fusion is exact);
* **baselines** trained without decay on the same data, schedule and seed: the network of the *deployed*
  shape (for ReduceNet: ``reducenet_<d>_plain``, one 3×3 conv + ReLU + residual per block, the
  "ResNet29" of the ReduceNet author's blog post (in Chinese) on VanillaNet-style deep training), and the deep
  nonlinear network itself.

Architectures: ``reducenet_20`` (the ReduceNet post's blocks: fuses into a stack of 3×3 convs with no
activation left but the stem's), ``reducenet_20_act`` (a permanent ReLU after each block: fuses into exactly
the ``reducenet_20_plain`` architecture, so the comparison with it is like for like) and timm's ``resnet26``
with narrow channels (Bottleneck blocks: the 3×3 and the last 1×1 fuse). Latency ratios are
measured interleaved in the same process (1 thread), so they compare like with like on a busy machine.

    python benchmarks/reparam.py           # 15 epochs, 2 seeds -> benchmarks/results/reparam.{json,md}
    python benchmarks/reparam.py --quick   # 5 epochs, 1 seed   -> benchmarks/results/reparam.quick.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import lightning_prune as lp  # noqa: E402
from lightning_prune.core.reparam import count_layers  # noqa: E402

warnings.filterwarnings("ignore")

BOTTLENECK = {"channels": (16, 32, 48, 64), "stem_width": 16}
ARCHS = {
    # the ReduceNet post's design: fused, nothing but the stem's ReLU is left (a linear backbone)
    "reducenet_20": {"decay": ("reducenet_20", {}), "deploy-depth baseline": ("reducenet_20_plain", {})},
    # with a permanent ReLU per block, the fused network is exactly the reducenet_20_plain architecture
    "reducenet_20_act": {"decay": ("reducenet_20_act", {}),
                         "same deployed architecture": ("reducenet_20_plain", {})},
    "resnet26 (bottleneck)": {"decay": ("resnet26", BOTTLENECK)},
}
_CACHE: dict = {}


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def latencies(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Fastest milliseconds per forward, the models measured interleaved (A B A B ...) after a warm-up.

    The minimum, not the median: on a shared machine the median mostly measures the neighbours' load.

    Denormal floats are flushed to zero while timing: trained weights can hold denormals, which slow CPU
    kernels by large, erratic factors that have nothing to do with the architecture.
    """
    times: dict[str, list[float]] = {k: [] for k in models}
    torch.set_flush_denormal(True)
    with torch.inference_mode():
        for m in models.values():
            for _ in range(3):
                m(x)
        for _ in range(repeats):
            for name, m in models.items():
                t = time.perf_counter()
                m(x)
                times[name].append((time.perf_counter() - t) * 1e3)
    torch.set_flush_denormal(False)
    return {k: min(v) for k, v in times.items()}


def accuracy(model: torch.nn.Module, loader) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return correct / total


def train(model_name: str, model_kwargs: dict, epochs: int, seed: int, decay: bool, root: Path):
    key = (model_name, json.dumps(model_kwargs), epochs, seed, decay)
    if key not in _CACHE:
        _CACHE[key] = _train(model_name, model_kwargs, epochs, seed, decay, root)
    return _CACHE[key]


def _train(model_name: str, model_kwargs: dict, epochs: int, seed: int, decay: bool, root: Path):
    pl.seed_everything(seed, verbose=False)
    module = lp.ImageClassifier(model_name, num_classes=10, model_kwargs=model_kwargs, optimizer="sgd",
                                lr=0.05, weight_decay=5e-4, scheduler="cosine")
    data = lp.DigitsDataModule(batch_size=64, seed=0)
    callbacks = ([lp.ActivationDecay(end_step=0.6, schedule="cosine", every_n_steps=1, verbose=False)]
                 if decay else [])
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(root),
                         callbacks=callbacks, num_sanity_val_steps=0)
    t = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - t
    data.setup("test")
    return module.eval(), data.test_dataloader(), seconds


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="lp_reparam_"))
    results: dict = {"args": vars(args), "torch": torch.__version__, "archs": {}}
    for arch, variants in ARCHS.items():
        rows: dict = {}
        for seed in range(args.seeds):
            name, kwargs = variants["decay"]
            module, test_loader, secs = train(name, kwargs, args.epochs, seed, True, root)
            deep = module.model.eval()
            acc_deep = accuracy(deep, test_loader)
            fused = lp.reparameterize(deep, inplace=False).eval()
            acc_fused = accuracy(fused, test_loader)
            x1, xb = torch.randn(1, 3, 32, 32), torch.randn(args.batch, 3, 32, 32)
            with torch.no_grad():
                max_rel = ((fused(xb) - deep(xb)).abs().amax(-1) / deep(xb).abs().amax(-1)).max().item()
            rec = rows.setdefault("decay", {"acc_unfused": [], "acc_fused": [], "train_s": [],
                                            "max_rel_diff": []})
            rec["acc_unfused"].append(acc_deep)
            rec["acc_fused"].append(acc_fused)
            rec["train_s"].append(secs)
            rec["max_rel_diff"].append(max_rel)
            if seed == 0:
                lat1 = latencies({"unfused": deep, "fused": fused}, x1, args.repeats)
                latb = latencies({"unfused": deep, "fused": fused}, xb, max(args.repeats // 4, 5))
                rec["shape"] = {
                    k: {"layers": count_layers(m), "params": params(m), "flops": flops(m, x1),
                        "latency_ms_b1": lat1[k], f"latency_ms_b{args.batch}": latb[k]}
                    for k, m in (("unfused", deep), ("fused", fused))
                }
            # baselines trained without decay: the deep network itself, and the deployed shape
            for label, (bname, bkw) in {"no decay (deep)": (name, kwargs), **{
                    k: v for k, v in variants.items() if k != "decay"}}.items():
                bmodule, loader, bsecs = train(bname, bkw, args.epochs, seed, False, root)
                brec = rows.setdefault(label, {"model": bname, "acc": [], "train_s": []})
                brec["acc"].append(accuracy(bmodule.model.eval(), loader))
                brec["train_s"].append(bsecs)
                if seed == 0:
                    m = bmodule.model.eval()
                    brec["shape"] = {"layers": count_layers(m), "params": params(m), "flops": flops(m, x1)}
            print(f"[{arch}] seed {seed}: decay fused {acc_fused:.4f} (unfused {acc_deep:.4f}); "
                  + ", ".join(f"{k} {v['acc'][-1]:.4f}" for k, v in rows.items() if k != "decay"), flush=True)
        results["archs"][arch] = rows
    return results


def mean(v: list[float]) -> str:
    return f"{statistics.mean(v):.4f}" + (f" ± {statistics.stdev(v):.4f}" if len(v) > 1 else "")


def to_markdown(res: dict) -> str:
    a = res["args"]
    b = a["batch"]
    seeds_flag = "" if a["quick"] or a["seeds"] == 2 else " --seeds " + str(a["seeds"])
    lines = [f"Digits (sklearn 8×8 upscaled to 32×32), {a['epochs']} epochs, SGD lr 0.05 cosine,"
             f" {a['seeds']} seed(s); ActivationDecay cosine per step, λ = 1 at 60% of training. CPU latency:"
             " 1 thread, denormals"
             " flushed, fastest of interleaved runs on a shared 2-core machine. Command: `python"
             f" benchmarks/reparam.py{' --quick' if a['quick'] else ''}{seeds_flag}`.", "",
             f"| model | layers | params | MFLOPs (1 img) | latency b1 (ms) | latency b{b} (ms) | test acc |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for arch, rows in res["archs"].items():
        d = rows["decay"]
        s = d["shape"]
        u, f = s["unfused"], s["fused"]
        lines.append(f"| {arch}, decay, before fusion | {u['layers']} | {u['params']:,} |"
                     f" {u['flops'] / 1e6:.1f} | {u['latency_ms_b1']:.2f} | {u[f'latency_ms_b{b}']:.1f} |"
                     f" {mean(d['acc_unfused'])} |")
        lines.append(f"| {arch}, decay, **fused** | {f['layers']} | {f['params']:,} |"
                     f" {f['flops'] / 1e6:.1f} |"
                     f" {f['latency_ms_b1']:.2f} ({f['latency_ms_b1'] / u['latency_ms_b1']:.2f}×) |"
                     f" {f[f'latency_ms_b{b}']:.1f} ({f[f'latency_ms_b{b}'] / u[f'latency_ms_b{b}']:.2f}×) |"
                     f" **{mean(d['acc_fused'])}** |")
        for label, rec in rows.items():
            if label == "decay":
                continue
            sh = rec["shape"]
            lines.append(f"| {arch}, {label}: `{rec['model']}` trained without decay | {sh['layers']} |"
                         f" {sh['params']:,} | {sh['flops'] / 1e6:.1f} | | | {mean(rec['acc'])} |")
    worst = max(max(r["decay"]["max_rel_diff"]) for r in res["archs"].values())
    lines += ["", f"Largest relative output difference fused vs unfused (eval): {worst:.1e}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 epochs, 1 seed, fewer latency repeats")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    args.epochs = args.epochs or (5 if args.quick else 15)
    args.seeds = args.seeds or (1 if args.quick else 2)
    args.repeats = args.repeats or (100 if args.quick else 200)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    res = run(args)
    stem = "reparam.quick" if args.quick else "reparam"
    Path(args.out, f"{stem}.json").write_text(json.dumps(res, indent=2))
    md = to_markdown(res)
    Path(args.out, f"{stem}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
