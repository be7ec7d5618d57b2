import math
import pickle

import lightning.pytorch as pl
import pytest
import timm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_prune import DigitsDataModule, ImageClassifier
from lightning_prune.testing import fit_tiny
from lightning_prune.training.data import CIFAR10DataModule, EpochShuffleSampler
from tests.helpers import fake_cifar


def test_digits_are_offline_3x32x32_with_a_fixed_seeded_split():
    dm = DigitsDataModule(batch_size=16)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 1797
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.long and 0 <= int(y.min()) and int(y.max()) <= 9
    again = DigitsDataModule(batch_size=16)
    again.setup("fit")
    assert again.test_set.indices == dm.test_set.indices
    assert set(dm.train_set.indices).isdisjoint(dm.test_set.indices)
    other_seed = DigitsDataModule(seed=1)
    other_seed.setup("fit")
    assert other_seed.test_set.indices != dm.test_set.indices


def test_epoch_sampler_is_reproducible_per_epoch():
    sampler = EpochShuffleSampler(50, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first != second and sorted(second) == list(range(50))


def test_bad_data_arguments():
    with pytest.raises(MisconfigurationException, match="`batch_size` must be >= 1"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(MisconfigurationException, match="`val_fraction`"):
        DigitsDataModule(val_fraction=0.6, test_fraction=0.5)


def test_classifier_wraps_any_timm_model_and_trains(tmp_path):
    model = ImageClassifier("test_efficientnet", num_classes=10, optimizer="adamw", lr=1e-3,
                            scheduler="cosine")
    trainer, _ = fit_tiny([], tmp_path, model=model, max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    assert trainer.global_step == 3 and "val/acc" in trainer.callback_metrics
    assert all(k.startswith(("model.", "val_acc", "test_acc")) for k in model.state_dict())
    assert pickle.loads(pickle.dumps(model.hparams))["model_name"] == "test_efficientnet"
    with pytest.raises(MisconfigurationException, match="`optimizer` must be one of"):
        ImageClassifier("test_resnet", optimizer="lion")
    with pytest.raises(MisconfigurationException, match="`scheduler` must be one of"):
        ImageClassifier("test_resnet", scheduler="poly")


class _LearningRates(pl.Callback):
    """The first parameter group's learning rate before every training step."""

    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("scheduler", ["cosine", "multistep", "none"])
def test_classifier_warmup_then_its_schedule_every_step(tmp_path, scheduler):
    """2 epochs of 4 steps, half an epoch of warm-up (2 steps): lr (s+1)/2 * 0.1, then the cosine over the 6
    steps left, the x0.1 at epoch 1 or the constant; a resumed fit goes on with the same rates."""
    make = lambda: ImageClassifier("test_resnet", num_classes=10, lr=0.1, scheduler=scheduler,  # noqa: E731
                                   milestones=[1], warmup_epochs=0.5)
    after = {"cosine": [0.05 * (1 + math.cos(math.pi * k / 6)) for k in range(6)],
             "multistep": [0.1, 0.1, 0.01, 0.01, 0.01, 0.01], "none": [0.1] * 6}[scheduler]
    probe, fit = _LearningRates(), {"max_epochs": 2, "limit_train_batches": 4, "limit_val_batches": 1}
    saving = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    fit_tiny([probe, saving], tmp_path, model=make(), **fit)
    assert probe.lrs == pytest.approx([0.05, 0.1] + after)
    resumed = _LearningRates()
    first_epoch = next((tmp_path / "ckpt").glob("epoch=0*.ckpt"))
    fit_tiny([resumed], tmp_path / "resumed", model=make(), ckpt_path=first_epoch, **fit)
    assert resumed.lrs == pytest.approx(probe.lrs[4:])


def test_classifier_warmup_needs_a_number_and_a_length_in_epochs(tmp_path):
    for bad in (-1, float("inf"), "1", True):
        with pytest.raises(MisconfigurationException, match="`warmup_epochs` must be a number >= 0"):
            ImageClassifier("test_resnet", warmup_epochs=bad)
    model = ImageClassifier("test_resnet", num_classes=10, warmup_epochs=1)
    with pytest.raises(MisconfigurationException, match="needs a finite training length in epochs"):
        fit_tiny([], tmp_path, model=model, max_epochs=-1, max_steps=3, limit_val_batches=0)


def test_classifier_head_starts_at_the_fan_in_scale():
    """timm's EfficientNet/MobileNet init scales the classifier by 1/sqrt(num_classes): with 10 classes the
    logits start ~10x too large (mobilenetv3 stayed at chance on ShapesDataModule); the default re-draws
    it."""
    torch.manual_seed(0)
    timm_head = ImageClassifier("test_efficientnet", num_classes=10, head_init="timm").model.get_classifier()
    head = ImageClassifier("test_efficientnet", num_classes=10).model.get_classifier()
    bound = head.in_features ** -0.5
    assert float(timm_head.weight.std()) > 2.5 * bound  # timm's: U(+-1/sqrt(10)), std 0.18
    assert float(head.weight.abs().max()) <= bound and float(head.weight.std()) > bound / 4
    torch.manual_seed(0)
    resnet = timm.create_model("test_resnet", num_classes=10).get_classifier().weight
    torch.manual_seed(0)
    ours = ImageClassifier("test_resnet", num_classes=10).model.get_classifier().weight
    assert torch.equal(resnet, ours)  # already at the fan-in scale: untouched
    with pytest.raises(MisconfigurationException, match="`head_init` must be one of"):
        ImageClassifier("test_resnet", head_init="zeros")


def test_classifier_stem_stride_and_zero_init_last_adapt_mobile_nets_to_small_images():
    """The recipe that makes mobilenetv3/efficientnet train from scratch on 32x32 shapes
    (benchmarks/results/shapes-mobile.md): a stride-1 stem, and every residual block the identity at init."""
    torch.manual_seed(0)
    plain = ImageClassifier("mobilenetv3_small_050").model
    model = ImageClassifier("mobilenetv3_small_050", stem_stride=1, zero_init_last=True)
    net = model.model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert net.conv_stem.stride == (1, 1) and plain.conv_stem.stride == (2, 2)
    assert net.forward_features(x).shape[-1] == 2 * plain.eval().forward_features(x).shape[-1]
    lasts = {b: getattr(b, "bn3", None) or b.bn2 for b in net.modules() if getattr(b, "has_skip", False)}
    assert lasts and all(float(bn.weight.abs().max()) == 0 for bn in lasts.values())
    for block, bn in lasts.items():
        inp = torch.randn(2, bn.num_features, 4, 4)
        assert torch.equal(block(inp), inp)  # every residual block starts as the identity
    rebuilt = ImageClassifier(**model.hparams).model  # what load_from_checkpoint builds
    assert rebuilt.conv_stem.stride == (1, 1)
    # channel slicing keeps the stride (the pruning callbacks' compression)
    from lightning_prune.graph import analyse_channels, slice_units

    group = next(g for g in analyse_channels(net, x).groups if g.size > 8)
    slice_units(net, [group], {group.name: [0, 1]})
    assert net.conv_stem.stride == (1, 1) and net(x).shape == (2, 10)
    with pytest.raises(MisconfigurationException, match="needs a model with a stem convolution `conv_stem`"):
        ImageClassifier("test_resnet", stem_stride=1)
    with pytest.raises(MisconfigurationException, match="found no residual block"):
        ImageClassifier("test_resnet", zero_init_last=True)
    with pytest.raises(MisconfigurationException, match="would zero trained weights"):
        ImageClassifier("mobilenetv3_small_050", pretrained=True, zero_init_last=True)
    with pytest.raises(MisconfigurationException, match="`stem_stride` must be None or an int >= 1"):
        ImageClassifier("test_efficientnet", stem_stride=0)


def test_cifar10_datamodule_on_small_local_data(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    fake_cifar(tmp_path)
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)  # the fake files' md5s differ
    monkeypatch.setattr(CIFAR10, "download",
                        lambda self: pytest.fail("must not download when data is present"))
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=8, num_workers=0, val_size=10, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50, 10, 20)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and abs(float(x.mean())) < 2
    model = ImageClassifier("test_resnet", num_classes=10, scheduler="none")
    trainer, _ = fit_tiny([], tmp_path, model=model, datamodule=dm, max_epochs=1, limit_val_batches=1)
    assert trainer.global_step == 7
    with pytest.raises(MisconfigurationException, match="`val_size`"):
        bad = CIFAR10DataModule(data_dir=str(tmp_path), val_size=0, download=False)
        bad.setup("fit")
