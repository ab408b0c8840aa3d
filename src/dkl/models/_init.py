"""The weight initialisation mdistiller's CIFAR VGG, MobileNetV2 and WRN share."""

from __future__ import annotations

import math

from torch import nn


def he_fan_out_init(model: nn.Module, *, linear_std: float | None) -> None:
    """Conv weights ``N(0, 2 / fan_out)`` and biases 0, BatchNorm ``(1, 0)``, Linear biases 0.

    ``linear_std``: Linear weights ``N(0, linear_std²)``; ``None`` keeps PyTorch's default
    (mdistiller's WRN). Modules are visited in ``model.modules()`` order, so the random draws
    are those of the per-model loops this replaces.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
