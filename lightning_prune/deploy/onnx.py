"""ONNX export with proof: export, load in onnxruntime, compare with PyTorch, measure.

:func:`export` takes a trained model -- masked, compressed or fused, a timm model or a LightningModule holding
one -- optionally removes its dead channels (:func:`~lightning_prune.compress`) and fuses it
(:func:`~lightning_prune.reparameterize`) on a copy, exports it with torch's ONNX exporter (the
``torch.export``-based one, the TorchScript one if that fails), loads the file in ``onnxruntime`` and compares
its outputs with the PyTorch model's on the example inputs and on random batches of every benchmarked size
(the maximum error relative to the largest output; past ``rtol`` it raises). It reports parameters, FLOPs
(torch-pruning's ``count_ops_and_params``), the file's size, and the latency of the exported model in
onnxruntime against the dense model's, one thread, thread CPU time, the two interleaved, medians.

Needs the ``export`` extra: ``pip install 'lightning-prune[export]'`` (onnx, onnxruntime, onnxscript).

Example::

    report = lp.export(model, "model.onnx", input_size=(3, 32, 32), compress=True)
    print(report)      # file size, params, FLOPs, max relative error, latency vs dense at batch 1 and 64
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_prune.errors import (
    ExportError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    MissingDependencyError,
)
from lightning_prune.graph import call_model, evaluating, example_inputs_for, like_model, traced_root
from lightning_prune.validation import check_bool, check_int, check_optional, check_positive

__all__ = ["EXTRA", "ExportReport", "export", "onnx_latency", "onnx_session", "require_export_dependencies"]

#: how to install what :func:`export` needs
EXTRA = "pip install 'lightning-prune[export]'"
#: above this many bytes of weights the ONNX file keeps them in a side file (protobuf's 2 GB limit)
_EXTERNAL_DATA_BYTES = 1_800_000_000


def require_export_dependencies() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or a :class:`~lightning_prune.errors.MissingDependencyError` naming the extra.
    """
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise MissingDependencyError(
            f"Exporting to ONNX needs `{error.name or 'onnx'}`, which is not installed (lightning-prune's"
            f" optional `export` extra: onnx, onnxruntime, onnxscript). HINT: {EXTRA}") from error
    return onnx, onnxruntime


@dataclass
class ExportReport:
    """What :func:`export` wrote and measured. Latencies are milliseconds of thread CPU time per run in
    onnxruntime at one thread (medians), keyed by batch size."""

    path: str
    file_bytes: int
    exporter: str
    opset: int
    params: int
    flops: float
    dense_params: int
    dense_flops: float
    max_abs_error: float
    max_rel_error: float
    checked_batches: list[int]
    latency_ms: dict[int, float] = field(default_factory=dict)
    dense_latency_ms: dict[int, float] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)
    #: the dense model's graph is the exported one (a masked model: masks do not change the graph), so the
    #: dense latency is the model's own
    same_graph: bool = False

    @property
    def latency_ratio(self) -> dict[int, float]:
        """Exported over dense latency, per batch size."""
        return {b: self.latency_ms[b] / self.dense_latency_ms[b] for b in self.latency_ms
                if self.dense_latency_ms.get(b)}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "latency_ratio": self.latency_ratio}

    def format_table(self) -> str:
        rows = [
            ("ONNX file", f"{self.path} ({self.file_bytes / 1e6:.2f} MB, opset {self.opset},"
                          f" {self.exporter})"),
            ("parameters", f"{self.params:,} ({self.params / max(self.dense_params, 1):.3f} of dense)"),
            ("FLOPs per sample", f"{self.flops / 1e6:.2f} M ({self.flops / max(self.dense_flops, 1):.3f} of"
                                 " dense)"),
            ("max error vs PyTorch", f"{self.max_rel_error:.2e} relative, {self.max_abs_error:.2e} absolute"
                                     f" (batches {', '.join(map(str, self.checked_batches))})"),
        ]
        for b, ms in self.latency_ms.items():
            dense = self.dense_latency_ms.get(b)
            ratio = (" (the dense graph: masks do not change it)" if self.same_graph
                     else f" vs dense {dense:.2f} ms: {ms / dense:.3f}x" if dense else "")
            rows.append((f"onnxruntime b{b}, 1 thread", f"{ms:.2f} ms{ratio}"))
        rows.extend(("before export", step) for step in self.steps)
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)

    def __str__(self) -> str:
        return self.format_table()


# ---------------------------------------------------------------------------------------------- inputs
def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _as_args(example: Any) -> tuple[Tensor, ...]:
    args = tuple(example) if isinstance(example, (list, tuple)) else (example,)
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise InvalidArgumentTypeError(
            f"`example_inputs` must be a tensor or a tuple of tensors (the model's positional inputs), got"
            f" {type(example).__name__}. HINT: for a model with keyword inputs wrap it in a module that takes"
            " them positionally.")
    return args


def _batch_of(args: Sequence[Tensor], batch: int, seed: int) -> tuple[Tensor, ...]:
    """Random inputs like ``args`` with ``batch`` rows (integer inputs: rows of the example, repeated)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for a in args:
        if a.is_floating_point():
            out.append(torch.randn(batch, *a.shape[1:], generator=generator).to(a.device, a.dtype))
        else:
            out.append(a[torch.arange(batch) % a.shape[0]])
    return tuple(out)


#: what onnxruntime's CPU kernels do not take (bfloat16 not at all, float16 not for most ops)
_HALF = (torch.float16, torch.bfloat16)


def _in_float32(module: nn.Module) -> tuple[nn.Module, str | None]:
    """``module``, or a float32 copy of it when it holds half-precision tensors (a "bf16-true" or "16-true"
    run), and the name of the dtype it was cast from."""
    half = {str(t.dtype).removeprefix("torch.") for t in (*module.parameters(), *module.buffers())
            if t.dtype in _HALF}
    if not half:
        return module, None
    return copy.deepcopy(module).float(), "/".join(sorted(half))


def _feed(session: Any, args: Sequence[Tensor]) -> dict[str, Any]:
    names = [i.name for i in session.get_inputs()]
    return {name: a.detach().cpu().numpy() for name, a in zip(names, args)}


@contextlib.contextmanager
def _eval(module: nn.Module) -> Iterator[nn.Module]:
    with evaluating(module):  # (every module's mode kept)
        yield module


def _errors(reference: Any, outputs: Sequence[Any]) -> tuple[float, float]:
    """Max absolute difference over all outputs, and that divided by the largest reference magnitude."""
    expected = _tensors(reference)
    if len(expected) != len(outputs):
        raise ExportError(f"The ONNX model returns {len(outputs)} outputs, PyTorch {len(expected)}.")
    worst_abs, scale = 0.0, 0.0
    for ref, got in zip(expected, outputs):
        ref = ref.detach().float().cpu()
        got = torch.as_tensor(got).float()
        if tuple(ref.shape) != tuple(got.shape):
            raise ExportError(f"The ONNX model returns shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}.")
        if ref.numel():
            worst_abs = max(worst_abs, float((ref - got).abs().max()))
            scale = max(scale, float(ref.abs().max()))
    return worst_abs, worst_abs / max(scale, 1e-12)


# ---------------------------------------------------------------------------------------------- exporting
def _onnx_export(model: nn.Module, args: tuple[Tensor, ...], path: str, n_outputs: int, dynamic_batch: bool,
                 opset_version: int | None, dynamo: bool | None) -> str:
    input_names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    output_names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    has_dynamo = "dynamo" in inspect.signature(torch.onnx.export).parameters
    failure = None
    if dynamo is not False and has_dynamo:
        try:
            kwargs: dict[str, Any] = {}
            if dynamic_batch:
                batch = torch.export.Dim("batch", min=1)
                kwargs["dynamic_shapes"] = tuple({0: batch} for _ in args)
            with _quiet():
                torch.onnx.export(model, args, path, dynamo=True, verbose=False, input_names=input_names,
                                  output_names=output_names, opset_version=opset_version,
                                  external_data=weight_bytes > _EXTERNAL_DATA_BYTES, **kwargs)
            return "torch.export"
        except Exception as error:  # noqa: BLE001 - whatever the new exporter trips on, the old one may take
            if dynamo:
                raise ExportError(f"torch's ONNX exporter (dynamo=True) failed: {type(error).__name__}:"
                                  f" {str(error)[:600]} HINT: dynamo=None falls back to the TorchScript"
                                  " exporter.") from error
            failure = error
            rank_zero_info(f"[export] the torch.export-based exporter failed ({type(error).__name__}:"
                           f" {str(error)[:200]}); trying the TorchScript exporter")
    try:
        axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
        kwargs = {"dynamo": False} if has_dynamo else {}
        with _quiet():
            torch.onnx.export(model, args, path, input_names=input_names, output_names=output_names,
                              dynamic_axes=axes, opset_version=opset_version or 17, do_constant_folding=True,
                              **kwargs)
    except Exception as error:  # noqa: BLE001
        raise ExportError(f"Neither of torch's ONNX exporters could export {type(model).__name__}:"
                          f" {type(error).__name__}: {str(error)[:600]}"
                          + (f" (torch.export: {type(failure).__name__}: {str(failure)[:300]})" if failure
                             else "")) from error
    return "torchscript"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _file_bytes(path: str) -> int:
    """The ONNX file plus the external-data files it names."""
    total = os.path.getsize(path)
    try:
        import onnx

        proto = onnx.load(path, load_external_data=False)
        locations = {entry.value for tensor in proto.graph.initializer for entry in tensor.external_data
                     if entry.key == "location"}
        total += sum(os.path.getsize(Path(path).parent / loc) for loc in locations)
    except Exception:  # noqa: BLE001 - the size of the main file is still right
        pass
    return total


def _opset(path: str) -> int:
    import onnx

    proto = onnx.load(path, load_external_data=False)
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def onnx_session(path: str, threads: int = 1) -> Any:
    """An onnxruntime CPU session for ``path`` with ``threads`` intra- and inter-op threads, sequential."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def onnx_latency(sessions: dict[str, Any], inputs: dict[int, tuple[Tensor, ...]], repeats: int = 5
                 ) -> dict[str, dict[int, float]]:
    """Milliseconds of thread CPU time (``time.thread_time``) of one ``session.run`` per session and batch
    size: every session warmed up once, then ``repeats`` rounds in which the sessions take turns (interleaved,
    so a busy machine slows all alike); medians. Sessions should have one intra-op thread (the calling thread
    does the work, which is what thread time counts)."""
    feeds = {(name, b): _feed(s, args) for name, s in sessions.items() for b, args in inputs.items()}
    for (name, _), feed in feeds.items():
        sessions[name].run(None, feed)
    times: dict[tuple[str, int], list[float]] = {key: [] for key in feeds}
    for _ in range(repeats):
        for (name, b), feed in feeds.items():
            start = time.thread_time()
            sessions[name].run(None, feed)
            times[(name, b)].append((time.thread_time() - start) * 1e3)
    out: dict[str, dict[int, float]] = {name: {} for name in sessions}
    for (name, b), values in times.items():
        out[name][b] = statistics.median(values)
    return out


def _count(model: nn.Module, args: tuple[Tensor, ...]) -> tuple[int, float]:
    from lightning_prune.graph import count_ops_and_params

    with _eval(model), torch.no_grad(), _quiet():
        flops, params = count_ops_and_params(model, args[0] if len(args) == 1 else args)
    return int(params), float(flops)


# ---------------------------------------------------------------------------------------------- export
def export(
    model: nn.Module,
    path: str | Path,
    example_inputs: Any = None,
    *,
    input_size: Sequence[int] | None = None,
    compress: bool = False,
    fuse: bool = False,
    round_to: int = 1,
    dense: nn.Module | None = None,
    dynamic_batch: bool = True,
    opset_version: int | None = None,
    dynamo: bool | None = None,
    rtol: float = 1e-4,
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 5,
    benchmark: bool = True,
) -> ExportReport:
    """Export ``model`` to ONNX at ``path``, prove that onnxruntime computes what PyTorch does, measure it.

    Args:
        model: a timm model, any ``nn.Module``, or a LightningModule (its timm model is exported, or the
            module itself when it has an ``example_input_array``). Left as it is: changes go to a copy. A
            float16/bfloat16 model ("16-true", "bf16-true") is exported, checked and timed as a float32 copy
            (onnxruntime's CPU kernels do not take half precision; ``steps`` says so).
        path: the ``.onnx`` file to write.
        example_inputs: what the model is called with (a tensor or a tuple of tensors); default: the module's
            ``example_input_array``, or a random batch of 2 at ``input_size``.
        input_size: ``(C, H, W)`` of that batch (default timm's ``pretrained_cfg["input_size"]``).
        compress: remove dead channels first (:func:`~lightning_prune.compress`, verified exact).
        fuse: fuse first (:func:`~lightning_prune.reparameterize`: decayed activations at λ = 1, timm's
            re-parameterisable blocks, conv+BN), verified exact.
        round_to: ``compress``'s channel rounding.
        dense: the dense model to compare parameters, FLOPs and latency with (default: ``model`` as given,
            which is the dense architecture of a masked model; pass the unpruned architecture for a model that
            was compressed before).
        dynamic_batch: the ONNX model takes any batch size (else only the example's).
        opset_version: the ONNX opset (default: the exporter's).
        dynamo: ``True``: torch's ``torch.export``-based exporter only; ``False``: the TorchScript one;
            ``None`` (default): the former, falling back to the latter.
        rtol: the largest accepted ``max |onnx - torch| / max |torch|`` over the checked batches.
        batch_sizes: batch sizes checked and timed (only the example's batch without ``dynamic_batch``).
        repeats: timing rounds (medians); ``benchmark=False`` skips timing.

    Returns:
        an :class:`ExportReport` (``print(report)`` shows a table).

    Raises:
        MissingDependencyError: onnx or onnxruntime is not installed
            (``pip install 'lightning-prune[export]'``).
        ExportError: the export failed, or the outputs differ by more than ``rtol``.
        CompressionError: compressing or fusing would change the outputs.
        InvalidArgumentError, InvalidArgumentTypeError: a bad argument.

    Example::

        report = lp.export(trainer.lightning_module, "model.onnx", input_size=(3, 32, 32))
        assert report.max_rel_error < 1e-4
    """
    for name, value in (("compress", compress), ("fuse", fuse), ("dynamic_batch", dynamic_batch),
                        ("benchmark", benchmark)):
        check_bool(name, value, error=InvalidArgumentError)
    check_optional(check_bool, "dynamo", dynamo, error=InvalidArgumentError)
    check_int("round_to", round_to, 1, error=InvalidArgumentError)
    check_int("repeats", repeats, 1, hint="5 or more make stable medians.", error=InvalidArgumentError)
    check_positive("rtol", rtol, error=InvalidArgumentError)
    check_optional(check_int, "opset_version", opset_version, 7, error=InvalidArgumentError)
    if (isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Sequence) or not batch_sizes
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batch_sizes)):
        raise InvalidArgumentError(
            f"`batch_sizes` must be a non-empty list of integers >= 1, got {batch_sizes!r}. HINT: (1, 64).")
    if not isinstance(model, nn.Module):
        raise InvalidArgumentTypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    require_export_dependencies()
    path = str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)

    from lightning_prune.core.compression import compress as compress_model
    from lightning_prune.core.reparam import count_layers, reparameterize

    _, root = traced_root(model)
    root, half = _in_float32(root)  # the proof compares onnxruntime with this float32 copy
    example = example_inputs if example_inputs is not None else example_inputs_for(root, input_size)
    args = _as_args(like_model(example, root))  # on the model's device, floating inputs in its dtype
    steps = []
    if half is not None:
        steps.append(f"cast {half} -> float32 (onnxruntime's CPU kernels take float32; the outputs are"
                     " checked against the float32 copy)")
    work = copy.deepcopy(root).eval()
    if compress:
        before = sum(p.numel() for p in work.parameters())
        compress_model(work, args if len(args) > 1 else args[0], round_to=round_to)
        steps.append(f"compressed: parameters {before:,} -> {sum(p.numel() for p in work.parameters()):,}")
    if fuse:
        before = count_layers(work)
        reparameterize(work, strict=False)
        steps.append(f"fused: {before} -> {count_layers(work)} conv/linear layers, conv+BN folded")
    with _eval(root), torch.no_grad():
        reference = call_model(root, args)
    n_outputs = len(_tensors(reference))
    with torch.no_grad():
        exporter = _onnx_export(work, args, path, n_outputs, dynamic_batch, opset_version, dynamo)
    try:
        session = onnx_session(path)
    except Exception as error:  # noqa: BLE001 - onnxruntime's own exception types
        dtypes = sorted({str(a.dtype).removeprefix("torch.") for a in (*work.parameters(), *args)})
        raise ExportError(
            f"onnxruntime cannot load {path} ({exporter} exporter): {str(error)[:400]} HINT: an op that"
            f" onnxruntime's CPU provider does not implement for these dtypes ({', '.join(dtypes)}; e.g."
            " float64 convolutions): export a float32 copy, lp.export(copy.deepcopy(model).float(), ...), or"
            " try dynamo=False or another opset_version.") from error

    checked = {args[0].shape[0]: args}
    if dynamic_batch:
        checked.update({b: _batch_of(args, b, seed=b) for b in batch_sizes if b not in checked})
    worst_abs = worst_rel = 0.0
    for batch in checked.values():
        with _eval(root), torch.no_grad():
            expected = call_model(root, batch)
        try:
            outputs = session.run(None, _feed(session, batch))
        except Exception as error:  # noqa: BLE001 - onnxruntime's own exception types
            raise ExportError(
                f"onnxruntime cannot run {path} on a batch of {batch[0].shape[0]}: {str(error)[:400]}"
                " HINT: the exporter fixed the batch size (Python code branching on it?); dynamic_batch=False"
                " exports for the example's batch only.") from error
        abs_error, rel_error = _errors(expected, outputs)
        worst_abs, worst_rel = max(worst_abs, abs_error), max(worst_rel, rel_error)
    rank_zero_info(f"[export] {path}: onnxruntime vs PyTorch, max relative error {worst_rel:.2e} (max abs"
                   f" {worst_abs:.2e}) over batches {sorted(checked)}")
    if not worst_rel <= rtol:
        raise ExportError(
            f"The ONNX model {path} computes outputs that differ from the PyTorch model's by {worst_rel:.3g}"
            f" relative (max |onnx - torch| / max |torch|; {worst_abs:.3g} absolute) > rtol={rtol:g}."
            " HINT: an op the exporter translates differently (try dynamo=False), or a model that is not"
            " deterministic in eval mode; the file is left for inspection.")

    one = _batch_of(args, 1, seed=0)
    dense_model = dense if dense is not None else root
    dense_root = _in_float32(traced_root(dense_model)[1])[0]
    params, flops = _count(work, one)
    dense_params, dense_flops = _count(dense_root, one)
    report = ExportReport(path, _file_bytes(path), exporter, _opset(path), params, flops, dense_params,
                          dense_flops, worst_abs, worst_rel, sorted(checked), steps=steps)
    if benchmark:
        sizes = [b for b in batch_sizes if dynamic_batch or b == args[0].shape[0]] or [args[0].shape[0]]
        inputs = {b: _batch_of(args, b, seed=100 + b) for b in sizes}
        same_graph = dense is None and not (compress or fuse)
        if same_graph:  # a masked model: the exported graph is the dense one
            timed = onnx_latency({"model": session}, inputs, repeats)
            report.latency_ms = report.dense_latency_ms = timed["model"]
            report.same_graph = True
        else:
            with tempfile.TemporaryDirectory() as tmp:
                dense_path = str(Path(tmp) / "dense.onnx")
                with torch.no_grad(), _eval(dense_root):
                    _onnx_export(copy.deepcopy(dense_root).eval(), args, dense_path, n_outputs, dynamic_batch,
                                 opset_version, dynamo)
                timed = onnx_latency({"model": session, "dense": onnx_session(dense_path)}, inputs, repeats)
            report.latency_ms, report.dense_latency_ms = timed["model"], timed["dense"]
    return report

