"""AutoAugment's CIFAR-10 policy as the IKL-AT authors' second view runs it (``CIFAR10Policy``).

The 25 sub-policies are AutoAugment's (Cubuk et al. 2019) as the widely used PIL implementation
the authors import (``autoaug.CIFAR10Policy``, DeepVoltaire/AutoAugment) lists them; the table is
the same as torchvision's ``AutoAugmentPolicy.CIFAR10``. Its operations differ from torchvision's:

- fill grey (128, 128, 128) outside the image for shears, translations and rotations
  (torchvision: black);
- shears resample bicubically (torchvision: nearest); translations and rotations nearest;
- magnitudes of bin ``i`` of 10: shear ``0.3 i/9``, translate ``(150/331) i/9`` of the image
  side, rotate ``30 i/9`` degrees, colour / contrast / sharpness / brightness factor
  ``1 ± 0.9 i/9``, posterize ``round(8 − 4 i/9)`` bits, solarize threshold ``256 (1 − i/9)``
  (torchvision: ``255 (1 − i/9)`` and integer translations);
- a random sign for shears, translations and the four enhance factors; rotations always turn
  by ``+30 i/9`` degrees (counter-clockwise), without a sign (torchvision: a random sign);
- a shear or translation is the PIL affine map ``(1, ±m, 0, 0, 1, 0)``, ``(1, 0, 0, ±m, 1, 0)``,
  ``(1, 0, ±m·W, 0, 1, 0)``, ``(1, 0, 0, 0, 1, ±m·H)``.

One call picks a sub-policy uniformly, then applies each of its two operations with its
probability. Random numbers come from torch (the global generator, or the one given).
"""

from __future__ import annotations

import torch

__all__ = ["CIFAR10_POLICIES", "CIFAR10Policy", "autoaugment_magnitude"]

#: AutoAugment's CIFAR-10 sub-policies: ((operation, probability, magnitude bin), x2)
CIFAR10_POLICIES: tuple[tuple[tuple[str, float, int | None], ...], ...] = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)

#: the operations whose magnitude gets a random sign (not Rotate: the authors' turns one way)
_SIGNED = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Color", "Contrast", "Sharpness",
           "Brightness")  # fmt: skip
_FILL = (128, 128, 128)


def autoaugment_magnitude(name: str, level: int | None) -> float:
    """The unsigned magnitude of bin ``level`` (0..9) of operation ``name``; 0 for none.

    >>> autoaugment_magnitude("Rotate", 9), autoaugment_magnitude("Posterize", 1)
    (30.0, 8)
    """
    if level is None:
        return 0.0
    if not 0 <= level <= 9:
        raise ValueError(f"Expected a magnitude bin in 0..9, got {level}")
    f = level / 9
    if name in ("ShearX", "ShearY"):
        return 0.3 * f
    if name in ("TranslateX", "TranslateY"):
        return 150 / 331 * f
    if name == "Rotate":
        return 30.0 * f
    if name in ("Color", "Contrast", "Sharpness", "Brightness"):
        return 0.9 * f
    if name == "Posterize":
        return round(8 - 4 * f)
    if name == "Solarize":
        return 256 * (1 - f)
    raise ValueError(f"operation {name!r} takes no magnitude")


def _apply(img, name: str, m: float):
    from PIL import Image, ImageEnhance, ImageOps

    if name == "Invert":
        return ImageOps.invert(img)
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Posterize":
        return ImageOps.posterize(img, int(m))
    if name == "Solarize":
        return ImageOps.solarize(img, m)
    if name in ("Color", "Contrast", "Sharpness", "Brightness"):
        return getattr(ImageEnhance, name)(img).enhance(1 + m)
    if name == "Rotate":  # nearest resampling: the same as rotating RGBA over a grey backdrop
        return img.rotate(m, fillcolor=_FILL)
    w, h = img.size
    if name == "ShearX":
        return img.transform(img.size, Image.AFFINE, (1, m, 0, 0, 1, 0), Image.BICUBIC,
                             fillcolor=_FILL)  # fmt: skip
    if name == "ShearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, m, 1, 0), Image.BICUBIC,
                             fillcolor=_FILL)  # fmt: skip
    if name == "TranslateX":
        return img.transform(img.size, Image.AFFINE, (1, 0, m * w, 0, 1, 0), fillcolor=_FILL)
    if name == "TranslateY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, m * h), fillcolor=_FILL)
    raise ValueError(f"unknown AutoAugment operation {name!r}")


class CIFAR10Policy:
    """AutoAugment's CIFAR-10 policy on PIL images, as the IKL-AT authors run it (module doc).

    >>> from PIL import Image
    >>> img = Image.new("RGB", (8, 8), (10, 200, 30))
    >>> CIFAR10Policy()(img, generator=torch.Generator().manual_seed(0)).size
    (8, 8)
    """

    def sample(self, generator: torch.Generator | None = None) -> list[tuple[str, float]]:
        """The operations ``[(name, signed magnitude), ...]`` one call applies (0, 1 or 2)."""
        idx = int(torch.randint(len(CIFAR10_POLICIES), (), generator=generator))
        ops = []
        for name, p, level in CIFAR10_POLICIES[idx]:
            if float(torch.rand((), generator=generator, dtype=torch.float64)) >= p:
                continue
            m = autoaugment_magnitude(name, level)
            if name in _SIGNED and int(torch.randint(2, (), generator=generator)) == 0:
                m = -m
            ops.append((name, m))
        return ops

    def __call__(self, img, generator: torch.Generator | None = None):
        for name, m in self.sample(generator):
            img = _apply(img, name, m)
        return img

    def __repr__(self) -> str:
        return "CIFAR10Policy(fill=(128, 128, 128), shear=bicubic)"
