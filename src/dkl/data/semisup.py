"""Data for semi-supervised learning: a labeled subset, multi-view samples, endless resumable batches.

The pieces, each usable alone (the views themselves are in :mod:`dkl.data.transforms`, the
endless sampler in :mod:`dkl.data.samplers`):

- :func:`split_labeled` picks ``num_labels_per_class`` samples of every class with USB's NumPy
  calls under the run's seed (stratified, the same images as USB, sorted); the rest is the
  unlabeled pool. The labeled indices are what a run folder records (``labeled_indices.json``).
- :class:`ViewDataset` returns ``(view_1, ..., view_k, label, index)`` for a key ``(index, draw)``;
  the transforms run under a torch RNG seeded from ``(seed, stream, draw)``, so a sample's
  augmentation depends on nothing but the seed and its draw number: not on workers, not on resume.
- :class:`SemiSupLoader` pairs a labeled and an unlabeled stream (``uratio`` unlabeled per labeled
  sample) and counts the steps it has served; ``state_dict()`` is that count.

>>> labels = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2, 2])
>>> lab, unl = split_labeled(labels, 2, seed=0)
>>> len(lab), len(unl), sorted(labels[lab].tolist())
(6, 3, [0, 0, 1, 1, 2, 2])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .collate import collate
from .samplers import InfiniteBatchSampler
from .seeding import mix_seed
from .transforms import RowStreams

__all__ = ["SemiSupLoader", "ViewDataset", "split_labeled"]


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
    """Pick ``num_labels_per_class`` indices of every class as USB does; return ``(labeled,
    unlabeled)``.

    USB's split, call for call: NumPy's legacy generator seeded with ``seed`` (USB seeds the
    global one with the run's seed), then for each class ``c`` in increasing order
    ``idx = np.where(labels == c)[0]``, ``shuffle(idx)``, and the first ``num_labels_per_class``
    are labeled. The same ``(labels, seed)`` therefore gives USB's labeled images, not only as
    many of them. The unlabeled pool is every other index (disjoint), or every index with
    ``include_labeled_in_unlabeled=True`` (USB's default, ``include_lb_to_ulb``). Both lists are
    sorted; NumPy's global generator is left as it was.

    Raises:
        ValueError: a class has fewer than ``num_labels_per_class`` + 1 samples (none would be
            left unlabeled) or the count is not positive.
    """
    import numpy as np

    y = _as_label_tensor(labels).numpy()
    if num_labels_per_class < 1:
        raise ValueError(f"Expected num_labels_per_class >= 1, got {num_labels_per_class}")
    classes, counts = np.unique(y, return_counts=True)
    if counts.size and counts.min() <= num_labels_per_class:
        smallest = int(counts.argmin())
        raise ValueError(
            f"num_labels_per_class={num_labels_per_class}: class {classes[smallest]}, the "
            f"smallest, has {counts[smallest]} samples, and each class keeps at least one "
            f"unlabeled; expected at most {counts[smallest] - 1}"
        )
    rng = np.random.RandomState(seed)  # = np.random.seed(seed) without touching the global one
    labeled: list[int] = []
    for c in classes.tolist():  # shuffles of absent classes would draw nothing
        idx = np.where(y == c)[0]
        rng.shuffle(idx)
        labeled.extend(idx[:num_labels_per_class].tolist())
    labeled.sort()
    if include_labeled_in_unlabeled:
        unlabeled = list(range(len(y)))
    else:
        chosen = set(labeled)
        unlabeled = [i for i in range(len(y)) if i not in chosen]
    return labeled, unlabeled


class ViewDataset(Dataset):
    """``(images, labels)`` restricted to ``indices``, returning several views of each sample.

    A key is ``(position, draw)``: ``position`` indexes ``indices``, ``draw`` is the global draw
    number that seeds the augmentation (``mix_seed(seed, stream, draw)``). ``__getitem__`` returns
    ``(*views, label, index)`` with ``index`` the sample's index in the full data set (so
    pseudo-label accuracy can use the true label of an "unlabeled" sample, and the labeled set can
    be audited).

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

    @property
    def _batched(self) -> bool:
        """Tensor images with batch-capable transforms (digits)."""
        return not self._pil and all(getattr(t, "batched", False) for t in self.transforms)

    def __getitem__(self, key: tuple[int, int] | int):
        if self._batched:  # the batched path, so a sample is the same alone or in a batch
            *views, label, index = self.__getitems__([key])
            return (*(v[0] for v in views), label[0], index[0])
        pos, draw = key if isinstance(key, tuple) else (key, key)
        i = self.indices[pos]
        img = self._load(i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, self.stream, draw))
            views = [t(img) for t in self.transforms]
        return (*views, self.labels[i], torch.tensor(i))

    def __getitems__(self, keys: list) -> Any:
        # Tensor images with batch-capable transforms: the whole batch augmented at once, each
        # image from a stream seeded by its own draw, so its views do not depend on the batch
        # it is in (its size changes with the number of ranks) or on its place there.
        if not self._batched:
            return [self[k] for k in keys]
        keys = [k if isinstance(k, tuple) else (k, k) for k in keys]
        idx = torch.tensor([self.indices[p] for p, _ in keys], dtype=torch.long)
        seeds = [mix_seed(self.seed, self.stream, d) for _, d in keys]
        rows = RowStreams(torch.tensor(seeds, dtype=torch.int64))
        x = self.images[idx]
        views = [t(x, generator=rows) for t in self.transforms]
        return (*views, self.labels[idx], idx)


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
                collate_fn=collate,
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
