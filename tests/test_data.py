"""Data sets: digits split, CIFAR in the real on-disk format, ImageFolder, the batch sampler, the
seed mixing, collate, the view builders and the adversarial second view."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from dkl.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Cutout,
    DigitsStrong,
    DigitsWeak,
    InfiniteBatchSampler,
    SeededDataset,
    ShardedBatchSampler,
    TensorImageDataset,
    TwoViews,
    ViewDataset,
    build_datasets,
    build_views,
    collate,
    crop_flip,
    mix_seed,
    raw_images,
    split_labeled,
    with_second_view,
)

torchvision = pytest.importorskip("torchvision")


def test_digits_split_is_fixed_stratified_and_scaled():
    train, test, info = build_datasets("digits", seed=5)
    assert (len(train), len(test)) == (1347, 450)
    assert info.num_classes == 10 and info.input_shape == (1, 8, 8)
    x, _ = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) <= 1.0
    # stratified: each class's share of the test set is its share of the whole (±1 image)
    from sklearn.datasets import load_digits

    full = Counter(load_digits().target.tolist())
    got = Counter(test.labels.tolist())
    for c in range(10):
        assert abs(got[c] - full[c] * 450 / 1797) <= 1
    # the split does not depend on the run's seed
    _, test2, _ = build_datasets("digits", seed=0)
    assert torch.equal(test.images, test2.images)


def _write_cifar10(root, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    per = n_train // 5
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per).tolist()
        batches.append((data, labels))
        # the real files are Python 2 pickles whose keys decode (latin1) to str
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump(
                {
                    "batch_label": f"training batch {i} of 5",
                    "data": data,
                    "labels": labels,
                    "filenames": [f"{j}.png" for j in range(per)],
                },
                f,
            )
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"data": test, "labels": list(range(n_test))}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}, f)
    return batches, test


def _write_cifar100(root, n_train=12, n_test=6):
    rng = np.random.default_rng(1)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    train = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8)
    fine = rng.integers(0, 100, n_train).tolist()
    with open(d / "train", "wb") as f:
        pickle.dump({"data": train, "fine_labels": fine, "coarse_labels": [0] * n_train}, f)
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    with open(d / "test", "wb") as f:
        pickle.dump(
            {
                "data": test,
                "fine_labels": [99, 0, 5, 7, 1, 2][:n_test],
                "coarse_labels": [0] * n_test,
            },
            f,
        )
    with open(d / "meta", "wb") as f:
        pickle.dump(
            {
                "fine_label_names": [f"f{i}" for i in range(100)],
                "coarse_label_names": [f"k{i}" for i in range(20)],
            },
            f,
        )
    return train, fine, test


@pytest.fixture
def no_md5(monkeypatch):
    # generated files cannot match the released archives' MD5 sums; everything else (file
    # names, pickle layout, HWC reshaping, PIL conversion, transforms) is torchvision's own code
    import os

    from torchvision.datasets import cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def test_cifar10_real_format(tmp_path, no_md5):
    batches, test_raw = _write_cifar10(tmp_path)
    train, test, info = build_datasets("cifar10", root=str(tmp_path), seed=0)
    assert (len(train), len(test), info.num_classes) == (20, 10, 10)
    x, y = test[3]
    want = torch.from_numpy(test_raw[3].reshape(3, 32, 32).astype(np.float32) / 255)
    assert torch.allclose(x, want) and y == 3  # CHW, [0, 1], no normalisation here
    xt, yt = train[0]
    assert xt.shape == (3, 32, 32) and 0 <= xt.min() and xt.max() <= 1
    assert yt == batches[0][1][0]
    # augmentation is a function of (seed, epoch, index): same draw again, another epoch differs
    assert torch.equal(train[0][0], xt)
    train.set_epoch(1)
    assert any(not torch.equal(train[i][0], _at(train, i, 0)) for i in range(4))


def _at(ds: SeededDataset, i: int, epoch: int):
    old = ds.epoch
    ds.set_epoch(epoch)
    try:
        return ds[i][0]
    finally:
        ds.set_epoch(old)


def test_cifar100_real_format(tmp_path, no_md5):
    train_raw, fine, _ = _write_cifar100(tmp_path)
    train, test, info = build_datasets("cifar100", root=str(tmp_path), augment=False)
    assert (len(train), len(test), info.num_classes) == (12, 6, 100)
    x, y = train[2]
    assert torch.allclose(x, torch.from_numpy(train_raw[2].reshape(3, 32, 32) / 255.0).float())
    assert y == fine[2]
    assert test[0][1] == 99


def test_cifar_policies_channels_and_statistics(tmp_path, no_md5):
    batches, _ = _write_cifar10(tmp_path)
    train, _, info = build_datasets("cifar10", root=str(tmp_path))
    steps = [type(t).__name__ for t in train.base.transform.transforms]
    assert steps == ["ToImage", "RandomCrop", "RandomHorizontalFlip", "ToDtype"]
    assert train.base.transform.transforms[1].padding == [4, 4, 4, 4]
    assert (info.mean, info.std) == (CIFAR10_MEAN, CIFAR10_STD)
    plain, _, _ = build_datasets("cifar10", root=str(tmp_path), augment="none")
    want = batches[0][0][1].reshape(3, 32, 32) / 255.0  # the stored CHW bytes
    np.testing.assert_allclose(plain[1][0].numpy(), want, atol=1e-7)
    # grey: the published RGB statistics no longer fit, so they are computed
    grey, _, info = build_datasets("cifar10", root=str(tmp_path), channels=1, augment="none")
    x = torch.stack([grey[i][0] for i in range(len(grey))]).double()
    assert info.input_shape == (1, 32, 32)
    assert info.mean == pytest.approx((float(x.mean()),)) and info.std[0] == pytest.approx(
        float(x.std(unbiased=False))
    )


def test_cifar_missing_files_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.download=true"):
        build_datasets("cifar100", root=str(tmp_path))


def test_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (i * 100, 50, 200)).save(
                    tmp_path / split / c / f"{i}.png"
                )
    train, val, info = build_datasets("imagefolder", root=str(tmp_path), image_size=16)
    assert (len(train), len(val), info.num_classes) == (4, 4, 2)
    assert train[0][0].shape == (3, 16, 16) and val[3][1] == 1


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        build_datasets("mnist")


def test_sampler_shards_cover_and_resume():
    n, world = 23, 3
    shards = [ShardedBatchSampler(n, 4, seed=7, rank=r, world=world) for r in range(world)]
    for s in shards:
        s.set_position(epoch=2)
    seen = [i for s in shards for b in s for i in b]
    assert set(seen) == set(range(n)) and len(seen) == 24  # padded to a multiple of world
    full = list(shards[1])
    shards[1].set_position(epoch=2, batch=1)
    assert list(shards[1]) == full[1:]
    shards[1].set_position(epoch=3)
    assert list(shards[1]) != full  # a new epoch, a new order


def test_normalisation_constants():
    assert CIFAR100_MEAN == (0.5071, 0.4867, 0.4408) and CIFAR100_STD == (0.2675, 0.2565, 0.2761)
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465) and CIFAR10_STD == (0.2470, 0.2435, 0.2616)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------ seed mixing

SEEDS = [0, 1, 7, 123_456_789, 2**40 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_mix_seed_reproduces_every_old_formula(seed):
    # the formulas each call site used before mix_seed existed, written out
    for epoch in (0, 1, 5, 10_000):
        for i in (0, 3, 49_999):
            old = (seed * 1_000_003 + epoch * 10_000_019 + i) % (2**63 - 1)  # SeededDataset
            assert mix_seed(seed, epoch, i) == old
        assert mix_seed(seed, 0, epoch) == seed * 1_000_003 + epoch  # ShardedBatchSampler
        old = seed * 1_000_003 + epoch * 7 + 3  # InfiniteBatchSampler
        assert mix_seed(seed, 0, epoch * 7 + 3) == old
    assert mix_seed(seed, 0, 17) == seed * 1_000_003 + 17  # split_labeled
    for stream in (0, 1):
        for draw in (0, 1, 10**9):
            old = (seed * 1_000_003 + stream * 10_000_019 + draw) % (2**61 - 1)  # ViewDataset
            assert mix_seed(seed, stream, draw) == old
    for rank in (1, 2, 7, 63):
        old = (seed * 1_000_003 + 7_919 * rank) % (2**63 - 1)  # the per-rank training seed
        assert mix_seed(seed, 0, 7_919 * rank) == old


def test_mix_seed_stays_a_valid_torch_seed():
    assert mix_seed(2**70, 2**70, 2**70) < 2**63 - 1
    torch.manual_seed(mix_seed(2**70, 3, 4))


def test_seeded_dataset_runs_the_transform_under_the_mixed_seed():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3), i

    ds = SeededDataset(Noise(), seed=11)
    ds.set_epoch(2)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    x, _ = ds[3]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    torch.manual_seed((11 * 1_000_003 + 2 * 10_000_019 + 3) % (2**63 - 1))
    assert torch.equal(x, torch.rand(3))


def test_samplers_seed_their_permutations_with_the_old_formulas():
    s = ShardedBatchSampler(10, 10, seed=4)
    s.set_position(epoch=3)
    g = torch.Generator().manual_seed(4 * 1_000_003 + 3)
    assert next(iter(s)) == torch.randperm(10, generator=g).tolist()
    inf = InfiniteBatchSampler(6, 6, seed=5)
    g = torch.Generator().manual_seed(5 * 1_000_003 + 1 * 7 + 3)  # epoch 1 = batch 1
    assert [p for p, _ in inf.batch(1)] == torch.randperm(6, generator=g).tolist()
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    rng = np.random.RandomState(9)  # USB: np.random.seed(seed), then one shuffle per class
    first, second = np.array([0, 1, 2]), np.array([3, 4, 5])
    rng.shuffle(first)
    rng.shuffle(second)
    assert split_labeled(labels, 1, seed=9)[0] == [int(first[0]), int(second[0])]


# ---------------------------------------------------------------------------------------- collate


def test_collate_passes_prebatched_tuples_through():
    ds = TensorImageDataset(torch.rand(5, 1, 2, 2), torch.arange(5))
    batch = ds.__getitems__([4, 0, 2])
    assert collate(batch) is batch
    views = ViewDataset(torch.rand(6, 1, 8, 8), torch.arange(6), [0, 2, 4], [DigitsWeak()])
    batch = views.__getitems__([(0, 0), (1, 1)])
    assert collate(batch) is batch and len(batch) == 3


def test_collate_stacks_lists_of_samples():
    # (image, int label) samples from a torchvision set: default_collate's result, as a tuple
    samples = [(torch.full((1, 2), float(i)), i) for i in range(3)]
    x, y = collate(samples)
    assert torch.equal(x, torch.stack([s[0] for s in samples]))
    assert y.dtype == torch.long and y.tolist() == [0, 1, 2]
    want = torch.utils.data.default_collate(samples)
    assert all(torch.equal(a, b) for a, b in zip(collate(samples), want))
    # ((basic, view), label) samples: a tuple of two stacked views
    pairs = [((torch.zeros(2), torch.ones(2)), i) for i in range(4)]
    (basic, view), y = collate(pairs)
    assert basic.shape == view.shape == (4, 2) and y.tolist() == [0, 1, 2, 3]
    # ViewDataset samples (*views, label, index) of PIL images: each column stacked
    from dkl.data import cifar_weak

    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    views = ViewDataset(images, torch.arange(6), [1, 3, 5], [cifar_weak(), cifar_weak()])
    items = views.__getitems__([(0, 0), (2, 1), (1, 2)])
    assert isinstance(items, list)  # PIL images: one sample per key
    out = collate(items)
    assert isinstance(out, tuple) and len(out) == 4
    assert all(torch.equal(a, torch.stack(col)) for a, col in zip(out, zip(*items)))
    assert out[2].tolist() == [1, 5, 3] and out[3].tolist() == [1, 5, 3]
    with pytest.raises(ValueError):
        collate([(torch.zeros(1), 0), (torch.zeros(1),)])


# ----------------------------------------------------------------------------- views and raw images


def test_crop_flip_parameters():
    crop, flip = crop_flip(32, padding=4)
    assert (crop.size, crop.padding, crop.padding_mode) == ((32, 32), 4, "constant")
    assert flip.p == 0.5
    weak, strong = build_views("cifar100", crop_ratio=0.75, randaugment_ops=2)
    crop = weak.transforms[0]
    assert (crop.padding, crop.padding_mode) == (8, "reflect")  # int(32 * (1 - 0.75))
    ra = strong.transforms[2]
    assert type(ra).__name__ == "UsbRandAugment" and ra.num_ops == 2


def test_build_views():
    weak, strong = build_views("digits")
    assert isinstance(weak, DigitsWeak) and isinstance(strong, DigitsStrong)
    with pytest.raises(ValueError, match=r"no views for data 'mnist'; expected one of digits, "):
        build_views("mnist")
    with pytest.raises(ValueError, match=r"Expected crop_ratio in \(0, 1\], got 0.0"):
        build_views("cifar10", crop_ratio=0.0)


def test_raw_images(tmp_path, no_md5):
    train, _, _ = build_datasets("digits")
    images, labels = raw_images(train)
    assert images is train.images and labels is train.labels
    _write_cifar10(tmp_path)
    train, _, _ = build_datasets("cifar10", root=str(tmp_path))
    images, labels = raw_images(train)
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8 and len(labels) == 20
    with pytest.raises(ValueError, match="data set list exposes neither"):
        raw_images([1, 2])


# ----------------------------------------------------------------------------- second view


@pytest.mark.parametrize("kind", ["autoaugment", "cutout"])
def test_with_second_view_copies_and_pairs(tmp_path, no_md5, kind):
    _write_cifar10(tmp_path)
    train, _, _ = build_datasets("cifar10", root=str(tmp_path), seed=3)
    old_transform = train.base.transform
    before = [train[i] for i in range(4)]
    two = with_second_view(train, kind)
    # the original is untouched: same transform object, same samples
    assert train.base.transform is old_transform
    assert all(torch.equal(train[i][0], before[i][0]) for i in range(4))
    assert two is not train and two.base is not train.base and two.base.data is train.base.data
    assert isinstance(two.base.transform, TwoViews)
    assert two.base.transform.basic is old_transform
    for i in range(4):
        (basic, view), y = two[i]
        # the basic view draws first from the same seeded RNG: it is the original sample
        assert torch.equal(basic, before[i][0]) and y == before[i][1]
        assert view.shape == (3, 32, 32) and 0 <= view.min() and view.max() <= 1
        assert torch.equal(two[i][0][1], view)  # reproducible per (seed, epoch, index)
    steps = [type(t).__name__ for t in two.base.transform.view.transforms]
    tail = ["CIFAR10Policy", "ToTensor"] if kind == "autoaugment" else ["ToTensor", "Cutout"]
    assert steps == ["RandomCrop", "RandomHorizontalFlip", *tail]
    (basic, view), y = collate([two[0], two[1]])
    assert basic.shape == view.shape == (2, 3, 32, 32) and y.shape == (2,)


def test_cutout_zeroes_one_clipped_square():
    torch.manual_seed(0)
    img = torch.ones(3, 8, 8)
    out = Cutout(4)(img)
    assert torch.equal(img, torch.ones(3, 8, 8))  # not in place
    torch.manual_seed(0)
    cy, cx = int(torch.randint(8, ())), int(torch.randint(8, ()))
    want = torch.ones(3, 8, 8)
    want[:, max(cy - 2, 0) : min(cy + 2, 8), max(cx - 2, 0) : min(cx + 2, 8)] = 0
    assert torch.equal(out, want)


def test_with_second_view_errors():
    train, _, _ = build_datasets("digits")
    with pytest.raises(ValueError, match=r"needs a torchvision image data set .* got TensorImage"):
        with_second_view(train, "cutout")
    with pytest.raises(
        ValueError, match=r"Expected a second view in \('autoaugment', 'cutout'\), got 'mixup'"
    ):
        with_second_view(train, "mixup")


def test_data_does_not_import_higher_layers():
    import subprocess
    import sys

    code = (
        "import sys, dkl.data\n"
        "bad = [m for m in sys.modules if m.split('.')[:2] in (['dkl', 'models'], "
        "['dkl', 'config'], ['dkl', 'engine'], ['dkl', 'train'], ['dkl', 'recipes'], "
        "['dkl', 'cli']) or m == 'torchvision']\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
