"""Data sets: digits split, CIFAR in the real on-disk format, ImageFolder, the batch sampler."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from dkl.data import SeededDataset, ShardedBatchSampler, build_datasets

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
