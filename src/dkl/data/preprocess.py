"""Preparing images for a model: channels, size, the augmentation policy, normalisation statistics.

One pipeline serves every data set whose samples are images (folders, NumPy arrays, Hugging Face
data sets, CIFAR, digits): a raw item (a PIL image, an array or a ``(C, H, W)`` tensor) is brought
to the run's channel count by :class:`PreparedImages`, then a torchvision transforms v2 pipeline
from :func:`image_transforms` resizes it, augments it (training only) and makes it a float tensor
in [0, 1]. Normalisation by the mean and std happens inside the model.

Policies (``data.augment``), at side ``s`` (``image_size``, or the stored size when 0):

======================  ================================================  =======================
policy                  training                                          evaluation
======================  ================================================  =======================
``none``                resize to s                                       resize to s
``crop_flip``           resize to s, random crop s after zero padding     resize to s
                        (``crop_padding``; -1: s / 8, 4 px at 32), flip
``random_resized_crop`` random crop of a share ``crop_scale`` of the       resize to s
                        area (aspect 3/4..4/3), resized to s, flip
``randaugment``         resize to s, flip, RandAugment(``ra_ops``,         resize to s
                        ``ra_magnitude``)
``imagenet``            random resized crop (0.08..1) to s, flip          resize to s / 0.875,
                                                                          centre crop s
======================  ================================================  =======================

The flip is horizontal with p = 1/2 and is dropped with ``flip=False`` (digits and text are not
mirror-symmetric). ``imagenet`` is the ImageNet recipe (s = 224 unless set): its evaluation crops
the centre 87.5 %, so only use it where training crops do the same on average; every other policy
evaluates on the whole image as ``none`` trains on it, so with ``none`` a training image and its
evaluation are the same tensor.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from dkl._files import atomic_write

__all__ = [
    "POLICIES",
    "PreparedImages",
    "channel_stats",
    "image_transforms",
    "stratified_split",
    "to_chw",
]

POLICIES = ("default", "none", "crop_flip", "random_resized_crop", "randaugment", "imagenet")
_GREY_MODES = ("1", "L", "LA", "I;16", "I;16L", "I;16B")
#: ImageNet evaluation: resize to size / 0.875, then centre crop (224 from 256)
IMAGENET_CROP = 0.875
#: ``auto`` statistics read at most this many training images, evenly spaced
STATS_MAX_IMAGES = 50_000


def image_transforms(
    policy: str,
    size: tuple[int, int],
    *,
    resize: bool = True,
    flip: bool = True,
    crop_padding: int = -1,
    crop_scale: Sequence[float] = (0.08, 1.0),
    ra_ops: int = 2,
    ra_magnitude: int = 9,
) -> tuple[Callable, Callable]:
    """``(train, eval)`` transforms v2 pipelines for ``policy`` at output size ``size = (H, W)``.

    Both take a PIL image, an ``(H, W, C)`` uint8 array or a ``(C, H, W)`` tensor and return a
    float32 ``(C, H, W)`` tensor in [0, 1]. ``resize=False`` leaves out the resize to ``size``
    (the images already have it). See the module docstring for the policies.

    >>> train, test = image_transforms("none", (4, 4))
    >>> x = torch.randint(0, 256, (1, 4, 4), dtype=torch.uint8)
    >>> torch.equal(train(x), test(x)), torch.allclose(test(x), x / 255)
    (True, True)
    """
    from torchvision.transforms import v2

    if policy not in POLICIES or policy == "default":
        raise ValueError(f"Expected an augmentation policy in {POLICIES[1:]}, got {policy!r}")
    h, w = size
    first = [v2.ToImage()]
    last = [v2.ToDtype(torch.float32, scale=True)]
    fit = [v2.Resize((h, w), antialias=True)] if resize else []
    mirror = [v2.RandomHorizontalFlip()] if flip else []
    test = v2.Compose([*first, *fit, *last])
    if policy == "none":
        return test, test
    if policy == "crop_flip":
        pad = max(1, round(min(h, w) / 8)) if crop_padding < 0 else int(crop_padding)
        train = [*fit, v2.RandomCrop((h, w), padding=pad), *mirror]
    elif policy == "random_resized_crop":
        scale = (float(crop_scale[0]), float(crop_scale[1]))
        train = [v2.RandomResizedCrop((h, w), scale=scale, antialias=True), *mirror]
    elif policy == "randaugment":
        train = [*fit, *mirror, v2.RandAugment(num_ops=ra_ops, magnitude=ra_magnitude)]
    else:  # imagenet
        train = [v2.RandomResizedCrop((h, w), antialias=True), *mirror]
        big = round(min(h, w) / IMAGENET_CROP)
        test = v2.Compose([*first, v2.Resize(big, antialias=True), v2.CenterCrop((h, w)), *last])
    return v2.Compose([*first, *train, *last]), test


# --------------------------------------------------------------------------------------------
# Raw items -> (C, H, W) at the run's channel count
# --------------------------------------------------------------------------------------------


def to_chw(x: Any, *, what: str = "image") -> Tensor:
    """A ``(C, H, W)`` tensor from one image: a torch tensor ``(C, H, W)`` or ``(H, W)``, or an
    array (NumPy, nested lists) ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` (C in 1, 3, 4; for
    arrays channels last wins when both ends could be channels). uint8 stays uint8, uint16
    becomes float32 divided by 65535, other integers (0..255) become uint8, floats become float32
    and must lie in [0, 1]; a 4th (alpha) channel is dropped.

    >>> to_chw(np.zeros((5, 6, 3), np.uint8)).shape
    torch.Size([3, 5, 6])
    >>> to_chw(torch.zeros(1, 4, 4)).shape
    torch.Size([1, 4, 4])
    """
    channels_last = not isinstance(x, Tensor)
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim == 2:
        t = t[None]
    elif channels_last and t.ndim == 3 and t.shape[-1] in (1, 3, 4):
        t = t.permute(2, 0, 1)
    elif not (t.ndim == 3 and t.shape[0] in (1, 3, 4)):
        layouts = "(H, W), (H, W, C) or (C, H, W)" if channels_last else "(H, W) or (C, H, W)"
        raise ValueError(
            f"{what}: expected an image laid out {layouts} with C in 1, 3, 4, got shape "
            f"{tuple(t.shape)}"
        )
    if t.shape[0] == 4:
        t = t[:3]
    return as_pixels(t, what)


def check_finite(t: Tensor, what: str = "images") -> None:
    """A ``ValueError`` naming ``what``, how many values and the index of the first when a
    floating-point ``t`` holds NaN or inf (with ``(image i)`` for a batch ``(N, C, H, W)``).

    >>> check_finite(torch.tensor([[0.5, float("nan")]]), "x")
    Traceback (most recent call last):
    ...
    ValueError: x: 1 value(s) are NaN or inf, the first at index (0, 1); clean or drop those images
    """
    if not t.is_floating_point() or t.numel() == 0:
        return
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return
    where = tuple(int(i) for i in (~finite).nonzero()[0])
    image = f" (image {where[0]})" if t.ndim == 4 else ""
    raise ValueError(
        f"{what}: {int((~finite).sum())} value(s) are NaN or inf, the first at index "
        f"{where}{image}; clean or drop those images"
    )


def as_pixels(t: Tensor, what: str = "image") -> Tensor:
    """``t`` as uint8 (uint8 and integers 0..255) or float32 (finite floats in [0, 1], and uint16
    divided by 65535, as 16-bit PNGs are read); anything else, a NaN or inf pixel or a value out
    of range, is a ``ValueError`` naming ``what`` (and the index of the first bad pixel).

    >>> as_pixels(torch.tensor([0, 65535], dtype=torch.uint16))
    tensor([0., 1.])
    """
    if t.dtype == torch.uint8:
        return t.contiguous()
    if t.dtype == torch.uint16:  # 16-bit images: the 0..65535 scale
        return t.to(torch.float32).div_(65535.0).contiguous()
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{what}: expected uint8, integer or float pixels, got {t.dtype}")
    if not t.is_floating_point():  # integers: the 0..255 scale of 8-bit images
        if t.numel() == 0:
            return t.to(torch.uint8).contiguous()
        a = t.detach().cpu().numpy()  # NumPy: torch has no min / max for uint32 and uint64
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            wide = "; 16-bit images: store them as uint16" if 0 <= lo and hi < 65536 else ""
            raise ValueError(f"{what}: integer pixels must lie in 0..255, got {lo}..{hi}{wide}")
        return t.to(torch.uint8).contiguous()
    t = t.float()
    if t.numel() == 0:
        return t.contiguous()
    check_finite(t, what)
    lo, hi = float(t.min()), float(t.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{what}: float pixels must lie in [0, 1], got [{lo:g}, {hi:g}]; store uint8 "
            f"(0..255) or divide by the maximum"
        )
    return t.contiguous()


def _is_pil(item: Any) -> bool:
    return type(item).__module__.startswith("PIL.") and hasattr(item, "getbands")


def _stored_channels(item: Any, what: str = "image") -> int:
    if _is_pil(item):
        return 1 if item.mode in _GREY_MODES else 3
    return int(to_chw(item, what=what).shape[0])


def _convert(item: Any, channels: int, what: str) -> Any:
    """``item`` with ``channels`` channels: PIL images are converted with PIL (palette, alpha and
    CMYK resolved the way PIL does it), arrays and tensors with the ITU-R 601 luma weights."""
    if _is_pil(item):
        if item.mode.startswith("I;16"):  # 16-bit grey: scale to [0, 1] rather than clip at 255
            t = torch.from_numpy(np.asarray(item, dtype=np.float32) / 65535.0)[None]
            return t.expand(3, -1, -1).contiguous() if channels == 3 else t
        if item.mode in ("I", "F"):
            raise ValueError(f"{what}: 32-bit images (PIL mode {item.mode}) are not supported")
        mode = "L" if channels == 1 else "RGB"
        return item if item.mode == mode else item.convert(mode)
    t = to_chw(item, what=what)
    if t.shape[0] == channels:
        return t
    if channels == 3:
        return t.expand(3, -1, -1).contiguous()
    from torchvision.transforms.v2 import functional as TF

    return TF.rgb_to_grayscale(t, num_output_channels=1)


def _size_of(item: Any) -> tuple[int, int]:
    if _is_pil(item):
        return item.height, item.width
    return int(item.shape[-2]), int(item.shape[-1])


class PreparedImages(Dataset):
    """``(transform(image), label)`` from a data set of raw ``(image, label)`` items.

    Each image is first brought to ``channels`` channels; with ``size`` set, an image of another
    size is an error naming it (set ``image_size`` to resize them all). The source may name its
    items for error messages with a ``describe(i)`` method (a file's path).

    ``data`` / ``targets`` are the source's (torchvision's CIFAR arrays), so that the adversarial
    second view and the semi-supervised views can start from the raw images.
    """

    def __init__(
        self,
        source: Any,
        transform: Callable,
        *,
        channels: int,
        size: tuple[int, int] | None = None,
    ) -> None:
        self.source = source
        self.transform = transform
        self.channels = int(channels)
        self.size = size

    def __len__(self) -> int:
        return len(self.source)

    def describe(self, i: int) -> str:
        describe = getattr(self.source, "describe", None)
        return describe(i) if describe is not None else f"item {i}"

    def raw(self, i: int) -> tuple[Any, int]:
        """Item ``i`` at the run's channel count, before the transform."""
        image, label = self.source[i]
        what = self.describe(i)
        image = _convert(image, self.channels, what)
        if self.size is not None and _size_of(image) != self.size:
            h, w = _size_of(image)
            raise ValueError(
                f"{what} is {h}×{w}, the first training image {self.size[0]}×{self.size[1]}: "
                f"set data.image_size to resize them all"
            )
        return image, int(label)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.raw(i)
        return self.transform(image), label

    def check(self) -> None:
        """Read every item as :meth:`raw` does (the file, its channels, its size), so that an
        unreadable or odd-sized image is an error now rather than when it is first used: the
        first bad one in order, read on a pool of threads (decoding releases the GIL, and
        ImageNet's 50,000 validation images would take minutes one by one)."""
        n = len(self)
        threads = min(16, os.cpu_count() or 1)
        if threads == 1 or n < 256 or self.data is not None:  # arrays in memory: no files
            for i in range(n):
                self.raw(i)
            return
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(self.raw, range(n)):
                pass

    @property
    def data(self) -> Any:
        return getattr(self.source, "data", None)

    @property
    def targets(self) -> Any:
        return getattr(self.source, "targets", None)


def probe(source: Any, channels: int, *, looks: int = 16) -> tuple[int, tuple[int, int]]:
    """``(channels, (H, W))`` of the images of ``source`` as the run will see them, from its
    first item. ``channels`` 0 means the data's own: 1 when ``looks`` evenly spaced items (the
    first included) are all grey (grey PIL modes, one-channel arrays), else 3."""
    n = len(source)
    if n == 0:
        raise ValueError("the training split is empty")
    describe = getattr(source, "describe", None)
    first = source[0][0]
    c = channels
    if not c:
        picks = sorted({0, *np.linspace(0, n - 1, min(looks, n)).round().astype(int).tolist()})
        c = max(
            _stored_channels(
                first if i == 0 else source[i][0], describe(i) if describe else f"item {i}"
            )
            for i in picks
        )
    return c, _size_of(_convert(first, c, describe(0) if describe else "item 0"))


# --------------------------------------------------------------------------------------------
# Statistics and splits
# --------------------------------------------------------------------------------------------


def channel_stats(
    dataset: Dataset, *, max_images: int = STATS_MAX_IMAGES, batch_size: int = 256
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of a data set of ``(image, label)`` float tensors,
    over every pixel, accumulated in float64. Data sets larger than ``max_images`` are read at
    ``max_images`` evenly spaced indices.

    >>> from dkl.data import TensorImageDataset
    >>> x = torch.tensor([0.0, 1.0]).repeat(2, 1, 1, 1).reshape(2, 1, 1, 2)
    >>> channel_stats(TensorImageDataset(x, torch.zeros(2)))
    ((0.5,), (0.5,))
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("cannot compute mean / std of an empty training split")
    idx = range(n) if n <= max_images else np.linspace(0, n - 1, max_images).round().astype(int)
    s1 = s2 = None
    count = 0
    batch: list[Tensor] = []

    def flush() -> None:
        nonlocal s1, s2, count
        x = torch.stack(batch).double()
        a, b = x.sum((0, 2, 3)), (x * x).sum((0, 2, 3))
        s1, s2 = (a, b) if s1 is None else (s1 + a, s2 + b)
        count += x.shape[0] * x.shape[2] * x.shape[3]
        batch.clear()

    for i in idx:
        batch.append(dataset[int(i)][0])
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    mean = s1 / count
    std = (s2 / count - mean * mean).clamp_min(0).sqrt()
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def cached_stats(
    dataset: Dataset, key: str, cache_dir: str | os.PathLike | None, *, channels: int = 0
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """:func:`channel_stats`, read from / written to ``<cache_dir>/data_stats.json`` when the
    file was written for the same ``key`` (:func:`~dkl.data.prepare_images` makes it of the data
    set, its root, channel count, length and content fingerprint, and the evaluation transform)
    and, with ``channels``, holds one value per channel. A channel that is constant over the
    training images gets std 1."""
    path = Path(cache_dir) / "data_stats.json" if cache_dir else None
    if path is not None and path.is_file():
        try:
            saved = json.loads(path.read_text())
            mean, std = tuple(map(float, saved["mean"])), tuple(map(float, saved["std"]))
            usable = (
                len(mean) == len(std) == (channels or len(mean)) > 0
                and all(math.isfinite(v) for v in (*mean, *std))
                and min(std) > 0
            )
            if saved.get("key") == key and usable:
                return mean, std
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # unreadable or edited into nonsense: computed again and rewritten
    mean, std = channel_stats(dataset)
    std = tuple(s if s > 0 else 1.0 for s in std)  # a constant channel: (x - mean) / 1 = 0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = (json.dumps({"key": key, "mean": mean, "std": std}, indent=1) + "\n").encode()
        atomic_write(path, lambda f: f.write(text), "data statistics")
    return mean, std


def stratified_split(
    labels: Sequence[int] | np.ndarray | Tensor, fraction: float, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` indices: from each class, ``round(n_c * fraction)`` images (at least one
    where the class has two or more) go to test, drawn with ``numpy.random.default_rng(seed)``
    class by class in label order; both index arrays are sorted.

    >>> tr, te = stratified_split([0, 0, 0, 0, 1, 1], 0.5)
    >>> len(tr), len(te), sorted(np.asarray([0, 0, 0, 0, 1, 1])[te].tolist())
    (3, 3, [0, 0, 1])
    """
    y = np.asarray(labels).reshape(-1)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"Expected a test fraction in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        k = round(len(members) * fraction)
        k = min(max(k, 1 if len(members) > 1 else 0), len(members) - 1)
        test.append(rng.permutation(members)[:k])
    te = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=int)
    tr = np.setdiff1d(np.arange(len(y)), te)
    return tr, te
