"""Test helpers for callback authors: a tiny real training run and the conformance check.

A plugin's test suite imports :func:`check_callback_conformance` to prove that its callback behaves like
the built-ins: constructible, picklable (DDP spawn), fits real Lightning steps on a tiny timm model,
keeps the model a plain model, and resumes from a mid-training checkpoint to exactly the same result.

Example::

    from lightning_prune.testing import check_callback_conformance

    def test_my_callback(tmp_path):
        check_callback_conformance(lambda: MyPruning(amount=0.5), tmp_path)
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import timm
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn

from lightning_prune.training.data import DigitsDataModule
from lightning_prune.training.models import ImageClassifier

__all__ = [
    "TINY_MODELS",
    "assert_state_equal",
    "check_callback_conformance",
    "check_mid_epoch_resume",
    "classifier_around",
    "fit_tiny",
    "read_wandb_offline_history",
    "tiny_classifier",
    "tiny_datamodule",
]

#: timm's tiny test models, one per family, with the arguments that make them take 32x32 digits.
TINY_MODELS: dict[str, dict[str, Any]] = {
    "test_resnet": {},
    "test_efficientnet": {},
    "test_convnext": {},
    "test_vit": {"img_size": 32},
}


def tiny_classifier(model_name: str = "test_resnet", **kwargs: Any) -> ImageClassifier:
    """An ImageClassifier around one of timm's ``test_*`` models, sized for 32x32 digits."""
    model_kwargs = {**TINY_MODELS.get(model_name, {}), **kwargs.pop("model_kwargs", {})}
    defaults = {"optimizer": "sgd", "lr": 0.05, "scheduler": "none", "weight_decay": 0.0}
    return ImageClassifier(model_name, num_classes=10, model_kwargs=model_kwargs, **{**defaults, **kwargs})


def classifier_around(net: nn.Module, input_size: Sequence[int] = (3, 32, 32), **kwargs: Any
                      ) -> ImageClassifier:
    """:func:`tiny_classifier`'s LightningModule holding ``net`` (a hand-written model) instead of a timm one;
    its ``example_input_array`` (a batch of 2 zeros of ``input_size``) says the input, which timm's config
    says for timm's models."""
    module = tiny_classifier("test_resnet", **kwargs)
    module.model = net
    module.example_input_array = torch.zeros(2, *input_size)
    return module


def tiny_datamodule(limit: int = 320, batch_size: int = 32, **kwargs: Any) -> DigitsDataModule:
    """The digits data, cut to ``limit`` images (split 70/15/15)."""
    return DigitsDataModule(batch_size=batch_size, limit=limit, **kwargs)


def fit_tiny(
    callbacks: Sequence[Callback],
    root: str | Path,
    model: pl.LightningModule | None = None,
    datamodule: pl.LightningDataModule | None = None,
    ckpt_path: str | Path | None = None,
    seed: int = 0,
    **trainer_kwargs: Any,
) -> tuple[pl.Trainer, pl.LightningModule]:
    """Seeded ``trainer.fit`` on CPU with the tiny model and data; returns the trainer and the module."""
    pl.seed_everything(seed, verbose=False)
    model = model if model is not None else tiny_classifier()
    datamodule = datamodule if datamodule is not None else tiny_datamodule()
    options: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "max_epochs": 2, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root),
        "num_sanity_val_steps": 0, "deterministic": True,
    }
    options.update(trainer_kwargs)
    if any(isinstance(cb, ModelCheckpoint) for cb in callbacks):
        options["enable_checkpointing"] = True
    trainer = pl.Trainer(callbacks=list(callbacks), **options)
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    return trainer, model


def assert_state_equal(a: Any, b: Any, path: str = "state") -> None:
    """Recursive equality of callback states (tensors compared exactly)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        assert isinstance(a, Tensor) and isinstance(b, Tensor), f"{path}: {type(a)} vs {type(b)}"
        assert a.shape == b.shape and a.dtype == b.dtype, (
            f"{path}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}")
        assert torch.equal(a.cpu(), b.cpu()), f"{path}: tensors differ"
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_state_equal(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _assert_plain_state(value: Any, path: str = "state") -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            assert isinstance(k, (str, int)), f"{path}: key {k!r} is not a str or int"
            _assert_plain_state(v, f"{path}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _assert_plain_state(v, f"{path}[{i}]")
    else:
        assert value is None or isinstance(value, (Tensor, bool, int, float, str)), (
            f"{path}: {type(value).__name__} is not a tensor or Python scalar")


def check_callback_conformance(
    make_callback: Callable[[], Callback],
    tmp_path: str | Path,
    model_name: str = "test_resnet",
    max_epochs: int = 3,
    resume_epoch: int = 1,
    limit_train_batches: int = 4,
    plain_model: bool = True,
) -> dict[str, Any]:
    """Check the contract every lightning-prune callback keeps; raises ``AssertionError`` on a breach.

    1. ``make_callback()`` returns a picklable ``Callback`` with a string ``state_key``.
    2. It fits ``max_epochs`` real epochs on a tiny timm model; its ``state_dict`` holds only tensors and
       Python scalars.
    3. With ``plain_model``: the model's ``state_dict`` has exactly the keys of a fresh model and loads into
       a fresh ``timm.create_model`` (strict).
    4. It did something: the fitted weights differ from those of the same seeded fit without the callback (a
       callback that never acts fails here; give ``max_epochs`` long enough for its schedule).
    5. Resuming from the checkpoint of epoch ``resume_epoch`` (a fresh model and a fresh callback) ends with
       the same weights and the same callback state as the uninterrupted run.

    Returns:
        the uninterrupted run's callback state.
    """
    root = Path(tmp_path)
    callback = make_callback()
    assert isinstance(callback, Callback), f"{type(callback).__name__} is not a lightning Callback"
    assert isinstance(callback.state_key, str)
    pickle.loads(pickle.dumps(callback))  # ddp_spawn pickles callbacks

    common = {"max_epochs": max_epochs, "limit_train_batches": limit_train_batches, "limit_val_batches": 2}
    saver = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    _, full_model = fit_tiny([callback, saver], root / "full", model=_seeded_classifier(model_name), **common)
    full_state = callback.state_dict()
    _assert_plain_state(full_state)

    if plain_model:
        fresh = tiny_classifier(model_name)
        assert set(full_model.state_dict()) == set(fresh.state_dict()), (
            "the callback changed the model's keys")
        inner = {k.removeprefix("model."): v for k, v in full_model.state_dict().items()
                 if k.startswith("model.")}
        timm_model = timm.create_model(model_name, num_classes=10, **TINY_MODELS.get(model_name, {}))
        timm_model.load_state_dict(inner, strict=True)

    reference = _reference_weights(model_name, root / "reference", common)
    differs = [k for k, v in full_model.state_dict().items()
               if k in reference and not torch.equal(v, reference[k])]
    assert differs, (
        f"{type(callback).__name__} changed nothing: after {max_epochs} epochs the weights equal those of the"
        " same fit without it. HINT: a schedule that acts later than the fit ends? Pass a longer max_epochs.")

    ckpt = root / "ckpt" / f"epoch={resume_epoch - 1}.ckpt"
    assert ckpt.exists(), f"no checkpoint at {ckpt}"
    resumed_cb = make_callback()
    _, resumed_model = fit_tiny([resumed_cb], root / "resumed", model=tiny_classifier(model_name),
                                ckpt_path=ckpt, **common)
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), f"resumed run differs from the uninterrupted one at {name}"
    assert_state_equal(full_state, resumed_cb.state_dict())
    return full_state


def check_mid_epoch_resume(
    make_callback: Callable[[], Callback | Sequence[Callback]],
    tmp_path: str | Path,
    model_name: str = "test_resnet",
    max_epochs: int = 3,
    limit_train_batches: int = 4,
    resume_step: int = 6,
    make_model: Callable[[], pl.LightningModule] | None = None,
    make_strategy: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Resume from a checkpoint taken in the middle of an epoch ends exactly like the uninterrupted run.

    The uninterrupted fit saves checkpoints with ``ModelCheckpoint(every_n_train_steps=resume_step)``; a fresh
    model and fresh callbacks resume from the one of step ``resume_step`` (which must not be a
    multiple of ``limit_train_batches``: that would be an epoch boundary) and must end with the same weights
    and the same state of every callback. ``make_callback`` may return one callback or several;
    ``make_strategy`` makes each fit's Trainer strategy (default: one CPU device).

    Returns:
        the uninterrupted run's state of the (first) callback.
    """
    assert resume_step % limit_train_batches, "resume_step lies on an epoch boundary"
    root = Path(tmp_path)

    def build() -> tuple[list[Callback], pl.LightningModule]:
        made = make_callback()
        callbacks = [made] if isinstance(made, Callback) else list(made)
        pl.seed_everything(0, verbose=False)
        return callbacks, make_model() if make_model is not None else tiny_classifier(model_name)

    common = {"max_epochs": max_epochs, "limit_train_batches": limit_train_batches, "limit_val_batches": 2}
    strategy = (lambda: {"strategy": make_strategy()}) if make_strategy is not None else dict
    callbacks, model = build()
    saver = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_train_steps=resume_step,
                            filename="{step}")
    _, full_model = fit_tiny([*callbacks, saver], root / "full", model=model, **common, **strategy())
    ckpt = root / "ckpt" / f"step={resume_step}.ckpt"
    assert ckpt.exists(), f"no checkpoint at {ckpt}"
    resumed_callbacks, resumed_model = build()
    _, resumed_model = fit_tiny(resumed_callbacks, root / "resumed", model=resumed_model, ckpt_path=ckpt,
                                **common, **strategy())
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert a.shape == b.shape and torch.equal(a, b), (
            f"resumed from step {resume_step} (mid-epoch), the run differs from the uninterrupted one at"
            f" {name}")
    for a_cb, b_cb in zip(callbacks, resumed_callbacks):
        assert_state_equal(a_cb.state_dict(), b_cb.state_dict(), f"{type(a_cb).__name__}.state")
    return callbacks[0].state_dict()


_REFERENCES: dict[tuple[Any, ...], dict[str, Tensor]] = {}


def _seeded_classifier(model_name: str, seed: int = 0) -> pl.LightningModule:
    """The tiny classifier with the same initial weights every time (seeded before it is built)."""
    pl.seed_everything(seed, verbose=False)
    return tiny_classifier(model_name)


def _reference_weights(model_name: str, root: Path, common: Mapping[str, Any]) -> dict[str, Tensor]:
    """The weights of the seeded tiny fit without any callback (cached per configuration in this process)."""
    key = (model_name, *sorted(common.items()))
    if key not in _REFERENCES:
        _, model = fit_tiny([], root, model=_seeded_classifier(model_name), **common)
        _REFERENCES[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return _REFERENCES[key]


def _wandb_log_records(path: Path) -> list[bytes]:
    import struct

    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written: the records before it are whole
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        # full/first start a record, middle/last extend it
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def read_wandb_offline_history(run_dir: str | Path, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The history rows (``run.log`` calls) of a finished offline W&B run, read from its ``run-*.wandb`` file.

    The file is a LevelDB-style log of protobuf ``Record`` messages: a 7-byte header (``:W&B``, magic,
    version), then 32 KiB blocks of chunks, each with a 7-byte header (checksum, length, type:
    full/first/middle/last). W&B's service may still be writing after ``wandb.finish()`` returns, so this
    waits (up to ``timeout`` seconds) for the run's ``exit`` record, reading again when it catches a record
    half-written (a chunk shorter than its header says, or bytes that do not parse yet). Values are decoded
    JSON; a histogram ``h`` logged under ``key`` appears as ``key/_type == "histogram"``, ``key/values``,
    ``key/bins``.
    """
    import json
    import time

    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    files = sorted(Path(run_dir).glob("**/run-*.wandb"))
    assert files, f"no run-*.wandb file under {run_dir}"
    deadline = time.monotonic() + timeout
    while True:
        records = []
        try:
            for raw in _wandb_log_records(files[-1]):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(raw)
                records.append(record)
        except DecodeError:  # read while the service was writing a record: read again (a torn write)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return [
        {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
