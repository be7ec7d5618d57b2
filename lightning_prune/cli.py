"""The ``lightning-prune`` command: ``fit`` / ``validate`` / ``test`` through LightningCLI, ``list`` and
``sensitivity`` (:mod:`lightning_prune.cli_sensitivity`).

Examples::

    lightning-prune list
    lightning-prune fit --config recipes/digits/magnitude.yaml
    lightning-prune fit --config recipes/digits/magnitude.yaml --trainer.accelerator gpu
    lightning-prune export --config recipes/digits/magnitude.yaml --ckpt_path last.ckpt  # (cli_export)

``fit`` ends, unless ``--test_after_fit false``, with a test of the final (pruned) weights and a table of
per-layer and global sparsity, parameters and accuracy.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from lightning_prune._registry import list_callbacks
from lightning_prune.report import sparsity_report

__all__ = ["PruneCLI", "format_callback_list", "main"]


def format_callback_list() -> str:
    """The table ``lightning-prune list`` prints: name, class, distribution, version, status, summary."""
    rows = [("name", "class", "distribution", "version", "status", "summary")]
    for info in list_callbacks().values():
        status = "BROKEN" if info.broken else "ok"
        summary = info.error if info.broken else info.summary
        rows.append((info.name, info.object_path, info.distribution or "?", info.version or "?", status,
                     summary))
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows)


class PruneCLI(LightningCLI):
    """LightningCLI over any LightningModule / LightningDataModule, that tests and reports after ``fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, test the final weights and print the sparsity table.")

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit", True):
            return
        if self.trainer.interrupted:
            return
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        self._print_summary(results[0] if results else {})

    @rank_zero_only
    def _print_summary(self, metrics: dict[str, float]) -> None:
        extra = {k: float(v) for k, v in {**self.trainer.callback_metrics, **metrics}.items()
                 if k.split("/")[-1] in ("acc", "loss") and not k.startswith("train")}
        print("\n" + sparsity_report(self.model).format_table(extra=dict(sorted(extra.items()))), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "list":
        print(format_callback_list())
        return
    if args and args[0] == "sensitivity":  # the per-layer sensitivity scan (lightning_prune.cli_sensitivity)
        from lightning_prune.cli_sensitivity import main as sensitivity_main

        sensitivity_main(args[1:])
        return
    if args and args[0] == "export":  # checkpoint -> ONNX checked in onnxruntime (lightning_prune.cli_export)
        from lightning_prune.cli_export import main as export_main

        export_main(args[1:])
        return
    PruneCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":  # pragma: no cover
    main()
