"""Small models for the embedded digits data (1x8x8 images in [0, 1], 10 classes).

Sizes at 10 classes (``dkl.models.count_parameters``):

* ``digits_cnn`` width 32 (default): 94,186 parameters; width 16 (the ``kd/digits_teacher``
  preset's teacher): 24,058; width 8 (student-size): 6,274.
* ``mlp`` hidden (128,) (default, student-size): 9,610; hidden (256, 256): 85,002.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .registry import register_model

__all__ = ["MLP", "DigitsCNN"]


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] per hidden width -> Linear(num_classes)."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if in_features < 1 or any(int(h) < 1 for h in hidden):
            raise ValueError(
                f"Expected positive in_features and hidden widths, got {in_features}, {tuple(hidden)}"
            )
        self.in_features = in_features
        layers: list[nn.Module] = []
        cin = in_features
        for h in hidden:
            layers += [nn.Linear(cin, int(h)), nn.ReLU()]
            cin = int(h)
        layers.append(nn.Linear(cin, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"Expected inputs with {self.in_features} features per row, got {x.shape[1]}"
            )
        return self.net(x)


class DigitsCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU layers (width w, 2w, 4w) with one 2x2 max-pool, global pool, Linear."""

    def __init__(self, num_classes: int, *, width: int = 32, in_channels: int = 1) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"Expected width >= 1, got {width}")

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, width),
            *block(width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"Expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        return self.fc(torch.flatten(self.features(x), 1))


@register_model("mlp", family="digits")
def mlp(num_classes: int, *, in_features: int = 64, hidden: Sequence[int] = (128,)) -> nn.Module:
    """MLP on flattened inputs (digits: 64 features)."""
    return MLP(in_features, tuple(hidden), num_classes)


@register_model("digits_cnn", family="digits")
def digits_cnn(num_classes: int, *, width: int = 32, in_channels: int = 1) -> nn.Module:
    """Small CNN for 8x8 digits; width 32 is teacher-size, width 8 student-size."""
    return DigitsCNN(num_classes, width=width, in_channels=in_channels)
