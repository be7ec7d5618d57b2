"""Sharded training (FSDP2) against DDP on 2 CPU processes: the same masks and gates, the memory per rank.

For each model (timm's ``vit_small_patch16_224`` at 32x32 and ``convnext_atto``, random init, AdamW, the
digits data at batch 32 per rank), the same seeded fit runs under Lightning's ``ModelParallelStrategy``
(``fully_shard`` on every block/stage, then the network) and under ``strategy="ddp"``, each on two CPU
processes with gloo:

* ``dense``: no callback (FSDP2 only): the step time every ratio refers to;
* ``magnitude``: ``GradualMagnitudePruning(target_sparsity=0.7)``, masks updated every 2 steps;
* ``group_lasso``: ``GroupLassoPruning(target_flops=0.5, compress=True)``, finalised at step 3 and the units
  removed inside the fit (under FSDP2: gathered, compressed, sharded again), then fine-tuned.

Recorded per run (rank 0, and both ranks' local shapes): the gathered masks / kept units (compared with DDP's
bit for bit), the mask bytes and optimizer-state bytes this rank holds at the end (its local shards under
FSDP2), the thread CPU time of a training batch (median over the batches after the first, from
``on_train_batch_start`` to ``on_train_batch_end``: forward, backward, optimizer step, the callbacks' work),
and the in-fit removal's parameter count and local shapes before/after.

Usage (from the repository root; one fit at a time, 2 processes)::

    OMP_NUM_THREADS=1 python benchmarks/sharded.py            # both models, 8 steps per fit
    python benchmarks/sharded.py --models convnext_atto --steps 6

Writes ``benchmarks/results/sharded.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

import lightning_prune as lp  # noqa: E402
from lightning_prune.training.data import DigitsDataModule  # noqa: E402
from lightning_prune.training.models import ImageClassifier  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"vit_small_patch16_224": {"img_size": 32}, "convnext_atto": {}}
#: the step at which GroupLassoPruning finalises its gates and removes the units (the batch ending there pays
#: for the removal: reported apart)
FINALIZE = 4


class ShardedNet(ImageClassifier):
    """The classifier with every block (ViT) or stage (ConvNeXt) and then the network sharded by FSDP2."""

    def configure_model(self) -> None:
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:  # DDP
            return
        from torch.distributed.fsdp import fully_shard

        for unit in [*getattr(self.model, "blocks", []), *getattr(self.model, "stages", [])]:
            fully_shard(unit, mesh=mesh["data_parallel"])
        fully_shard(self.model, mesh=mesh["data_parallel"])


class StepClock(Callback):
    """Thread CPU seconds of every training batch (this process's main thread)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._start = time.thread_time()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.times.append(time.thread_time() - self._start)


class ShapeProbe(Callback):
    """Parameter count and this rank's local shapes of a few parameters at every batch end."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.seen: list[tuple[int, int, dict[str, tuple[int, ...]]]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        params = dict(pl_module.named_parameters())
        local = {
            n: tuple((params[n].to_local() if hasattr(params[n], "to_local") else params[n]).shape)
            for n in self.names
            if n in params
        }
        count = sum(p.numel() for p in params.values())
        if not self.seen or self.seen[-1][1:] != (count, local):
            self.seen.append((int(trainer.global_step), count, local))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        _local(v).numel() * _local(v).element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )


def fit(model_name: str, kind: str, method: str, steps: int) -> dict[str, Any]:
    from lightning.pytorch.strategies import ModelParallelStrategy

    pl.seed_everything(0, verbose=False)
    model = ShardedNet(
        model_name,
        num_classes=10,
        model_kwargs=MODELS[model_name],
        optimizer="adamw",
        lr=1e-3,
        scheduler="none",
        weight_decay=0.0,
    )
    strategy = (
        ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if kind == "fsdp2" else "ddp"
    )
    callbacks: list[Callback] = []
    pruning: Any = None
    if method == "magnitude":
        pruning = lp.GradualMagnitudePruning(
            target_sparsity=0.7, every_n_steps=2, sparsity_end_step=0.5, verbose=False
        )
    elif method == "group_lasso":
        pruning = lp.GroupLassoPruning(
            lam=0.05,
            gate_lr=1.0,
            target_flops=0.5,
            finalize_step=FINALIZE,
            round_to=1,
            compress=True,
            verbose=False,
        )
    if pruning is not None:
        callbacks.append(pruning)
    clock = StepClock()
    probe_names = (
        ["model.patch_embed.proj.weight", "model.blocks.0.mlp.fc1.weight"]
        if "vit" in model_name
        else ["model.stem.0.weight", "model.stages.0.blocks.0.mlp.fc1.weight"]
    )
    probe = ShapeProbe(probe_names)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=[*callbacks, clock, probe],
    )
    data = DigitsDataModule(batch_size=32, limit=2 * 32 * steps * 10 // 7 + 64)
    trainer.fit(model, datamodule=data)
    out: dict[str, Any] = {
        "steps": int(trainer.global_step),
        "step_cpu_s": statistics.median(clock.times[1:]) if len(clock.times) > 1 else None,
        "batch_cpu_s": list(clock.times),
        "optimizer_bytes": _optimizer_bytes(trainer.optimizers[0]),
        "param_bytes": sum(_local(p).numel() * _local(p).element_size() for p in model.parameters()),
        "shapes": probe.seen,
    }
    if pruning is not None:
        out["masks"] = pruning.masks.state_dict()  # gathered (a collective)
        out["mask_bytes"] = pruning.masks.memory_bytes()
        out["sparsity"] = pruning.sparsity_metrics().get("prune/sparsity")
    if method == "group_lasso":
        out["keep"] = [k.clone() for k in pruning.keep]
        out["removed_units"] = sum(len(v) for v in (pruning.shrink.removed or {}).values())
    return out


def _child(rank: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        result: Any = ("ok", fit(*args))
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        result = ("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
    torch.save(result, Path(out) / f"rank{rank}.pt")


def run_two(*args: Any) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("fork")  # (the parent never runs autograd)
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        procs = [ctx.Process(target=_child, args=(rank, port, out, args)) for rank in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        results = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(2)]
    errors = [v for kind, v in results if kind == "error"]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [v for _, v in results]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="sharded")
    args = parser.parse_args()
    rows: dict[str, Any] = {
        "steps": args.steps,
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "processes": 2,
        "backend": "gloo (CPU)",
        "models": {},
    }
    for model_name in args.models:
        runs: dict[str, list[dict[str, Any]]] = {}
        for kind, method in (
            ("fsdp2", "dense"),
            ("fsdp2", "magnitude"),
            ("ddp", "magnitude"),
            ("fsdp2", "group_lasso"),
            ("ddp", "group_lasso"),
        ):
            started = time.perf_counter()
            runs[f"{kind}/{method}"] = run_two(model_name, kind, method, args.steps)
            print(f"{model_name} {kind}/{method}: {time.perf_counter() - started:.0f} s wall", flush=True)
        dense = runs["fsdp2/dense"][0]["step_cpu_s"]
        summary: dict[str, Any] = {}
        for method in ("magnitude", "group_lasso"):
            fsdp, ddp = runs[f"fsdp2/{method}"], runs[f"ddp/{method}"]
            entry = {
                "masks_equal_ddp": _same(fsdp[0]["masks"], ddp[0]["masks"])
                and _same(fsdp[1]["masks"], ddp[0]["masks"]),
                "sparsity": fsdp[0]["sparsity"],
                "mask_bytes_per_rank": {"fsdp2": fsdp[0]["mask_bytes"], "ddp": ddp[0]["mask_bytes"]},
                "optimizer_bytes_per_rank": {
                    "fsdp2": fsdp[0]["optimizer_bytes"],
                    "ddp": ddp[0]["optimizer_bytes"],
                },
                "param_bytes_per_rank": {"fsdp2": fsdp[0]["param_bytes"], "ddp": ddp[0]["param_bytes"]},
                "step_cpu_s": {
                    "fsdp2": fsdp[0]["step_cpu_s"],
                    "ddp": ddp[0]["step_cpu_s"],
                    "fsdp2_dense": dense,
                },
            }
            entry["mask_ratio"] = entry["mask_bytes_per_rank"]["fsdp2"] / max(
                entry["mask_bytes_per_rank"]["ddp"], 1
            )
            entry["optimizer_ratio"] = entry["optimizer_bytes_per_rank"]["fsdp2"] / max(
                entry["optimizer_bytes_per_rank"]["ddp"], 1
            )
            entry["step_ratio_to_dense_fsdp2"] = entry["step_cpu_s"]["fsdp2"] / dense if dense else None
            if method == "group_lasso":
                entry["keep_equal_ddp"] = all(
                    torch.equal(a, b) for a, b in zip(fsdp[0]["keep"], ddp[0]["keep"])
                )
                entry["removed_units"] = fsdp[0]["removed_units"]
                entry["phases_cpu_s"] = {  # (batch FINALIZE - 1 ends at step FINALIZE: the removal)
                    kind: {
                        "gates": statistics.median(run[0]["batch_cpu_s"][1 : FINALIZE - 1]),
                        "removal_batch": run[0]["batch_cpu_s"][FINALIZE - 1],
                        "after_removal": statistics.median(run[0]["batch_cpu_s"][FINALIZE:]),
                    }
                    for kind, run in (("fsdp2", fsdp), ("ddp", ddp))
                }
                entry["shapes_rank0"] = fsdp[0]["shapes"]
                entry["shapes_rank1"] = fsdp[1]["shapes"]
                entry["shapes_ddp"] = ddp[0]["shapes"]
            summary[method] = entry
        rows["models"][model_name] = summary
        print(json.dumps(summary, indent=1, default=str)[:3000], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(rows, indent=1, default=str), encoding="utf-8")
    (RESULTS / f"{args.out}.md").write_text(markdown(rows), encoding="utf-8")


def _kib(n: int) -> str:
    return f"{n / 1024:,.0f} KiB" if n < 1024**2 else f"{n / 1024**2:,.1f} MiB"


def markdown(rows: dict[str, Any]) -> str:
    lines = [
        f"# Sharded training (FSDP2) vs DDP, 2 CPU processes ({rows['backend']}), {rows['steps']} steps per"
        f" fit, torch {rows['torch']}, Lightning {rows['lightning']}",
        "",
        "Produced by `python benchmarks/sharded.py` (AdamW, batch 32 per rank, digits at 32x32). Bytes are"
        " what rank 0 holds at the end of the fit (group_lasso: after the removal, of the smaller network)."
        " Step times are the median thread CPU seconds of a training batch (rank 0's main thread, after the"
        " first batch; gloo's communication threads are not counted, nor the waiting for them), measured on"
        " a shared 2-core machine under heavy load: read the ratios, not the absolute times. The masks and"
        " kept units are compared with DDP's bit for bit (gathered on both ranks).",
        "",
        "| model | callback | masks = DDP's | masks / rank FSDP2 | DDP | ratio | optimizer state / rank FSDP2"
        " | DDP | ratio | step CPU s FSDP2 | DDP | FSDP2 dense | ratio to dense |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model, summary in rows["models"].items():
        for method, e in summary.items():
            equal = e["masks_equal_ddp"] and e.get("keep_equal_ddp", True)
            t = e["step_cpu_s"]
            lines.append(
                f"| {model} | {method} | {'yes' if equal else 'NO'}"
                f" | {_kib(e['mask_bytes_per_rank']['fsdp2'])}"
                f" | {_kib(e['mask_bytes_per_rank']['ddp'])} | {e['mask_ratio']:.3f}"
                f" | {_kib(e['optimizer_bytes_per_rank']['fsdp2'])}"
                f" | {_kib(e['optimizer_bytes_per_rank']['ddp'])}"
                f" | {e['optimizer_ratio']:.3f} | {t['fsdp2']:.3f} | {t['ddp']:.3f} | {t['fsdp2_dense']:.3f}"
                f" | {e['step_ratio_to_dense_fsdp2']:.2f} |"
            )
    lines += [
        "",
        "In-fit removal (GroupLassoPruning, target_flops=0.5, compress=True): parameter count and local"
        " shapes per rank, at the batch ends where they changed:",
        "",
    ]
    for model, summary in rows["models"].items():
        e = summary.get("group_lasso")
        if not e:
            continue
        phases = "; ".join(
            f"{kind}: gates {v['gates']:.3f} s, the removal's batch {v['removal_batch']:.3f} s,"
            f" after it {v['after_removal']:.3f} s"
            for kind, v in e["phases_cpu_s"].items()
        )
        lines.append(
            f"* {model}: {e['removed_units']} units removed; batch CPU time ({phases});"
            f" rank 0 {e['shapes_rank0']}; rank 1 {e['shapes_rank1']}; DDP {e['shapes_ddp']}"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
