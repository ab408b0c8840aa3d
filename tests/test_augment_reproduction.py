"""USB's RandAugment + Cutout and the IKL-AT authors' CIFAR10Policy: parameters on fixed seeds
against USB's / the policy's formulas evaluated here, operations against PIL or NumPy by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL")
from PIL import Image, ImageOps

from dkl.data.autoaugment import CIFAR10_POLICIES, CIFAR10Policy, autoaugment_magnitude
from dkl.data.usb import CUTOUT_FILL, UsbRandAugment, apply_usb_op, usb_cutout

# USB's augment_list(): (operation, min, max), in its order
USB_LIST = [
    ("AutoContrast", 0, 1), ("Brightness", 0.05, 0.95), ("Color", 0.05, 0.95),
    ("Contrast", 0.05, 0.95), ("Equalize", 0, 1), ("Identity", 0, 1), ("Posterize", 4, 8),
    ("Rotate", -30, 30), ("Sharpness", 0.05, 0.95), ("ShearX", -0.3, 0.3),
    ("ShearY", -0.3, 0.3), ("Solarize", 0, 256), ("TranslateX", -0.3, 0.3),
    ("TranslateY", -0.3, 0.3),
]  # fmt: skip


def image(seed: int = 0, size: int = 32) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- USB RandAugment
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_usb_op_choice_and_magnitudes_follow_usbs_formulas(seed):
    n, w = 3, 32
    ops, box = UsbRandAugment(n).sample(w, w, generator=torch.Generator().manual_seed(seed))
    u = torch.rand(2 * n + 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = u.tolist()
    # random.choices(k=n): floor(14 u); value = min + (max - min) u; cutout v = 0.5 u · W
    want = []
    for k in range(n):
        name, lo, hi = USB_LIST[int(u[k] * 14)]
        want.append((name, lo + (hi - lo) * u[n + k]))
    assert [o[0] for o in ops] == [o[0] for o in want]
    assert [o[1] for o in ops] == pytest.approx([o[1] for o in want], rel=1e-12)
    v = 0.5 * u[2 * n] * w
    cx, cy = w + (1 - w) * u[2 * n + 1], w + (1 - w) * u[2 * n + 2]  # np.random.uniform(W)
    x0, y0 = int(max(0, cx - v / 2)), int(max(0, cy - v / 2))
    assert (box.v, box.x0, box.y0) == (pytest.approx(v), x0, y0)
    assert (box.x1, box.y1) == (pytest.approx(min(w, x0 + v)), pytest.approx(min(w, y0 + v)))
    assert 1 < cx <= w and 1 < cy <= w


def test_usb_draws_ops_with_replacement_over_the_whole_list():
    g = torch.Generator().manual_seed(0)
    ra = UsbRandAugment(3)
    names, repeats, mags = set(), 0, {}
    for _ in range(400):
        ops, _ = ra.sample(32, 32, generator=g)
        names |= {n for n, _ in ops}
        repeats += len({n for n, _ in ops}) < 3
        for n, v in ops:
            lo, hi = mags.get(n, (math.inf, -math.inf))
            mags[n] = (min(lo, v), max(hi, v))
    assert names == {n for n, _, _ in USB_LIST} and repeats > 0
    for n, lo, hi in USB_LIST:  # magnitudes spread over each op's full range
        assert lo <= mags[n][0] < lo + 0.1 * (hi - lo) and hi - 0.1 * (hi - lo) < mags[n][1] <= hi


def test_usb_geometric_ops_by_hand():
    img = image(1)
    a = np.asarray(img).astype(int)
    # TranslateX v: PIL's affine reads input x + v·W; v = -0.25 at W = 32 moves right by 8, black fill
    out = np.asarray(apply_usb_op(img, "TranslateX", -0.25)).astype(int)
    assert (out[:, 8:] == a[:, :-8]).all() and (out[:, :8] == 0).all()
    out = np.asarray(apply_usb_op(img, "TranslateY", 0.125)).astype(int)
    assert (out[:-4] == a[4:]).all() and (out[-4:] == 0).all()
    # ShearX: the PIL affine (1, v, 0, 0, 1, 0), nearest, black
    want = img.transform(img.size, Image.AFFINE, (1, 0.2, 0, 0, 1, 0), Image.NEAREST)
    assert np.array_equal(np.asarray(apply_usb_op(img, "ShearX", 0.2)), np.asarray(want))
    want = img.transform(img.size, Image.AFFINE, (1, 0, 0, -0.1, 1, 0), Image.NEAREST)
    assert np.array_equal(np.asarray(apply_usb_op(img, "ShearY", -0.1)), np.asarray(want))
    assert np.array_equal(np.asarray(apply_usb_op(img, "Rotate", 180.0)), a[::-1, ::-1])


def test_usb_pixel_ops_by_hand():
    img = image(2)
    a = np.asarray(img).astype(int)
    # Posterize keeps int(v) bits; Solarize inverts pixels >= v; Identity is the image
    assert (np.asarray(apply_usb_op(img, "Posterize", 5.9)) == (a & 0b11111000)).all()
    assert (np.asarray(apply_usb_op(img, "Posterize", 4.0)) == (a & 0b11110000)).all()
    want = np.where(a >= 100.5, 255 - a, a)
    assert (np.asarray(apply_usb_op(img, "Solarize", 100.5)) == want).all()
    assert apply_usb_op(img, "Identity", 0.3) is img
    # Brightness: blend with black by the factor
    out = np.asarray(apply_usb_op(img, "Brightness", 0.5)).astype(int)
    assert np.abs(out - a * 0.5).max() <= 1
    assert np.array_equal(
        np.asarray(apply_usb_op(img, "AutoContrast", 0)), ImageOps.autocontrast(img)
    )
    with pytest.raises(ValueError, match="Expected an operation"):
        apply_usb_op(img, "Invert", 0.0)


def test_usb_cutout_fills_the_square_usb_draws():
    img = image(3)
    a = np.asarray(img)
    from dkl.data.usb import _cutout_box

    # u = (size, x, y) = (0.5, 0.25, 0.75): v = 8, centre (32 - 31/4, 32 - 93/4) = (24.25, 8.75)
    box = _cutout_box(32, 32, 0.5, 0.25, 0.75)
    assert (box.v, box.x0, box.y0, box.x1, box.y1) == (8.0, 20, 4, 28.0, 12.0)
    out = np.asarray(usb_cutout(img, box))
    inside = np.zeros((32, 32), bool)
    inside[4:13, 20:29] = True  # PIL's rectangle covers both ends: rows 4..12, columns 20..28
    assert (out[inside] == CUTOUT_FILL).all()
    assert np.array_equal(out[~inside], a[~inside])
    assert _cutout_box(32, 32, 0.0, 0.5, 0.5) is None  # v = 0: the image is left alone
    assert usb_cutout(img, None) is img
    # no operations: the whole call is the Cutout it samples
    ra = UsbRandAugment(0)
    _, box = ra.sample(32, 32, generator=torch.Generator().manual_seed(4))
    got = np.asarray(ra(img, generator=torch.Generator().manual_seed(4)))
    assert np.array_equal(got, np.asarray(usb_cutout(img, box)))


def test_strong_view_uses_usb_randaugment():
    pytest.importorskip("torchvision")
    from dkl.data import build_views

    _, strong = build_views("cifar100", randaugment_ops=3)
    assert any(isinstance(t, UsbRandAugment) and t.num_ops == 3 for t in strong.transforms)
    with pytest.raises(ValueError, match="num_ops >= 0"):
        UsbRandAugment(-1)


# --------------------------------------------------------------------------- CIFAR10Policy
# The CIFAR-10 policy of the PIL implementation the IKL-AT authors import (DeepVoltaire/AutoAugment,
# ``CIFAR10Policy``), written out from its source: (p1, op1, bin1, p2, op2, bin2). Bins of the
# operations without a magnitude (autocontrast, equalize, invert) are listed but unused there.
AUTHORS_CIFAR10 = [
    (0.1, "invert", 7, 0.2, "contrast", 6),
    (0.7, "rotate", 2, 0.3, "translateX", 9),
    (0.8, "sharpness", 1, 0.9, "sharpness", 3),
    (0.5, "shearY", 8, 0.7, "translateY", 9),
    (0.5, "autocontrast", 8, 0.9, "equalize", 2),
    (0.2, "shearY", 7, 0.3, "posterize", 7),
    (0.4, "color", 3, 0.6, "brightness", 7),
    (0.3, "sharpness", 9, 0.7, "brightness", 9),
    (0.6, "equalize", 5, 0.5, "equalize", 1),
    (0.6, "contrast", 7, 0.6, "sharpness", 5),
    (0.7, "color", 7, 0.5, "translateX", 8),
    (0.3, "equalize", 7, 0.4, "autocontrast", 8),
    (0.4, "translateY", 3, 0.2, "sharpness", 6),
    (0.9, "brightness", 6, 0.2, "color", 8),
    (0.5, "solarize", 2, 0.0, "invert", 3),
    (0.2, "equalize", 0, 0.6, "autocontrast", 0),
    (0.2, "equalize", 8, 0.6, "equalize", 4),
    (0.9, "color", 9, 0.6, "equalize", 6),
    (0.8, "autocontrast", 4, 0.2, "solarize", 8),
    (0.1, "brightness", 3, 0.7, "color", 0),
    (0.4, "solarize", 5, 0.9, "autocontrast", 3),
    (0.9, "translateY", 9, 0.7, "translateY", 9),
    (0.9, "autocontrast", 2, 0.8, "solarize", 3),
    (0.8, "equalize", 8, 0.1, "invert", 3),
    (0.7, "translateY", 9, 0.9, "autocontrast", 1),
]
NO_MAGNITUDE = {"autocontrast", "equalize", "invert"}


def test_cifar10_policy_table_is_the_authors():
    assert len(CIFAR10_POLICIES) == len(AUTHORS_CIFAR10) == 25
    for ours, (p1, op1, b1, p2, op2, b2) in zip(CIFAR10_POLICIES, AUTHORS_CIFAR10):
        for (name, p, level), (p_ref, op_ref, b_ref) in zip(ours, [(p1, op1, b1), (p2, op2, b2)]):
            assert name.lower() == op_ref.lower() and p == p_ref
            assert level == (None if op_ref in NO_MAGNITUDE else b_ref)


def test_cifar10_policy_table_is_torchvisions():
    tv = pytest.importorskip("torchvision.transforms")
    theirs = tv.AutoAugment(tv.AutoAugmentPolicy.CIFAR10).policies
    assert len(theirs) == 25
    for ours, ref in zip(CIFAR10_POLICIES, theirs):
        for (n1, p1, m1), (n2, p2, m2) in zip(ours, ref):
            assert (n1, p1) == (n2, p2) and (m1 == m2 or m2 is None)


def test_cifar10_policy_rotates_one_way():
    # the authors' rotate takes the bin's angle as it is; the other signed operations flip
    seen = {}
    g = torch.Generator().manual_seed(0)
    policy = CIFAR10Policy()
    for _ in range(3000):
        for name, m in policy.sample(g):
            seen.setdefault(name, set()).add(m > 0 if m else None)
    assert seen["Rotate"] == {True}
    for name in ("TranslateX", "TranslateY", "ShearY", "Color", "Sharpness", "Brightness"):
        assert {True, False} <= seen[name], name


def test_cifar10_policy_magnitudes_by_hand():
    assert autoaugment_magnitude("ShearX", 8) == pytest.approx(0.3 * 8 / 9)
    assert autoaugment_magnitude("TranslateY", 9) == pytest.approx(150 / 331)
    assert autoaugment_magnitude("Rotate", 2) == pytest.approx(30 * 2 / 9)
    assert autoaugment_magnitude("Color", 3) == pytest.approx(0.9 * 3 / 9)
    assert [autoaugment_magnitude("Posterize", i) for i in range(10)] == [
        8,
        8,
        7,
        7,
        6,
        6,
        5,
        5,
        4,
        4,
    ]
    assert autoaugment_magnitude("Solarize", 2) == pytest.approx(256 * 7 / 9)
    assert autoaugment_magnitude("Equalize", None) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_cifar10_policy_sampling_on_fixed_seeds(seed):
    got = CIFAR10Policy().sample(torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    sub = CIFAR10_POLICIES[int(torch.randint(25, (), generator=g))]
    want = []
    for name, p, level in sub:
        if float(torch.rand((), generator=g, dtype=torch.float64)) >= p:
            continue
        m = autoaugment_magnitude(name, level)
        if name not in ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "Rotate"):
            m = m if int(torch.randint(2, (), generator=g)) else -m
        want.append((name, m))
    assert got == want


def test_cifar10_policy_ops_fill_grey_and_shear_bicubically():
    from dkl.data.autoaugment import _apply

    img = image(5)
    grey = (128, 128, 128)
    want = img.transform(
        img.size, Image.AFFINE, (1, 0.2, 0, 0, 1, 0), Image.BICUBIC, fillcolor=grey
    )
    assert np.array_equal(np.asarray(_apply(img, "ShearX", 0.2)), np.asarray(want))
    out = np.asarray(_apply(img, "TranslateX", -0.25))
    assert (out[:, :8] == grey).all() and np.array_equal(out[:, 8:], np.asarray(img)[:, :-8])
    # rotation: the RGBA-over-grey composite of the PIL implementation the authors use
    rot = img.convert("RGBA").rotate(17.0)
    want = Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert("RGB")
    assert np.array_equal(np.asarray(_apply(img, "Rotate", 17.0)), np.asarray(want))
    out = np.asarray(_apply(img, "Brightness", -0.5)).astype(int)  # factor 1 - 0.5
    assert np.abs(out - np.asarray(img).astype(int) * 0.5).max() <= 1


def test_second_view_uses_the_authors_policy():
    pytest.importorskip("torchvision")
    from dkl.data.transforms import _second_view

    assert any(isinstance(t, CIFAR10Policy) for t in _second_view("autoaugment").transforms)
