"""Your own data: image folders, .npz files and Hugging Face data sets written here, the
preprocessing policies, the auto mean / std, channels, the dataset registry and the error messages;
the acceptance run (summary.json's accuracy = final.pt re-evaluated by hand)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from dkl.data import (
    POLICIES,
    DataInfo,
    ImageSplits,
    SeededDataset,
    UnknownDatasetError,
    build_datasets,
    list_datasets,
    register_dataset,
    stratified_split,
)

pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")


def _pattern(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A grey uint8 image whose class shows: a bright row band, column band or diagonal."""
    img = rng.integers(0, 70, (size, size)).astype(np.uint8)
    lo, hi = size // 3, 2 * size // 3
    if label == 0:
        img[lo:hi, :] = 220
    elif label == 1:
        img[:, lo:hi] = 220
    else:
        idx = np.arange(size)
        img[idx, idx] = 250
        img[idx[1:], idx[:-1]] = 250
    return img


def write_folder(root, counts=None, size=12, classes=("a", "b", "c"), mode="L", seed=0):
    """``root/<split>/<class>/<i>.png`` with ``counts[split]`` images per class."""
    counts = counts or {"train": 4, "val": 2}
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for label, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.fromarray(_pattern(label % 3, size, rng))
                if mode != "L":
                    img = img.convert(mode)
                img.save(d / f"{i:03d}.png")
    return root


def pixels(path, mode="L") -> np.ndarray:
    with Image.open(path) as img:
        a = np.asarray(img.convert(mode), dtype=np.float64) / 255.0
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def files(root, split):
    return sorted((root / split).glob("*/*.png"))


# ------------------------------------------------------------------------- train/eval consistency


def test_folder_none_policy_is_the_stored_image_in_grey(tmp_path):
    root = write_folder(tmp_path)
    train, val, info = build_datasets("imagefolder", root=str(root), augment="none")
    assert info.input_shape == (1, 12, 12) and info.num_classes == 3
    assert info.classes == ("a", "b", "c")
    for i, path in enumerate(files(root, "train")):
        x, y = train[i]
        assert x.dtype == torch.float32 and y == "abc".index(path.parent.name)
        np.testing.assert_allclose(x.numpy(), pixels(path), atol=1e-7)
    np.testing.assert_allclose(val[0][0].numpy(), pixels(files(root, "val")[0]), atol=1e-7)


@pytest.mark.parametrize("policy", [p for p in POLICIES if p not in ("default", "imagenet")])
def test_eval_preprocessing_of_the_train_split_is_what_none_trains_on(tmp_path, policy):
    # val holds the very files of train: its (eval) tensors must be the ones `none` trains on
    root = write_folder(tmp_path / "d", {"train": 3})
    (root / "val").symlink_to(root / "train")
    kw = {"root": str(root), "image_size": 16, "mean": [0.5], "std": [0.5]}
    plain, _, _ = build_datasets("imagefolder", augment="none", **kw)
    _, val, info = build_datasets("imagefolder", augment=policy, **kw)
    assert info.input_shape == (1, 16, 16)
    for i in range(len(val)):
        assert torch.equal(val[i][0], plain[i][0])


def test_imagenet_policy_evaluates_on_the_centre_crop(tmp_path):
    from torchvision.transforms import v2

    root = write_folder(tmp_path, {"train": 2, "val": 1}, size=40, mode="RGB")
    train, val, info = build_datasets("imagefolder", root=str(root), augment="imagenet",
                                      image_size=16, mean="imagenet", std="imagenet")  # fmt: skip
    assert info.input_shape == (3, 16, 16) and info.mean == (0.485, 0.456, 0.406)
    by_hand = v2.Compose([v2.ToImage(), v2.Resize(18, antialias=True), v2.CenterCrop(16),
                          v2.ToDtype(torch.float32, scale=True)])  # fmt: skip
    with Image.open(files(root, "val")[0]) as img:
        assert torch.equal(val[0][0], by_hand(img.convert("RGB")))
    assert isinstance(train, SeededDataset) and train[0][0].shape == (3, 16, 16)


def test_crop_flip_pads_small_images_and_is_seeded_per_sample(tmp_path):
    root = write_folder(tmp_path, {"train": 2, "val": 1})
    train, _, _ = build_datasets("imagefolder", root=str(root), augment="crop_flip", seed=3)
    crop = train.base.transform.transforms[1]
    assert type(crop).__name__ == "RandomCrop" and crop.padding == [2, 2, 2, 2]  # 12 / 8 -> 2
    assert torch.equal(train[1][0], train[1][0])  # the same sample in the same epoch
    draws = {train[i][0].numpy().tobytes() for i in range(6)}
    train.set_epoch(1)
    assert draws != {train[i][0].numpy().tobytes() for i in range(6)}
    # no padding and no flip: crop_flip is the identity
    same, _, _ = build_datasets("imagefolder", root=str(root), augment="crop_flip",
                                crop_padding=0, flip=False)  # fmt: skip
    plain, _, _ = build_datasets("imagefolder", root=str(root), augment="none")
    assert all(torch.equal(same[i][0], plain[i][0]) for i in range(6))


def test_augment_booleans_and_dataset_defaults(tmp_path):
    root = write_folder(tmp_path, {"train": 1, "val": 1})
    plain, _, _ = build_datasets("imagefolder", root=str(root), augment=False)
    default, _, _ = build_datasets("imagefolder", root=str(root), augment=True)
    assert not isinstance(plain, SeededDataset) and not isinstance(default, SeededDataset)
    digits, _, _ = build_datasets("digits", augment=True)  # digits: no standard augmentation
    assert type(digits).__name__ == "TensorImageDataset"


def test_config_augment_keys():
    from dkl.config import ConfigError, load_config
    from dkl.config.schema import AUGMENT_POLICIES

    assert AUGMENT_POLICIES == POLICIES
    assert load_config("kd/digits_ce", ["data.augment=false"]).data.augment == "none"
    assert load_config("kd/digits_ce", ["data.augment=true"]).data.augment == "default"
    with pytest.raises(ConfigError, match=r"^data.augment: expected one of default, none, crop_"):
        load_config("kd/digits_ce", ["data.augment=flip"])
    with pytest.raises(ConfigError, match=r"^data.mean: expected 1 per-channel values, got 3$"):
        load_config("kd/digits_ce", ["data.channels=1", "data.mean=[0.1,0.2,0.3]"])
    with pytest.raises(ConfigError, match=r"^data.crop_scale: expected \[lo, hi\]"):
        load_config("kd/digits_ce", ["data.crop_scale=[0.5, 0.2]"])
    cfg = load_config("kd/imagenet_resnet34_resnet18_ikl")
    assert (cfg.data.augment, cfg.data.mean, cfg.data.channels) == ("imagenet", "imagenet", 3)


# ------------------------------------------------------------------------------------ channels


def test_channels_grey_to_rgb_and_rgb_to_grey(tmp_path):
    grey = write_folder(tmp_path / "g", {"train": 1, "val": 1})
    train, _, info = build_datasets("imagefolder", root=str(grey), channels=3)
    assert info.input_shape == (3, 12, 12)
    x = train[0][0]
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    colour = write_folder(tmp_path / "c", {"train": 1, "val": 1}, mode="RGB")
    assert build_datasets("imagefolder", root=str(colour))[2].input_shape[0] == 3
    train, _, info = build_datasets("imagefolder", root=str(colour), channels=1)
    assert info.input_shape == (1, 12, 12)
    np.testing.assert_allclose(train[0][0].numpy(), pixels(files(colour, "train")[0]), atol=1e-7)


def test_channels_as_stored_looks_past_the_first_image(tmp_path):
    root = write_folder(tmp_path, {"train": 2, "val": 1})
    path = files(root, "train")[-1]
    Image.open(path).convert("RGB").save(path)  # one colour image among grey ones
    assert build_datasets("imagefolder", root=str(root))[2].input_shape[0] == 3


def test_image_size_zero_requires_one_size(tmp_path):
    root = write_folder(tmp_path, {"train": 2, "val": 1})
    odd = files(root, "train")[1]
    Image.new("L", (9, 12)).save(odd)
    train, _, _ = build_datasets("imagefolder", root=str(root), mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match=rf"image '{odd}' is 12×9, the first .* data.image_size"):
        train[1]
    train, _, _ = build_datasets("imagefolder", root=str(root), image_size=8)
    assert train[1][0].shape == (1, 8, 8)


# ---------------------------------------------------------------------------------- mean / std


def test_auto_mean_std_match_numpy_and_are_cached(tmp_path):
    root = write_folder(tmp_path / "d", mode="RGB")
    want = np.stack([pixels(p, "RGB") for p in files(root, "train")])  # (N, 3, H, W)
    cache = tmp_path / "run"
    _, _, info = build_datasets("imagefolder", root=str(root), mean="auto", std="auto",
                                cache_dir=str(cache))  # fmt: skip
    np.testing.assert_allclose(info.mean, want.mean((0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(info.std, want.std((0, 2, 3)), rtol=1e-6)
    # a second build reads the file (here edited, to show it is read, not recomputed)
    saved = json.loads((cache / "data_stats.json").read_text())
    saved["mean"] = [0.25, 0.5, 0.75]
    (cache / "data_stats.json").write_text(json.dumps(saved))
    _, _, again = build_datasets("imagefolder", root=str(root), mean="auto", std="auto",
                                 cache_dir=str(cache))  # fmt: skip
    assert again.mean == (0.25, 0.5, 0.75) and again.std == info.std
    # other data (another image size) does not reuse it
    _, _, other = build_datasets("imagefolder", root=str(root), image_size=6, mean="auto",
                                 cache_dir=str(cache))  # fmt: skip
    assert other.mean != (0.25, 0.5, 0.75)


def test_mean_std_default_fixed_and_errors(tmp_path):
    root = write_folder(tmp_path, {"train": 1, "val": 1})
    _, _, info = build_datasets("imagefolder", root=str(root), mean=[0.1], std=[0.2])
    assert (info.mean, info.std) == ((0.1,), (0.2,))
    want = np.stack([pixels(p) for p in files(root, "train")])
    _, _, info = build_datasets("imagefolder", root=str(root))  # default: no published values
    np.testing.assert_allclose(info.mean, [want.mean()], rtol=1e-6)
    with pytest.raises(ValueError, match="ImageNet's values are for 3 channels, the images have 1"):
        build_datasets("imagefolder", root=str(root), mean="imagenet")
    with pytest.raises(ValueError, match=r"data.std: 3 value\(s\) for images with 1 channel"):
        build_datasets("imagefolder", root=str(root), std=[0.2, 0.2, 0.2])
    # digits keeps its published values; with 3 channels they no longer fit: computed
    assert build_datasets("digits")[2].std == (pytest.approx(0.37600776),)
    assert len(build_datasets("digits", channels=3)[2].mean) == 3


# ------------------------------------------------------------------------------ folder errors


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"data.root '{tmp_path / 'nope'}' is not a"):
        build_datasets("imagefolder", root=str(tmp_path / "nope"))
    root = write_folder(tmp_path / "d", {"train": 1})
    with pytest.raises(ValueError, match=r"too few images per class to hold out"):
        build_datasets("imagefolder", root=str(root))
    leaf = root / "train" / "a"  # images, no class folders
    with pytest.raises(
        FileNotFoundError, match=rf"expected class folders under '{leaf / 'train'}'"
    ):
        build_datasets("imagefolder", root=str(leaf))
    write_folder(root, {"val": 1}, classes=("a", "b", "z"))
    with pytest.raises(ValueError, match=r"class folders differ .*only in train: \['c'\]; only "
                                         r"in val: \['z'\]"):  # fmt: skip
        build_datasets("imagefolder", root=str(root))
    (root / "val" / "z").rename(root / "val" / "c")
    bad = root / "train" / "b" / "000.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=rf"^cannot read image '{bad}'"):
        build_datasets("imagefolder", root=str(root))  # the channel probe reads it
    train, _, _ = build_datasets("imagefolder", root=str(root), channels=1, mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match=rf"^cannot read image '{bad}'"):
        train[1]  # or when it is loaded
    (root / "train" / "c" / "000.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"no image files .* in '{root / 'train' / 'c'}'"):
        build_datasets("imagefolder", root=str(root))


# ----------------------------------------------------------------------------------------- npz


def test_npz_with_test_part_uint8_channels_last(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 6, 5, 3), dtype=np.uint8)
    xt = rng.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(10) % 3, x_test=xt, y_test=np.array([2, 1, 0, 0]),
             classes=np.array(["r", "g", "b"]))  # fmt: skip
    train, test, info = build_datasets("npz", root=str(path), mean="auto", std="auto")
    assert (len(train), len(test), info.num_classes, info.classes) == (10, 4, 3, ("r", "g", "b"))
    assert info.input_shape == (3, 6, 5)
    np.testing.assert_allclose(train[7][0].numpy(), x[7].transpose(2, 0, 1) / 255, atol=1e-7)
    assert train[7][1] == 1 and test[0][1] == 2
    np.testing.assert_allclose(info.mean, (x / 255).mean((0, 1, 2)), rtol=1e-6)


def test_npz_without_test_part_holds_out_a_fixed_stratified_share(tmp_path):
    x = np.linspace(0, 1, 40 * 16, dtype=np.float32).reshape(40, 4, 4)  # float (N, H, W)
    y = np.repeat([0, 1, 2, 3], 10)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    train, test, info = build_datasets("npz", root=str(path), val_fraction=0.3, seed=5)
    assert (len(train), len(test), info.input_shape) == (28, 12, (1, 4, 4))
    labels = [int(test[i][1]) for i in range(len(test))]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    _, test2, _ = build_datasets("npz", root=str(path), val_fraction=0.3, seed=9)
    assert torch.equal(test.images, test2.images)  # independent of the run's seed
    held = {tuple(test[i][0].flatten().tolist()) for i in range(len(test))}
    assert held.isdisjoint(tuple(train[i][0].flatten().tolist()) for i in range(len(train)))
    tr, te = stratified_split(y, 0.3)  # the documented split: rng(0), class by class
    rng = np.random.default_rng(0)
    want = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:3] for c in range(4)]))
    assert te.tolist() == want.tolist() and len(tr) == 28


def test_npz_errors(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((2, 4, 4)), y=np.zeros(2, int))
    with pytest.raises(ValueError, match=r"must hold arrays x and y, found \['images', 'y'\]"):
        build_datasets("npz", root=str(path))
    np.savez(path, x=np.full((2, 4, 4), 255.0), y=np.zeros(2, int))
    with pytest.raises(ValueError, match=r"'x': float pixels must lie in \[0, 1\], got \[255, "):
        build_datasets("npz", root=str(path))
    np.savez(path, x=np.zeros((2, 4, 4), np.uint8), y=np.zeros(3, int))
    with pytest.raises(ValueError, match=r"'y' must be \(2,\) labels, got shape \(3,\)"):
        build_datasets("npz", root=str(path))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        build_datasets("npz", root=str(tmp_path / "missing.npz"))


# ------------------------------------------------------------------------------ Hugging Face


@pytest.fixture
def hf_rows():
    rng = np.random.default_rng(1)
    images = [Image.fromarray(_pattern(i % 3, 8, rng)) for i in range(12)]
    return images, [i % 3 for i in range(12)]


def test_hf_saved_to_disk(tmp_path, hf_rows):
    datasets = pytest.importorskip("datasets")
    images, labels = hf_rows
    features = datasets.Features(
        {"img": datasets.Image(), "fine": datasets.ClassLabel(names=["x", "y", "z"])}
    )
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"img": images[:9], "fine": labels[:9]}, features),
        validation=datasets.Dataset.from_dict({"img": images[9:], "fine": labels[9:]}, features),
    )
    dd.save_to_disk(str(tmp_path / "hf"))
    train, test, info = build_datasets("hf", root=str(tmp_path / "hf"))
    assert (len(train), len(test), info.classes, info.input_shape) == (9, 3, ("x", "y", "z"),
                                                                       (1, 8, 8))  # fmt: skip
    x, y = test[1]
    np.testing.assert_allclose(x[0].numpy(), np.asarray(images[10]) / 255, atol=1e-7)
    assert y == labels[10]


def test_hf_parquet_without_test_split(tmp_path, hf_rows):
    datasets = pytest.importorskip("datasets")
    images, labels = hf_rows
    arrays = [np.asarray(im).tolist() for im in images]  # plain int lists, no Image feature
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_dict({"pixels": arrays, "label": labels}).to_parquet(
        str(tmp_path / "pq" / "train.parquet")
    )
    train, test, info = build_datasets(
        "hf", root=str(tmp_path / "pq"), val_fraction=0.25,
        options={"image_key": "pixels", "cache_dir": str(tmp_path / "cache")},
    )  # fmt: skip
    assert (len(train), len(test), info.num_classes) == (9, 3, 3)
    _, te = stratified_split(labels, 0.25)
    np.testing.assert_allclose(test[0][0][0].numpy(), np.asarray(images[te[0]]) / 255, atol=1e-7)
    with pytest.raises(ValueError, match=r"unknown data.options \['imagekey'\]"):
        build_datasets("hf", root=str(tmp_path / "pq"), options={"imagekey": "pixels"})


def test_hf_imagefolder_builder(tmp_path):
    pytest.importorskip("datasets")
    root = write_folder(tmp_path / "d", {"train": 2, "val": 1})
    train, test, info = build_datasets(
        "hf", root=str(root), options={"builder": "imagefolder", "cache_dir": str(tmp_path / "c")}
    )
    assert (len(train), len(test), info.classes) == (6, 3, ("a", "b", "c"))
    assert info.input_shape == (1, 12, 12)


# ------------------------------------------------------------------------------ the registry


def test_register_dataset_raw_items_and_finished_sets():
    @register_dataset("test_stripes")
    def stripes(request):
        n = int(request.options.get("n", 4))
        items = [(np.full((3, 3), 40 * i, np.uint8), i % 2) for i in range(n)]
        return ImageSplits(train=items, test=items[:2], classes=2)

    @register_dataset("test_ready")
    def ready(request):
        from dkl.data import TensorImageDataset

        ds = TensorImageDataset(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]))
        return ds, ds, DataInfo("test_ready", 2, (1, 2, 2), (0.0,), (1.0,))

    try:
        assert {"test_stripes", "test_ready"} <= set(list_datasets())
        train, test, info = build_datasets("test_stripes", options={"n": 6}, channels=3)
        assert (len(train), len(test), info.input_shape) == (6, 2, (3, 3, 3))
        np.testing.assert_allclose(train[2][0].numpy(), np.full((3, 3, 3), 80 / 255), atol=1e-7)
        assert build_datasets("test_ready")[2].name == "test_ready"
        with pytest.raises(ValueError, match="'test_ready' is already registered"):
            register_dataset("test_ready")(stripes)
        with pytest.raises(UnknownDatasetError) as err:
            build_datasets("mnist")
        msg = str(err.value)
        assert "\n" not in msg and "built in: digits, cifar10, cifar100, imagefolder, npz" in msg
        assert "registered: test_ready, test_stripes" in msg
    finally:
        from dkl.data.datasets import _REGISTRY

        _REGISTRY.pop("test_stripes", None)
        _REGISTRY.pop("test_ready", None)


def test_unknown_data_name_is_a_one_line_config_error(tmp_path):
    from dkl.api import make_trainer
    from dkl.config import ConfigError, load_config

    cfg = load_config("kd/digits_ce", ["data.name=mnist", f"train.out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^data.name: unknown data set 'mnist'; built in: "):
        make_trainer(cfg)


# ------------------------------------------------------------------------------ acceptance


def test_acceptance_reported_accuracy_is_final_pt_on_the_training_preprocessing(tmp_path):
    """Grey 12×12 images, 3 classes, a small CNN, augment none: the top-1 in summary.json is the
    accuracy of final.pt on the val images prepared by hand (PIL -> [0, 1], NumPy mean / std)."""
    from torchvision.transforms import v2

    from dkl.api import train
    from dkl.config import load_config
    from dkl.models import create_model

    root = write_folder(tmp_path / "data", {"train": 16, "val": 8})
    cfg = load_config(
        {
            "name": "own", "recipe": "distill", "seed": 0,
            "data": {"name": "imagefolder", "root": str(root), "augment": "none",
                     "batch_size": 16, "eval_batch_size": 64},
            "model": {"name": "digits_cnn", "kwargs": {"width": 8}},
            "optim": {"name": "sgd", "lr": 0.05}, "sched": {"name": "cosine"},
            "train": {"epochs": 3, "out_dir": str(tmp_path / "runs"), "device": "cpu",
                      "progress": False, "plot": False, "threads": 1},
            "distill": {"method": "ce"},
        }
    )  # fmt: skip
    summary = train(cfg, log=lambda m: None)
    run = tmp_path / "runs" / "own"
    assert json.loads((run / "summary.json").read_text())["last"]["top1"] == summary["last"]["top1"]

    to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])

    def load(split):
        xs, ys = [], []
        for p in files(root, split):
            with Image.open(p) as img:
                xs.append(to_tensor(img))
            ys.append("abc".index(p.parent.name))
        return torch.stack(xs), torch.tensor(ys)

    x_train, _ = load("train")
    mean, std = float(x_train.double().mean()), float(x_train.double().std(unbiased=False))
    cached = json.loads((run / "data_stats.json").read_text())
    assert cached["mean"] == pytest.approx([mean]) and cached["std"] == pytest.approx([std])
    model = create_model("digits_cnn", 3, width=8, in_channels=1)
    model.load_state_dict(torch.load(run / "final.pt", weights_only=True)["model"])
    model.eval()
    x_val, y_val = load("val")
    with torch.no_grad():
        pred = model((x_val - mean) / std).argmax(1)
    top1 = 100.0 * float((pred == y_val).double().mean())
    assert summary["last"]["top1"] == pytest.approx(top1, abs=1e-9)
    assert top1 > 100 / 3  # it learned something: the check is not vacuous


@pytest.mark.parametrize("layout", ["train_only", "classes_at_root"])
def test_a_folder_without_a_test_split_holds_out_a_fixed_stratified_share(tmp_path, layout):
    root = write_folder(tmp_path / "d", {"train": 10})
    if layout == "classes_at_root":
        for c in ("a", "b", "c"):
            (root / "train" / c).rename(root / c)
        (root / "train").rmdir()
    a = build_datasets("imagefolder", root=str(root), val_fraction=0.2, seed=0)
    b = build_datasets("imagefolder", root=str(root), val_fraction=0.2, seed=5)
    train, test, info = a
    assert (len(train), len(test), info.num_classes) == (24, 6, 3)  # 2 of each class's 10 held out
    assert sorted(int(test[i][1]) for i in range(len(test))) == [0, 0, 1, 1, 2, 2]
    held = [test.source.describe(i) for i in range(len(test))]
    assert held == [b[1].source.describe(i) for i in range(len(b[1]))]  # whatever the seed
    seen = {train.source.describe(i) for i in range(len(train))}
    assert not seen & set(held)


# --------------------------------------------------------------------------------------------
# Data as users have it: other split names, links, hidden files, run folders, changed images
# --------------------------------------------------------------------------------------------

SOURCES_LOG = "dkl.data.sources"


@pytest.mark.parametrize("name", ["val", "validation", "valid", "test"])
def test_a_folder_test_split_under_any_common_name_is_used_and_named(tmp_path, caplog, name):
    root = write_folder(tmp_path, {"train": 4, name: 2})
    with caplog.at_level(logging.INFO, logger=SOURCES_LOG):
        train, test, _ = build_datasets("imagefolder", root=str(root), mean=[0.5], std=[0.5])
    assert (len(train), len(test)) == (12, 6)  # nothing held out of train
    assert test.source.describe(0) == f"image '{root / name / 'a' / '000.png'}'"
    assert f"test split '{root / name}'" in caplog.text


def test_the_first_of_the_test_split_names_wins_and_the_others_are_named(tmp_path, caplog):
    """The name each source always read comes first (a folder's val/ then test/, an npz file's
    x_test): data holding several is scored on the same split as before."""
    root = write_folder(tmp_path, {"train": 4, "validation": 2, "test": 1})
    with caplog.at_level(logging.WARNING, logger=SOURCES_LOG):
        _, test, _ = build_datasets("imagefolder", root=str(root), mean=[0.5], std=[0.5])
    assert len(test) == 3
    assert f"test split '{root / 'test'}'; left out '{root / 'validation'}'" in caplog.text
    x = np.random.default_rng(0).integers(0, 256, (12, 4, 4), dtype=np.uint8)
    path = tmp_path / "d.npz"
    y = np.arange(12) % 3
    np.savez(path, x=x, y=y, x_val=x[:4], y_val=y[:4], x_test=x[:5], y_test=y[:5])
    assert len(build_datasets("npz", root=str(path))[1]) == 5


def test_a_held_out_test_split_is_a_warning(tmp_path, caplog):
    root = write_folder(tmp_path, {"train": 10})
    with caplog.at_level(logging.WARNING, logger=SOURCES_LOG):
        build_datasets("imagefolder", root=str(root), mean=[0.5], std=[0.5])
    assert (
        f"no test split (no val/, test/, validation/, valid/ folder in '{root}'); holding out "
        f"data.val_fraction=0.2 of the training images (6 of 30)"
    ) in caplog.text


@pytest.mark.parametrize("name", ["val", "validation", "valid", "test"])
def test_npz_test_split_keys_follow_the_same_names(tmp_path, caplog, name):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 4, 4), dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(12) % 3, **{f"x_{name}": x[:5], f"y_{name}": np.arange(5) % 3})
    with caplog.at_level(logging.INFO, logger=SOURCES_LOG):
        train, test, _ = build_datasets("npz", root=str(path))
    assert (len(train), len(test)) == (12, 5)
    assert f"test split x_{name} / y_{name}" in caplog.text
    np.savez(path, x=x, y=np.arange(12) % 3, **{f"x_{name}": x[:5]})
    with pytest.raises(ValueError, match=rf"holds one of x_{name} / y_{name}, not both"):
        build_datasets("npz", root=str(path))


def test_images_in_a_linked_sub_folder_are_read_once_like_torchvision(tmp_path):
    from torchvision.datasets import ImageFolder

    root = write_folder(tmp_path / "d", {"train": 3, "val": 1})
    extra = write_folder(tmp_path / "extra", {"more": 2}, seed=1) / "more" / "a"
    (root / "train" / "a" / "more").symlink_to(extra, target_is_directory=True)
    assert len(ImageFolder(str(root / "train"))) == 11
    (extra / "loop").symlink_to(root / "train" / "a", target_is_directory=True)  # a link cycle
    train, _, _ = build_datasets("imagefolder", root=str(root), mean=[0.5], std=[0.5])
    seen = [train.source.describe(i) for i in range(len(train))]
    assert len(seen) == 11 and f"image '{root / 'train' / 'a' / 'more' / '001.png'}'" in seen


def test_hidden_files_and_folders_in_class_folders_are_skipped(tmp_path):
    root = write_folder(tmp_path, {"train": 3, "val": 1})
    a = root / "train" / "a"
    (a / ".ipynb_checkpoints").mkdir()
    (a / ".ipynb_checkpoints" / "000-checkpoint.png").write_bytes((a / "000.png").read_bytes())
    (a / "._000.png").write_bytes(b"\x00\x05\x16\x07 macOS AppleDouble")  # not an image
    (root / "val" / "b" / "._000.png").write_bytes(b"\x00\x05\x16\x07")
    train, test, _ = build_datasets("imagefolder", root=str(root))
    assert (len(train), len(test)) == (9, 3)


def test_run_folders_inside_the_data_are_no_class_and_no_images(tmp_path, caplog):
    root = write_folder(tmp_path, {"train": 10})
    for c in ("a", "b", "c"):  # the flat layout, root/<class>/*
        (root / "train" / c).rename(root / c)
    (root / "train").rmdir()
    run = root / "runs" / "t1"  # `dkl train` run from inside the data folder
    run.mkdir(parents=True)
    Image.new("L", (12, 12)).save(run / "curves.png")
    (run / "summary.json").write_text("{}")
    (run / "final.pt").write_bytes(b"")
    nested = root / "a" / "runs" / "t2"  # a run inside a class folder: its plot is no image
    nested.mkdir(parents=True)
    Image.new("L", (12, 12)).save(nested / "curves.png")
    (nested / "metrics.jsonl").write_text("")
    with caplog.at_level(logging.WARNING, logger=SOURCES_LOG):
        train, test, info = build_datasets("imagefolder", root=str(root), mean=[0.5], std=[0.5])
    assert info.classes == ("a", "b", "c") and len(train) + len(test) == 30
    assert "left out 2 dkl run folder(s)" in caplog.text and "(a/runs/t2, runs/t1)" in caplog.text


def test_cached_mean_std_follow_the_images_not_their_count(tmp_path):
    root = write_folder(tmp_path / "d", {"train": 3, "val": 1})
    cache = str(tmp_path / "run")
    first = build_datasets("imagefolder", root=str(root), mean="auto", cache_dir=cache)[2].mean
    for path in (root / "train").rglob("*.png"):  # every image replaced by its negative
        Image.fromarray(255 - np.asarray(Image.open(path))).save(path)
    again = build_datasets("imagefolder", root=str(root), mean="auto", cache_dir=cache)[2].mean
    assert again[0] == pytest.approx(1 - first[0], abs=1e-6)
    # an .npz rewritten with other pixels, the same shape
    path, x = tmp_path / "d.npz", np.zeros((12, 4, 4), np.uint8)
    np.savez(path, x=x, y=np.arange(12) % 3)
    assert build_datasets("npz", root=str(path), mean="auto", cache_dir=cache)[2].mean == (0.0,)
    np.savez(path, x=x + 255, y=np.arange(12) % 3)
    assert build_datasets("npz", root=str(path), mean="auto", cache_dir=cache)[2].mean == (1.0,)


def test_npz_uint16_images_are_scaled_like_16_bit_pngs(tmp_path):
    x = np.random.default_rng(0).integers(0, 65536, (12, 5, 5), dtype=np.uint16)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(12) % 3, x_test=x[:3], y_test=np.arange(3))
    train, _, _ = build_datasets("npz", root=str(path), mean=[0.5], std=[0.5])
    np.testing.assert_allclose(train[4][0].numpy()[0], x[4] / 65535, atol=1e-6)
    png = tmp_path / "f" / "train" / "a" / "000.png"  # the folder source reads a 16-bit PNG so
    png.parent.mkdir(parents=True)
    Image.fromarray(x[4]).save(png)
    with Image.open(png) as img:
        from dkl.data.preprocess import _convert

        assert torch.equal(_convert(img, 1, "png")[0], train[4][0][0])


def test_an_image_over_pils_pixel_limit_is_one_line_naming_it(tmp_path, monkeypatch):
    root = write_folder(tmp_path, {"train": 2, "val": 1})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30)  # 12×12 = 144 > 2 × 30: a "bomb"
    first = root / "train" / "a" / "000.png"
    with pytest.raises(ValueError) as err:
        build_datasets("imagefolder", root=str(root))
    msg = str(err.value)
    assert msg.startswith(f"cannot read image '{first}': Image size (144 pixels) exceeds limit")
    assert "PIL.Image.MAX_IMAGE_PIXELS = None" in msg and "\n" not in msg


def test_npz_class_names_as_bytes_or_objects(tmp_path):
    path = tmp_path / "d.npz"
    x, y = np.zeros((6, 4, 4), np.uint8), np.arange(6) % 3
    np.savez(path, x=x, y=y, x_test=x, y_test=y, classes=np.array([b"a", b"b", "é".encode()]))
    assert build_datasets("npz", root=str(path), mean=[0.5], std=[0.5])[2].classes == (
        "a", "b", "é",
    )  # fmt: skip
    np.savez(path, x=x, y=y, x_test=x, y_test=y, classes=np.array(["a", "b", None], dtype=object))
    with pytest.raises(ValueError, match=r"'classes' is an object array, which only pickle can "
                                         r"read .*expected \(K,\) class names as strings"):  # fmt: skip
        build_datasets("npz", root=str(path))


def _hf_split(datasets, images, labels, names=None, image_key="image"):
    if names is None:
        return datasets.Dataset.from_dict({image_key: images, "label": labels})
    features = datasets.Features(
        {image_key: datasets.Image(), "label": datasets.ClassLabel(names=names)}
    )
    return datasets.Dataset.from_dict({image_key: images, "label": labels}, features)


def test_hf_test_labels_are_matched_to_the_training_classes_by_name(tmp_path, hf_rows):
    datasets = pytest.importorskip("datasets")
    images, labels = hf_rows
    names = ["x", "y", "z"]
    dd = datasets.DatasetDict(
        train=_hf_split(datasets, images[:9], labels[:9], names),
        test=_hf_split(datasets, images[9:], [2 - v for v in labels[9:]], names[::-1]),
    )
    dd.save_to_disk(str(tmp_path / "reordered"))
    _, test, info = build_datasets("hf", root=str(tmp_path / "reordered"))
    assert info.classes == ("x", "y", "z")
    assert [test[i][1] for i in range(3)] == labels[9:]  # the name each image was given
    # encoded on its own (class_encode_column): a test split without class y numbers z as 1
    keep = [i for i in range(9, 12) if labels[i] != 1]
    dd["test"] = _hf_split(datasets, [images[i] for i in keep], [labels[i] // 2 for i in keep],
                           ["x", "z"])  # fmt: skip
    dd.save_to_disk(str(tmp_path / "encoded"))
    _, test, _ = build_datasets("hf", root=str(tmp_path / "encoded"))
    assert [test[i][1] for i in range(len(test))] == [labels[i] for i in keep]
    dd["test"] = _hf_split(datasets, images[9:], [0, 1, 2], ["x", "y", "w"])
    dd.save_to_disk(str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"^data 'hf': split 'test', column 'label': classes "
                                         r"\['w'\] of its ClassLabel are not in the training "
                                         r"split's \(\['x', 'y', 'z'\]\)$"):  # fmt: skip
        build_datasets("hf", root=str(tmp_path / "other"))


def test_hf_string_labels_are_classes_in_sorted_order(tmp_path, hf_rows):
    datasets = pytest.importorskip("datasets")
    images, labels = hf_rows
    words = ["cat", "ant", "bee"]  # label 0 is "cat": sorted, it is class 2
    dd = datasets.DatasetDict(
        train=_hf_split(datasets, images[:9], [words[v] for v in labels[:9]]),
        test=_hf_split(datasets, images[9:], [words[v] for v in labels[9:]]),
    )
    dd.save_to_disk(str(tmp_path / "s"))
    train, test, info = build_datasets("hf", root=str(tmp_path / "s"))
    assert info.classes == ("ant", "bee", "cat")
    assert train[0][1] == 2 and [test[i][1] for i in range(3)] == [2, 0, 1]
    dd["test"] = _hf_split(datasets, images[9:], ["cat", "ant", "dog"])
    dd.save_to_disk(str(tmp_path / "t"))
    with pytest.raises(ValueError, match=r"split 'test', column 'label': labels \['dog'\] are not "
                                         r"classes of the training split"):  # fmt: skip
        build_datasets("hf", root=str(tmp_path / "t"))


def test_hf_missing_images_and_columns_are_one_line(tmp_path, hf_rows):
    datasets = pytest.importorskip("datasets")
    images, labels = hf_rows
    train = _hf_split(datasets, images[:8] + [None], labels[:9], ["x", "y", "z"])
    dd = datasets.DatasetDict(train=train, test=_hf_split(datasets, images[9:], labels[9:]))
    dd["test"] = dd["test"].remove_columns("label")
    dd.save_to_disk(str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"^data 'hf': split 'test' has no column 'label', which "
                                         r"split 'train' has \(its columns: \['image'\]\)$"):  # fmt: skip
        build_datasets("hf", root=str(tmp_path / "a"))
    dd["test"] = _hf_split(datasets, images[9:], labels[9:], ["x", "y", "z"])
    dd.save_to_disk(str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"^data 'hf': row 8 of split 'train' has no image "
                                         r"\(column 'image' is None\)"):  # fmt: skip
        build_datasets("hf", root=str(tmp_path / "b"))  # the channel probe reads it


def test_hf_uint16_pixel_lists_are_scaled_like_16_bit_pngs(tmp_path):
    datasets = pytest.importorskip("datasets")
    x = np.random.default_rng(0).integers(0, 65536, (6, 4, 4), dtype=np.uint16)
    features = datasets.Features(
        {"pixels": datasets.Array2D((4, 4), "uint16"), "label": datasets.Value("int64")}
    )
    ds = datasets.Dataset.from_dict({"pixels": x, "label": np.arange(6) % 2}, features)
    datasets.DatasetDict(train=ds, test=ds).save_to_disk(str(tmp_path / "u16"))
    train, _, _ = build_datasets("hf", root=str(tmp_path / "u16"), mean=[0.5], std=[0.5],
                                 options={"image_key": "pixels"})  # fmt: skip
    np.testing.assert_allclose(train[3][0].numpy()[0], x[3] / 65535, atol=1e-6)


# --------------------------------------------------------------------------------------------
# A pretrained backbone whose classifier does not fit, and the RGB 224 px example
# --------------------------------------------------------------------------------------------

EXAMPLE = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "own_data_rgb"


def _imagenet_layout_file(tmp_path, model_fn, name: str):
    """A torchvision model's state_dict with ImageNet's 1000 classes (random weights)."""
    torch.manual_seed(0)
    path = tmp_path / name
    sd = model_fn(num_classes=1000).state_dict()
    torch.save(sd, path)
    return path, sd


@pytest.mark.parametrize(
    "arch, head",
    [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"), ("squeezenet1_0", "classifier.1")],
)
def test_a_1000_class_file_loads_into_a_10_class_model_with_a_new_classifier(
    tmp_path, caplog, arch, head
):
    import torchvision

    from dkl.models import create_model

    path, sd = _imagenet_layout_file(tmp_path, getattr(torchvision.models, arch), f"{arch}.pth")
    with pytest.raises(ValueError, match=rf"only the classifier '{head}' differs"):
        create_model(f"tv:{arch}", 10, checkpoint=path)  # by default a file must fit whole
    with caplog.at_level("WARNING", logger="dkl.models.weights"):
        model = create_model(f"tv:{arch}", 10, checkpoint=path, replace_classifier=True)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        (
            f"{path}: its classifier '{head}' has 1000 outputs, the model's 10: loaded every "
            f"other weight and kept the model's new '{head}'"
        )
    ]
    own = model.state_dict()
    for k, v in sd.items():  # every weight but the classifier's is the file's
        if k.startswith(head + "."):
            assert own[k].shape[0] == 10
        else:
            assert torch.equal(own[k], v), k


def test_replace_classifier_never_hides_another_mismatch(tmp_path):
    import torchvision

    from dkl.models import create_model, load_weights

    path, _ = _imagenet_layout_file(tmp_path, torchvision.models.resnet18, "r18.pth")
    with pytest.raises(ValueError, match=r"80 missing key\(s\): layer1\.2\.conv1\.weight"):
        load_weights(  # another architecture: the backbone differs too
            torchvision.models.resnet34(num_classes=10), path, replace_classifier=True
        )
    # a file without a classifier: the rest loads, the model keeps its own
    sd = {k: v for k, v in torch.load(path).items() if not k.startswith("fc.")}
    torch.save(sd, tmp_path / "backbone.pth")
    model = create_model(
        "tv:resnet18", 5, checkpoint=tmp_path / "backbone.pth", replace_classifier=True
    )
    assert torch.equal(model.conv1.weight, sd["conv1.weight"]) and model.fc.out_features == 5
    with pytest.raises(ValueError, match="needs a checkpoint"):
        create_model("tv:resnet18", 5, replace_classifier=True)


def test_rgb_224_example_teacher_from_imagenet_weights_then_a_small_student(
    tmp_path, monkeypatch, caplog
):
    """examples/own_data_rgb as a user runs it, on generated RGB photos and a stand-in ImageNet
    file, shortened: the teacher starts from the file's backbone, the student learns from it."""
    import importlib.util
    import shutil

    from dkl.api import train
    from dkl.config import load_config
    from dkl.train.checkpoint import load_checkpoint

    for f in EXAMPLE.iterdir():
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location(
        "make_tiny_photos", tmp_path / "make_tiny_photos.py"
    )
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    maker.main(".", per_class=6)
    imagenet = torch.load("weights/resnet18-f37072fd.pth")

    short = ["train.epochs=1", "train.max_steps_per_epoch=1", "data.batch_size=6",
             "data.eval_batch_size=8", "data.num_workers=0", "train.progress=false", "train.plot=false"]  # fmt: skip
    with caplog.at_level("WARNING", logger="dkl.models.weights"):
        teacher = train(
            load_config("teacher.yaml", [*short, "optim.lr=1e-12"]), log=lambda line: None
        )
    assert any(
        "its classifier 'fc' has 1000 outputs, the model's 3" in r.getMessage()
        for r in caplog.records
    )
    assert teacher["last"]["top1"] >= 0
    sd = load_checkpoint("runs/photos_teacher/best.pt")["model"]
    conv1 = next(v for k, v in sd.items() if k.endswith("conv1.weight") and "layer" not in k)
    assert torch.allclose(conv1, imagenet["conv1.weight"], atol=1e-9)  # the file's backbone
    fc = next(v for k, v in sd.items() if k.endswith("fc.weight"))
    assert fc.shape == (3, 512)

    cfg = load_config("student.yaml", short)
    assert cfg.model.name == "tv:mobilenet_v3_small" and cfg.data.augment == "imagenet"
    student = train(cfg, log=lambda line: None)
    assert set(student["last"]) >= {"top1"}
    with open("runs/photos_student/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert rows and "train_kd" in rows[-1]  # the teacher's term was trained on


# ------------------------------------------------------------------ EXIF orientation, caches


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_folder_images_are_read_upright_by_their_exif_orientation(tmp_path, fmt):
    """A phone stores a portrait on its side with EXIF Orientation=6 (turn 90° clockwise to
    view): dkl read it as stored, rotated, like torchvision's ImageFolder."""
    rng = np.random.default_rng(0)
    upright = {}
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                img = rng.integers(0, 60, (12, 16)).astype(np.uint8)  # 12 high, 16 wide
                img[:3] = 255  # a bright band along the top
                exif = Image.Exif()
                exif[0x0112] = 6
                path = tmp_path / split / c / f"{i}.{fmt}"
                stored = Image.fromarray(img).rotate(90, expand=True)  # 16 high, 12 wide
                stored.save(path, exif=exif, quality=100)
                upright[path] = img / 255.0
    train, test, info = build_datasets("imagefolder", root=str(tmp_path), mean=[0.5], std=[0.5])
    assert info.input_shape == (1, 12, 16)
    tol = 1e-7 if fmt == "png" else 12 / 255  # JPEG's loss
    for split in (train, test):
        for k, (path, _) in enumerate(split.source.samples):
            np.testing.assert_allclose(split[k][0].numpy()[0], upright[path], atol=tol)


def test_folder_fingerprint_changed_with_the_exif_orientation(tmp_path):
    """Statistics cached before dkl applied the orientation are keyed by the old fingerprint
    (each file's path, label, size and time): that key must not come back."""
    import hashlib
    import os

    from dkl.data.sources import FolderImages

    root = write_folder(tmp_path, {"train": 2})
    images = FolderImages(root / "train", ["a", "b", "c"])
    old = hashlib.blake2b(digest_size=16)
    for path, label in images.samples:
        st = os.stat(path)
        rel = os.fsencode(os.path.relpath(path, root / "train"))
        old.update(b"%s\0%d\0%d\0%d\n" % (rel, label, st.st_size, st.st_mtime_ns))
    assert images.fingerprint() != old.hexdigest()


def test_cached_mean_std_follow_the_channel_count(tmp_path):
    """An overwrite with another data.channels read the 1-channel mean back for 3 channels:
    'Expected input of shape (B, 1, H, W), got (64, 3, 8, 8)'."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8)
    x[..., 2] //= 4  # three channels with three means
    path, cache = tmp_path / "d.npz", str(tmp_path / "run")
    np.savez(path, x=x, y=np.arange(12) % 3, x_test=x[:3], y_test=np.arange(3))
    grey = build_datasets("npz", root=str(path), channels=1, mean="auto", cache_dir=cache)[2]
    rgb = build_datasets("npz", root=str(path), channels=3, mean="auto", cache_dir=cache)[2]
    assert len(grey.mean) == 1
    np.testing.assert_allclose(rgb.mean, (x / 255).mean((0, 1, 2)), rtol=1e-6)
    # a cache entry under the right key but with another number of values is stale
    stats = tmp_path / "run" / "data_stats.json"
    saved = json.loads(stats.read_text())
    stats.write_text(json.dumps({**saved, "mean": [0.5], "std": [0.25]}))
    again = build_datasets("npz", root=str(path), channels=3, mean="auto", cache_dir=cache)[2]
    np.testing.assert_allclose(again.mean, (x / 255).mean((0, 1, 2)), rtol=1e-6)
