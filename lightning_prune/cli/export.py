"""``lightning-prune export``: a run's checkpoint to ONNX, checked in onnxruntime, from the run's config.

Examples::

    lightning-prune export --config recipes/digits/group_lasso.yaml --ckpt_path last.ckpt \\
        --export.output model.onnx
    lightning-prune export --config runs/digits/magnitude/version_0/config.yaml --ckpt_path last.ckpt \\
        --export.output model.onnx --export.sparse_output model.sparse.pt --export.report export.json

The model, data and callbacks come from the config (``model:``, ``data:``, ``trainer.callbacks``; a ``fit``
config, or the ``config.yaml`` a run saved, works as it is). The checkpoint is restored onto the fresh model
with the callbacks' state (:func:`lightning_prune.restore_run`): gate callbacks that had not finalised
finalise (``--export.finalize``), the pruned units are removed (``--export.compress``; default: as the
callbacks were configured) and decayed activations fused (``--export.fuse``; default: with
``fuse_on_train_end``). Then :func:`lightning_prune.export` writes the ONNX file, runs it in onnxruntime on a
batch of the test data (and random batches of each ``--export.batch_sizes``) against the PyTorch model, and
prints parameters, FLOPs, file size, the maximum relative error and the latency against the dense model's
(one thread). Needs ``pip install 'lightning-prune[export]'``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser

from lightning_prune.cli.config import (
    OneLineParseErrors,
    add_fit_config_arguments,
    config_cli,
    weights_only_of,
)
from lightning_prune.cli.errors import ConfigError

__all__ = ["ExportCLI", "ExportOptions", "main"]


@dataclass
class ExportOptions:
    """What ``lightning-prune export`` writes and checks.

    Args:
        output: the ONNX file to write.
        finalize: gate callbacks that have not finalised choose their units first.
        compress: remove the pruned units first (default: as the callbacks were configured).
        fuse: fuse decayed activations and conv+BN first (default: with ``fuse_on_train_end``).
        input_size: ``(C, H, W)`` of the example inputs (default: a batch of the test data, else timm's).
        batch_sizes: the batch sizes checked and timed.
        repeats: timing rounds (medians).
        benchmark: time the exported and the dense model in onnxruntime.
        rtol: the largest accepted ``max |onnx - torch| / max |torch|``.
        dynamo: ``true``: torch's torch.export-based exporter only; ``false``: the TorchScript one; default:
            the former, falling back to the latter.
        opset_version: the ONNX opset (default: the exporter's).
        sparse_output: also write the restored model as a sparse checkpoint (``lp.save_sparse``).
        report: also write the report as JSON.
    """

    output: str = "model.onnx"
    finalize: bool = True
    compress: bool | None = None
    fuse: bool | None = None
    input_size: list[int] | None = None
    batch_sizes: list[int] | None = None
    repeats: int = 5
    benchmark: bool = True
    rtol: float = 1e-4
    dynamo: bool | None = None
    opset_version: int | None = None
    sparse_output: str | None = None
    report: str | None = None


class ExportCLI(OneLineParseErrors):
    """LightningCLI without a subcommand: builds the model, data and callbacks of a config, then exports."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_fit_config_arguments(parser, "The run's Lightning checkpoint to export (required).")
        parser.add_class_arguments(ExportOptions, "export")

    def _example(self, options: ExportOptions) -> Any:
        """Two images of the test data (the proof runs on real inputs), or None (timm's input size)."""
        if options.input_size is not None or self.datamodule is None:
            return None
        try:
            self.datamodule.prepare_data()
            self.datamodule.setup("test")
            batch = next(iter(self.datamodule.test_dataloader()))
        except Exception as error:  # noqa: BLE001 - then the model's own input size
            print(f"[export] no test batch from the datamodule ({type(error).__name__}: {error});"
                  " using the model's input size", flush=True)
            return None
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return x[:2].float()

    def export(self) -> None:
        from lightning_prune.deploy.onnx import export, require_export_dependencies
        from lightning_prune.deploy.restore import restore_run

        options = ExportOptions(**dict(self.config["export"]))
        ckpt_path = self.config.get("ckpt_path")
        if not ckpt_path:
            raise ConfigError("`lightning-prune export` needs `--ckpt_path`, the Lightning checkpoint of the"
                              " run to export. HINT: `--trainer.enable_checkpointing true` on `fit` writes"
                              " under the logger's `version_<N>/checkpoints/`.")
        require_export_dependencies()  # before anything slow
        dense = copy.deepcopy(self.model)  # the fresh, unpruned architecture: the baseline of the report
        run = restore_run(ckpt_path, self.model, self.trainer.callbacks, finalize=options.finalize,
                          compress=options.compress, fuse=options.fuse,
                          weights_only=weights_only_of(self.config))
        try:
            example = self._example(options)
            report = export(run.module, options.output, example, dense=dense,
                            input_size=tuple(options.input_size) if options.input_size else None,
                            batch_sizes=tuple(options.batch_sizes or (1, 64)), repeats=options.repeats,
                            benchmark=options.benchmark, rtol=options.rtol, dynamo=options.dynamo,
                            opset_version=options.opset_version)
            report.steps = run.steps + report.steps
            if options.sparse_output:
                from lightning_prune.deploy.sparse_io import save_sparse
                from lightning_prune.graph import traced_root

                info = save_sparse(traced_root(run.module)[1], options.sparse_output)
                report.steps.append(f"sparse checkpoint: {info.path} ({info.file_bytes / 1e6:.2f} MB,"
                                    f" {info.ratio:.1f}x smaller than its tensors dense)")
        finally:
            run.close()
        print("\n" + report.format_table(), flush=True)
        if options.report:
            with open(options.report, "w", encoding="utf-8") as handle:
                json.dump(report.to_dict(), handle, indent=1)


def main(argv: Sequence[str]) -> None:
    config_cli(ExportCLI, argv).export()
