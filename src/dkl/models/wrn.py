"""Wide ResNets.

``WideResNet`` has the layout shared by mdistiller (``mdistiller/models/cifar/wrn.py``) and
RobustBench's ``WideResNet(depth, widen_factor, sub_block1=False)``: keys ``conv1``,
``block{1,2,3}.layer.<i>.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``. A
``convShortcut`` exists only where the block changes the channel count.

``DMWideResNet`` has the layout RobustBench uses for its Swish WRNs (DeepMind's code:
``dm_wide_resnet.py``): ``mean``/``std`` buffers, ``init_conv``,
``layer.<g>.block.<i>.{batchnorm_0,conv_0,batchnorm_1,conv_1,shortcut}``, ``batchnorm``,
``logits``; stride-2 convs pad "SAME"-style (0 left/top, 1 right/bottom).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._init import he_fan_out_init
from .registry import register_model

__all__ = ["DMWideResNet", "WideResNet"]


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "swish":
        return nn.SiLU()  # swish(x) = x * sigmoid(x)
    raise ValueError(f"Expected activation 'relu' or 'swish', got {name!r}")


def _blocks_per_group(depth: int) -> int:
    if (depth - 4) % 6 != 0 or depth < 10:
        raise ValueError(f"Expected WRN depth = 6n + 4 >= 10, got {depth}")
    return (depth - 4) // 6


class _WRNBlock(nn.Module):
    """Pre-activation block; with a channel change the shortcut sees the activated input."""

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float, act: str) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = _activation(act)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = _activation(act)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.convShortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.act2(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.convShortcut is None else self.convShortcut(pre))


class _NetworkBlock(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int, drop: float, act: str) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                _WRNBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop, act)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs (Zagoruyko & Komodakis), mdistiller/RobustBench layout.

    Args:
        depth: 6n + 4 (16, 28, 34, 40 ...).
        widen_factor: k; stage widths are ``16k, 32k, 64k``.
        num_classes: output size.
        drop_rate: dropout between the two convs of a block.
        activation: ``"relu"`` (default) or ``"swish"``.
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        *,
        drop_rate: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        n = _blocks_per_group(depth)
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _NetworkBlock(n, widths[0], widths[1], 1, drop_rate, activation)
        self.block2 = _NetworkBlock(n, widths[1], widths[2], 2, drop_rate, activation)
        self.block3 = _NetworkBlock(n, widths[2], widths[3], 2, drop_rate, activation)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.act = _activation(activation)
        self.fc = nn.Linear(widths[3], num_classes)
        he_fan_out_init(self, linear_std=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.act(self.bn1(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class _DMBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: str) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"Expected stride 1 or 2, got {stride}")
        self.stride = stride
        self.batchnorm_0 = nn.BatchNorm2d(cin)
        self.relu_0 = _activation(act)
        self.conv_0 = nn.Conv2d(cin, cout, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(cout)
        self.relu_1 = _activation(act)
        self.conv_1 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu_0(self.batchnorm_0(x))
        # TensorFlow "SAME" padding: symmetric at stride 1, one extra pixel right/bottom at stride 2
        padded = F.pad(pre, (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1))
        out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(padded))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class _DMBlockGroup(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int, act: str) -> None:
        super().__init__()
        self.block = nn.Sequential(
            *[
                _DMBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, act)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMWideResNet(nn.Module):
    """WRN in the layout of RobustBench's Swish models (DeepMind's ``DMWideResNet``).

    The ``mean``/``std`` buffers exist so RobustBench checkpoints load strictly; they default to
    0 and 1 (identity) because dkl normalises in :class:`dkl.models.NormalizedModel`. A checkpoint
    that stores its own mean/std overwrites them, so do not wrap such a model a second time.
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        *,
        activation: str = "swish",
        mean: tuple[float, ...] = (0.0, 0.0, 0.0),
        std: tuple[float, ...] = (1.0, 1.0, 1.0),
    ) -> None:
        super().__init__()
        n = _blocks_per_group(depth)
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))
        self.init_conv = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            _DMBlockGroup(n, widths[0], widths[1], 1, activation),
            _DMBlockGroup(n, widths[1], widths[2], 2, activation),
            _DMBlockGroup(n, widths[2], widths[3], 2, activation),
        )
        self.batchnorm = nn.BatchNorm2d(widths[3])
        self.relu = _activation(activation)
        self.logits = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.init_conv((x - self.mean) / self.std)
        out = self.relu(self.batchnorm(self.layer(out)))
        return self.logits(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _register_wrn(name: str, depth: int, k: int, family: str) -> None:
    def build(num_classes: int, *, drop_rate: float = 0.0) -> nn.Module:
        return WideResNet(depth, k, num_classes, drop_rate=drop_rate)

    build.__name__ = name
    build.__doc__ = f"WRN-{depth}-{k} (mdistiller / RobustBench ``WideResNet`` layout)."
    register_model(name, family=family)(build)


for _d, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register_wrn(f"wrn_{_d}_{_k}", _d, _k, "cifar")
_register_wrn("wrn_28_10", 28, 10, "robust")
_register_wrn("wrn_34_10", 34, 10, "robust")


@register_model("wrn_28_10_swish", family="robust")
def wrn_28_10_swish(num_classes: int, **kwargs) -> nn.Module:
    """WRN-28-10 with Swish, in RobustBench's ``DMWideResNet`` layout (see :class:`DMWideResNet`)."""
    return DMWideResNet(28, 10, num_classes, **kwargs)
