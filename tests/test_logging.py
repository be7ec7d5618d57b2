import csv
import json

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_prune import GradualMagnitudePruning
from lightning_prune.callbacks.logging import mask_image
from lightning_prune.testing import fit_tiny, read_wandb_offline_history

FAST = {"max_epochs": 2, "limit_train_batches": 4, "limit_val_batches": 1}


def _pruner(**kwargs):
    return GradualMagnitudePruning(target_sparsity=0.5, every_n_steps=2, sparsity_end_step=4, verbose=False,
                                   **kwargs)


def test_sparsity_goes_to_any_lightning_logger(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    fit_tiny([_pruner()], tmp_path, logger=logger, **FAST)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("prune/sparsity")]
    assert [int(r["step"]) for r in logged] == [2, 4, 6, 8]
    assert float(logged[-1]["prune/sparsity"]) == pytest.approx(0.5, abs=0.01)
    assert float(logged[-1]["prune/target_sparsity"]) == pytest.approx(0.5)
    per_layer = [k for k in rows[0] if k.startswith("prune/sparsity/model.")]
    assert "prune/sparsity/model.layer1.0.conv1.weight" in per_layer


@pytest.mark.parametrize(("every", "expected_images"), [(1, 2), (0, 1)])
def test_wandb_offline_run_gets_mask_images_histograms_and_table(tmp_path, every, expected_images):
    import wandb

    logger = WandbLogger(save_dir=str(tmp_path), project="lp-test", offline=True)
    pruner = _pruner(log_media_every_n_epochs=every)
    try:
        fit_tiny([pruner], tmp_path, logger=logger, **FAST)
    finally:
        wandb.finish()
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    layer = "model.layer1.0.conv1.weight"
    images = sorted((run_dir / "files/media/images/prune/mask").glob(f"{layer}_*.png"))
    # once per epoch, the end of training adding nothing the last epoch logged (same step, same masks);
    # or only at the end
    assert len(images) == expected_images
    steps = [int(image.name[len(layer) + 1:].split("_")[0]) for image in images]
    assert len(set(steps)) == len(steps), f"the same masks logged twice at step {steps}"
    tables = sorted((run_dir / "files/media/table/prune").glob("sparsity_table_*.table.json"))
    assert len(tables) == expected_images
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["layer", "params", "pruned", "sparsity"]
    row = next(r for r in table["data"] if r[0] == layer)
    assert row[3] == pytest.approx(row[2] / row[1]) == pytest.approx(pruner.masks.layer_sparsity()[layer])
    history = read_wandb_offline_history(run_dir)
    hist = [r for r in history if f"prune/weights/{layer}/_type" in r]
    assert len(hist) == expected_images and hist[-1][f"prune/weights/{layer}/_type"] == "histogram"
    scalars = [r["prune/sparsity"] for r in history if "prune/sparsity" in r]
    assert scalars and scalars[-1] == pytest.approx(0.5, abs=0.01)


def test_mask_image_is_white_where_kept_and_bounded():
    mask = torch.zeros(4, 2, 3, 3, dtype=torch.bool)
    mask[1] = True
    image = mask_image(mask)
    assert image.shape == (4, 18) and image.dtype == torch.uint8
    assert image[1].eq(255).all() and image[0].eq(0).all()
    assert max(mask_image(torch.ones(5000, 3000, dtype=torch.bool), max_side=1000).shape) <= 1000


def test_histograms_of_constant_or_empty_values_do_not_break_wandb(tmp_path):
    import wandb
    from lightning.pytorch import Trainer

    from lightning_prune.callbacks.logging import log_histograms

    logger = WandbLogger(save_dir=str(tmp_path), project="lp-test", offline=True)
    trainer = Trainer(logger=logger, enable_checkpointing=False, enable_progress_bar=False)
    try:
        log_histograms(trainer, {"ones": torch.ones(1000), "empty": torch.ones(0), "normal": torch.randn(50)})
    finally:
        wandb.finish()
    rows = read_wandb_offline_history(next((tmp_path / "wandb").glob("offline-run-*")))
    row = next(r for r in rows if "ones/_type" in r)
    assert row["ones/_type"] == "histogram" and "empty/_type" not in row and sum(row["ones/values"]) == 1000


def test_a_wandb_log_read_while_a_record_is_being_written_gives_the_whole_records_only(tmp_path):
    """W&B's service may still be writing when the offline log is read: a chunk shorter than its header
    says is the record in progress, not a record (it failed to parse, flakily, in the suite)."""
    import struct

    from lightning_prune.testing import _wandb_log_records

    whole = b"a whole record"
    data = (b":W&B" + struct.pack("<HB", 0xBEE1, 0) + struct.pack("<IHB", 0, len(whole), 1) + whole
            + struct.pack("<IHB", 0, 100, 1) + b"only ten b")
    path = tmp_path / "run-x.wandb"
    path.write_bytes(data)
    assert _wandb_log_records(path) == [whole]
