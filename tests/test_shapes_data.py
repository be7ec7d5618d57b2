"""The procedural shapes benchmark: deterministic, balanced, disjoint splits, trainable, resumable."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_prune as lp
from lightning_prune.testing import fit_tiny
from lightning_prune.training.shapes import SHAPE_CLASSES, render_shapes

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"train_size": 120, "val_size": 40, "test_size": 60}


def _digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def test_render_is_a_function_of_the_seed_only():
    labels = np.arange(520) % 10  # two random streams (chunks of 512)
    first = render_shapes(labels, (3, 0), difficulty=0.7)
    assert first.dtype == np.uint8 and first.shape == (520, 3, 32, 32)
    assert np.array_equal(render_shapes(labels, (3, 0), difficulty=0.7), first)
    assert not np.array_equal(first[512:], first[:8])  # the second stream is not the first again
    assert not np.array_equal(render_shapes(labels[:20], (4, 0), difficulty=0.7), first[:20])
    assert not np.array_equal(render_shapes(labels[:20], (3, 0), difficulty=0.6), first[:20])


def test_render_is_the_same_in_another_process_with_another_thread_count():
    labels = np.arange(64) % 10
    code = ("import hashlib, numpy as np;"
            "from lightning_prune.training.shapes import render_shapes;"
            "print(hashlib.sha256(render_shapes(np.arange(64) % 10, (0, 2), 0.5).tobytes()).hexdigest())")
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                           timeout=120)
    assert other.stdout.strip() == _digest(render_shapes(labels, (0, 2), 0.5))


def test_difficulty_zero_is_one_clean_shape_on_a_plain_background():
    image = render_shapes(np.array([SHAPE_CLASSES.index("square")]), 0, difficulty=0.0)[0]
    corner_colour = image[:, 0, 0]
    background = (image == corner_colour[:, None, None]).all(0)
    assert 0.1 < 1 - background.mean() < 0.9  # the shape, and a flat background around it
    assert len(np.unique(image.reshape(3, -1), axis=1)) < 100  # no noise: the shape's edge only
    with pytest.raises(ValueError, match="difficulty"):
        render_shapes(np.array([0]), 0, difficulty=1.5)


def test_splits_have_the_promised_shapes_types_and_balanced_classes():
    dm = lp.ShapesDataModule(batch_size=16, **SMALL)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (120, 40, 60)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert -2.5 < float(x.min()) and float(x.max()) < 2.5  # standardised [0, 1]
    for split, size in zip(("train", "val", "test"), (120, 40, 60)):
        images, labels = dm.split_tensors(split)
        assert images.dtype == torch.uint8 and images.shape == (size, 3, 32, 32)
        assert torch.bincount(labels, minlength=10).tolist() == [size // 10] * 10
    assert lp.ShapesDataModule.num_classes == len(SHAPE_CLASSES) == 10


def test_splits_are_deterministic_and_disjoint_and_the_test_set_ignores_train_size():
    dm = lp.ShapesDataModule(**SMALL)
    digests = {split: {_digest(image.numpy()) for image in dm.split_tensors(split)[0]}
               for split in ("train", "val", "test")}
    assert len(digests["train"]) == 120 and len(digests["test"]) == 60  # no image twice
    assert digests["train"].isdisjoint(digests["val"]) and digests["train"].isdisjoint(digests["test"])
    assert digests["val"].isdisjoint(digests["test"])
    bigger = lp.ShapesDataModule(**{**SMALL, "train_size": 200})
    assert torch.equal(bigger.split_tensors("test")[0], dm.split_tensors("test")[0])
    assert torch.equal(bigger.split_tensors("train")[0][:120], dm.split_tensors("train")[0])
    other = lp.ShapesDataModule(**SMALL, data_seed=1)
    assert not torch.equal(other.split_tensors("test")[0], dm.split_tensors("test")[0])


def test_training_loader_resumes_mid_epoch():
    def loader():
        dm = lp.ShapesDataModule(batch_size=32, seed=5, **SMALL)
        dm.setup("fit")
        return dm

    full = [y.tolist() for _, y in loader().train_dataloader()]
    first = loader()
    batches = iter(first.train_dataloader())
    assert [next(batches)[1].tolist() for _ in range(2)] == full[:2]
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert [y.tolist() for _, y in resumed.train_dataloader()] == full[2:]


def test_one_epoch_fit_of_a_tiny_timm_model(tmp_path):
    model = lp.ImageClassifier("test_resnet", num_classes=10)
    dm = lp.ShapesDataModule(batch_size=32, **SMALL)
    trainer, _ = fit_tiny([], tmp_path, model=model, datamodule=dm, max_epochs=1)
    assert trainer.global_step == 4 and "val/acc" in trainer.callback_metrics
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert 0.0 <= float(trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]) <= 1.0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"batch_size": 0}, "`batch_size` must be >= 1"),
    ({"test_size": 0}, "`test_size` must be an int >= 1"),
    ({"train_size": 10.5}, "`train_size` must be an int >= 1"),
    ({"difficulty": 1.2}, r"`difficulty` must be a number in \[0, 1\]"),
    ({"difficulty": "hard"}, r"`difficulty` must be a number in \[0, 1\]"),
    ({"image_size": 4}, "`image_size` must be an int >= 8"),
])
def test_bad_shapes_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        lp.ShapesDataModule(**kwargs)
