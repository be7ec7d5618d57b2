"""``lightning-prune sensitivity``: the per-layer sensitivity scan from the same config as ``fit``.

Examples::

    lightning-prune sensitivity --config recipes/digits/dense.yaml                  # train, then scan
    lightning-prune sensitivity --config recipes/digits/dense.yaml --ckpt_path dense.ckpt \\
        --sensitivity.method channels --sensitivity.target_sparsity 0.95

The model and data come from the config (``model:``, ``data:``, ``trainer:``, ``seed_everything:``; a
``fit`` config works as it is). The weights scanned are those of ``--ckpt_path`` (a Lightning checkpoint,
also one written after channels were removed inside the fit), or, without it, those the config's Trainer fits
first. ``sensitivity.json``, ``sensitivity.md`` and the heat map ``sensitivity.png`` go to
``--sensitivity.out_dir``; with ``--sensitivity.target_sparsity`` also ``layer_targets.json`` (the
``layer_targets`` of ``GradualMagnitudePruning``, or a ratio per channel group).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_prune.cli.config import (
    OneLineParseErrors,
    add_fit_config_arguments,
    config_cli,
    weights_only_of,
)
from lightning_prune.core.sensitivity import layer_targets_from_sensitivity, sensitivity

__all__ = ["SensitivityCLI", "SensitivityOptions", "main"]


@dataclass
class SensitivityOptions:
    """What ``lightning-prune sensitivity`` scans and where it writes.

    Args:
        sparsities: the sparsities each layer is pruned to, alone.
        method: ``magnitude`` (a layer's smallest weights) or ``channels`` (a channel group's smallest units).
        metric: ``accuracy`` or ``loss`` (cross-entropy).
        split: the data scanned: ``val``, ``test`` or ``train``.
        max_batches: at most that many batches (default: all).
        include: globs over module names that narrow the layers scanned.
        exclude: globs over module names to leave out.
        channel_criterion: ``l2`` or ``first_k`` (``channels`` only).
        out_dir: where the table, the heat map and the layer targets go.
        target_sparsity: also write the per-layer targets that meet this global sparsity.
        tolerance: a drop up to this counts as none (in the metric's units; the evaluation's noise).
        fit: without ``--ckpt_path``, train the model with the config's Trainer first.
    """

    sparsities: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95, 0.98)
    method: str = "magnitude"
    metric: str = "accuracy"
    split: str = "val"
    max_batches: int | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    channel_criterion: str = "l2"
    out_dir: str = "sensitivity"
    target_sparsity: float | None = None
    tolerance: float = 0.0
    fit: bool = True


class SensitivityCLI(OneLineParseErrors, LightningCLI):
    """LightningCLI without a subcommand: builds the model, data and Trainer of a config, then scans."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_fit_config_arguments(parser, "Scan the weights of this Lightning checkpoint (default: fit"
                                         " first).")
        parser.add_class_arguments(SensitivityOptions, "sensitivity")

    def scan(self) -> None:
        options = SensitivityOptions(**dict(self.config["sensitivity"]))
        model, datamodule, trainer = self.model, self.datamodule, self.trainer
        ckpt_path = self.config.get("ckpt_path")
        if ckpt_path:
            from lightning_prune.core.compression import load_compressed

            # a plain checkpoint, or one of a model shrunk inside the fit
            load_compressed(ckpt_path, model, weights_only=weights_only_of(self.config))
        elif options.fit:
            trainer.fit(model, datamodule=datamodule)
        else:
            print("[sensitivity] no --ckpt_path and --sensitivity.fit false: scanning the initial weights",
                  flush=True)
        if datamodule is None:
            raise SystemExit("lightning-prune sensitivity needs a `data:` section (a LightningDataModule).")
        stage = {"val": "validate", "test": "test", "train": "fit"}.get(options.split)
        if stage is None:
            raise SystemExit(f"--sensitivity.split must be val, test or train, got {options.split!r}.")
        datamodule.setup(stage)
        loader = {"val": datamodule.val_dataloader, "test": datamodule.test_dataloader,
                  "train": datamodule.train_dataloader}[options.split]()
        model.to(trainer.strategy.root_device)
        out = Path(options.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        table = sensitivity(model, loader, sparsities=tuple(options.sparsities), method=options.method,
                            metric=options.metric, include=options.include, exclude=options.exclude,
                            channel_criterion=options.channel_criterion, max_batches=options.max_batches,
                            heatmap=out / "sensitivity.png")
        table.save(out / "sensitivity.json")
        (out / "sensitivity.md").write_text(table.format() + "\n", encoding="utf-8")
        print("\n" + table.format(), flush=True)
        written = [out / "sensitivity.json", out / "sensitivity.md", out / "sensitivity.png"]
        if options.target_sparsity is not None:
            targets = layer_targets_from_sensitivity(table, options.target_sparsity, options.tolerance)
            (out / "layer_targets.json").write_text(json.dumps(targets, indent=1) + "\n", encoding="utf-8")
            what = ("GradualMagnitudePruning(layer_targets=...)" if table.method == "magnitude"
                    else "the fraction of units to prune per channel group")
            print(f"\nlayer targets for a global sparsity of {options.target_sparsity} ({what}):", flush=True)
            for name, value in targets.items():
                print(f"  {name}: {value:.4f}", flush=True)
            written.append(out / "layer_targets.json")
        print("\nwritten: " + ", ".join(str(p) for p in written), flush=True)


def main(argv: Sequence[str]) -> None:
    config_cli(SensitivityCLI, argv).scan()
