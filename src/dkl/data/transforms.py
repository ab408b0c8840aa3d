"""Augmentations: the CIFAR crop + flip, the semi-supervised weak / strong views, a second view.

Every view is a float tensor in [0, 1]: normalisation lives in the model.

- :func:`crop_flip`: random crop to ``size`` after padding by ``padding`` pixels, then a horizontal
  flip with probability 1/2. The CIFAR train transform and the adversarial second view use
  ``(32, 4, "constant")``; USB's weak view uses reflect padding of ``int(size * (1 - crop_ratio))``
  (4 pixels at 32 with ratio 0.875).
- Semi-supervised views. CIFAR-like images (``uint8`` arrays ``(N, H, W, 3)``), as in USB:
  weak = the reflect-padded crop + flip; strong = the weak transforms + USB's own RandAugment
  (3 ops, each with a random magnitude over its full range) and Cutout
  (:class:`~dkl.data.usb.UsbRandAugment`). Digits (float tensors ``(1, 8, 8)`` in
  [0, 1]): weak = a random shift of up to one pixel (zero fill; no flip, digits are not
  mirror-symmetric); strong = the weak shift + a random rotation (±20°) and scaling (0.85–1.15), a
  random 3×3 erase and Gaussian pixel noise (σ = 0.1), clamped to [0, 1]. :func:`build_views`
  picks the pair for a data set name.
- Second view for adversarial training (CIFAR): :func:`with_second_view` returns a copy of a train
  set whose samples are ``((basic, view), label)``, ``view`` = crop + flip + AutoAugment (the
  CIFAR-10 policy as the IKL-AT authors run it, :class:`~dkl.data.autoaugment.CIFAR10Policy`) or
  crop + flip + Cutout (16×16).

torchvision is imported only when a CIFAR transform is built (``pip install 'dkl[vision]'``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "SECOND_VIEWS",
    "Cutout",
    "DigitsStrong",
    "DigitsWeak",
    "TwoViews",
    "build_views",
    "cifar_strong",
    "cifar_weak",
    "crop_flip",
    "with_second_view",
]

SECOND_VIEWS = ("autoaugment", "cutout")


def crop_flip(size: int = 32, padding: int = 4, padding_mode: str = "constant") -> list:
    """``[RandomCrop(size, padding, padding_mode), RandomHorizontalFlip()]`` (torchvision)."""
    from torchvision import transforms as T

    return [
        T.RandomCrop(size, padding=padding, padding_mode=padding_mode),
        T.RandomHorizontalFlip(),
    ]


# --------------------------------------------------------------------------------------------
# Semi-supervised views: digits
# --------------------------------------------------------------------------------------------


def _check_digits(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim not in (3, 4):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"Expected an image tensor (C, H, W) or a batch (N, C, H, W), got {got}")
    return x[None] if x.ndim == 3 else x


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = (
    _signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
)


def _shr(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` keeps the sign)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 (wrapping)."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


class RowStreams:
    """One random stream per image, vectorised over the batch: the ``k``-th number of an image
    is splitmix64 of its (mixed) seed and ``k`` (counter-based), so it depends on that seed
    alone, not on the batch the image is in, its place there or the batch's size. One
    ``torch.Generator`` per image did the same at 2-5x the cost of a digits batch.

    >>> a = RowStreams(torch.tensor([7, 8])).rand((3,))
    >>> torch.equal(a[1], RowStreams(torch.tensor([8])).rand((3,))[0])
    True
    """

    def __init__(self, seeds: Tensor) -> None:
        # each seed mixed first: nearby seeds (consecutive draw numbers) would otherwise give
        # streams that are shifts of each other
        self.keys = _mix(seeds.to(torch.int64) * _GOLDEN)
        self.count = 0

    def __len__(self) -> int:
        return len(self.keys)

    def _uniform(self, k: int) -> Tensor:
        """``(n, k)`` float64 in [0, 1), the next ``k`` numbers of each stream."""
        counter = torch.arange(self.count + 1, self.count + k + 1, dtype=torch.int64)
        self.count += k
        z = _mix(self.keys[:, None] + counter * _GOLDEN)  # wraps modulo 2^64
        return _shr(z, 11).to(torch.float64) * 2.0**-53

    def rand(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        k = math.prod(shape)
        return self._uniform(k).reshape(len(self), *shape).to(dtype)

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        k = math.prod(shape)
        u = self._uniform(2 * k)  # Box-Muller: 1 - u in (0, 1] keeps the log finite
        z = torch.sqrt(-2.0 * torch.log1p(-u[:, :k])) * torch.cos(2 * math.pi * u[:, k:])
        return z.reshape(len(self), *shape).to(dtype)

    def randint(self, high: int, shape: tuple[int, ...]) -> Tensor:
        return (self.rand(shape, torch.float64) * high).long().clamp_(max=high - 1)


def _rand(n: int, shape: tuple[int, ...], generator: Any, dtype: torch.dtype) -> Tensor:
    if isinstance(generator, RowStreams):
        return generator.rand(shape, dtype)
    return torch.rand((n, *shape), generator=generator, dtype=dtype)


def _randn(n: int, shape: tuple[int, ...], generator: Any, dtype: torch.dtype) -> Tensor:
    if isinstance(generator, RowStreams):
        return generator.randn(shape, dtype)
    return torch.randn((n, *shape), generator=generator, dtype=dtype)


def _randint(high: int, n: int, shape: tuple[int, ...], generator: Any) -> Tensor:
    if isinstance(generator, RowStreams):
        return generator.randint(high, shape)
    return torch.randint(0, high, (n, *shape), generator=generator)


class DigitsWeak:
    """Random shift by up to ``max_shift`` pixels in each direction, zero fill.

    Works on one image ``(C, H, W)`` or a batch ``(N, C, H, W)`` (one shift per image), drawing
    from ``generator`` (default: torch's global RNG), or from :class:`RowStreams`, one stream
    per image.

    >>> x = torch.arange(9.0).reshape(1, 3, 3)
    >>> DigitsWeak()(x, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([1, 3, 3])
    """

    batched = True

    def __init__(self, max_shift: int = 1) -> None:
        self.max_shift = int(max_shift)

    def __call__(self, x: Tensor, generator: Any = None) -> Tensor:
        single = x.ndim == 3
        xb = _check_digits(x)
        s = self.max_shift
        n, _, h, w = xb.shape
        padded = F.pad(xb, (s, s, s, s))
        dy, dx = _randint(2 * s + 1, n, (2,), generator).T
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
        out = padded[
            torch.arange(n)[:, None, None, None],
            torch.arange(xb.shape[1])[None, :, None, None],
            rows,
            cols,
        ]
        return out[0] if single else out

    def __repr__(self) -> str:
        return f"DigitsWeak(max_shift={self.max_shift})"


class DigitsStrong:
    """The weak shift, then rotation + scaling, a random square erase and Gaussian noise."""

    batched = True

    def __init__(
        self,
        max_shift: int = 1,
        degrees: float = 20.0,
        scale: tuple[float, float] = (0.85, 1.15),
        erase: int = 3,
        noise: float = 0.1,
    ) -> None:
        self.weak = DigitsWeak(max_shift)
        self.degrees, self.scale, self.erase, self.noise = float(degrees), scale, int(erase), noise

    def __call__(self, x: Tensor, generator: Any = None) -> Tensor:
        single = x.ndim == 3
        xb = self.weak(_check_digits(x), generator=generator)
        n, c, h, w = xb.shape
        u = _rand(n, (2,), generator, xb.dtype).T
        angle = (u[0] * 2 - 1) * math.radians(self.degrees)
        s = self.scale[0] + u[1] * (self.scale[1] - self.scale[0])
        cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
        zero = torch.zeros_like(cos)
        theta = torch.stack(
            [torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1
        )
        grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
        xb = F.grid_sample(xb, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.erase > 0:
            i = _randint(h - self.erase + 1, n, (), generator)
            j = _randint(w - self.erase + 1, n, (), generator)
            r, q = torch.arange(h), torch.arange(w)
            in_r = (r[None] >= i[:, None]) & (r[None] < i[:, None] + self.erase)  # (N, H)
            in_c = (q[None] >= j[:, None]) & (q[None] < j[:, None] + self.erase)  # (N, W)
            xb = xb.masked_fill((in_r[:, :, None] & in_c[:, None, :])[:, None], 0.0)
        if self.noise > 0:
            xb = xb + self.noise * _randn(n, tuple(xb.shape[1:]), generator, xb.dtype)
        xb = xb.clamp(0.0, 1.0)
        return xb[0] if single else xb

    def __repr__(self) -> str:
        return (
            f"DigitsStrong(max_shift={self.weak.max_shift}, degrees={self.degrees}, "
            f"scale={self.scale}, erase={self.erase}, noise={self.noise})"
        )


# --------------------------------------------------------------------------------------------
# Semi-supervised views: CIFAR (USB)
# --------------------------------------------------------------------------------------------


def _usb_crop_flip(size: int, crop_ratio: float) -> list:
    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"Expected crop_ratio in (0, 1], got {crop_ratio}")
    return crop_flip(size, padding=int(size * (1.0 - crop_ratio)), padding_mode="reflect")


def cifar_weak(size: int = 32, crop_ratio: float = 0.875) -> Callable:
    """USB's weak view for 32×32 images: reflect-padded random crop + flip, to a [0, 1] tensor."""
    from torchvision import transforms as T

    return T.Compose([*_usb_crop_flip(size, crop_ratio), T.ToTensor()])


def cifar_strong(size: int = 32, crop_ratio: float = 0.875, num_ops: int = 3) -> Callable:
    """USB's strong view: the weak transforms + USB's RandAugment(``num_ops``) and Cutout
    (:class:`~dkl.data.usb.UsbRandAugment`), to a [0, 1] tensor."""
    from torchvision import transforms as T

    from .usb import UsbRandAugment

    return T.Compose([*_usb_crop_flip(size, crop_ratio), UsbRandAugment(num_ops), T.ToTensor()])


def build_views(
    data_name: str,
    *,
    crop_ratio: float = 0.875,
    randaugment_ops: int = 3,
) -> tuple[Callable, Callable]:
    """``(weak, strong)`` transforms for a data set name (digits: tensor views; CIFAR: USB's).

    >>> weak, strong = build_views("digits")
    >>> weak, strong.degrees
    (DigitsWeak(max_shift=1), 20.0)
    """
    if data_name == "digits":
        return DigitsWeak(), DigitsStrong()
    if data_name in ("cifar10", "cifar100"):
        weak = cifar_weak(32, crop_ratio)
        strong = cifar_strong(32, crop_ratio, randaugment_ops)
        return weak, strong
    raise ValueError(f"no views for data {data_name!r}; expected one of digits, cifar10, cifar100")


# --------------------------------------------------------------------------------------------
# Second view (adversarial training)
# --------------------------------------------------------------------------------------------


class Cutout:
    """Zero one random ``length``×``length`` square (clipped at the border) of a (C, H, W) tensor.

    The centre is drawn from torch's global RNG (``torch.randint``), row then column.

    >>> _ = torch.manual_seed(0)
    >>> int((Cutout(2)(torch.ones(1, 4, 4)) == 0).sum()) in (1, 2, 4)
    True
    """

    def __init__(self, length: int = 16) -> None:
        self.length = length

    def __call__(self, img: Tensor) -> Tensor:
        _, h, w = img.shape
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(cy - self.length // 2, 0), min(cy + self.length // 2, h)
        x0, x1 = max(cx - self.length // 2, 0), min(cx + self.length // 2, w)
        img = img.clone()
        img[:, y0:y1, x0:x1] = 0.0
        return img

    def __repr__(self) -> str:
        return f"Cutout(length={self.length})"


class TwoViews:
    """A transform returning ``(basic(img), view(img))``, in that order (``basic`` draws first)."""

    def __init__(self, basic: Callable, view: Callable) -> None:
        self.basic, self.view = basic, view

    def __call__(self, img: Any) -> tuple[Any, Any]:
        return self.basic(img), self.view(img)

    def __repr__(self) -> str:
        return f"TwoViews(basic={self.basic!r}, view={self.view!r})"


def _second_view(kind: str) -> Callable:
    from torchvision import transforms as T

    if kind == "autoaugment":
        from .autoaugment import CIFAR10Policy

        return T.Compose([*crop_flip(32, padding=4), CIFAR10Policy(), T.ToTensor()])
    return T.Compose([*crop_flip(32, padding=4), T.ToTensor(), Cutout(16)])


def with_second_view(train_set: Dataset, kind: str) -> Dataset:
    """A copy of ``train_set`` whose samples are ``((basic, view), label)``.

    ``basic`` is the set's own transform; ``view`` is crop + flip + AutoAugment (the authors'
    :class:`~dkl.data.autoaugment.CIFAR10Policy`) for ``kind="autoaugment"``, crop + flip + a
    16×16 :class:`Cutout` for ``kind="cutout"``.
    ``train_set`` is a torchvision image data set or a :class:`~dkl.data.SeededDataset` around
    one; the copies are shallow (the images are shared) and ``train_set`` itself is left as it
    was.

    Raises:
        ValueError: ``kind`` is not one of :data:`SECOND_VIEWS`, or the data set has no
            torchvision transform to extend (digits).
    """
    if kind not in SECOND_VIEWS:
        raise ValueError(f"Expected a second view in {SECOND_VIEWS}, got {kind!r}")
    base = getattr(train_set, "base", train_set)
    if getattr(base, "transform", None) is None:
        raise ValueError(
            f"a second view ({kind!r}) needs a torchvision image data set with a transform "
            f"(cifar10, cifar100), got {type(base).__name__}"
        )
    new_base = copy.copy(base)
    new_base.transform = TwoViews(base.transform, _second_view(kind))
    if base is train_set:
        return new_base
    new = copy.copy(train_set)
    new.base = new_base
    return new
