"""Pre-activation ResNet-18 for 32x32 inputs (He et al. 2016), the usual adversarial-training
baseline. Key layout of RobustBench's ``PreActResNet(PreActBlock, [2, 2, 2, 2], bn_before_fc=True)``:
``conv1``, ``layer{1..4}.<i>.{bn1,conv1,bn2,conv2,shortcut.0}``, ``bn``, ``linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model

__all__ = ["PreActResNet"]


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False))
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        # a projection sees the pre-activated input (He et al.); the identity sees x itself
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet with basic blocks; ``blocks`` per stage, e.g. (2, 2, 2, 2) for 18."""

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        cin = 64
        for i, (cout, n, stride) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)), 1):
            layers = []
            for j in range(n):
                layers.append(_PreActBlock(cin, cout, stride if j == 0 else 1))
                cin = cout
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        x = F.relu(self.bn(x))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("preact_resnet18", family="robust")
def preact_resnet18(num_classes: int) -> nn.Module:
    """PreAct-ResNet-18 with a final BN-ReLU before the pool (RobustBench ``bn_before_fc=True``)."""
    return PreActResNet((2, 2, 2, 2), num_classes)
