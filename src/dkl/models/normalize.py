"""Input normalisation inside the model, so data and attacks stay in [0, 1] pixel space.

The mean and std come from the caller (the data sets' values are in :mod:`dkl.data`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Normalize", "NormalizedModel", "unwrap_normalization", "with_normalization"]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel of a ``(B, C, H, W)`` input.

    mean and std are non-persistent buffers: they follow ``.to(device)`` but stay out of the
    ``state_dict``, so checkpoints only hold the wrapped model's weights.

    >>> norm = Normalize((0.5,), (0.25,))
    >>> norm(torch.ones(1, 1, 2, 2)).flatten().tolist()
    [2.0, 2.0, 2.0, 2.0]
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel() or mean_t.numel() == 0:
            raise ValueError(
                f"Expected mean and std of the same non-zero length, got {mean_t.numel()} and "
                f"{std_t.numel()}"
            )
        if not bool((std_t > 0).all()):
            raise ValueError(f"Expected every std > 0, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(-1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(-1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"Expected input of shape (B, {self.mean.shape[0]}, H, W), got {tuple(x.shape)}"
            )
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class NormalizedModel(nn.Module):
    """``model(normalize(x))``: a model that takes [0, 1] inputs.

    Its ``state_dict`` keys are the inner model's with a ``model.`` prefix (``Normalize`` adds
    none). :func:`dkl.models.load_weights` loads a bare-model checkpoint (keys without the prefix)
    into ``.model`` automatically; ``load_weights(wrapper.model, path)`` does the same explicitly.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def with_normalization(
    model: nn.Module, mean: Sequence[float], std: Sequence[float]
) -> NormalizedModel:
    """Wrap ``model`` so it normalises its inputs itself (see :class:`NormalizedModel`).

    >>> from dkl.models import create_model
    >>> net = with_normalization(create_model("resnet8", 10), (0.5,) * 3, (0.25,) * 3)
    >>> next(iter(net.state_dict()))
    'model.conv1.weight'
    """
    return NormalizedModel(model, mean, std)


def unwrap_normalization(model: nn.Module) -> nn.Module:
    """The bare architecture inside DDP/DataParallel (``.module``), ``torch.compile``
    (``._orig_mod``) and :class:`NormalizedModel` (``.model``) wrappers, in any nesting.

    >>> from dkl.models import create_model
    >>> inner = create_model("resnet8", 10)
    >>> unwrap_normalization(with_normalization(inner, (0.5,) * 3, (0.25,) * 3)) is inner
    True
    """
    while True:
        if isinstance(model, NormalizedModel):
            model = model.model
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model
