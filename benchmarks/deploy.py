"""Deploy what you pruned: file sizes, ONNX exactness and onnxruntime latency, measured on the digits (CPU).

Trained in this process on the embedded digits (32x32, seed 0, ``--epochs`` epochs of SGD with cosine LR):

* ``resnet18`` **dense**, the baseline;
* ``resnet18`` **90% magnitude**: ``GradualMagnitudePruning(target_sparsity=0.9, sparsity_end_step=0.7)``
  (and 50% / 97% for the sparse-checkpoint sizes);
* ``resnet18`` **2:4**: the same callback with ``pattern="2:4"``;
* ``resnet18`` **compressed at 0.25 FLOPs**: ``GroupLassoPruning(target_flops=0.25, finalize_step=0.5,
  compress=True)``, shrunk inside the fit;
* ``reducenet_20_act`` **fused**: ``ActivationDecay(end_step=0.6, schedule="cosine",
  fuse_on_train_end=True)``, against the same network before fusion (its own dense baseline).

Each model is exported with ``lp.export`` (onnxruntime checked against PyTorch on two test images and
random batches of 1 and 64; the maximum error relative to the largest output), saved as a dense
``state_dict`` (``torch.save``) and as a sparse checkpoint (``lp.save_sparse``, loaded back and compared bit
for bit), and its test accuracy is measured in PyTorch and in onnxruntime. Latency: every ONNX model in
onnxruntime at one thread, thread CPU time (``time.thread_time``) of one run at batch 1 and 64, all models
interleaved in each round, medians of ``--reps`` rounds, as ratios to the dense model measured in the same
rounds.

    python benchmarks/deploy.py                 # 10 epochs, about 10 minutes on 2 CPU cores
    python benchmarks/deploy.py --epochs 1 --tag quick

Writes ``benchmarks/results/deploy[.<tag>].{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

import lightning_prune as lp  # noqa: E402
from lightning_prune.deploy.onnx import onnx_latency, onnx_session  # noqa: E402
from lightning_prune.functional import nm_violations  # noqa: E402

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).resolve().parent / "results"


def trainer(epochs: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks),
                      default_root_dir="runs/bench_deploy", deterministic=True)


def classifier(name: str) -> lp.ImageClassifier:
    return lp.ImageClassifier(name, num_classes=10, optimizer="sgd", lr=0.05, weight_decay=5e-4,
                              scheduler="cosine")


class Snapshot(pl.Callback):
    """The model as training left it, before a later callback fuses it (list it first)."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.model = copy.deepcopy(pl_module).eval()


def fit(name: str, epochs: int, callbacks=()) -> lp.ImageClassifier:
    pl.seed_everything(0, verbose=False)
    model = classifier(name)
    trainer(epochs, callbacks).fit(model, datamodule=lp.DigitsDataModule(batch_size=64))
    return model.eval()


def torch_accuracy(model: torch.nn.Module, data: pl.LightningDataModule) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in data.test_dataloader():
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return correct / total


def onnx_accuracy(path: str, data: pl.LightningDataModule) -> float:
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    correct = total = 0
    for x, y in data.test_dataloader():
        logits = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        correct += int((logits.argmax(-1) == y).sum())
        total += len(y)
    return correct / total


def file_sizes(module: torch.nn.Module, folder: Path, tag: str) -> dict[str, Any]:
    dense_path, sparse_path = folder / f"{tag}.pt", folder / f"{tag}.sparse.pt"
    torch.save(module.state_dict(), dense_path)
    info = lp.save_sparse(module, sparse_path)
    loaded = lp.load_sparse(sparse_path)
    for key, value in module.state_dict().items():  # bit for bit
        a, b = value, loaded[key]
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                                                  b.view(torch.uint8) if b.is_floating_point() else b), key
    zeros = sum(int((p == 0).sum()) for p in module.parameters() if p.dim() > 1)
    weights = sum(p.numel() for p in module.parameters() if p.dim() > 1)
    return {"state_dict_bytes": dense_path.stat().st_size, "sparse_bytes": info.file_bytes,
            "weight_sparsity": zeros / weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--tag", default="")
    parser.add_argument("--markdown-only", action="store_true",
                        help="Only write the .md again from the .json of an earlier run.")
    args = parser.parse_args()
    suffix = f".{args.tag}" if args.tag else ""
    if args.markdown_only:
        out = json.loads((RESULTS / f"deploy{suffix}.json").read_text(encoding="utf-8"))
        (RESULTS / f"deploy{suffix}.md").write_text(format_markdown(out), encoding="utf-8")
        print(format_markdown(out))
        return
    torch.set_num_threads(1)
    started = time.time()
    data = lp.DigitsDataModule(batch_size=64)
    data.setup("test")
    example = next(iter(data.test_dataloader()))[0][:2]

    def magnitude(s: float, pattern: str | None = None) -> lp.GradualMagnitudePruning:
        return lp.GradualMagnitudePruning(target_sparsity=s, sparsity_end_step=0.7, pattern=pattern,
                                          verbose=False)

    models: dict[str, tuple[str, lp.ImageClassifier, lp.ImageClassifier]] = {}  # tag -> (label, model, dense)
    dense = fit("resnet18", args.epochs)
    models["dense"] = ("resnet18 dense", dense, dense)
    for s in (0.5, 0.9, 0.97):
        models[f"magnitude{int(s * 100)}"] = (f"resnet18 {s:.0%} magnitude", fit("resnet18", args.epochs,
                                                                                  [magnitude(s)]), dense)
    models["nm24"] = ("resnet18 2:4 magnitude", fit("resnet18", args.epochs, [magnitude(0.5, "2:4")]), dense)
    gl = lp.GroupLassoPruning(target_flops=0.25, finalize_step=0.5, compress=True, verbose=False)
    models["compressed"] = ("resnet18 compressed at 0.25 FLOPs", fit("resnet18", args.epochs, [gl]), dense)
    snap = Snapshot()
    decay = lp.ActivationDecay(end_step=0.6, schedule="cosine", every_n_steps=1, fuse_on_train_end=True,
                               verbose=False)
    fused = fit("reducenet_20_act", args.epochs, [snap, decay])
    models["reducenet"] = ("reducenet_20_act before fusion", snap.model, snap.model)
    models["reducenet_fused"] = ("reducenet_20_act fused", fused, snap.model)
    fit_seconds = time.time() - started

    rows: dict[str, dict[str, Any]] = {}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for tag, (label, module, reference) in models.items():
            path = str(folder / f"{tag}.onnx")
            report = lp.export(module, path, example, dense=reference, benchmark=False, batch_sizes=(1, 64))
            row = {"label": label, "params": report.params, "flops": report.flops,
                   "dense_params": report.dense_params, "dense_flops": report.dense_flops,
                   "onnx_bytes": report.file_bytes, "onnx_max_rel_error": report.max_rel_error,
                   "exporter": report.exporter, "torch_acc": torch_accuracy(module, data),
                   "onnx_acc": onnx_accuracy(path, data), **file_sizes(module.model, folder, tag)}
            if tag == "reducenet_fused":
                x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
                with torch.no_grad():
                    a, b = module(x), reference(x)
                row["fused_vs_unfused_rel_error"] = float((a - b).abs().max() / b.abs().max())
            if tag == "nm24":
                targeted = [p for n, p in module.model.named_parameters()
                            if p.dim() > 1 and n != "conv1.weight" and not n.startswith("fc.")]
                row["nm_violations"] = sum(nm_violations(p, 2, 4) for p in targeted)
            rows[tag] = row
            sessions[tag] = onnx_session(path)
        inputs = {b: (torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b)),)
                  for b in (1, 64)}
        latency = onnx_latency(sessions, inputs, repeats=args.reps)
    for tag, row in rows.items():
        base = "reducenet" if tag.startswith("reducenet") else "dense"
        row["latency_ms"] = latency[tag]
        row["latency_ratio"] = {b: latency[tag][b] / latency[base][b] for b in latency[tag]}
        row["latency_baseline"] = base

    out = {"epochs": args.epochs, "reps": args.reps, "threads": 1, "fit_seconds": fit_seconds,
           "seconds": time.time() - started, "torch": torch.__version__, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"deploy{suffix}.json").write_text(json.dumps(out, indent=1), encoding="utf-8")
    (RESULTS / f"deploy{suffix}.md").write_text(format_markdown(out), encoding="utf-8")
    print(format_markdown(out))


def format_markdown(out: dict[str, Any]) -> str:
    rows = out["rows"]
    mb = 1e6
    lines = [
        f"Digits, {out['epochs']} epochs, seed 0; onnxruntime at 1 thread, thread CPU time, all models"
        f" interleaved, medians of {out['reps']}; torch {out['torch']}.",
        "",
        "| model | params | FLOPs | test acc (PyTorch / ONNX) | state_dict | sparse checkpoint | ONNX"
        " | latency b1 | latency b64 | max rel. error ONNX vs PyTorch |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for tag in ("dense", "magnitude90", "nm24", "compressed", "reducenet", "reducenet_fused"):
        r = rows[tag]
        ratio = r["latency_ratio"]
        b1, b64 = ratio.get(1, ratio.get("1")), ratio.get(64, ratio.get("64"))
        lines.append(
            f"| {r['label']} | {r['params'] / 1e6:.2f} M ({r['params'] / r['dense_params']:.2f}×)"
            f" | {r['flops'] / 1e6:.1f} M ({r['flops'] / r['dense_flops']:.2f}×)"
            f" | {r['torch_acc']:.4f} / {r['onnx_acc']:.4f} | {r['state_dict_bytes'] / mb:.1f} MB"
            f" | {r['sparse_bytes'] / mb:.1f} MB ({r['state_dict_bytes'] / r['sparse_bytes']:.1f}× smaller)"
            f" | {r['onnx_bytes'] / mb:.1f} MB | {b1:.2f}× | {b64:.2f}× | {r['onnx_max_rel_error']:.1e} |")
    fused = rows["reducenet_fused"]
    dense_ms = {str(k): v for k, v in rows["dense"]["latency_ms"].items()}
    lines += [
        "",
        f"Ratios of latency are to `resnet18 dense` ({dense_ms['1']:.2f} ms at batch 1,"
        f" {dense_ms['64']:.1f} ms at batch 64); the ReduceNet rows to `reducenet_20_act before fusion`"
        f" (fused vs unfused outputs in PyTorch: {fused['fused_vs_unfused_rel_error']:.1e} relative)."
        f" The 2:4 model's targeted weights: {rows['nm24']['nm_violations']} blocks of 4 with more than 2"
        " non-zeros.",
        "",
        "| resnet18 sparse checkpoint | weight sparsity | state_dict | `lp.save_sparse` | smaller by |",
        "|---|---:|---:|---:|---:|",
    ]
    for tag in ("dense", "magnitude50", "magnitude90", "magnitude97", "nm24"):
        r = rows[tag]
        lines.append(f"| {r['label']} | {r['weight_sparsity']:.1%} | {r['state_dict_bytes'] / mb:.2f} MB"
                     f" | {r['sparse_bytes'] / mb:.2f} MB"
                     f" | {r['state_dict_bytes'] / r['sparse_bytes']:.1f}× |")
    lines += ["", f"Total {out['seconds'] / 60:.1f} min ({out['fit_seconds'] / 60:.1f} min training)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
