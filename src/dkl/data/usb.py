"""USB's strong view for semi-supervised CIFAR: RandAugment with random magnitudes, then Cutout.

The IKL authors' semi-supervised numbers come from USB (Wang et al. 2022, the unified SSL
benchmark), whose strong view differs from torchvision's ``RandAugment``:

- ``num_ops`` operations are drawn **with replacement** from the 14 of :data:`USB_OPS`, and each
  gets a magnitude drawn uniformly over its **own full range** (no global magnitude);
- then Cutout: a square of side ``v = U(0, 0.5) · width`` whose corner is ``int(max(0, c − v/2))``
  in each direction, ``c`` the centre, filled with RGB (125, 123, 114) (``v = 0``: no square).

Operations act on PIL images as USB's do: enhancements with the drawn factor, ``Image.rotate``
by the drawn degrees, PIL affine maps ``(1, v, 0, 0, 1, 0)`` (ShearX), ``(1, 0, 0, v, 1, 0)``
(ShearY), ``(1, 0, v·W, 0, 1, 0)`` (TranslateX), ``(1, 0, 0, 0, 1, v·H)`` (TranslateY), all with
PIL's defaults (nearest resampling, black fill); Posterize keeps ``max(1, int(v))`` bits;
Solarize inverts the pixels at or above the threshold ``v``.

Random numbers come from torch (the global generator, or the one given), in USB's order: the
``num_ops`` choices ``⌊14 u⌋``, the ``num_ops`` magnitudes ``lo + (hi − lo) u``, the Cutout size
``0.5 u`` and its centre. USB draws the centre with ``np.random.uniform(W)``, which NumPy reads as
``low = W, high = 1``: the centre is ``W + (1 − W) u``, in ``(1, W]``, and so it is here. The
square is drawn with ``ImageDraw.rectangle((x0, y0, x0 + v, y0 + v))`` as USB does, so it covers
the pixels ``x0 .. int(x0 + v)`` (both ends, clipped to the image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["CUTOUT_FILL", "USB_OPS", "CutoutBox", "UsbRandAugment", "apply_usb_op", "usb_cutout"]

#: (name, min, max) of USB's RandAugment operations, in its order (the choice index is into this)
USB_OPS: tuple[tuple[str, float, float], ...] = (
    ("AutoContrast", 0.0, 1.0),
    ("Brightness", 0.05, 0.95),
    ("Color", 0.05, 0.95),
    ("Contrast", 0.05, 0.95),
    ("Equalize", 0.0, 1.0),
    ("Identity", 0.0, 1.0),
    ("Posterize", 4.0, 8.0),
    ("Rotate", -30.0, 30.0),
    ("Sharpness", 0.05, 0.95),
    ("ShearX", -0.3, 0.3),
    ("ShearY", -0.3, 0.3),
    ("Solarize", 0.0, 256.0),
    ("TranslateX", -0.3, 0.3),
    ("TranslateY", -0.3, 0.3),
)

#: Cutout's fill, RGB
CUTOUT_FILL = (125, 123, 114)


def apply_usb_op(img, name: str, v: float):
    """USB's operation ``name`` with magnitude ``v`` on a PIL image (a new image)."""
    from PIL import Image, ImageEnhance, ImageOps

    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Identity":
        return img
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return getattr(ImageEnhance, name)(img).enhance(v)
    if name == "Posterize":
        return ImageOps.posterize(img, max(1, int(v)))
    if name == "Rotate":
        return img.rotate(v)
    if name == "Solarize":
        return ImageOps.solarize(img, v)
    w, h = img.size
    affine = {
        "ShearX": (1, v, 0, 0, 1, 0),
        "ShearY": (1, 0, 0, v, 1, 0),
        "TranslateX": (1, 0, v * w, 0, 1, 0),
        "TranslateY": (1, 0, 0, 0, 1, v * h),
    }
    if name not in affine:
        raise ValueError(f"Expected an operation in {[n for n, _, _ in USB_OPS]}, got {name!r}")
    return img.transform(img.size, Image.AFFINE, affine[name])


@dataclass(frozen=True)
class CutoutBox:
    """The square USB's Cutout draws: ``ImageDraw.rectangle((x0, y0, x1, y1))``; ``v`` its side."""

    v: float
    x0: int
    y0: int
    x1: float
    y1: float


def _cutout_box(width: int, height: int, u_size: float, u_x: float, u_y: float) -> CutoutBox | None:
    v = 0.5 * u_size * width
    if v <= 0:
        return None
    cx, cy = width + (1 - width) * u_x, height + (1 - height) * u_y  # np.random.uniform(W)
    x0, y0 = int(max(0.0, cx - v / 2.0)), int(max(0.0, cy - v / 2.0))
    return CutoutBox(v, x0, y0, min(width, x0 + v), min(height, y0 + v))


def usb_cutout(img, box: CutoutBox | None):
    """``img`` with ``box`` filled with :data:`CUTOUT_FILL` (``img`` itself when ``box`` is None)."""
    if box is None:
        return img
    from PIL import ImageDraw

    out = img.copy()
    ImageDraw.Draw(out).rectangle((box.x0, box.y0, box.x1, box.y1), CUTOUT_FILL)
    return out


class UsbRandAugment:
    """USB's RandAugment(``num_ops``) + Cutout on PIL images (see the module docstring).

    >>> ops, box = UsbRandAugment(3).sample(32, 32, generator=torch.Generator().manual_seed(0))
    >>> len(ops), box is None or 0 <= box.x0 < 32
    (3, True)
    """

    def __init__(self, num_ops: int = 3) -> None:
        if not (isinstance(num_ops, int) and num_ops >= 0):
            raise ValueError(f"Expected num_ops >= 0, got {num_ops!r}")
        self.num_ops = num_ops

    def sample(
        self, width: int, height: int, generator: torch.Generator | None = None
    ) -> tuple[list[tuple[str, float]], CutoutBox | None]:
        """The operations ``[(name, magnitude), ...]`` and the Cutout box of one call."""
        n = self.num_ops
        u = torch.rand(2 * n + 3, generator=generator, dtype=torch.float64).tolist()
        ops = []
        for k in range(n):
            name, lo, hi = USB_OPS[math.floor(u[k] * len(USB_OPS))]  # random.choices
            ops.append((name, lo + (hi - lo) * u[n + k]))
        return ops, _cutout_box(width, height, *u[2 * n :])

    def __call__(self, img, generator: torch.Generator | None = None):
        ops, box = self.sample(*img.size, generator=generator)
        for name, v in ops:
            img = apply_usb_op(img, name, v)
        return usb_cutout(img, box)

    def __repr__(self) -> str:
        return f"UsbRandAugment(num_ops={self.num_ops}, cutout=0.5, fill={CUTOUT_FILL})"
