"""ONNX export with proof (lp.export), restoring a run from its checkpoint (lp.restore_run) and the
``lightning-prune export`` command."""

import copy
import json
import sys

import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from onnx import numpy_helper
from torch import nn

import lightning_prune as lp
from lightning_prune.cli import main
from lightning_prune.deploy.onnx import onnx_latency
from lightning_prune.functional import magnitude_mask
from lightning_prune.testing import TINY_MODELS, fit_tiny, tiny_classifier

QUICK = {"batch_sizes": (1, 4), "repeats": 1}
FIT = {"max_epochs": 2, "limit_train_batches": 4, "limit_val_batches": 1}


def _run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def _prune_(model, sparsity):
    for p in model.parameters():
        if p.dim() > 1:
            p.mul_(magnitude_mask(p.abs(), sparsity))


@pytest.mark.parametrize("model_name", list(TINY_MODELS))
def test_export_checks_onnxruntime_against_pytorch_on_timm_families(tmp_path, model_name):
    model = timm.create_model(model_name, num_classes=10, **TINY_MODELS[model_name])
    _prune_(model, 0.8)
    model.train()  # export works on an eval copy and leaves the model as it was
    report = lp.export(model, tmp_path / "m.onnx", input_size=(3, 32, 32), **QUICK)
    assert model.training
    assert report.max_rel_error < 1e-4 and report.checked_batches == [1, 2, 4]
    assert report.params == sum(p.numel() for p in model.parameters()) == report.dense_params
    assert report.flops > 0 and report.flops == report.dense_flops
    assert report.file_bytes == (tmp_path / "m.onnx").stat().st_size and report.opset >= 13
    assert report.same_graph and set(report.latency_ms) == {1, 4} and report.latency_ratio == {1: 1.0, 4: 1.0}
    x = torch.randn(3, 3, 32, 32)  # a batch size that was not checked: the batch dimension is dynamic
    assert _rel(_run_onnx(tmp_path / "m.onnx", x), model.eval()(x)) < 1e-4
    text = str(report)
    assert "max error vs PyTorch" in text and "onnxruntime b4, 1 thread" in text


def test_the_masks_are_in_the_onnx_weights(tmp_path):
    model = timm.create_model("test_resnet", num_classes=10)
    _prune_(model, 0.9)
    lp.export(model, tmp_path / "m.onnx", input_size=(3, 32, 32), benchmark=False)
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer]
    big = [w for w in weights if w.ndim == 4 and w.size > 1000]
    assert big and all((w == 0).mean() > 0.8 for w in big[1:])  # (the stem is not pruned here either)


def test_compress_and_fuse_on_a_copy_and_time_against_the_dense_model(tmp_path):
    model = timm.create_model("test_resnet", num_classes=10)
    with torch.no_grad():
        model.layer1[0].conv2.weight[:, :12] = 0  # channels no layer reads: removable
    before = copy.deepcopy(model.state_dict())
    report = lp.export(model, tmp_path / "m.onnx", input_size=(3, 32, 32), compress=True, fuse=True, **QUICK)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert report.params < report.dense_params and report.flops < report.dense_flops
    assert not report.same_graph and set(report.dense_latency_ms) == {1, 4}
    assert report.steps[0].startswith("compressed: parameters") and report.steps[1].startswith("fused:")
    assert report.max_rel_error < 1e-4
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert not any(n.op_type == "BatchNormalization" for n in graph.node)  # folded into the convs


def test_a_reducenet_trained_with_activation_decay_exports_fused(tmp_path):
    decay = lp.ActivationDecay(end_step=0.5, verbose=False)  # λ reaches 1; fused by export, not by the fit
    _, module = fit_tiny([decay], tmp_path / "fit", model=tiny_classifier("reducenet_20_act"), max_epochs=1,
                         limit_train_batches=4, limit_val_batches=0)
    report = lp.export(module, tmp_path / "r.onnx", input_size=(3, 32, 32), fuse=True, **QUICK)
    assert report.steps == ["fused: 20 -> 11 conv/linear layers, conv+BN folded"]
    assert report.max_rel_error < 1e-4 and report.params < 0.9 * report.dense_params
    graph = onnx.load(str(tmp_path / "r.onnx")).graph
    assert sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in graph.node) == 11
    x = torch.randn(3, 3, 32, 32)
    assert _rel(_run_onnx(tmp_path / "r.onnx", x), module.eval()(x)) < 1e-4


def test_a_lightning_module_exports_its_timm_model(tmp_path):
    module = tiny_classifier("test_vit")
    report = lp.export(module, tmp_path / "vit.onnx", input_size=(3, 32, 32), benchmark=False)
    x = torch.randn(2, 3, 32, 32)
    assert report.max_rel_error < 1e-4
    assert _rel(_run_onnx(tmp_path / "vit.onnx", x), module.eval()(x)) < 1e-4


def test_a_bf16_true_run_and_a_float16_model_export_as_float32_copies(tmp_path):
    pruner = lp.GradualMagnitudePruning(target_sparsity=0.5, sparsity_end_step=2, verbose=False)
    _, module = fit_tiny([pruner], tmp_path / "fit", precision="bf16-true", max_epochs=1,
                         limit_train_batches=3, limit_val_batches=0)
    half = timm.create_model("test_resnet", num_classes=10).half()
    for model, dtype in ((module, torch.bfloat16), (half, torch.float16)):
        assert next(model.parameters()).dtype == dtype
        example = torch.randn(2, 3, 32, 32, dtype=dtype)  # inputs in the model's dtype, as it was trained
        report = lp.export(model, tmp_path / "h.onnx", example, **QUICK)
        assert report.steps[0].startswith(f"cast {str(dtype)[6:]} -> float32") and report.max_rel_error < 1e-4
        assert next(model.parameters()).dtype == dtype  # the model itself is left as it was
        x = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            own = model.eval()(x.to(dtype)).float()
        assert _rel(_run_onnx(tmp_path / "h.onnx", x), own) < 0.05  # the half model, up to its rounding


def test_latency_is_thread_time_interleaved_and_median(tmp_path):
    lp.export(nn.Sequential(nn.Linear(8, 4)), tmp_path / "l.onnx", torch.randn(2, 8), benchmark=False)
    session = ort.InferenceSession(str(tmp_path / "l.onnx"), providers=["CPUExecutionProvider"])
    timed = onnx_latency({"a": session, "b": session}, {1: (torch.randn(1, 8),), 3: (torch.randn(3, 8),)},
                         repeats=3)
    assert set(timed) == {"a", "b"} and all(set(v) == {1, 3} for v in timed.values())
    assert all(ms >= 0 for v in timed.values() for ms in v.values())


class BatchDependent(nn.Module):
    """Python control flow on the batch size: the exported graph takes one batch size only."""

    def forward(self, x):
        return x * 2 if x.shape[0] == 2 else x * 3


class ExportsSomethingElse(nn.Module):
    """Computes another function while torch exports it (as code that special-cases tracing does)."""

    def forward(self, x):
        return x * 1.01 if torch.onnx.is_in_onnx_export() else x


def test_outputs_past_the_tolerance_are_a_clear_error(tmp_path):
    match = r"differ from the PyTorch model's by .* relative .* > rtol=0.0001.*HINT"
    with pytest.raises(lp.ExportError, match=match):
        lp.export(ExportsSomethingElse(), tmp_path / "bad.onnx", torch.randn(2, 4), batch_sizes=(3,),
                  benchmark=False)
    assert (tmp_path / "bad.onnx").exists()  # left for inspection


def test_a_graph_that_lost_the_dynamic_batch_is_a_clear_error(tmp_path):
    match = r"(?s)onnxruntime cannot run .* on a batch of 1.*dynamic_batch=False"
    with pytest.raises(lp.ExportError, match=match):
        lp.export(BatchDependent(), tmp_path / "b.onnx", torch.randn(2, 4), batch_sizes=(1,), benchmark=False)
    report = lp.export(BatchDependent(), tmp_path / "b.onnx", torch.randn(2, 4), dynamic_batch=False,
                       benchmark=False)
    assert report.checked_batches == [2] and report.max_rel_error == 0


def test_a_file_onnxruntime_cannot_load_is_a_clear_error(tmp_path):
    model = timm.create_model("test_resnet", num_classes=10).double()  # no float64 Conv on onnxruntime's CPU
    match = r"(?s)onnxruntime cannot load .*f64.onnx.*NOT_IMPLEMENTED.*HINT: .*float64.*\.float\(\)"
    with pytest.raises(lp.ExportError, match=match):
        lp.export(model, tmp_path / "f64.onnx", input_size=(3, 32, 32), benchmark=False)


def test_missing_onnxruntime_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(lp.MissingDependencyError,
                       match=r"needs `onnxruntime`.*HINT: pip install 'lightning-prune\[export\]'") as info:
        lp.export(nn.Linear(4, 2), tmp_path / "x.onnx", torch.randn(2, 4))
    assert isinstance(info.value, ImportError)
    monkeypatch.setitem(sys.modules, "onnx", None)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="1"):  # the command: one line on stderr, exit status 1
        main(["export", "--config", "recipes/digits/magnitude.yaml", "--ckpt_path", "x.ckpt"])
    assert "error: Exporting to ONNX needs `onnx`" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_sizes": []}, lp.InvalidArgumentError, r"`batch_sizes` must be a non-empty list"),
        ({"batch_sizes": (1, 0)}, lp.InvalidArgumentError, r"`batch_sizes` must be .* got \(1, 0\)"),
        ({"repeats": 0}, lp.InvalidArgumentError, r"`repeats` must be an integer >= 1, got 0"),
        ({"rtol": 0}, lp.InvalidArgumentError, r"`rtol` must be a number > 0"),
        ({"compress": 1}, lp.InvalidArgumentError, r"`compress` must be True or False"),
        ({"dynamo": "yes"}, lp.InvalidArgumentError, r"`dynamo` must be True or False"),
        ({"example_inputs": {"x": torch.randn(2, 4)}}, lp.InvalidArgumentTypeError,
         r"`example_inputs` must be a tensor or a tuple of tensors"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, match):
    kwargs = {"example_inputs": torch.randn(2, 4), **kwargs}
    with pytest.raises(error, match=match):
        lp.export(nn.Linear(4, 2), tmp_path / "x.onnx", **kwargs)


def test_a_model_that_is_not_a_module(tmp_path):
    with pytest.raises(lp.InvalidArgumentTypeError, match=r"`model` must be an nn.Module, got dict"):
        lp.export({}, tmp_path / "x.onnx")


# ---------------------------------------------------------------------------------------------- restore_run
def _fit_with_checkpoint(tmp_path, callback_factory, model_name="test_resnet"):
    """The uninterrupted run (the model as training left it), and the path of its last checkpoint."""
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", save_top_k=1)
    _, model = fit_tiny([callback_factory(), saver], tmp_path / "fit", model=tiny_classifier(model_name),
                        **FIT)
    return model.eval(), tmp_path / "ckpt" / "last.ckpt"


def _same_outputs(a, b):
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    return ya.shape == yb.shape and _rel(yb, ya) < 1e-5


def test_restore_a_gate_run_finalises_and_compresses_as_the_end_of_training_does(tmp_path):
    def make():  # finalised and compressed at the end: the last checkpoint is from before; restore_run has no
        # training data to recalibrate the BatchNorms with, so the fit does not either (docs/deploy.md)
        return lp.GroupLassoPruning(target_flops=0.5, finalize_step=1.0, compress=True, verbose=False,
                                    recalibrate_bn_batches=0)

    trained, ckpt = _fit_with_checkpoint(tmp_path, make)
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    assert not next(iter(state.values()))["finalized"]
    run = lp.restore_run(ckpt, tiny_classifier(), [make()])
    try:
        assert [s.split(" ")[0] for s in run.steps] == ["restored", "finalised", "compressed:"]
        assert sum(p.numel() for p in run.module.parameters()) == sum(p.numel() for p in trained.parameters())
        assert _same_outputs(trained, run.module)
        report = lp.export(run.module, tmp_path / "gl.onnx", input_size=(3, 32, 32),
                           dense=tiny_classifier(), **QUICK)
        assert report.params < report.dense_params and report.flops <= 0.55 * report.dense_flops
    finally:
        run.close()


def test_restore_a_run_compressed_inside_the_fit_onto_a_fresh_module(tmp_path):
    def make():
        return lp.GroupLassoPruning(target_flops=0.5, finalize_step=4, compress=True, verbose=False)

    trained, ckpt = _fit_with_checkpoint(tmp_path, make)
    run = lp.restore_run(ckpt, tiny_classifier(), [make()])
    assert _same_outputs(trained, run.module)
    assert len(run.steps) == 1  # restored: nothing left to finalise or compress
    run.close()
    alone = lp.restore_run(ckpt, tiny_classifier())  # without the callbacks: the recorded removal applies
    assert _same_outputs(trained, alone.module)


def test_restore_an_activation_decay_run_fuses_it(tmp_path):
    def make():
        return lp.ActivationDecay(end_step=0.5, fuse_on_train_end=True, verbose=False)

    trained, ckpt = _fit_with_checkpoint(tmp_path, make, "test_efficientnet")
    run = lp.restore_run(ckpt, tiny_classifier("test_efficientnet"), [make()])
    assert run.steps[-1].startswith("fused:")
    assert _same_outputs(trained, run.module)
    other = lp.ActivationDecay(end_step=1.0, verbose=False)  # another schedule: another run's state key
    with pytest.warns(UserWarning, match=r"holds no state for ActivationDecay.*starts from nothing"), \
            pytest.raises(lp.CompressionError, match=r"λ < 1"):  # so λ is 0: fusing would change the outputs
        lp.restore_run(ckpt, tiny_classifier("test_efficientnet"), [other], fuse=True)


def test_restore_a_magnitude_run_and_bad_inputs(tmp_path):
    def make():
        return lp.GradualMagnitudePruning(target_sparsity=0.8, every_n_steps=2, sparsity_end_step=4,
                                          verbose=False)

    trained, ckpt = _fit_with_checkpoint(tmp_path, make)
    run = lp.restore_run(ckpt, tiny_classifier(), [make()])
    restored = run.module.state_dict()
    assert all(torch.equal(v, restored[k]) for k, v in trained.state_dict().items())
    assert run.callbacks[0].masks.sparsity() == pytest.approx(0.8, abs=0.01)
    with pytest.raises(lp.InvalidArgumentTypeError, match=r"`module` must be the run's LightningModule"):
        lp.restore_run(ckpt, timm.create_model("test_resnet"))
    torch.save({"weights": 1}, tmp_path / "not.ckpt")
    with pytest.raises(lp.InvalidArgumentError, match=r"is not a Lightning checkpoint"):
        lp.restore_run(tmp_path / "not.ckpt", tiny_classifier())


def test_a_checkpoint_that_needs_pickle_loads_only_when_asked(tmp_path):
    from fractions import Fraction

    module = tiny_classifier()
    payload = {"state_dict": module.state_dict(), "callbacks": {}, "note": Fraction(1, 2)}  # not a tensor
    torch.save(payload, tmp_path / "p.ckpt")
    with pytest.raises(lp.UnsafeFileError, match=r"p.ckpt holds Python objects .*fractions.Fraction"):
        lp.restore_run(tmp_path / "p.ckpt", tiny_classifier())
    run = lp.restore_run(tmp_path / "p.ckpt", tiny_classifier(), weights_only=False)
    assert _same_outputs(module, run.module)
    run.close()


# ---------------------------------------------------------------------------------------------- the command
def _config(tmp_path, callback: dict) -> str:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "logger": False,
                    "callbacks": [callback]},
        "model": {"class_path": "lightning_prune.ImageClassifier",
                  "init_args": {"model_name": "test_resnet", "num_classes": 10, "optimizer": "sgd",
                                "lr": 0.05, "scheduler": "none", "weight_decay": 0.0}},
        "data": {"class_path": "lightning_prune.DigitsDataModule",
                 "init_args": {"batch_size": 32, "limit": 320}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def test_the_export_command_restores_finalises_compresses_and_proves(tmp_path, capsys):
    args = {"target_flops": 0.5, "finalize_step": 1.0, "compress": True, "verbose": False,
            "recalibrate_bn_batches": 0}  # restore_run cannot recalibrate: no training data (docs/deploy.md)
    trained, ckpt = _fit_with_checkpoint(tmp_path, lambda: lp.GroupLassoPruning(**args))
    config = _config(tmp_path, {"class_path": "lightning_prune.GroupLassoPruning", "init_args": args})
    out = tmp_path / "out"
    main(["export", "--config", config, "--ckpt_path", str(ckpt), "--export.output", str(out / "m.onnx"),
          "--export.batch_sizes", "[1, 4]", "--export.repeats", "1", "--export.sparse_output",
          str(out / "m.sparse.pt"), "--export.report", str(out / "report.json")])
    printed = capsys.readouterr().out
    assert "max error vs PyTorch" in printed and "finalised GroupLassoPruning" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["max_rel_error"] < 1e-4 and report["checked_batches"] == [1, 2, 4]
    assert report["params"] == sum(p.numel() for p in trained.model.parameters()) < report["dense_params"]
    assert set(report["latency_ratio"]) == {"1", "4"} and not report["same_graph"]
    x = torch.randn(5, 3, 32, 32)
    assert _rel(_run_onnx(out / "m.onnx", x), trained(x)) < 1e-4  # the end of training, in onnxruntime
    small = lp.load_sparse(out / "m.sparse.pt", timm.create_model("test_resnet", num_classes=10))
    assert _same_outputs(trained.model, small)


def test_the_export_command_needs_a_checkpoint(tmp_path, capsys):
    config = _config(tmp_path, {"class_path": "lightning_prune.GradualMagnitudePruning"})
    with pytest.raises(SystemExit) as exited:
        main(["export", "--config", config])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "lightning-prune: error: `lightning-prune export` needs `--ckpt_path`")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU path runs for real on a GPU")
def test_the_semi_structured_gpu_benchmark_says_why_it_skips_and_exits_zero(capsys):
    import runpy
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "semi_structured_gpu.py"
    benchmark = runpy.run_path(str(script))
    assert benchmark["main"]([]) == 0
    assert "2:4 semi-structured benchmark skipped: no CUDA GPU" in capsys.readouterr().out
