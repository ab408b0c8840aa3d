"""Model zoo: a name registry, CIFAR / ImageNet / digits / adversarial-training architectures,
USB's 32×32 ViTs, weight loading and in-model input normalisation (mean and std from the caller).

>>> import torch
>>> from dkl.models import create_model
>>> create_model("wrn_16_2", 100)(torch.zeros(1, 3, 32, 32)).shape
torch.Size([1, 100])
"""

from __future__ import annotations

from torch import nn

from . import cifar_resnet, imagenet, mobilenet, preact_resnet, shufflenet, small, vgg, wrn
from .normalize import Normalize, NormalizedModel, unwrap_normalization, with_normalization
from .registry import (
    ModelEntry,
    adapt_input_channels,
    create_model,
    list_models,
    model_entry,
    register_model,
)
from .vit import load_usb_pretrained, resize_pos_embed
from .weights import extract_state_dict, load_weights

del cifar_resnet, imagenet, mobilenet, preact_resnet, shufflenet, small, vgg, wrn


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (works on meta-device models too).

    >>> count_parameters(nn.Linear(3, 2))
    8
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "ModelEntry",
    "Normalize",
    "NormalizedModel",
    "adapt_input_channels",
    "count_parameters",
    "create_model",
    "extract_state_dict",
    "list_models",
    "load_usb_pretrained",
    "load_weights",
    "model_entry",
    "register_model",
    "resize_pos_embed",
    "unwrap_normalization",
    "with_normalization",
]
