"""MobileNets.

* ``MobileNetV2`` (CIFAR): mdistiller's ``mobile_half`` (expansion 6, width 0.5, 1280-d head).
  Keys ``conv1.{0,1}``, ``blocks.<s>.<i>.conv.{0,1,3,4,6,7}``, ``conv2.{0,1}``, ``classifier.0``.
* ``mobilenet_v1`` (ImageNet, Howard et al. 2017, 224x224): 13 depthwise-separable layers,
  keys ``model.<i>.{0,1,3,4}`` and ``fc``, the layout of mdistiller's ImageNet MobileNetV1 used
  for the ResNet50 -> MobileNetV1 pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._init import he_fan_out_init
from .registry import register_model

__all__ = ["CifarMobileNetV2", "MobileNetV1"]


def _conv_bn_relu(
    cin: int, cout: int, kernel: int, stride: int, groups: int = 1
) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            *_conv_bn_relu(cin, hidden, 1, 1),  # expand (present even when expand == 1)
            *_conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),  # linear bottleneck
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs with expansion ``expand`` and ``width_mult``."""

    # (expansion, channels, repeats, stride); expansion None = use ``expand``
    _SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
                (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))  # fmt: skip

    def __init__(self, num_classes: int, *, expand: int = 6, width_mult: float = 0.5) -> None:
        super().__init__()
        cin = int(32 * width_mult)
        self.conv1 = nn.Sequential(*_conv_bn_relu(3, cin, 3, 2))
        self.blocks = nn.ModuleList()
        for t, c, n, s in self._SETTING:
            cout = int(c * width_mult)
            stage = []
            for i in range(n):
                stage.append(_InvertedResidual(cin, cout, s if i == 0 else 1, t or expand))
                cin = cout
            self.blocks.append(nn.Sequential(*stage))
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = nn.Sequential(*_conv_bn_relu(cin, last, 1, 1))
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        he_fan_out_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        x = self.conv2(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MobileNetV1(nn.Module):
    """MobileNetV1 (width 1.0) for ImageNet-size inputs."""

    # (output channels, stride) of the 13 depthwise-separable layers
    _LAYERS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
               (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))  # fmt: skip

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers = [nn.Sequential(*_conv_bn_relu(3, 32, 3, 2))]
        cin = 32
        for cout, stride in self._LAYERS:
            layers.append(
                nn.Sequential(
                    *_conv_bn_relu(cin, cin, 3, stride, groups=cin),
                    *_conv_bn_relu(cin, cout, 1, 1),
                )
            )
            cin = cout
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.model(x), 1))


@register_model("MobileNetV2", family="cifar")
def cifar_mobilenet_v2(num_classes: int) -> nn.Module:
    """CIFAR MobileNetV2, expansion 6, width 0.5 (mdistiller ``MobileNetV2`` = ``mobile_half``)."""
    return CifarMobileNetV2(num_classes, expand=6, width_mult=0.5)


@register_model("mobilenet_v1", family="imagenet")
def mobilenet_v1(num_classes: int) -> nn.Module:
    """ImageNet MobileNetV1 (the student of the ResNet50 -> MobileNetV1 pair)."""
    return MobileNetV1(num_classes)
