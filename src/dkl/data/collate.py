"""The ``collate_fn`` of every dkl ``DataLoader``."""

from __future__ import annotations

from typing import Any

from torch.utils.data import default_collate

__all__ = ["collate"]


def collate(batch: Any) -> Any:
    """Stack a list of samples into a batch; pass through a batch that is already stacked.

    A tuple is what a data set's ``__getitems__`` returns after stacking the batch itself
    (:class:`~dkl.data.TensorImageDataset`, :class:`~dkl.data.ViewDataset` on digits): it is
    returned as is. A list holds one sample per index: tuple samples become a tuple of columns,
    each column collated by the same rule (a column of tuples, e.g. ``(basic, view)`` image pairs,
    becomes a tuple of stacked tensors); anything else goes to torch's ``default_collate`` (tensors
    stacked, numbers turned into a tensor).

    >>> import torch
    >>> x, y = collate([(torch.zeros(2), 0), (torch.ones(2), 1)])
    >>> x.tolist(), y.tolist()
    ([[0.0, 0.0], [1.0, 1.0]], [0, 1])
    >>> pre = (torch.zeros(3, 2), torch.arange(3))
    >>> collate(pre) is pre
    True
    """
    if isinstance(batch, tuple):
        return batch
    if batch and type(batch[0]) is tuple:
        return tuple(collate(list(column)) for column in zip(*batch, strict=True))
    return default_collate(batch)
