"""Your own images: a folder of class folders, a NumPy ``.npz`` file, a Hugging Face data set.

Each builder reads raw ``(image, label)`` items; :func:`~dkl.data.prepare_images` then applies the
run's channels, size, augmentation policy and mean / std like for every other data set.

``imagefolder`` (``data.root`` = a folder)
    ``root/train/<class>/<image>`` and ``root/val/<class>/<image>`` (``root/test`` if there is no
    ``val``); classes are the sorted folder names, which must be the same in both; images are the
    files torchvision's ``ImageFolder`` reads (``.png``, ``.jpg``, ...), found recursively.

``npz`` (``data.root`` = a file written by ``numpy.savez``)
    ``x``: images ``(N, H, W)`` (grey), ``(N, H, W, C)`` or ``(N, C, H, W)`` with C in 1, 3, 4
    (channels last wins when both could be channels; a 4th channel, alpha, is dropped), uint8
    0..255 or float in [0, 1]; ``y``: ``(N,)`` integer labels 0..K-1. Optional: ``x_test`` and
    ``y_test`` (the test split; without them a fixed stratified ``data.val_fraction`` of ``x`` is
    held out, the same for every seed, see :func:`~dkl.data.stratified_split`) and ``classes``
    (K names).

``hf`` (``data.root`` = a folder)
    A ``datasets.DatasetDict`` or ``Dataset`` saved with ``save_to_disk`` (read with
    ``load_from_disk``), or local files read with ``datasets.load_dataset(builder,
    data_dir=root)``, ``builder`` being ``data.options.builder`` or, when not set, ``parquet`` if
    the folder holds ``.parquet`` files and ``imagefolder`` otherwise. Splits: ``train`` and the
    first of ``test``, ``validation``, ``valid``, ``val`` (else ``data.val_fraction`` of train,
    as for ``npz``); ``data.options`` may name ``train_split`` / ``test_split``. Columns: the
    image column is ``options.image_key`` or the first ``Image`` feature (else a column named
    ``image``, ``img``, ``x`` or ``pixel_values``); the label column ``options.label_key`` or the
    first ``ClassLabel`` feature (else ``label``, ``labels``, ``y``, ``target``); class names come
    from the ``ClassLabel``. Needs ``pip install 'dkl[hf]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dkl._files import sniff

from .datasets import (
    DataRequest,
    ImageSplits,
    TensorImageDataset,
    no_options,
    register_dataset,
)
from .preprocess import as_pixels, stratified_split, to_chw

__all__ = ["FolderImages", "HFImages"]

_IMAGE_COLUMNS = ("image", "img", "x", "pixel_values")
_LABEL_COLUMNS = ("label", "labels", "y", "target")
_TEST_SPLITS = ("test", "validation", "valid", "val")


# --------------------------------------------------------------------------------------------
# imagefolder
# --------------------------------------------------------------------------------------------


def _image_extensions() -> tuple[str, ...]:
    try:
        from torchvision.datasets.folder import IMG_EXTENSIONS
    except ImportError:  # pragma: no cover - depends on the install
        return (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
    return tuple(IMG_EXTENSIONS)


class FolderImages:
    """The images under ``folder/<class>/`` as ``(PIL image, label)``, read on access.

    An unreadable file is a ``ValueError`` naming its path.
    """

    def __init__(self, folder: Path, classes: list[str]) -> None:
        ext = _image_extensions()
        self.folder = folder
        self.samples: list[tuple[Path, int]] = []
        for label, c in enumerate(classes):
            files = sorted(
                p for p in (folder / c).rglob("*") if p.is_file() and p.suffix.lower() in ext
            )
            if not files:
                raise FileNotFoundError(
                    f"data 'imagefolder': no image files ({', '.join(ext[:4])}, ...) in "
                    f"'{folder / c}'"
                )
            self.samples += [(p, label) for p in files]
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, i: int) -> str:
        return f"image '{self.samples[i][0]}'"

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img.load()
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            why = str(e).replace(f"'{path}'", "").replace(str(path), "").strip(" :") or repr(e)
            raise ValueError(f"cannot read image '{path}': {why}") from None
        return img, label


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class _Part:
    """Some of the items of a :class:`FolderImages` (a held-out split), by index."""

    def __init__(self, source: FolderImages, indices: np.ndarray) -> None:
        self.source, self.indices = source, [int(i) for i in indices]
        self.targets = [source.targets[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self, i: int) -> str:
        return self.source.describe(self.indices[i])

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.source[self.indices[i]]


def _held_out(folder: Path, classes: list[str], fraction: float) -> tuple[_Part, _Part]:
    """A fixed stratified ``fraction`` of ``folder``'s images as the test split."""
    images = FolderImages(folder, classes)
    tr, te = stratified_split(images.targets, fraction)
    if len(te) == 0:
        raise ValueError(
            f"data 'imagefolder': '{folder}' has no test folder and too few images per class to "
            f"hold out data.val_fraction={fraction} of them; add {folder.parent}/val/<class>/ "
            f"or more images"
        )
    return _Part(images, tr), _Part(images, te)


@register_dataset("imagefolder")
def _imagefolder(request: DataRequest) -> ImageSplits:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test/``); with no test folder, or
    with class folders directly under ``root``, a fixed stratified ``data.val_fraction`` of the
    images is held out as the test split (the same images for every seed)."""
    no_options("imagefolder", request)
    root = Path(request.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data 'imagefolder': data.root '{root}' is not a folder")
    train_dir = root / "train"
    test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not train_dir.is_dir():
        if test_dir is not None or not _class_folders(root):
            raise FileNotFoundError(
                f"data 'imagefolder': expected class folders under '{train_dir}' (layout: "
                f"{root}/train/<class>/*.png and {root}/val/<class>/*.png, or {root}/<class>/*.png "
                f"with data.val_fraction held out)"
            )
        train_dir = root  # root/<class>/*: one pool of images
    classes = _class_folders(train_dir)
    if not classes:
        raise FileNotFoundError(f"data 'imagefolder': no class folders in '{train_dir}'")
    if test_dir is None:
        train, test = _held_out(train_dir, classes, request.val_fraction)
        return ImageSplits(train, test, classes)
    test_classes = _class_folders(test_dir)
    if classes != test_classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise ValueError(
            f"data 'imagefolder': class folders differ between '{train_dir}' and '{test_dir}' "
            f"(only in {train_dir.name}: {only_train or 'none'}; only in {test_dir.name}: "
            f"{only_test or 'none'})"
        )
    return ImageSplits(FolderImages(train_dir, classes), FolderImages(test_dir, classes), classes)


# --------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------


def _array(f: Any, key: str, path: Path) -> np.ndarray:
    """Array ``key`` of an open .npz, with a one-line error when it cannot be read."""
    try:
        return f[key]
    except (OSError, ValueError, EOFError, KeyError) as e:  # damaged, or a pickled object array
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(f"data 'npz': '{path}': cannot read array '{key}' ({why})") from None


def _images_from_array(x: np.ndarray, path: Path, key: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4):
        x = np.moveaxis(x, -1, 1)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3, 4)):
        raise ValueError(
            f"{path}: '{key}' must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1, 3, "
            f"4, got shape {x.shape}"
        )
    return as_pixels(torch.as_tensor(np.ascontiguousarray(x[:, :3])), f"{path} '{key}'")


def _labels_from_array(y: np.ndarray, n: int, path: Path, key: str) -> torch.Tensor:
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{path}: '{key}' must be ({n},) labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: '{key}' must hold integer labels, got dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise ValueError(f"{path}: '{key}' holds a negative label ({y.min()})")
    if len(y) and int(y.max()) > np.iinfo(np.int64).max:  # uint64 would wrap to a negative
        raise ValueError(f"{path}: '{key}' holds a label too large for a class ({int(y.max())})")
    return torch.as_tensor(y.astype(np.int64))


@register_dataset("npz")
def _npz(request: DataRequest) -> ImageSplits:
    no_options("npz", request)
    path = Path(request.root).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data 'npz': data.root '{path}' is not a file (a numpy .npz)")
    expected = "a NumPy .npz archive: numpy.savez(path, x=images, y=labels)"
    kind = sniff(path)
    if "numpy.savez" not in kind and kind != "a zip archive":
        if kind == "an empty zip archive":
            raise ValueError(
                f"data 'npz': '{path}' is an empty .npz (no arrays); expected {expected}"
            )
        raise ValueError(f"data 'npz': data.root '{path}' is {kind}; expected {expected}")
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(f"data 'npz': cannot read '{path}' ({why}); expected {expected}") from None
    with f:
        keys = set(f.files)
        if not {"x", "y"} <= keys:
            raise ValueError(f"data 'npz': '{path}' must hold arrays x and y, found {sorted(keys)}")
        if ("x_test" in keys) != ("y_test" in keys):
            raise ValueError(f"data 'npz': '{path}' holds one of x_test / y_test, not both")
        x = _images_from_array(_array(f, "x", path), path, "x")
        if len(x) == 0:
            raise ValueError(f"data 'npz': '{path}': 'x' holds no images (shape {tuple(x.shape)})")
        y = _labels_from_array(_array(f, "y", path), len(x), path, "y")
        if "x_test" in keys:
            x_test = _images_from_array(_array(f, "x_test", path), path, "x_test")
            y_test = _labels_from_array(_array(f, "y_test", path), len(x_test), path, "y_test")
            if x_test.shape[1:] != x.shape[1:]:
                raise ValueError(
                    f"data 'npz': '{path}': x_test images are {tuple(x_test.shape[1:])}, x "
                    f"images {tuple(x.shape[1:])}"
                )
        else:
            tr, te = stratified_split(y.numpy(), request.val_fraction)
            if len(te) == 0:
                raise ValueError(
                    f"data 'npz': '{path}' has no x_test / y_test and too few images per class "
                    f"to hold out data.val_fraction={request.val_fraction} of them; add a test "
                    f"split or more images"
                )
            tr_t, te_t = torch.as_tensor(tr), torch.as_tensor(te)
            x, x_test, y, y_test = x[tr_t], x[te_t], y[tr_t], y[te_t]
        if len(y_test) == 0:
            raise ValueError(f"data 'npz': '{path}': x_test / y_test hold no images")
        classes: Any = int(max(int(y.max()), int(y_test.max()) if len(y_test) else 0)) + 1
        if "classes" in keys:
            names = [str(c) for c in f["classes"].tolist()]
            if len(names) < classes:
                raise ValueError(
                    f"data 'npz': '{path}': {len(names)} class names for labels up to {classes - 1}"
                )
            classes = names
    return ImageSplits(TensorImageDataset(x, y), TensorImageDataset(x_test, y_test), classes)


# --------------------------------------------------------------------------------------------
# hf
# --------------------------------------------------------------------------------------------


class HFImages:
    """``(image, label)`` items of a Hugging Face ``datasets.Dataset`` (only two columns read)."""

    def __init__(self, ds: Any, image_key: str, label_key: str, indices: Any = None) -> None:
        ds = ds.select_columns([image_key, label_key])
        self.ds = ds if indices is None else ds.select(indices)
        self.image_key, self.label_key = image_key, label_key
        self.targets = [int(v) for v in self.ds[label_key]]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        row = self.ds[int(i)]
        image = row[self.image_key]
        if not hasattr(image, "getbands"):  # not a PIL image: an array or nested lists
            image = to_chw(image, what=f"row {i} of column '{self.image_key}'")
        return image, self.targets[i]


def _pick_column(features: dict, wanted: str | None, kind: str, names: tuple, what: str) -> str:
    if wanted:
        if wanted not in features:
            raise ValueError(f"data 'hf': no column {wanted!r} (columns: {sorted(features)})")
        return wanted
    typed = [k for k, f in features.items() if type(f).__name__ == kind]
    named = [k for k in names if k in features]
    if typed or named:
        return (typed or named)[0]
    raise ValueError(
        f"data 'hf': no {what} column found (columns: {sorted(features)}); set "
        f"data.options.{'image_key' if what == 'image' else 'label_key'}"
    )


def _load_hf(root: Path, options: dict) -> Any:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("data 'hf' needs Hugging Face datasets: pip install 'dkl[hf]'") from e
    builder = options.get("builder")
    saved = (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()
    if saved and not builder:
        ds = datasets.load_from_disk(str(root))
    else:
        if not builder:
            builder = "parquet" if any(root.rglob("*.parquet")) else "imagefolder"
        kwargs = {k: options[k] for k in ("cache_dir",) if k in options}
        ds = datasets.load_dataset(builder, data_dir=str(root), **kwargs)
    return ds if isinstance(ds, dict) else {"train": ds}


@register_dataset("hf")
def _hf(request: DataRequest) -> ImageSplits:
    root = Path(request.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data 'hf': data.root '{root}' is not a folder")
    opts = dict(request.options)
    known = {"builder", "cache_dir", "train_split", "test_split", "image_key", "label_key"}
    if set(opts) - known:
        raise ValueError(
            f"data 'hf': unknown data.options {sorted(set(opts) - known)} (known: {sorted(known)})"
        )
    splits = _load_hf(root, opts)
    train_name = opts.get("train_split", "train")
    if train_name not in splits:
        raise ValueError(f"data 'hf': no split {train_name!r} in '{root}' (splits: {list(splits)})")
    test_name = opts.get("test_split") or next((s for s in _TEST_SPLITS if s in splits), None)
    if test_name is not None and test_name not in splits:
        raise ValueError(f"data 'hf': no split {test_name!r} in '{root}' (splits: {list(splits)})")
    train_ds = splits[train_name]
    features = dict(train_ds.features)
    image_key = _pick_column(features, opts.get("image_key"), "Image", _IMAGE_COLUMNS, "image")
    label_key = _pick_column(features, opts.get("label_key"), "ClassLabel", _LABEL_COLUMNS, "label")
    if test_name is not None:
        train = HFImages(train_ds, image_key, label_key)
        test = HFImages(splits[test_name], image_key, label_key)
    else:
        labels = np.asarray(train_ds[label_key])
        tr, te = stratified_split(labels, request.val_fraction)
        train = HFImages(train_ds, image_key, label_key, tr.tolist())
        test = HFImages(train_ds, image_key, label_key, te.tolist())
    feature = features[label_key]
    if type(feature).__name__ == "ClassLabel":
        classes: Any = list(feature.names)
    else:
        classes = max(max(train.targets, default=0), max(test.targets, default=0)) + 1
    n = classes if isinstance(classes, int) else len(classes)
    bad = [t for t in (*train.targets, *test.targets) if not 0 <= t < n]
    if bad:
        raise ValueError(f"data 'hf': label {bad[0]} in column '{label_key}' is out of range")
    return ImageSplits(train, test, classes)
