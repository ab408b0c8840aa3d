"""CIFAR ResNets with mdistiller's ``state_dict`` layout.

Two families, as in mdistiller (``mdistiller/models/cifar/resnet.py`` and ``resnetv2.py``):

* ``resnet{8,14,20,32,44,56,110}`` and ``resnet{8,32}x4``: 3 stages of basic blocks, widths
  ``(16, 16, 32, 64)`` or ``(32, 64, 128, 256)`` for the ``x4`` models; keys ``conv1``, ``bn1``,
  ``layer{1,2,3}.<i>.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}``, ``fc``.
* ``ResNet50``: 4 stages of bottleneck blocks on a 3x3 stem; keys ``conv1``, ``bn1``,
  ``layer{1..4}.<i>.{conv1..3,bn1..3,shortcut.0,shortcut.1}``, ``linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model

__all__ = ["CifarBottleneckResNet", "CifarResNet"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _projection(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
    )


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        # mdistiller names the projection "downsample" in this family
        self.downsample = _projection(cin, cout, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: stem, 3 stages of ``n`` basic blocks, global pool, ``fc``.

    Args:
        depth: 6n + 2 (8, 14, 20, 32, 44, 56, 110).
        widths: channels of the stem and the three stages.
        num_classes: output size.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"Expected depth = 6n + 2 >= 8, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, (cout, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = []
            for j in range(n):
                blocks.append(_BasicBlock(cin, cout, stride if j == 0 else 1))
                cin = cout
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        # empty Sequential = identity, which keeps the key layout of mdistiller's resnetv2
        self.shortcut = (
            _projection(cin, cout, stride) if stride != 1 or cin != cout else nn.Sequential()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarBottleneckResNet(nn.Module):
    """The CIFAR "ResNet50" of CRD/mdistiller: 3x3 stem (no max-pool), 4 bottleneck stages."""

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)), 1):
            layers = []
            for j in range(n):
                layers.append(_Bottleneck(cin, planes, stride if j == 0 else 1))
                cin = planes * _Bottleneck.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.linear = nn.Linear(cin, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _kaiming_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


_THIN = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def _register_resnet(name: str, depth: int, widths: tuple[int, int, int, int]) -> None:
    def build(num_classes: int) -> nn.Module:
        return CifarResNet(depth, widths, num_classes)

    build.__name__ = name
    build.__doc__ = f"CIFAR ResNet-{depth}, stage widths {widths[1:]} (mdistiller ``{name}``)."
    register_model(name, family="cifar")(build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register_resnet(f"resnet{_depth}", _depth, _THIN)
_register_resnet("resnet8x4", 8, _WIDE)
_register_resnet("resnet32x4", 32, _WIDE)


@register_model("ResNet50", family="cifar")
def cifar_resnet50(num_classes: int) -> nn.Module:
    """CIFAR bottleneck ResNet-50 (mdistiller ``ResNet50``; not torchvision's ``resnet50``)."""
    return CifarBottleneckResNet((3, 4, 6, 3), num_classes)
