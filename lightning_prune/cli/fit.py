"""The LightningCLI behind ``lightning-prune fit`` / ``validate`` / ``test`` / ``predict``
(:mod:`lightning_prune.cli.app` dispatches to it, and keeps the help and ``list`` free of these imports)."""

from __future__ import annotations

from typing import Optional

from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities import rank_zero_only

from lightning_prune.cli.config import OneLineParseErrors
from lightning_prune.cli.errors import ConfigError, check_accelerator
from lightning_prune.core.report import sparsity_report

__all__ = ["PruneCLI"]


class PruneCLI(OneLineParseErrors):
    """LightningCLI over any LightningModule / LightningDataModule, that tests and reports after ``fit``.

    A parse error comes back as one :class:`~lightning_prune.cli.errors.ConfigError` line (the class, the
    unknown key and its closest valid spelling) instead of jsonargparse's usage and nested union errors; a GPU
    accelerator asked for on a machine without one fails before anything is built.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, test the final weights and print the sparsity table.")
        parser.add_argument("--torch_threads", type=Optional[int], default=None,
                            help="torch's intra-op thread count for the run (torch.set_num_threads; default:"
                                 " torch's, one per core). A fixed count makes a seeded CPU run give the same"
                                 " result on every machine and keeps it from stalling on a busy one.")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_accelerator((config.get("trainer") or {}).get("accelerator"))
        threads = config.get("torch_threads")
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"`torch_threads` must be an integer >= 1, got {threads}."
                                  " HINT: leave it unset (null) for torch's default, one thread per core.")
            import torch

            torch.set_num_threads(threads)

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
