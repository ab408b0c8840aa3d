"""CIFAR VGGs with batch norm, mdistiller's ``vgg{8,11,13,16,19}`` (its ``vgg*_bn`` builders).

Layout: five ``block{0..4}`` Sequentials of ``[conv(bias), bn, relu, ..., conv, bn]`` (the last
ReLU of a block is applied in ``forward``), then ``classifier`` (``Linear(512, C)``). For 32x32
inputs max-pools follow blocks 0-2 only, so blocks 3 and 4 both run at 4x4 (mdistiller adds a
fourth pool for 64x64 inputs; so do we).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._init import he_fan_out_init
from .registry import register_model

__all__ = ["CifarVGG"]

_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": (
        (64, 64),
        (128, 128),
        (256, 256, 256, 256),
        (512, 512, 512, 512),
        (512, 512, 512, 512),
    ),
}


def _stage(cin: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, kernel_size=3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers[:-1])


class CifarVGG(nn.Module):
    """VGG-BN for 32x32 (and 64x64) inputs; ``stages`` lists the conv widths of each block."""

    def __init__(self, stages: tuple[tuple[int, ...], ...], num_classes: int) -> None:
        super().__init__()
        if len(stages) != 5:
            raise ValueError(f"Expected 5 stages, got {len(stages)}")
        cin = 3
        for i, widths in enumerate(stages):
            setattr(self, f"block{i}", _stage(cin, widths))
            cin = widths[-1]
        self.classifier = nn.Linear(cin, num_classes)
        he_fan_out_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        for i in range(5):
            x = F.relu(getattr(self, f"block{i}")(x))
            if i < 3 or (i == 3 and height == 64):
                x = F.max_pool2d(x, kernel_size=2, stride=2)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _register_vgg(name: str) -> None:
    def build(num_classes: int) -> nn.Module:
        return CifarVGG(_CONFIGS[name], num_classes)

    build.__name__ = name
    build.__doc__ = f"CIFAR {name} with batch norm (mdistiller ``{name}``)."
    register_model(name, family="cifar")(build)


for _name in _CONFIGS:
    _register_vgg(_name)
