"""Model zoo: a name registry, CIFAR / ImageNet / digits / adversarial-training architectures,
weight loading and in-model input normalisation.

>>> import torch
>>> from dkl.models import create_model
>>> create_model("wrn_16_2", 100)(torch.zeros(1, 3, 32, 32)).shape
torch.Size([1, 100])
"""

from __future__ import annotations

from torch import nn

from . import cifar_resnet, imagenet, mobilenet, preact_resnet, shufflenet, small, vgg, wrn
from .normalize import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    NormalizedModel,
    unwrap_normalization,
    with_normalization,
)
from .registry import ModelEntry, create_model, list_models, model_entry, register_model
from .weights import extract_state_dict, load_weights

del cifar_resnet, imagenet, mobilenet, preact_resnet, shufflenet, small, vgg, wrn


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (works on meta-device models too).

    >>> count_parameters(nn.Linear(3, 2))
    8
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ModelEntry",
    "Normalize",
    "NormalizedModel",
    "count_parameters",
    "create_model",
    "extract_state_dict",
    "list_models",
    "load_weights",
    "model_entry",
    "register_model",
    "unwrap_normalization",
    "with_normalization",
]
