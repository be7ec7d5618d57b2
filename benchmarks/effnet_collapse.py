"""Where does ``efficientnet_b0`` lose its accuracy under ``GroupLassoPruning(target_flops=0.5)``?

One run of ``GroupLassoPruning(target_flops=..., finalize_step=0.5, compress=True)`` on
``lp.ShapesDataModule`` (1,000 test images) with a probe that records: the share of gates captured (zero
and frozen) at steps 10 and 50 and at finalisation, by kind of group (residual streams and other,
squeeze-excitation bottlenecks, the expand groups coupled through a depthwise conv); the gates' medians by
kind; the test accuracy of the gated model just before finalisation and of the compressed model right after
(each also with BatchNorm statistics recalibrated on 20 training batches); the mean training loss over the
20 batches before and after; the final accuracy. ``benchmarks/results/effnet_collapse.md`` has the runs and
what they show.

Usage::

    python benchmarks/effnet_collapse.py                                   # the defaults
    python benchmarks/effnet_collapse.py --kw '{"max_gate_step": null}'    # before the fix
    python benchmarks/effnet_collapse.py --reinit 0                        # timm's classifier init
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

import lightning_prune as lp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "effnet_collapse.json"


def kind(name: str) -> str:
    """The kind of a channel group of a timm EfficientNet/MobileNet by its name."""
    if name.endswith("se.conv_reduce"):
        return "se_reduce"
    if name.endswith("conv_pw") and not name.startswith("blocks.0."):
        return "expand(dw)"
    return "stream/other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="efficientnet_b0")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--difficulty", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--reinit", type=int, default=1, help="1: head_init='fan_in' (default), 0: 'timm'")
    parser.add_argument("--kw", default="{}", help="more GroupLassoPruning arguments, as JSON")
    parser.add_argument("--stop", type=int, default=0, help="1: stop right after finalisation")
    parser.add_argument("--data", default="shapes", choices=["shapes", "digits"],
                        help="digits: lp.DigitsDataModule (where the collapse was first measured)")
    parser.add_argument("--dense", type=int, default=0, help="1: no pruning (the dense reference)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    if args.data == "digits":
        data = lp.DigitsDataModule(batch_size=64, seed=0)
    else:
        data = lp.ShapesDataModule(batch_size=64, train_size=args.train_size, difficulty=args.difficulty,
                                   test_size=1000)
    data.setup("fit")
    model = lp.ImageClassifier(args.model, num_classes=10, lr=args.lr,
                               head_init="fan_in" if args.reinit else "timm")
    cb = lp.GroupLassoPruning(target_flops=args.target, finalize_step=0.5, compress=True, verbose=False,
                              log_media_every_n_epochs=0, input_size=(3, 32, 32), **json.loads(args.kw))
    out: dict[str, Any] = {"args": vars(args)}

    @torch.no_grad()
    def acc(m: torch.nn.Module) -> float:
        was = m.training
        m.eval()
        right = seen = 0
        for x, y in data.test_dataloader():
            right += int((m(x).argmax(1) == y).sum())
            seen += len(y)
        m.train(was)
        return right / seen

    @torch.no_grad()
    def recalibrated_acc(m: torch.nn.Module, batches: int = 20) -> float:
        norms = [b for b in m.modules() if isinstance(b, torch.nn.modules.batchnorm._BatchNorm)]
        saved = [(copy.deepcopy(b.state_dict()), b.momentum) for b in norms]
        for b in norms:
            b.reset_running_stats()
            b.momentum = None
        was = m.training
        m.train()
        for i, (x, _) in enumerate(data.train_dataloader()):
            if i >= batches:
                break
            m(x)
        m.train(was)
        result = acc(m)
        for b, (state, momentum) in zip(norms, saved):
            b.load_state_dict(state)
            b.momentum = momentum
        return result

    def frozen_by_kind() -> dict[str, float]:
        counts: dict[str, list[int]] = {}
        for g, gate in cb.gateset:
            entry = counts.setdefault(kind(g.name), [0, 0])
            entry[0] += int(gate.frozen.sum())
            entry[1] += gate.frozen.numel()
        return {k: round(v[0] / v[1], 3) for k, v in counts.items()}

    class Probe(pl.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.mark = -1

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))
            step = trainer.global_step
            if step in (10, 50) and not cb.finalized:
                out[f"frozen@{step}"] = frozen_by_kind()
                print(f"frozen@{step}", out[f"frozen@{step}"], flush=True)
            if step == cb.finalize_at_step - 1 and "before" not in out:
                out["before"], out["before_recal"] = acc(pl_module), recalibrated_acc(pl_module)
                out["frozen@final"] = frozen_by_kind()
                values: dict[str, list[torch.Tensor]] = {}
                for g, gate in cb.gateset:
                    values.setdefault(kind(g.name), []).append(gate.deterministic().abs().cpu())
                joined = {k: torch.cat(v) for k, v in values.items()}
                out["gates_by_kind"] = {k: {"median": float(v.median()),
                                            "below_0.05": float((v < 0.05).float().mean()),
                                            "units": int(v.numel())} for k, v in joined.items()}
                out["loss_before"] = sum(self.losses[-20:]) / 20
                print("before", out["before"], out["before_recal"], out["frozen@final"],
                      json.dumps(out["gates_by_kind"]), flush=True)
            if cb.finalized and "after" not in out:
                out["after"], out["after_recal"] = acc(pl_module), recalibrated_acc(pl_module)
                kept: dict[str, list[Any]] = {}
                for g, k in zip(cb.groups, cb.keep):
                    entry = kept.setdefault(kind(g.name), [0, 0, []])
                    entry[0] += int(k.sum())
                    entry[1] += k.numel()
                    entry[2].append(f"{int(k.sum())}/{k.numel()}")
                out["kept_by_kind"] = {k: {"kept": v[0], "total": v[1], "groups": " ".join(v[2])}
                                       for k, v in kept.items()}
                self.mark = len(self.losses)
                print("after", out["after"], out["after_recal"], json.dumps(out["kept_by_kind"]), flush=True)
                if args.stop:
                    trainer.should_stop = True
            if len(self.losses) == self.mark + 20:
                out["loss_after20"] = sum(self.losses[-20:]) / 20

    started = time.process_time()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[] if args.dense else [cb, Probe()])
    trainer.fit(model, datamodule=data)
    out["final"], out["final_recal"] = acc(model), recalibrated_acc(model)
    out["size"] = {} if args.dense else cb.size_metrics()
    out["cpu_min"] = (time.process_time() - started) / 60
    print("RESULT", json.dumps(out), flush=True)
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps(rows + [out], indent=1) + "\n")


if __name__ == "__main__":
    main()
