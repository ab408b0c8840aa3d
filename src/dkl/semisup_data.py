"""Data for semi-supervised learning: a labeled subset, weak/strong views, endless resumable batches.

The pieces, each usable alone:

- :func:`split_labeled` picks ``num_labels_per_class`` samples of every class with a seeded
  generator (stratified, reproducible, sorted); the rest is the unlabeled pool. The labeled
  indices are what a run folder records (``labeled_indices.json``).
- Views. CIFAR-like images (``uint8`` arrays ``(N, H, W, 3)``), as in USB: weak = random crop with
  reflect padding ``int(size * (1 - crop_ratio))`` (4 pixels at 32 with ratio 0.875) + horizontal
  flip; strong = the weak transforms + torchvision's ``RandAugment`` (3 ops) + a Cutout-like random
  erase. USB uses its own RandAugment (3 ops of random magnitude, then Cutout up to half the side);
  torchvision's has a fixed magnitude, so the strong view is close to, not identical with, USB's.
  Digits (float tensors ``(1, 8, 8)`` in [0, 1]): weak = a random shift of up to one pixel (zero
  fill; no flip, digits are not mirror-symmetric); strong = the weak shift + a random rotation
  (±20°) and scaling (0.85–1.15), a random 3×3 erase and Gaussian pixel noise (σ = 0.1), clamped
  to [0, 1]. Every view is a float tensor in [0, 1]: normalisation lives in the model.
- :class:`ViewDataset` returns ``(view_1, ..., view_k, label, index)`` for a key ``(index, draw)``;
  the transforms run under a torch RNG seeded from ``(seed, stream, draw)``, so a sample's
  augmentation depends on nothing but the seed and its draw number: not on workers, not on resume.
- :class:`InfiniteBatchSampler` yields batches of keys forever, epoch after epoch, each epoch a
  seeded permutation; batch ``b`` is a pure function of ``(seed, b)``, so resuming needs only ``b``.
- :class:`SemiSupLoader` pairs a labeled and an unlabeled stream (``uratio`` unlabeled per labeled
  sample) and counts the steps it has served; ``state_dict()`` is that count.

>>> labels = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2, 2])
>>> lab, unl = split_labeled(labels, 2, seed=0)
>>> len(lab), len(unl), sorted(labels[lab].tolist())
(6, 3, [0, 0, 1, 1, 2, 2])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "DigitsStrong",
    "DigitsWeak",
    "InfiniteBatchSampler",
    "SemiSupLoader",
    "ViewDataset",
    "cifar_strong",
    "cifar_weak",
    "split_labeled",
]

_MIX = (1_000_003, 10_000_019, 2**61 - 1)


def _as_label_tensor(labels: Any) -> Tensor:
    t = torch.as_tensor(labels)
    if t.ndim != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(
            f"Expected labels as a 1-D integer sequence, got {tuple(t.shape)} {t.dtype}"
        )
    return t.long()


def split_labeled(
    labels: Any,
    num_labels_per_class: int,
    *,
    seed: int = 0,
    include_labeled_in_unlabeled: bool = False,
) -> tuple[list[int], list[int]]:
    """Pick ``num_labels_per_class`` indices of every class; return ``(labeled, unlabeled)``.

    The choice is a seeded permutation within each class, so the same ``(labels, seed)`` always
    gives the same split, and each class gets exactly the same count. The unlabeled pool is every
    other index (disjoint), or every index with ``include_labeled_in_unlabeled=True`` (USB's
    default, ``include_lb_to_ulb``; 200 of 50,000 images on CIFAR-100, a negligible difference).
    Both lists are sorted.

    Raises:
        ValueError: a class has fewer than ``num_labels_per_class`` + 1 samples (none would be
            left unlabeled) or the count is not positive.
    """
    y = _as_label_tensor(labels)
    if num_labels_per_class < 1:
        raise ValueError(f"Expected num_labels_per_class >= 1, got {num_labels_per_class}")
    g = torch.Generator().manual_seed(int(seed) * _MIX[0] + 17)
    labeled: list[int] = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        if idx.numel() <= num_labels_per_class:
            raise ValueError(
                f"class {c} has {idx.numel()} samples; expected more than "
                f"num_labels_per_class={num_labels_per_class}"
            )
        pick = idx[torch.randperm(idx.numel(), generator=g)[:num_labels_per_class]]
        labeled.extend(pick.tolist())
    labeled.sort()
    if include_labeled_in_unlabeled:
        unlabeled = list(range(len(y)))
    else:
        chosen = set(labeled)
        unlabeled = [i for i in range(len(y)) if i not in chosen]
    return labeled, unlabeled


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------


def _check_digits(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim not in (3, 4):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"Expected an image tensor (C, H, W) or a batch (N, C, H, W), got {got}")
    return x[None] if x.ndim == 3 else x


class DigitsWeak:
    """Random shift by up to ``max_shift`` pixels in each direction, zero fill.

    Works on one image ``(C, H, W)`` or a batch ``(N, C, H, W)`` (one shift per image), drawing
    from ``generator`` (default: torch's global RNG).

    >>> x = torch.arange(9.0).reshape(1, 3, 3)
    >>> DigitsWeak()(x, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([1, 3, 3])
    """

    batched = True

    def __init__(self, max_shift: int = 1) -> None:
        self.max_shift = int(max_shift)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        single = x.ndim == 3
        xb = _check_digits(x)
        s = self.max_shift
        n, _, h, w = xb.shape
        padded = F.pad(xb, (s, s, s, s))
        dy, dx = torch.randint(0, 2 * s + 1, (2, n), generator=generator)
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

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        single = x.ndim == 3
        xb = self.weak(_check_digits(x), generator=generator)
        n, c, h, w = xb.shape
        u = torch.rand(2, n, generator=generator, dtype=xb.dtype)
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
            i = torch.randint(0, h - self.erase + 1, (n,), generator=generator)
            j = torch.randint(0, w - self.erase + 1, (n,), generator=generator)
            r, q = torch.arange(h), torch.arange(w)
            in_r = (r[None] >= i[:, None]) & (r[None] < i[:, None] + self.erase)  # (N, H)
            in_c = (q[None] >= j[:, None]) & (q[None] < j[:, None] + self.erase)  # (N, W)
            xb = xb.masked_fill((in_r[:, :, None] & in_c[:, None, :])[:, None], 0.0)
        if self.noise > 0:
            xb = xb + self.noise * torch.randn(xb.shape, generator=generator, dtype=xb.dtype)
        xb = xb.clamp(0.0, 1.0)
        return xb[0] if single else xb

    def __repr__(self) -> str:
        return (
            f"DigitsStrong(max_shift={self.weak.max_shift}, degrees={self.degrees}, "
            f"scale={self.scale}, erase={self.erase}, noise={self.noise})"
        )


def _cifar_base(size: int, crop_ratio: float) -> list:
    from torchvision import transforms as T

    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"Expected crop_ratio in (0, 1], got {crop_ratio}")
    pad = int(size * (1.0 - crop_ratio))
    return [T.RandomCrop(size, padding=pad, padding_mode="reflect"), T.RandomHorizontalFlip()]


def cifar_weak(size: int = 32, crop_ratio: float = 0.875) -> Callable:
    """USB's weak view for 32×32 images: reflect-padded random crop + flip, to a [0, 1] tensor."""
    from torchvision import transforms as T

    return T.Compose([*_cifar_base(size, crop_ratio), T.ToTensor()])


def cifar_strong(
    size: int = 32,
    crop_ratio: float = 0.875,
    num_ops: int = 3,
    magnitude: int = 9,
    cutout: float = 0.5,
) -> Callable:
    """Weak transforms + ``RandAugment(num_ops, magnitude)`` + a square erase of side up to
    ``cutout`` × image side (USB's Cutout), to a [0, 1] tensor."""
    from torchvision import transforms as T

    tf = [
        *_cifar_base(size, crop_ratio),
        T.RandAugment(num_ops=num_ops, magnitude=magnitude),
        T.ToTensor(),
    ]
    if cutout > 0:
        tf.append(T.RandomErasing(p=1.0, scale=(0.0, cutout**2), ratio=(1.0, 1.0), value=0.5))
    return T.Compose(tf)


# --------------------------------------------------------------------------------------------
# Data sets and sampling
# --------------------------------------------------------------------------------------------


class ViewDataset(Dataset):
    """``(images, labels)`` restricted to ``indices``, returning several views of each sample.

    A key is ``(position, draw)``: ``position`` indexes ``indices``, ``draw`` is the global draw
    number that seeds the augmentation. ``__getitem__`` returns ``(*views, label, index)`` with
    ``index`` the sample's index in the full data set (so pseudo-label accuracy can use the true
    label of an "unlabeled" sample, and the labeled set can be audited).

    ``images``: a ``uint8`` array/tensor ``(N, H, W, C)`` (converted to PIL for torchvision
    transforms) or a float tensor ``(N, C, H, W)`` (passed to the transforms as a tensor).
    """

    def __init__(
        self,
        images: Any,
        labels: Any,
        indices: Sequence[int],
        transforms: Sequence[Callable],
        *,
        seed: int = 0,
        stream: int = 0,
    ) -> None:
        self.labels = _as_label_tensor(labels)
        if len(images) != len(self.labels):
            raise ValueError(
                f"images and labels differ in length: {len(images)} vs {len(self.labels)}"
            )
        if len(transforms) == 0:
            raise ValueError("Expected at least one transform (one per view), got none")
        self.images = images
        self.indices = [int(i) for i in indices]
        self.transforms = list(transforms)
        self.seed, self.stream = int(seed), int(stream)
        self._pil = not (isinstance(images, Tensor) and images.is_floating_point())

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, i: int):
        img = self.images[i]
        if self._pil:
            from PIL import Image

            arr = img.numpy() if isinstance(img, Tensor) else img
            return Image.fromarray(arr)
        return img

    def __getitem__(self, key: tuple[int, int] | int):
        pos, draw = key if isinstance(key, tuple) else (key, key)
        i = self.indices[pos]
        img = self._load(i)
        s = (self.seed * _MIX[0] + self.stream * _MIX[1] + int(draw)) % _MIX[2]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            views = [t(img) for t in self.transforms]
        return (*views, self.labels[i], torch.tensor(i))

    def __getitems__(self, keys: list) -> Any:
        # Tensor images with batch-capable transforms (digits): augment the whole batch at once,
        # from a generator seeded by the batch's first draw (draw numbers are unique per batch).
        if self._pil or not all(getattr(t, "batched", False) for t in self.transforms):
            return [self[k] for k in keys]
        keys = [k if isinstance(k, tuple) else (k, k) for k in keys]
        idx = torch.tensor([self.indices[p] for p, _ in keys], dtype=torch.long)
        s = (self.seed * _MIX[0] + self.stream * _MIX[1] + int(keys[0][1])) % _MIX[2]
        g = torch.Generator().manual_seed(s)
        x = self.images[idx]
        views = [t(x, generator=g) for t in self.transforms]
        return (*views, self.labels[idx], idx)


class InfiniteBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of ``(position, draw)`` keys over ``range(n)``, epoch after epoch.

    Draw ``k`` (global, over all ranks) is position ``perm_e[k mod n]`` of epoch ``e = k // n``,
    where ``perm_e`` is a permutation seeded with ``(seed, e)``. Rank ``r`` of ``world`` takes
    draws ``(b * world + r) * batch_size + j``: batch ``b`` of a rank depends only on
    ``(seed, b)``, so :attr:`start` (batches already served) is the whole resume state.

    >>> s = InfiniteBatchSampler(5, 2, seed=0)
    >>> it = iter(s); b = [next(it) for _ in range(5)]
    >>> sorted([p for batch in b for p, _ in batch][:5]) == [0, 1, 2, 3, 4]  # epoch 0: all of 0..4
    True
    >>> [k for _, k in b[2]]   # draw numbers continue across the epoch boundary
    [4, 5]
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
    ) -> None:
        if n <= 0:
            raise ValueError(f"Expected a non-empty data set, got n={n}")
        if batch_size <= 0:
            raise ValueError(f"Expected batch_size > 0, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"Expected rank in [0, {world}), got {rank}")
        self.n, self.batch_size, self.seed = n, batch_size, int(seed)
        self.rank, self.world, self.start = rank, world, int(start)
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _position(self, draw: int) -> int:
        e, off = divmod(draw, self.n)
        if e != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * _MIX[0] + e * 7 + 3)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), e
        return int(self._perm[off])

    def batch(self, b: int) -> list[tuple[int, int]]:
        first = (b * self.world + self.rank) * self.batch_size
        return [(self._position(k), k) for k in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.start
        while True:
            yield self.batch(b)
            b += 1


def _collate(items: Any) -> tuple[Tensor, ...]:
    if isinstance(items, tuple):  # ViewDataset.__getitems__ already stacked the batch
        return items
    return tuple(torch.stack(col) for col in zip(*items))


class SemiSupLoader:
    """Endless ``(labeled, unlabeled)`` batch pairs; resumable from the number of steps served.

    ``labeled`` = ``(x, y, index)``, ``batch_size`` samples; ``unlabeled`` = ``(view_1, ...,
    y_true, index)``, ``uratio * batch_size`` samples, or ``None`` when ``unlabeled_set`` is
    ``None`` (the supervised baseline). Both streams are infinite; ``state_dict()`` stores the step
    count and ``load_state_dict`` restarts both streams there (DataLoader workers are rebuilt).
    """

    def __init__(
        self,
        labeled_set: Dataset,
        unlabeled_set: Dataset | None,
        *,
        batch_size: int,
        uratio: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if uratio < 1:
            raise ValueError(f"Expected uratio >= 1, got {uratio}")
        self.labeled_set, self.unlabeled_set = labeled_set, unlabeled_set
        self.batch_size, self.uratio, self.seed = batch_size, uratio, int(seed)
        self.num_workers, self.rank, self.world = num_workers, rank, world
        self.step = 0
        self._iters: tuple[Iterator, Iterator | None] | None = None

    def _loader(self, ds: Dataset, bs: int, seed: int) -> Iterator:
        sampler = InfiniteBatchSampler(
            len(ds), bs, seed=seed, rank=self.rank, world=self.world, start=self.step
        )
        return iter(
            DataLoader(
                ds,
                batch_sampler=sampler,
                num_workers=self.num_workers,
                collate_fn=_collate,
                persistent_workers=False,
            )
        )

    def _start(self) -> None:
        lab = self._loader(self.labeled_set, self.batch_size, self.seed * 2 + 0)
        unl = None
        if self.unlabeled_set is not None:
            unl = self._loader(self.unlabeled_set, self.batch_size * self.uratio, self.seed * 2 + 1)
        self._iters = (lab, unl)

    def __iter__(self) -> SemiSupLoader:
        return self

    def __next__(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...] | None]:
        if self._iters is None:
            self._start()
        lab_it, unl_it = self._iters  # type: ignore[misc]
        lab = next(lab_it)
        unl = next(unl_it) if unl_it is not None else None
        self.step += 1
        return lab, unl

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self._iters = None
