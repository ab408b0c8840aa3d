"""Write a tiny stand-in for the example: RGB "photos" of three classes in my_photos/ and a
ResNet-18 weight file with ImageNet's 1000-class layout (random weights) in weights/, so that
``dkl train teacher.yaml`` and ``dkl train student.yaml`` run end to end without a download.

    python make_tiny_photos.py [folder]    # default: the current folder

With real data, put your photos in my_photos/ and torchvision's resnet18-f37072fd.pth in weights/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

CLASSES = ("red_square", "green_disc", "blue_stripes")


def photo(label: int, rng: np.random.Generator, size: int) -> Image.Image:
    """A noisy RGB image whose class shows in colour and shape; sizes vary as photos do."""
    img = rng.integers(0, 90, (size, size + rng.integers(0, 16), 3)).astype(np.uint8)
    h, w = img.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    if label == 0:
        img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4, 0] = 230
    elif label == 1:
        img[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 3) ** 2, 1] = 230
    else:
        img[(xx // 6) % 2 == 0, 2] = 230
    return Image.fromarray(img)


def main(folder: str = ".", per_class: int = 12, seed: int = 0) -> Path:
    root = Path(folder)
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        for i in range(per_class):
            split = "val" if i % 4 == 0 else "train"
            d = root / "my_photos" / split / name
            d.mkdir(parents=True, exist_ok=True)
            photo(label, rng, int(rng.integers(40, 72))).save(d / f"{i}.jpg", quality=95)
    weights = root / "weights" / "resnet18-f37072fd.pth"
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), weights)
    return root


if __name__ == "__main__":
    print(f"wrote my_photos/ and weights/ under {main(*sys.argv[1:2]).resolve()}")
