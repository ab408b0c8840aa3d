"""CIFAR ShuffleNets with mdistiller's layout (``ShuffleNetv1.py`` / ``ShuffleNetv2.py``).

* ``ShuffleV1``: groups 3, stage widths (240, 480, 960), (4, 8, 4) blocks; keys ``conv1``, ``bn1``,
  ``layer{1,2,3}.<i>.{conv1,bn1,conv2,bn2,conv3,bn3}``, ``linear``.
* ``ShuffleV2``: net size 1 (116, 232, 464, 1024), (3, 7, 3) blocks after a down-sampling block;
  keys ``layer<s>.0.{conv1..5,bn1..5}`` (down block), ``layer<s>.<i>.{conv1..3,bn1..3}``,
  ``conv2``, ``bn2``, ``linear``.
Both use a 1x1 stem at full resolution, so a 32x32 input ends at 4x4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model

__all__ = ["ShuffleNetV1", "ShuffleNetV2"]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, g*c, H, W) -> interleave the g groups channel by channel."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class _V1Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = cout // 4
        # the first pointwise conv after the 24-channel stem is not grouped (too few channels)
        self.g1 = 1 if cin == 24 else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g1)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:  # down-sampling block: concatenate the pooled input
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    def __init__(
        self,
        num_classes: int,
        *,
        widths: tuple[int, int, int] = (240, 480, 960),
        blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for s, (width, n) in enumerate(zip(widths, blocks), start=1):
            layers = []
            for i in range(n):
                # the first block concatenates its input, so its branch makes width - cin channels
                layers.append(
                    _V1Block(cin, width - cin if i == 0 else width, 2 if i == 0 else 1, groups)
                )
                cin = width
            setattr(self, f"layer{s}", nn.Sequential(*layers))
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _V2Block(nn.Module):
    """Split half the channels off, transform the other half, concatenate, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, x2 = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([keep, out], 1), 2)


class _V2Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        # left branch: depthwise stride 2 -> pointwise
        self.conv1 = nn.Conv2d(cin, cin, 3, stride=2, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch: pointwise -> depthwise stride 2 -> pointwise
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int,
        *,
        widths: tuple[int, int, int, int] = (116, 232, 464, 1024),
        blocks: tuple[int, int, int] = (3, 7, 3),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for s, (width, n) in enumerate(zip(widths[:3], blocks), start=1):
            layers: list[nn.Module] = [_V2Down(cin, width)]
            layers += [_V2Block(width) for _ in range(n)]
            setattr(self, f"layer{s}", nn.Sequential(*layers))
            cin = width
        self.conv2 = nn.Conv2d(cin, widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("ShuffleV1", family="cifar")
def shuffle_v1(num_classes: int) -> nn.Module:
    """CIFAR ShuffleNetV1, groups 3 (mdistiller ``ShuffleV1``)."""
    return ShuffleNetV1(num_classes)


@register_model("ShuffleV2", family="cifar")
def shuffle_v2(num_classes: int) -> nn.Module:
    """CIFAR ShuffleNetV2, net size 1 (mdistiller ``ShuffleV2``)."""
    return ShuffleNetV2(num_classes)
