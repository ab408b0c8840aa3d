"""Batch samplers whose order is a pure function of the seed, so resuming needs one integer.

- :class:`ShardedBatchSampler`: epoch-based; the order of epoch ``e`` is a permutation seeded with
  ``(seed, e)``, split across ranks like ``DistributedSampler``; resuming needs the epoch and the
  number of batches already done.
- :class:`InfiniteBatchSampler`: batches of ``(position, draw)`` keys forever, epoch after epoch,
  each epoch a seeded permutation; batch ``b`` is a pure function of ``(seed, b)``, so resuming
  needs only ``b`` (the semi-supervised streams, iteration-based).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from .seeding import mix_seed

__all__ = ["InfiniteBatchSampler", "ShardedBatchSampler", "shard_indices"]


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Indices ``rank, rank + world, ...`` of ``range(n)``: disjoint shards covering everything.

    >>> shard_indices(7, 1, 3)
    [1, 4]
    """
    return list(range(rank, n, world))


class ShardedBatchSampler(Sampler[list[int]]):
    """Batches of indices for one rank, reproducible from ``(seed, epoch)`` and resumable.

    The order of an epoch is ``randperm(n)`` drawn from a generator seeded with
    ``mix_seed(seed, 0, epoch)``; with ``world > 1`` it is padded by wrap-around to a multiple of
    ``world`` and rank r takes every world-th index (the same split as ``DistributedSampler``).
    Because the order is a pure function of ``(seed, epoch)``, resuming mid-epoch only needs the
    number of batches already done: :meth:`set_position` skips them.

    >>> s = ShardedBatchSampler(10, batch_size=4, shuffle=False)
    >>> list(s)
    [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    >>> s.set_position(epoch=0, batch=2); list(s)
    [[8, 9]]
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        drop_last: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.seed, self.rank, self.world, self.drop_last = seed, rank, world, drop_last
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(batch)

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, 0, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.world > 1:
            total = math.ceil(self.n / self.world) * self.world
            order = (order * math.ceil(total / max(self.n, 1)))[:total]
            order = order[self.rank :: self.world]
        return order

    def batches_per_epoch(self) -> int:
        per_rank = math.ceil(self.n / self.world)
        if self.drop_last:
            return per_rank // self.batch_size
        return math.ceil(per_rank / self.batch_size)

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._indices()
        for b in range(self.start, self.batches_per_epoch()):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]


class InfiniteBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of ``(position, draw)`` keys over ``range(n)``, epoch after epoch.

    Draw ``k`` (global, over all ranks) is position ``perm_e[k mod n]`` of epoch ``e = k // n``,
    where ``perm_e`` is a permutation seeded with ``mix_seed(seed, 0, 7 * e + 3)``. Rank ``r`` of
    ``world`` takes draws ``(b * world + r) * batch_size + j``: batch ``b`` of a rank depends only
    on ``(seed, b)``, so :attr:`start` (batches already served) is the whole resume state.

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
            g = torch.Generator().manual_seed(mix_seed(self.seed, 0, 7 * e + 3))
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
