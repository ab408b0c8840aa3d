"""The data sets, by name, and what a model needs to know about each.

Every data set yields ``(image, label)`` with the image a float tensor **in [0, 1]**. Normalisation
is not done here: it lives inside the model (``dkl.models.with_normalization(model, mean, std)``,
the engine adds it from :class:`DataInfo` when ``model.normalize`` is true), so that adversarial
attacks and evaluation work in true pixel space and every recipe sees the same inputs.

Built in (:func:`list_datasets`; more with :func:`register_dataset`):

- ``digits``: scikit-learn's ``load_digits`` (1,797 8×8 images, 10 classes, embedded, no download),
  pixels divided by 16, shaped (1, 8, 8), a fixed stratified split (1,347 train / 450 test,
  ``random_state=0``) that does not depend on the run's seed. Standard augmentation: none.
- ``cifar10`` / ``cifar100``: torchvision's loaders on ``root`` (``download`` honoured); standard
  augmentation ``crop_flip`` (random crop 32 after 4-pixel zero padding + horizontal flip).
- ``imagefolder``, ``npz``, ``hf``: your own images (:mod:`dkl.data.sources`).

Preprocessing (channels, size, augmentation policy, mean / std) is the same for all of them; see
:mod:`dkl.data.preprocess`. Augmentation randomness is seeded per sample from
``(seed, epoch, index)`` (see :class:`SeededDataset`), so the data a step sees depends only on the
seed, the epoch and the step, never on worker count or on where a run was interrupted: that is
what makes resume exact.

>>> train, test, info = build_datasets("digits")
>>> len(train), len(test), info.num_classes, tuple(train[0][0].shape)
(1347, 450, 10, (1, 8, 8))
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .preprocess import (
    POLICIES,
    PreparedImages,
    cached_stats,
    check_finite,
    image_transforms,
    probe,
)
from .seeding import mix_seed

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataInfo",
    "DataRequest",
    "ImageSplits",
    "SeededDataset",
    "TensorImageDataset",
    "UnknownDatasetError",
    "build_datasets",
    "check_labels",
    "list_datasets",
    "prepare_images",
    "raw_images",
    "register_dataset",
]

#: the data sets dkl ships (more come from :func:`register_dataset`)
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "npz", "hf")

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
    classes: tuple[str, ...] = ()


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

    @property
    def targets(self) -> torch.Tensor:
        return self.labels


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
    node = train_set
    while node is not None:
        if hasattr(node, "images") and hasattr(node, "labels"):  # digits (tensors)
            return node.images, node.labels
        if getattr(node, "data", None) is not None and getattr(node, "targets", None) is not None:
            return node.data, node.targets  # torchvision's CIFAR
        node = getattr(node, "base", None) or getattr(node, "source", None)
    raise ValueError(
        f"data set {type(getattr(train_set, 'base', train_set)).__name__} exposes neither "
        f"(images, labels) nor (data, targets); supported: digits, cifar10, cifar100"
    )


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataRequest:
    """What a run asks of its data: the ``data`` section of the config (less the batching), the
    run's ``seed`` and the folder where computed statistics are cached. A builder registered with
    :func:`register_dataset` receives one; most only read ``root`` and ``options``."""

    name: str = "digits"
    root: str = "data"
    download: bool = False
    seed: int = 0
    image_size: int = 0
    channels: int = 0
    augment: str = "default"
    flip: bool = True
    crop_padding: int = -1
    crop_scale: tuple[float, float] = (0.08, 1.0)
    ra_ops: int = 2
    ra_magnitude: int = 9
    mean: Any = "default"
    std: Any = "default"
    val_fraction: float = 0.2
    options: dict = field(default_factory=dict)
    cache_dir: str | None = None
    #: read every test image before training (an evaluation reads them once anyway)
    check_test: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.augment, bool):  # the v0.1 switch
            object.__setattr__(self, "augment", "default" if self.augment else "none")
        if self.augment not in POLICIES:
            raise ValueError(
                f"data.augment: expected one of {', '.join(POLICIES)}, got {self.augment!r}"
            )
        if self.channels not in (0, 1, 3):
            raise ValueError(f"data.channels: expected 0, 1 or 3, got {self.channels!r}")
        object.__setattr__(self, "crop_scale", tuple(float(v) for v in self.crop_scale))


@dataclass
class ImageSplits:
    """What a builder may return instead of finished data sets: raw ``(image, label)`` items,
    which :func:`prepare_images` brings to the requested channels, size, augmentation and
    statistics.

    ``train`` / ``test``: map-style data sets of ``(image, label)``; an image is a PIL image, an
    array or tensor ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` (uint8 0..255 or float in [0, 1]).
    ``classes``: the class names, or their number. ``mean`` / ``std``: the data set's published
    statistics (used for ``mean: default``; ``None``: computed). ``augment``: the policy
    ``augment: default`` means. A split may have a ``fingerprint()`` method returning a cheap
    digest of its content (file sizes and times): the computed statistics are cached under it, so
    a split whose images changed gets them computed again.
    """

    train: Any
    test: Any
    classes: Sequence[str] | int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: str = "none"


Builder = Callable[[DataRequest], "ImageSplits | tuple[Dataset, Dataset, DataInfo]"]
_REGISTRY: dict[str, Builder] = {}


class UnknownDatasetError(ValueError):
    """``data.name`` is neither built in nor registered."""


def register_dataset(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``fn(request: DataRequest)`` as data set ``name``.

    The builder returns an :class:`ImageSplits` of raw items (dkl then applies the run's
    channels, size, augmentation and statistics) or a finished ``(train, test, DataInfo)``.
    Registering a taken name is an error.

    >>> @register_dataset("doc_pairs")
    ... def doc_pairs(request):
    ...     items = [(torch.full((1, 2, 2), i / 3), i % 2) for i in range(4)]
    ...     return ImageSplits(train=items, test=items, classes=["even", "odd"])
    >>> train, test, info = build_datasets("doc_pairs", mean=[0.5], std=[0.25])
    >>> info.num_classes, info.input_shape, info.classes
    (2, (1, 2, 2), ('even', 'odd'))
    >>> del _REGISTRY["doc_pairs"]  # keep the doctest out of the real registry
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Expected a non-empty data set name, got {name!r}")

    def decorator(fn: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"data set {name!r} is already registered by {_REGISTRY[name]!r}")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_datasets() -> list[str]:
    """The names :func:`build_datasets` knows: the built-in ones and those registered."""
    return sorted(_REGISTRY)


def _unknown(name: str) -> str:
    extra = sorted(set(_REGISTRY) - set(DATASETS))
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
    return (
        f"unknown data set {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; built in: "
        f"{', '.join(DATASETS)}; registered: {', '.join(extra) or 'none'} "
        f"(dkl.data.register_dataset adds one)"
    )


def build_datasets(name: str = "digits", **options: Any) -> tuple[Dataset, Dataset, DataInfo]:
    """Return ``(train, test, info)`` for the data set ``name``.

    ``options`` are the fields of :class:`DataRequest` (``root``, ``download``, ``seed``,
    ``image_size``, ``channels``, ``augment``, ``mean``, ``std``, ``cache_dir``...);
    ``augment=True`` / ``False`` mean ``"default"`` / ``"none"``.
    """
    if name not in _REGISTRY:
        raise UnknownDatasetError(_unknown(name))
    request = DataRequest(name=name, **options)
    out = _REGISTRY[name](request)
    if isinstance(out, ImageSplits):
        return prepare_images(out, request)
    if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], DataInfo)):
        raise TypeError(
            f"data set {name!r}: the builder must return ImageSplits or (train, test, DataInfo), "
            f"got {type(out).__name__}"
        )
    return out


# --------------------------------------------------------------------------------------------
# From raw items to data sets
# --------------------------------------------------------------------------------------------


def _labels_of(split: Any) -> np.ndarray | None:
    """The labels of a raw split (its ``targets``, or the second entry of each item of a list);
    ``None`` when they cannot be had without reading every image."""
    labels = getattr(split, "targets", None)
    if labels is None and isinstance(split, (list, tuple)):
        labels = [item[1] for item in split]
    if labels is None:
        return None
    if torch.is_tensor(labels):
        labels = labels.detach().cpu().numpy()
    try:
        out = np.asarray(labels).reshape(-1)
    except (TypeError, ValueError):
        return None
    return out if out.dtype.kind in "iu" else None


def _listing(values: Sequence[Any], names: Sequence[str] = (), show: int = 10) -> str:
    items = [f"{v} ({names[v]!r})" if names and 0 <= v < len(names) else str(v) for v in values]
    more = f", ... (+{len(items) - show} more)" if len(items) > show else ""
    return ", ".join(items[:show]) + more


def check_labels(
    name: str,
    train: Any,
    test: Any,
    num_classes: int,
    classes: Sequence[str] = (),
    *,
    complete: bool = True,
) -> None:
    """The labels of a classification data set are 0..C-1 with C >= 2 and, with ``complete``,
    every class in the training split; a label outside 0..C-1 in either split is an error too.
    Each error is one line saying which labels are missing or extra and how to renumber them.
    (The published data sets, CIFAR and digits, are complete by construction: they skip that
    check, so a few of their images make a valid test fixture.)

    >>> check_labels("mine", [(0, 0), (0, 2)], [], 3)
    Traceback (most recent call last):
    ...
    ValueError: data 'mine': labels must be 0..2, each with training images; class 1 has none (labels present: 0, 2); renumber the labels 0..K-1 (numpy: y = np.unique(y, return_inverse=True)[1]) or name only the classes you have
    """
    remap = "renumber the labels 0..K-1 (numpy: y = np.unique(y, return_inverse=True)[1])"
    if num_classes < 2:
        listed = f" ({', '.join(map(repr, classes))})" if classes else ""
        raise ValueError(
            f"data '{name}': {num_classes} class{'' if num_classes == 1 else 'es'}{listed}; a classifier needs at least 2 (with "
            f"one, every prediction is right and accuracy means nothing)"
        )
    y_train = _labels_of(train)
    for split, y in (("training", y_train), ("test", _labels_of(test))):
        if y is None or not len(y):
            continue
        present = np.unique(y)
        extra = [int(v) for v in present if not 0 <= v < num_classes]
        if extra:
            raise ValueError(
                f"data '{name}': {split} labels {_listing(extra)} lie outside 0..{num_classes - 1}"
                f" ({num_classes} classes); {remap}"
            )
    if y_train is None or not complete:
        return
    present = [int(v) for v in np.unique(y_train)]  # sorted, all in 0..C-1 by now
    n_missing = num_classes - len(present)
    if n_missing:
        first, have, i = [], set(present), 0
        while len(first) < 10 and i < num_classes:  # the first few, without a set of all C
            if i not in have:
                first.append(i)
            i += 1
        listed = _listing(first, classes) + (
            f", ... (+{n_missing - len(first)} more)" if n_missing > len(first) else ""
        )
        which, verb = ("class", "has") if n_missing == 1 else ("classes", "have")
        raise ValueError(
            f"data '{name}': labels must be 0..{num_classes - 1}, each with training images; "
            f"{which} {listed} {verb} none (labels present: {_listing(present)}); {remap} or "
            f"name only the classes you have"
        )


def prepare_images(splits: ImageSplits, request: DataRequest) -> tuple[Dataset, Dataset, DataInfo]:
    """Apply ``request``'s channels, size, augmentation policy and statistics to raw splits.

    The train split is wrapped in :class:`SeededDataset` when its transform is random. A
    :class:`TensorImageDataset` of float images that needs no change at all is returned as it
    is (batched fetches).
    """
    r = request
    for label, split in (("training", splits.train), ("test", splits.test)):
        if isinstance(split, TensorImageDataset):  # a tensor-backed split may skip as_pixels
            check_finite(split.images, f"data '{r.name}': {label} images")
    channels, stored = probe(splits.train, r.channels)
    policy = splits.augment if r.augment == "default" else r.augment
    side = r.image_size or (224 if policy == "imagenet" else 0)
    size = (side, side) if side else stored
    resize = bool(side)
    train_tf, eval_tf = image_transforms(
        policy, size, resize=resize, flip=r.flip, crop_padding=r.crop_padding,
        crop_scale=r.crop_scale, ra_ops=r.ra_ops, ra_magnitude=r.ra_magnitude,
    )  # fmt: skip
    check = None if resize else stored
    classes = tuple(str(c) for c in splits.classes) if not isinstance(splits.classes, int) else ()
    num_classes = len(classes) if not isinstance(splits.classes, int) else int(splits.classes)
    published = r.name in ("digits", "cifar10", "cifar100")
    check_labels(r.name, splits.train, splits.test, num_classes, classes, complete=not published)
    as_is = (
        policy == "none"
        and not resize
        and all(
            isinstance(s, TensorImageDataset)
            and s.images.is_floating_point()
            and s.images.ndim == 4
            and s.images.shape[1] == channels
            for s in (splits.train, splits.test)
        )
    )
    if as_is:
        train, test = splits.train, splits.test
        stats_set = splits.train
    else:
        prepared = PreparedImages(splits.train, train_tf, channels=channels, size=check)
        train = prepared if policy == "none" else SeededDataset(prepared, r.seed)
        test = PreparedImages(splits.test, eval_tf, channels=channels, size=check)
        # a bad test image would otherwise stop the run at its first evaluation, after a whole
        # epoch and before anything of it is saved: read them all now, as training reads its own
        if r.check_test:
            test.check()
        stats_set = PreparedImages(splits.train, eval_tf, channels=channels, size=check)
    root = r.root if not r.root else str(Path(r.root).expanduser().resolve())

    def key() -> str:  # only built when the statistics are computed or read back
        return (
            f"{r.name}|{root}|{channels}|{len(stats_set)}|{_fingerprint(splits.train)}|{eval_tf!r}"
        )

    mean, std = _statistics(r, splits, channels, stats_set, key)
    info = DataInfo(r.name, num_classes, (channels, *size), mean, std, classes)
    return train, test, info


def _fixed(key: str, value: Any, channels: int) -> tuple[float, ...] | None:
    """A mean or std the request fixes (a list or ``imagenet``); ``None`` for default / auto."""
    if isinstance(value, str):
        if value == "imagenet":
            if channels != 3:
                raise ValueError(
                    f"data.{key}=imagenet: ImageNet's values are for 3 channels, the images have "
                    f"{channels}; set data.channels=3 or data.{key}=auto"
                )
            return IMAGENET_MEAN if key == "mean" else IMAGENET_STD
        if value not in ("default", "auto"):
            raise ValueError(
                f"data.{key}: expected a list, default, auto or imagenet, got {value!r}"
            )
        return None
    values = tuple(float(v) for v in value)
    if len(values) != channels:
        raise ValueError(
            f"data.{key}: {len(values)} value(s) for images with {channels} channel(s)"
        )
    return values


def _fingerprint(split: Any) -> str:
    """A cheap digest of a raw split's content, part of the key of the cached mean / std: the
    split's own ``fingerprint()`` (folders: each file's size and modification time), else a hash
    of its in-memory images and labels; ``""`` when it has neither (a list of items).

    >>> x = TensorImageDataset(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]))
    >>> _fingerprint(x) == _fingerprint(TensorImageDataset(torch.ones(2, 1, 2, 2), x.labels))
    False
    """
    own = getattr(split, "fingerprint", None)
    if callable(own):
        return str(own())
    if isinstance(split, TensorImageDataset):
        arrays = (split.images, split.labels)
    elif isinstance(getattr(split, "data", None), (np.ndarray, torch.Tensor)):
        arrays = (split.data, getattr(split, "targets", None))  # torchvision's CIFAR
    else:
        return ""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        if a is None:
            continue
        t = torch.as_tensor(np.asarray(a) if isinstance(a, list) else a).detach().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _statistics(
    r: DataRequest, splits: ImageSplits, channels: int, stats_set: Any, key: Callable[[], str]
):
    out = {}
    for name, value, known in (("mean", r.mean, splits.mean), ("std", r.std, splits.std)):
        fixed = _fixed(name, value, channels)
        if fixed is None and value == "default" and known is not None and len(known) == channels:
            fixed = tuple(known)
        out[name] = fixed
    if out["mean"] is None or out["std"] is None:
        mean, std = cached_stats(stats_set, key(), r.cache_dir, channels=channels)
        out["mean"] = out["mean"] or mean
        out["std"] = out["std"] or std
    return out["mean"], out["std"]


# --------------------------------------------------------------------------------------------
# Built-in data sets: digits and CIFAR (imagefolder, npz and hf live in sources.py)
# --------------------------------------------------------------------------------------------


def no_options(name: str, request: DataRequest) -> None:
    """A source that takes no ``data.options`` refuses them rather than ignore them."""
    if request.options:
        raise ValueError(
            f"data '{name}' takes no data.options, got {sorted(request.options)}; remove them"
        )


@register_dataset("digits")
def _digits(request: DataRequest) -> ImageSplits:
    no_options("digits", request)
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
    return ImageSplits(train, test, [str(c) for c in range(10)], mean, std)


def _cifar(request: DataRequest) -> ImageSplits:
    name, root = request.name, request.root
    no_options(name, request)
    try:
        from torchvision import datasets
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(f"data '{name}' needs torchvision: pip install 'dkl[vision]'") from e

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        train = cls(root, train=True, download=request.download)
        test = cls(root, train=False, download=request.download)
    except RuntimeError as e:
        raise FileNotFoundError(
            f"data '{name}' not found under '{root}' ({e}); set data.download=true or point "
            f"data.root at the folder that holds "
            f"{'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'}"
        ) from None
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    return ImageSplits(train, test, list(train.classes), mean, std, augment="crop_flip")


register_dataset("cifar10")(_cifar)
register_dataset("cifar100")(_cifar)
