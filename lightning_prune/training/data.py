"""Data modules for the recipes: the embedded digits set and the procedural shapes benchmark (both offline)
and CIFAR-10 (torchvision download)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "EpochShuffleSampler", "ResumableDataLoader",
           "ShapesDataModule"]


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch from ``seed + epoch``: reproducible, and exact after a resume.

    Lightning calls ``set_epoch`` at the start of every epoch, so a run resumed from a checkpoint sees the
    same batches as an uninterrupted one.
    """

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class _SkippingIndexSampler:
    """The loader's index sampler, which skips the batches a resumed pass has already served (indices only:
    no sample is loaded for them)."""

    def __init__(self, loader: ResumableDataLoader, base: Iterable[Any]) -> None:
        self.loader, self.base = loader, base

    def __iter__(self) -> Iterator[Any]:
        loader = self.loader
        epoch = loader._sampler_epoch()
        skip = 0
        if loader._resume is not None:
            saved_epoch, saved_batches = loader._resume
            loader._resume = None
            if saved_epoch is None or saved_epoch == epoch:
                skip = saved_batches
        loader._pass_epoch, loader._served = epoch, skip
        iterator = iter(self.base)
        for _ in range(skip):
            if next(iterator, None) is None:
                break
        yield from iterator

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning checkpoints and restores in the middle of an epoch.

    Lightning saves the ``state_dict()`` of a training dataloader that has ``state_dict``/``load_state_dict``
    (``fit_loop.state_dict()["combined_loader"]``) and loads it before the resumed epoch starts. The state is
    the epoch of the current pass (the sampler's ``epoch``, which Lightning sets through ``set_epoch``) and
    the batches already served to the training loop; a resumed pass of the same epoch skips those batches
    by index (without loading them), so with a sampler whose order depends only on its seed and epoch
    (:class:`EpochShuffleSampler`, ``DistributedSampler``) the run sees exactly the batches of an
    uninterrupted one. A state whose epoch differs from the resumed pass (saved at the end of an epoch) is
    dropped.

    Example::

        sampler = EpochShuffleSampler(len(dataset), seed=0)
        loader = ResumableDataLoader(dataset, batch_size=32, sampler=sampler)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._pass_epoch: int | None = None
        self._resume: tuple[int | None, int] | None = None

    def _sampler_epoch(self) -> int | None:
        epoch = getattr(self.sampler, "epoch", None)
        if epoch is None and self.batch_sampler is not None:
            epoch = getattr(getattr(self.batch_sampler, "sampler", None), "epoch", None)
        return int(epoch) if isinstance(epoch, int) else None

    @property
    def _index_sampler(self) -> Any:
        return _SkippingIndexSampler(self, super()._index_sampler)

    def __iter__(self) -> Iterator[Any]:
        return self._counted(super().__iter__())

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch": epoch of the current pass (or None), "batches": batches served in it}``."""
        epoch = self._pass_epoch if self._pass_epoch is not None else self._sampler_epoch()
        return {"epoch": epoch, "batches": int(self._served)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        epoch = state_dict.get("epoch")
        self._resume = (None if epoch is None else int(epoch), int(state_dict.get("batches", 0)))
        if epoch is not None and hasattr(self.sampler, "set_epoch"):
            # workers fetch indices as soon as the iterator exists, before Lightning sets the epoch
            self.sampler.set_epoch(int(epoch))


def _split(n: int, fractions: tuple[float, float], seed: int) -> tuple[list[int], list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val, n_test = int(round(n * fractions[0])), int(round(n * fractions[1]))
    return order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test]


class _LoaderMixin:
    batch_size: int
    num_workers: int
    seed: int
    train_set: Dataset
    val_set: Dataset
    test_set: Dataset

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        if not train:
            return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                              drop_last=False, persistent_workers=self.num_workers > 0)
        sampler = EpochShuffleSampler(len(dataset), self.seed)  # type: ignore[arg-type]
        loader = ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                                     num_workers=self.num_workers, drop_last=False,
                                     persistent_workers=self.num_workers > 0)
        pending = getattr(self, "_pending_train_state", None)
        if pending is not None:
            loader.load_state_dict(pending)
            self._pending_train_state = None
        self._train_loader = loader
        return loader

    # The training loader's position also travels in the data module's own state: Lightning restores the
    # data module before it builds the loader, whereas its own restore of the loader's state is skipped when
    # something asked for `trainer.estimated_stepping_batches` before the loops were restored (a schedule
    # resolved at `on_fit_start`, OneCycleLR in `configure_optimizers`; Lightning issue #20550).
    def state_dict(self) -> dict[str, Any]:
        loader = getattr(self, "_train_loader", None)
        return {"train_loader": loader.state_dict()} if loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_train_state = state_dict.get("train_loader")

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)


class DigitsDataModule(_LoaderMixin, pl.LightningDataModule):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes) as 3x32x32 tensors.

    No network: the data ships inside scikit-learn. Images are scaled to [0, 1], resized to ``image_size``
    (bilinear), repeated over 3 channels and standardised; train/val/test come from a fixed seeded split.

    Args:
        batch_size: samples per batch.
        image_size: side of the square images fed to the model.
        val_fraction, test_fraction: parts of the 1,797 images held out (defaults 15% each).
        seed: seeds the split and the per-epoch shuffling.
        num_workers: DataLoader workers.
        limit: use only the first ``limit`` images (tests).
    """

    num_classes = 10

    def __init__(self, batch_size: int = 64, image_size: int = 32, val_fraction: float = 0.15,
                 test_fraction: float = 0.15, seed: int = 0, num_workers: int = 0,
                 limit: int | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise MisconfigurationException(f"`batch_size` must be >= 1, got {batch_size}.")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise MisconfigurationException(
                f"`val_fraction` ({val_fraction}) and `test_fraction` ({test_fraction}) must be in (0, 1)"
                " and leave room for training data.")
        self.save_hyperparameters()
        self.batch_size, self.image_size = batch_size, image_size
        self.seed, self.num_workers = seed, num_workers
        self.val_fraction, self.test_fraction, self.limit = val_fraction, test_fraction, limit

    def _tensors(self) -> tuple[Tensor, Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        if self.limit is not None:
            images, labels = images[: self.limit], labels[: self.limit]
        if self.image_size != 8:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        images = (images - images.mean()) / images.std()
        return images.repeat(1, 3, 1, 1), labels

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        images, labels = self._tensors()
        full = TensorDataset(images, labels)
        train, val, test = _split(len(full), (self.val_fraction, self.test_fraction), self.seed)
        self.train_set, self.val_set = Subset(full, train), Subset(full, val)
        self.test_set = Subset(full, test)


class _ImageTensorDataset(Dataset):
    """``uint8`` images ``(n, 3, h, w)`` served as standardised ``float32`` tensors, with ``long`` labels."""

    def __init__(self, images: Tensor, labels: Tensor, mean: float, std: float) -> None:
        self.images, self.labels, self.mean, self.std = images, labels, mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return (self.images[index].float() / 255.0 - self.mean) / self.std, self.labels[index]


#: the splits made so far in this process, by (data_seed, split, size, difficulty, image_size)
_SHAPES_CACHE: dict[tuple[int, int, int, float, int], tuple[Tensor, Tensor]] = {}
_SPLITS = ("train", "val", "test")


def _shapes_split(data_seed: int, split: int, size: int, difficulty: float,
                  image_size: int) -> tuple[Tensor, Tensor]:
    key = (data_seed, split, size, difficulty, image_size)
    if key not in _SHAPES_CACHE:
        import numpy as np

        from lightning_prune.training.shapes import SHAPE_CLASSES, SHAPES_CHUNK, render_shapes

        # whole random streams, so that a smaller split is the start of a larger one
        labels = np.arange(-(-size // SHAPES_CHUNK) * SHAPES_CHUNK, dtype=np.int64) % len(SHAPE_CLASSES)
        images = render_shapes(labels, (data_seed, split), difficulty, image_size)[:size]
        _SHAPES_CACHE[key] = (torch.from_numpy(images).clone(), torch.from_numpy(labels[:size]).clone())
    return _SHAPES_CACHE[key]


class ShapesDataModule(_LoaderMixin, pl.LightningDataModule):
    """A procedural 10-class benchmark of 32x32 RGB images, made from a seed in seconds (no download).

    Each image shows one shape whose kind is the label (disk, ring, square, frame, triangle, plus, star, pair
    of disks, crescent, three bars; :data:`~lightning_prune.training.shapes.SHAPE_CLASSES`), at a random
    position, scale and rotation, in random colours (a minimum contrast with the background, no link to the
    label), with a random stripe texture, on a background with a gradient and a grating, among smaller
    distractor shapes of every kind (some occluding it), thin lines and pixel noise. ``difficulty`` scales
    all these nuisances together. It is a test bench on which a few CPU minutes of training leave dense
    ``resnet18`` well short of 100% (``benchmarks/results/shapes.md``), so that pruning methods can differ; it
    is not a substitute for CIFAR-10 or ImageNet.

    The three splits come from independent random streams of ``data_seed`` (so the test set does not change
    with ``train_size``, and a smaller split is the start of a larger one), each with the classes in equal
    numbers (``i % 10`` for image ``i``); images are made with NumPy on one thread and kept as ``uint8``,
    identical on every run, rank and thread count, and kept in memory for the process (a second data module
    with the same arguments reuses them). Images are scaled to
    [0, 1] and standardised with fixed statistics (mean 0.5, sd 0.29); there is no augmentation (fresh data is
    cheap: raise ``train_size``). The training loader resumes mid-epoch like :class:`DigitsDataModule`'s.

    Args:
        batch_size: samples per batch.
        train_size, val_size, test_size: images per split.
        difficulty: in [0, 1]; 0 is one large high-contrast shape on a plain background, 1 adds smaller
            shapes, lower contrast, textures, up to five distractors and four lines and more noise.
        data_seed: seeds the images (the same for every training seed of a benchmark).
        seed: seeds the per-epoch shuffling of the training set.
        image_size: side of the square images.
        num_workers: DataLoader workers.
    """

    num_classes = 10
    mean, std = 0.5, 0.29

    def __init__(self, batch_size: int = 64, train_size: int = 5000, val_size: int = 1000,
                 test_size: int = 2000, difficulty: float = 0.0, data_seed: int = 0, seed: int = 0,
                 image_size: int = 32, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise MisconfigurationException(f"`batch_size` must be >= 1, got {batch_size}.")
        for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MisconfigurationException(f"`{name}` must be an int >= 1, got {value!r}.")
        number = isinstance(difficulty, (int, float)) and not isinstance(difficulty, bool)
        if not number or not 0 <= difficulty <= 1:
            raise MisconfigurationException(f"`difficulty` must be a number in [0, 1], got {difficulty!r}.")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise MisconfigurationException(f"`image_size` must be an int >= 8, got {image_size!r}.")
        self.save_hyperparameters()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.seed, self.data_seed = seed, data_seed
        self.sizes = (train_size, val_size, test_size)
        self.difficulty, self.image_size = float(difficulty), image_size

    def split_tensors(self, split: str) -> tuple[Tensor, Tensor]:
        """The ``uint8`` images ``(n, 3, s, s)`` and ``long`` labels of ``split`` (``"train"``, ``"val"``,
        ``"test"``), before standardisation."""
        index = _SPLITS.index(split)
        return _shapes_split(self.data_seed, index, self.sizes[index], self.difficulty, self.image_size)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        train, val, test = (_ImageTensorDataset(*self.split_tensors(split), self.mean, self.std)
                            for split in _SPLITS)
        self.train_set, self.val_set, self.test_set = train, val, test


class CIFAR10DataModule(_LoaderMixin, pl.LightningDataModule):
    """CIFAR-10 through torchvision (downloaded into ``data_dir`` on first use), with the usual augmentation.

    Training images get a random 32x32 crop from a 4-pixel zero padding and a horizontal flip; all images
    are normalised with the CIFAR-10 channel statistics. ``val_size`` images of the training set (a fixed
    seeded choice) form the validation set; the official test set is the test set.

    Args:
        data_dir: where the data set lives or is downloaded to.
        batch_size, num_workers, seed: as usual.
        val_size: training images held out for validation.
        download: fetch the data when it is missing.
    """

    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(self, data_dir: str = "./data", batch_size: int = 128, num_workers: int = 4,
                 val_size: int = 5000, seed: int = 0, download: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_dir, self.batch_size, self.num_workers = str(Path(data_dir)), batch_size, num_workers
        self.val_size, self.seed, self.download = val_size, seed, download

    def _transforms(self, train: bool):
        from torchvision import transforms as T

        steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
        return T.Compose([*steps, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def prepare_data(self) -> None:
        from torchvision.datasets import CIFAR10

        CIFAR10(self.data_dir, train=True, download=self.download)
        CIFAR10(self.data_dir, train=False, download=self.download)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        from torchvision.datasets import CIFAR10

        train_aug = CIFAR10(self.data_dir, train=True, transform=self._transforms(True))
        train_plain = CIFAR10(self.data_dir, train=True, transform=self._transforms(False))
        if not 0 < self.val_size < len(train_aug):
            raise MisconfigurationException(
                f"`val_size` must be in (0, {len(train_aug)}), got {self.val_size}.")
        order = torch.randperm(len(train_aug), generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.train_set = Subset(train_aug, order[self.val_size:])
        self.val_set = Subset(train_plain, order[: self.val_size])
        self.test_set = CIFAR10(self.data_dir, train=False, transform=self._transforms(False))
