"""GPU check: every callback for a few steps on a real timm model, mixed precision, eager and compiled.

With CUDA: a timm resnet18 at 64x64 on synthetic data (batch 64) is trained by a real ``Trainer`` with
``accelerator="gpu"``, ``precision`` ``"bf16-mixed"`` and ``"16-mixed"`` (Lightning's GradScaler, initial
scale 65536), eager and ``trainer.fit(torch.compile(module))`` (inductor), once densely and once with every
registered callback (the built-ins and the installed plugins'). After every optimizer step it checks what the
CPU tests check:

- masked weights are exact zeros (every ``PruningCallback``), in their weight's layout;
- gates are attached until finalisation and their parameters stay finite; under ``16-mixed`` the gates move as
  much per step as under ``bf16-mixed`` (the loss scale never reaches the gates' own optimizer: the ratio of
  their mean step sizes is reported and must lie in [0.1, 10]);
- resume (eager, ``bf16-mixed``): a fit resumed from its epoch-1 checkpoint ends with the same masks and
  weights (to 1e-3: cuDNN is not bitwise reproducible) as the uninterrupted one.

FSDP2 rows (``--no-fsdp2`` skips them): the callbacks that act on sharded weights (:data:`FSDP2_ROWS`:
magnitude, group lasso with the in-fit removal, one-shot SparseGPT, evolutionary mutation) under
Lightning's ``ModelParallelStrategy`` with ``fully_shard`` applied to the timm model in ``configure_model``,
``bf16-mixed``, eager, on one GPU (a one-rank mesh: the ``DTensor`` code paths on CUDA with NCCL; that two
ranks equal DDP is what the CPU tests prove with gloo), with the same checks (masked weights zero in every
local shard).

It prints one table: median step time (CUDA-synchronised, warm-up steps excluded), its ratio to the dense step
of the same precision and compile mode, peak GPU memory, and each check's outcome. Every combination runs in
its own ``try``: a failure is a row of the table, not the end of the run. A time budget (default 280 s)
skips the remaining rows (reported as skipped) so the whole check stays under 6 minutes on one GPU.
Results also go to ``benchmarks/results/gpu_check.{json,md}``. Then (``--no-semi-structured`` skips it,
about a minute) ``benchmarks/semi_structured_gpu.py``: a ViT's Linear layers pruned 2:4 and made
semi-structured against dense, forward and step times, into
``benchmarks/results/semi_structured_gpu.{json,md}``.
Exit status: 0 when every row passed (or without CUDA), else 1.

    python benchmarks/gpu_check.py               # everything
    python benchmarks/gpu_check.py --no-compile  # eager only
    python benchmarks/gpu_check.py --only magnitude,l0
    python benchmarks/gpu_check.py --fsdp2-only  # the ModelParallelStrategy rows only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

NO_CUDA = ("gpu_check: CUDA is not available on this machine (torch.cuda.is_available() is False); nothing to"
           " check. Run it on a machine with an NVIDIA GPU (`--accelerator cpu` dry-runs the code paths).")
if __name__ == "__main__" and not torch.cuda.is_available() and "--accelerator" not in sys.argv:
    print(NO_CUDA)  # before the heavy imports
    sys.exit(0)

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import lightning_prune as lp  # noqa: E402
from lightning_prune.callbacks.gating import GatePruningCallback  # noqa: E402
from lightning_prune.training.models import ImageClassifier  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BATCH, SIZE, STEPS_PER_EPOCH, EPOCHS, WARMUP = 64, 64, 8, 2, 4
SETTINGS = {"accelerator": "gpu", "model": "resnet18"}


def _sync() -> None:
    if SETTINGS["accelerator"] == "gpu":
        torch.cuda.synchronize()
PRECISIONS = ("bf16-mixed", "16-mixed")
#: the callbacks run under ModelParallelStrategy (FSDP2) when a GPU is there
FSDP2_ROWS = ("magnitude", "group_lasso", "one_shot", "evolution")


def _callback(name: str):
    """Each callback configured to act within the check's 16 steps."""
    quiet = {"verbose": False}
    if name == "magnitude":
        return lp.GradualMagnitudePruning(target_sparsity=0.5, every_n_steps=2, sparsity_end_step=4, **quiet)
    if name == "lottery_ticket":
        return lp.LotteryTicket(rounds=1, epochs_per_round=1, **quiet)
    if name == "group_lasso":
        return lp.GroupLassoPruning(lam=0.05, finalize_step=10, **quiet)
    if name == "l0":
        return lp.L0Pruning(lam=0.05, finalize_step=10, **quiet)
    if name == "activation_decay":
        return lp.ActivationDecay(begin_step=2, end_step=12, **quiet)
    if name == "evolution":
        return lp.EvolutionaryMutation(population=4, every_n_steps=6, fitness_batches=1, **quiet)
    if name == "distill":
        return lp.create_callback("distill", **quiet)
    return lp.create_callback(name)


def _fsdp2_callback(name: str):
    """The FSDP2 rows' callbacks, configured to act within the check's 16 steps."""
    quiet = {"verbose": False}
    if name == "group_lasso":
        return lp.GroupLassoPruning(lam=0.05, finalize_step=6, compress=True, target_flops=0.5, **quiet)
    if name == "one_shot":
        return lp.OneShotPruning("sparsegpt", target_sparsity=0.5, calibration_batches=2, **quiet)
    return _callback(name)


class ShardedClassifier(ImageClassifier):
    """The check's classifier with FSDP2 applied in ``configure_model``: every stage (``blocks``/``layerN``/
    ``stages`` children) an FSDP unit, then the network."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for name, child in self.model.named_children():
            if name.startswith(("layer", "blocks", "stages")):
                for unit in (child if isinstance(child, torch.nn.Sequential) else [child]):
                    fully_shard(unit, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def _fit_fsdp2(name: str, root: Path) -> dict[str, Any]:
    """One FSDP2 row: ``ModelParallelStrategy`` on one device, ``bf16-mixed``, eager."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    pl.seed_everything(0, verbose=False)
    module = ShardedClassifier(SETTINGS["model"], num_classes=10, scheduler="none", weight_decay=0.0, lr=0.02)
    callback = None if name == "dense" else _fsdp2_callback(name)
    checks = Checks(callback)
    gpu = SETTINGS["accelerator"] == "gpu"
    trainer = pl.Trainer(accelerator=SETTINGS["accelerator"], devices=1, precision="bf16-mixed",
                         strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
                         max_epochs=EPOCHS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[c for c in (callback, checks) if c is not None], limit_val_batches=2,
                         num_sanity_val_steps=0, default_root_dir=str(root))
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_dataloaders=_data(STEPS_PER_EPOCH), val_dataloaders=_data(2, seed=1))
    sharded = any(hasattr(p, "device_mesh") for p in module.parameters())
    if not sharded:
        checks.errors.append("the parameters are not DTensor shards")
    return {"module": module, "callback": callback, "checks": checks,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if gpu else float("nan")}


def _data(steps: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH * steps, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, 10, (BATCH * steps,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


class Checks(pl.Callback):
    """Times steps (CUDA-synchronised) and checks the invariants after each optimizer step."""

    def __init__(self, callback: Any) -> None:
        self.callback, self.times, self.errors = callback, [], []
        self.gate_steps: list[float] = []
        self._t0, self._gates = 0.0, None
        self.zeros_checked = self.gates_checked = 0

    def _gate_values(self) -> list[torch.Tensor] | None:
        cb = self.callback
        if isinstance(cb, GatePruningCallback) and cb.gateset is not None and not cb.finalized:
            return [p.detach().float().clone() for p in cb.gateset.parameters()]
        return None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._gates = self._gate_values()
        _sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync()
        if trainer.global_step > WARMUP:
            self.times.append(time.perf_counter() - self._t0)
        cb = self.callback
        masks = getattr(cb, "masks", None)
        if isinstance(cb, lp.PruningCallback) and masks is not None:
            for name, mask in masks.items():
                param = masks.local(name).detach()  # (a sharded weight: its local shard, the mask's layout)
                if param[~mask.to(param.device)].any():
                    self.errors.append(f"step {trainer.global_step}: {name} has non-zero pruned weights")
            self.zeros_checked += 1
        if isinstance(cb, GatePruningCallback) and not cb.finalized:
            if cb.gateset is None or not cb.gateset.attached:
                self.errors.append(f"step {trainer.global_step}: gates not attached")
            after = self._gate_values()
            if after is not None and self._gates is not None:
                if not all(torch.isfinite(a).all() for a in after):
                    self.errors.append(f"step {trainer.global_step}: non-finite gates")
                moved = sum(float((a - b).abs().sum()) for a, b in zip(after, self._gates))
                self.gate_steps.append(moved / max(sum(a.numel() for a in after), 1))
            self.gates_checked += 1


def _fit(name: str, precision: str, compiled: bool, root: Path, ckpt_every_epoch: bool = False,
         ckpt_path: Path | None = None, epochs: int = EPOCHS) -> dict[str, Any]:
    torch._dynamo.reset()  # a fresh compile per fit (dynamo's cache limit is per code object)
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(SETTINGS["model"], num_classes=10, scheduler="none", weight_decay=0.0, lr=0.02)
    callback = None if name == "dense" else _callback(name)
    checks = Checks(callback)
    callbacks = [c for c in (callback, checks) if c is not None]
    if ckpt_every_epoch:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1,
                                         filename="{epoch}"))
    gpu = SETTINGS["accelerator"] == "gpu"
    trainer = pl.Trainer(accelerator=SETTINGS["accelerator"], devices=1, precision=precision,
                         max_epochs=epochs,
                         logger=False, enable_checkpointing=ckpt_every_epoch, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, limit_val_batches=2,
                         num_sanity_val_steps=0, default_root_dir=str(root), deterministic="warn")
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(torch.compile(module) if compiled else module, train_dataloaders=_data(STEPS_PER_EPOCH),
                val_dataloaders=_data(2, seed=1), ckpt_path=str(ckpt_path) if ckpt_path else None)
    return {"module": module, "callback": callback, "checks": checks,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if gpu else float("nan")}


def _resume(name: str, root: Path) -> str:
    """'exact', 'max |Δw| = ...' (pass when ≤ 1e-3 and the masks agree), or the failure."""
    full = _fit(name, "bf16-mixed", False, root / "full", ckpt_every_epoch=True)
    resumed = _fit(name, "bf16-mixed", False, root / "resumed",
                   ckpt_path=root / "full" / "ckpt" / "epoch=0.ckpt")
    a, b = full["module"].state_dict(), resumed["module"].state_dict()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())
    masks_a = getattr(full["callback"], "masks", None)
    masks_b = getattr(resumed["callback"], "masks", None)
    if masks_a is not None and masks_b is not None:
        for n, m in masks_a.items():
            if not torch.equal(m.cpu(), masks_b[n].cpu()):
                return f"FAIL: masks differ at {n}"
    if diff == 0.0:
        return "exact"
    return f"{'ok' if diff <= 1e-3 else 'FAIL'}: max |dw| = {diff:.1e}"


def _error(err: BaseException) -> str:
    last = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" ({Path(last.filename).name}:{last.lineno})" if last else ""
    return f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}{where}"


def _run_row(row: dict[str, Any], fit: Callable[[], dict[str, Any]], args: argparse.Namespace,
             start: float) -> Any:
    """Run one row of the table: ``fit()`` (returning ``{"checks", "peak_mib"}``), its median step time
    (``row["ms"]``), peak memory, the checks' counts and status (``"ok"`` or the first errors) written into
    ``row``. Returns the checks when the fit ran, None when it failed (a ``FAIL`` row) or the time budget was
    spent (the row says so)."""
    if time.monotonic() - start > args.budget:
        row["status"] = "skipped (time budget)"
        return None
    try:
        out = fit()
        checks = out["checks"]
        ms = statistics.median(checks.times) * 1000 if checks.times else float("nan")
        row.update(ms=round(ms, 2), peak_mib=round(out["peak_mib"], 1), zeros=checks.zeros_checked,
                   gates=checks.gates_checked)
        row["status"] = "FAIL: " + "; ".join(checks.errors[:3]) if checks.errors else "ok"
        return checks
    except Exception as err:  # noqa: BLE001 - a failure is a row of the table
        row["status"] = "FAIL: " + _error(err)
        traceback.print_exc()
        return None
    finally:
        if args.accelerator == "gpu":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated callback names")
    parser.add_argument("--budget", type=float, default=280.0,
                        help="seconds after which the remaining rows are skipped")
    parser.add_argument("--accelerator", choices=("gpu", "cpu"), default="gpu",
                        help="cpu: a dry run of the code paths (no timings worth reading)")
    parser.add_argument("--model", default="resnet18", help="timm model name")
    parser.add_argument("--no-fsdp2", action="store_true",
                        help="skip the ModelParallelStrategy (FSDP2) rows")
    parser.add_argument("--fsdp2-only", action="store_true",
                        help="only the ModelParallelStrategy (FSDP2) rows")
    parser.add_argument("--no-semi-structured", action="store_true",
                        help="skip the 2:4 ViT Linear timings (benchmarks/semi_structured_gpu.py)")
    args = parser.parse_args(argv)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    SETTINGS.update(accelerator=args.accelerator, model=args.model)
    if args.accelerator == "cpu":
        global BATCH, SIZE
        BATCH, SIZE = 8, 32
    device = torch.cuda.get_device_name(0) if args.accelerator == "gpu" else "CPU (dry run)"

    start = time.monotonic()
    names = sorted(lp.list_callbacks())
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    modes = [False] if args.no_compile else [False, True]
    rows: list[dict[str, Any]] = []
    dense_ms: dict[Any, float] = {}
    gate_steps: dict[tuple[str, str, bool], float] = {}
    root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    print(f"gpu_check on {device}, torch {torch.__version__}: {args.model} {SIZE}x{SIZE},"
          f" batch {BATCH}, {EPOCHS}x{STEPS_PER_EPOCH} steps per fit", flush=True)
    for compiled in ([] if args.fsdp2_only else modes):  # eager first: the cheap rows land before compiles
        for precision in PRECISIONS:
            for name in ["dense", *names]:
                row: dict[str, Any] = {"callback": name, "precision": precision,
                                       "compiled": "inductor" if compiled else "no"}
                rows.append(row)
                checks = _run_row(row, partial(_fit, name, precision, compiled,
                                               root / f"{name}-{precision}-{compiled}"), args, start)
                if checks is not None and name == "dense":
                    dense_ms[precision, compiled] = row["ms"]
                if checks is not None and checks.gate_steps:
                    gate_steps[name, precision, compiled] = statistics.mean(checks.gate_steps)
                print(f"  {name:>20} {precision:>10} compiled={compiled!s:5} {row.get('status')}"
                      f" ({time.monotonic() - start:.0f} s)", flush=True)
    if not args.no_fsdp2:
        fsdp2 = [n for n in FSDP2_ROWS if not args.only or n in args.only.split(",")]
        for name in ["dense", *fsdp2]:
            row = {"callback": f"{name} (FSDP2)", "precision": "bf16-mixed", "compiled": "no"}
            rows.append(row)
            checks = _run_row(row, partial(_fit_fsdp2, name, root / f"fsdp2-{name}"), args, start)
            if checks is not None and name == "dense":
                dense_ms["fsdp2"] = row["ms"]
            elif checks is not None and dense_ms.get("fsdp2"):
                row["ratio"] = round(row["ms"] / dense_ms["fsdp2"], 3)
            print(f"  {row['callback']:>20} bf16-mixed FSDP2 {row.get('status')}"
                  f" ({time.monotonic() - start:.0f} s)", flush=True)
    for row in rows:
        if row["callback"].endswith("(FSDP2)"):
            continue
        dense = dense_ms.get((row["precision"], row["compiled"] == "inductor"))
        if "ms" in row and dense:
            row["ratio"] = round(row["ms"] / dense, 3)
        key = (row["callback"], "16-mixed", row["compiled"] == "inductor")
        ref = gate_steps.get((row["callback"], "bf16-mixed", key[2]))
        if row["precision"] == "16-mixed" and key in gate_steps and ref:
            ratio = gate_steps[key] / ref
            row["gate_step_fp16_vs_bf16"] = round(ratio, 3)
            if not 0.1 <= ratio <= 10 and row.get("status") == "ok":
                row["status"] = f"FAIL: gates moved {ratio:.3g}x as far under 16-mixed (loss scale leaked?)"
    resume: dict[str, str] = {}
    if not args.no_resume and not args.fsdp2_only:
        for name in names:
            if time.monotonic() - start > args.budget:
                resume[name] = "skipped (time budget)"
                continue
            try:
                resume[name] = _resume(name, root / f"resume-{name}")
            except Exception as err:  # noqa: BLE001
                resume[name] = "FAIL: " + _error(err)
            print(f"  resume {name:>20} {resume[name]}", flush=True)
    for row in rows:
        if row["precision"] == "bf16-mixed" and row["compiled"] == "no" and row["callback"] in resume:
            row["resume"] = resume[row["callback"]]

    header = ("| callback | precision | compiled | ms/step | ratio to dense | peak GPU MiB | zero checks |"
              " gate checks | gate step fp16/bf16 | resume | status |")
    lines = [header, "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['callback']} | {r['precision']} | {r['compiled']} | {r.get('ms', '')} |"
                     f" {r.get('ratio', '')} | {r.get('peak_mib', '')} | {r.get('zeros', '')} |"
                     f" {r.get('gates', '')} | {r.get('gate_step_fp16_vs_bf16', '')} |"
                     f" {r.get('resume', '')} |"
                     f" {r.get('status', '')} |")
    elapsed = time.monotonic() - start
    lines.append(f"\n{device}, torch {torch.__version__}, {elapsed:.0f} s in all.")
    table = "\n".join(lines)
    print(table)
    results = RESULTS if args.accelerator == "gpu" else root  # a dry run leaves the published results alone
    results.mkdir(exist_ok=True)
    print(f"results in {results}")
    (results / "gpu_check.md").write_text(table + "\n")
    (results / "gpu_check.json").write_text(json.dumps(
        {"device": device, "torch": torch.__version__, "seconds": round(elapsed, 1),
         "rows": rows, "resume": resume}, indent=2) + "\n")
    failed = [r for r in rows if str(r.get("status", "")).startswith("FAIL")]
    failed += [n for n, v in resume.items() if v.startswith("FAIL")]
    if args.accelerator == "gpu" and not args.no_semi_structured:
        _semi_structured(results)
    return 1 if failed else 0


def _semi_structured(results: Path) -> None:
    """The deploy issue's GPU rows: a ViT's Linear layers 2:4 semi-structured against dense (~1 min)."""
    import runpy

    try:
        bench = runpy.run_path(str(Path(__file__).with_name("semi_structured_gpu.py")))
        result = bench["run"](repeats=10)
        text = bench["render"](result)
        print(text)
        (results / "semi_structured_gpu.md").write_text(text)
        (results / "semi_structured_gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    except Exception:  # noqa: BLE001 - the callback table above is already written
        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
