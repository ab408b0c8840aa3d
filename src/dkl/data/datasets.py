"""The data sets, by name, and what a model needs to know about each.

Every data set yields ``(image, label)`` with the image a float tensor **in [0, 1]**. Normalisation
is not done here: it lives inside the model (``dkl.models.with_normalization(model, mean, std)``,
the engine adds it from :class:`DataInfo` when ``model.normalize`` is true), so that adversarial
attacks and evaluation work in true pixel space and every recipe sees the same inputs.

- ``digits``: scikit-learn's ``load_digits`` (1,797 8×8 images, 10 classes, embedded, no download),
  pixels divided by 16, shaped (1, 8, 8), a fixed stratified split (1,347 train / 450 test,
  ``random_state=0``) that does not depend on the run's seed.
- ``cifar10`` / ``cifar100``: torchvision's loaders on ``root`` (``download`` honoured); train
  augmentation = random crop 32 with 4-pixel padding + horizontal flip.
- ``imagefolder``: ``root/train/<class>/*`` and ``root/val/<class>/*``; train = random resized crop
  + flip, val = resize to ``image_size / 0.875`` + centre crop.

Augmentation randomness is seeded per sample from ``(seed, epoch, index)`` (see
:class:`SeededDataset`), so the data a step sees depends only on the seed, the epoch and the step,
never on worker count or on where a run was interrupted: that is what makes resume exact.

>>> train, test, info = build_datasets("digits")
>>> len(train), len(test), info.num_classes, tuple(train[0][0].shape)
(1347, 450, 10, (1, 8, 8))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .seeding import mix_seed
from .transforms import crop_flip

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataInfo",
    "SeededDataset",
    "TensorImageDataset",
    "build_datasets",
    "raw_images",
]

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")

# per-channel mean and std of the training images, for in-model normalisation
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# the values mdistiller's CIFAR-100 teachers were trained with
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataInfo:
    """What a model needs to know about the data: classes, input shape, normalisation."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


class TensorImageDataset(Dataset):
    """Images and labels held in memory as tensors; ``__getitems__`` fetches a batch at once."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images and labels differ in length: {images.shape[0]} vs {labels.shape[0]}"
            )
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(idx, dtype=torch.long)
        return self.images[t], self.labels[t]


class SeededDataset(Dataset):
    """Wrap a data set whose transform draws from torch's global RNG (torchvision transforms).

    Each ``__getitem__`` runs under a forked RNG seeded with ``mix_seed(seed, epoch, index)``: the
    same sample in the same epoch always gets the same crop and flip, whichever worker loads it
    and however the run was interrupted. The caller's RNG state is left untouched.
    """

    def __init__(self, base: Dataset, seed: int = 0) -> None:
        self.base = base
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, self.epoch, i))
            return self.base[i]

    @property
    def targets(self):
        return getattr(self.base, "targets", None)


def raw_images(train_set: Any) -> tuple[Any, Any]:
    """The un-augmented images and labels behind one of :func:`build_datasets`' train sets.

    digits: ``(images, labels)`` tensors; CIFAR: torchvision's ``(data, targets)``, a ``uint8``
    array ``(N, 32, 32, 3)`` and a list of ints.

    >>> images, labels = raw_images(build_datasets("digits")[0])
    >>> tuple(images.shape), len(labels)
    ((1347, 1, 8, 8), 1347)
    """
    if hasattr(train_set, "images") and hasattr(train_set, "labels"):  # digits (tensors)
        return train_set.images, train_set.labels
    base = getattr(train_set, "base", train_set)  # SeededDataset around a torchvision set
    if hasattr(base, "data") and hasattr(base, "targets"):
        return base.data, base.targets
    raise ValueError(
        f"data set {type(base).__name__} exposes neither (images, labels) nor "
        f"(data, targets); supported: digits, cifar10, cifar100"
    )


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _digits(root: str, download: bool, augment: bool, seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float32).div_(16.0).reshape(-1, 1, 8, 8)
    y = torch.as_tensor(y, dtype=torch.long)
    # fixed split, independent of the run's seed, so every run is scored on the same 450 images
    tr, te = train_test_split(
        torch.arange(len(y)).numpy(), test_size=450, stratify=y.numpy(), random_state=0
    )
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    train = TensorImageDataset(x[tr].contiguous(), y[tr].contiguous())
    test = TensorImageDataset(x[te].contiguous(), y[te].contiguous())
    mean = (float(train.images.mean()),)
    std = (float(train.images.std()),)
    return train, test, DataInfo("digits", 10, (1, 8, 8), mean, std)


def _cifar(name: str, root: str, download: bool, augment: bool, seed: int):
    try:
        from torchvision import datasets, transforms
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(f"data '{name}' needs torchvision: pip install 'dkl[vision]'") from e

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    train_tf = [transforms.ToTensor()]
    if augment:
        train_tf = [*crop_flip(32, padding=4), transforms.ToTensor()]
    try:
        train = cls(root, train=True, download=download, transform=transforms.Compose(train_tf))
        test = cls(root, train=False, download=download, transform=transforms.ToTensor())
    except RuntimeError as e:
        raise FileNotFoundError(
            f"data '{name}' not found under '{root}' ({e}); set data.download=true or point "
            f"data.root at the folder that holds "
            f"{'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'}"
        ) from None
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    n_cls = 10 if name == "cifar10" else 100
    return SeededDataset(train, seed), test, DataInfo(name, n_cls, (3, 32, 32), mean, std)


def _imagefolder(root: str, download: bool, augment: bool, seed: int, image_size: int = 224):
    try:
        from torchvision import datasets, transforms
    except ImportError as e:  # pragma: no cover
        raise ImportError("data 'imagefolder' needs torchvision: pip install 'dkl[vision]'") from e
    for split in ("train", "val"):
        if not (Path(root) / split).is_dir():
            raise FileNotFoundError(
                f"data 'imagefolder': expected class folders under '{Path(root) / split}'"
            )
    if augment:
        train_tf = transforms.Compose(
            [
                transforms.RandomResizedCrop(image_size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
            ]
        )
    else:
        train_tf = transforms.Compose(
            [transforms.Resize((image_size, image_size)), transforms.ToTensor()]
        )
    val_tf = transforms.Compose(
        [
            transforms.Resize(round(image_size / 0.875)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
        ]
    )
    train = datasets.ImageFolder(str(Path(root) / "train"), transform=train_tf)
    val = datasets.ImageFolder(str(Path(root) / "val"), transform=val_tf)
    if train.classes != val.classes:
        raise ValueError(
            f"imagefolder: train and val class folders differ ({len(train.classes)} vs "
            f"{len(val.classes)} classes)"
        )
    info = DataInfo(
        "imagefolder", len(train.classes), (3, image_size, image_size), IMAGENET_MEAN, IMAGENET_STD
    )
    return SeededDataset(train, seed), val, info


def build_datasets(
    name: str = "digits",
    *,
    root: str = "data",
    download: bool = False,
    augment: bool = True,
    seed: int = 0,
    image_size: int = 224,
) -> tuple[Dataset, Dataset, DataInfo]:
    """Return ``(train, test, info)`` for a data set named in :data:`DATASETS`."""
    if name == "digits":
        return _digits(root, download, augment, seed)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, root, download, augment, seed)
    if name == "imagefolder":
        return _imagefolder(root, download, augment, seed, image_size)
    raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
