"""Your own images: a folder of class folders, a NumPy ``.npz`` file, a Hugging Face data set.

Each builder reads raw ``(image, label)`` items; :func:`~dkl.data.prepare_images` then applies the
run's channels, size, augmentation policy and mean / std like for every other data set. The test
split is the first of the source's :data:`TEST_SPLITS` it has (a folder, an ``x_<name>`` /
``y_<name>`` pair, a split): ``val``, ``validation``, ``valid`` and ``test`` for each, the name
each source has always read first; without one a fixed stratified ``data.val_fraction`` of the
training images is held out, and a warning says so.

``imagefolder`` (``data.root`` = a folder)
    ``root/train/<class>/<image>`` and ``root/<split>/<class>/<image>``, ``<split>`` the first
    of ``val``, ``test``, ``validation``, ``valid``; classes are the sorted folder names, which
    must be the same in both; images are the files torchvision's ``ImageFolder`` reads
    (``.png``, ``.jpg``, ...), found recursively, following folder links as it does (a link back
    up the tree is read once). Names starting with ``.`` (``.ipynb_checkpoints``, macOS ``._``
    files) are skipped at any depth, and so are dkl run folders (a folder holding ``final.pt``,
    ``metrics.jsonl``, ...: ``runs/`` left inside the data), with a warning.

``npz`` (``data.root`` = a file written by ``numpy.savez``)
    ``x``: images ``(N, H, W)`` (grey), ``(N, H, W, C)`` or ``(N, C, H, W)`` with C in 1, 3, 4
    (channels last wins when both could be channels; a 4th channel, alpha, is dropped), uint8
    0..255, uint16 0..65535 (scaled by 1/65535, as 16-bit PNGs are) or float in [0, 1]; ``y``:
    ``(N,)`` integer labels 0..K-1. Optional: the test split as ``x_test`` / ``y_test`` (or
    ``_val``, ``_validation``, ``_valid``, the first found; without one a fixed stratified
    ``data.val_fraction`` of ``x`` is held out, the same for every seed, see
    :func:`~dkl.data.stratified_split`) and ``classes`` (K names, a string or bytes array).

``hf`` (``data.root`` = a folder)
    A ``datasets.DatasetDict`` or ``Dataset`` saved with ``save_to_disk`` (read with
    ``load_from_disk``), or local files read with ``datasets.load_dataset(builder,
    data_dir=root)``, ``builder`` being ``data.options.builder`` or, when not set, ``parquet`` if
    the folder holds ``.parquet`` files and ``imagefolder`` otherwise. Splits: ``train`` and the
    first of ``test``, ``validation``, ``valid``, ``val`` (else ``data.val_fraction`` of train,
    as for ``npz``); ``data.options`` may name ``train_split`` / ``test_split``. Columns: the
    image column is ``options.image_key`` or the first ``Image`` feature (else a column named
    ``image``, ``img``, ``x`` or ``pixel_values``); the label column ``options.label_key`` or the
    first ``ClassLabel`` feature (else ``label``, ``labels``, ``y``, ``target``). Class names come
    from the training split's ``ClassLabel``, or are its string labels, sorted; the test split's
    labels are matched to them by name (its own ``ClassLabel`` may list them in another order).
    Needs ``pip install 'dkl[hf]'``.
"""

from __future__ import annotations

import hashlib
import logging
import os
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

__all__ = ["TEST_SPLITS", "FolderImages", "HFImages"]

_log = logging.getLogger(__name__)  # without a logging setup, Python prints a warning as one line

_IMAGE_COLUMNS = ("image", "img", "x", "pixel_values")
_LABEL_COLUMNS = ("label", "labels", "y", "target")
#: names of the test split, in the order each source looks for them (folders, npz keys, hf
#: splits): the name each source has always read comes first (a folder's ``val/``, then
#: ``test/``; an npz file's ``x_test``; a Hugging Face set's ``test``), so that data holding
#: several keeps being scored on the same one; the other names follow
TEST_SPLITS = {
    "imagefolder": ("val", "test", "validation", "valid"),
    "npz": ("test", "val", "validation", "valid"),
    "hf": ("test", "validation", "valid", "val"),
}
#: files only dkl writes, into a run folder (dkl.train.rundir.RESULT_FILES less the common names,
#: and the statistics cache): a folder holding one is a run's output, never images
_RUN_FILES = frozenset(("final.pt", "last.pt", "best.pt", "metrics.jsonl", "data_stats.json"))


def _choice(source: str, found: list[str], what: str) -> None:
    """Say which of the candidate test splits ``found`` (in :data:`TEST_SPLITS` order) is used."""
    if len(found) > 1:
        _log.warning(
            f"data '{source}': test split {what.format(found[0])}; left out "
            f"{', '.join(what.format(f) for f in found[1:])} (the first of "
            f"{', '.join(TEST_SPLITS[source])} is the test split)"
        )
    else:
        _log.info(f"data '{source}': test split {what.format(found[0])}")


def _holding_out(source: str, looked_for: str, fraction: float, n_test: int, n: int) -> None:
    _log.warning(
        f"data '{source}': no test split ({looked_for}); holding out data.val_fraction={fraction}"
        f" of the training images ({n_test} of {n}) as the test split"
    )


# --------------------------------------------------------------------------------------------
# imagefolder
# --------------------------------------------------------------------------------------------


def _image_extensions() -> tuple[str, ...]:
    try:
        from torchvision.datasets.folder import IMG_EXTENSIONS
    except ImportError:  # pragma: no cover - depends on the install
        return (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
    return tuple(IMG_EXTENSIONS)


def _scan(folder: Path, ext: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """``(images, run folders)`` under ``folder``: image files found recursively through folder
    links (``os.walk(followlinks=True)``, as torchvision's ``ImageFolder``), each real folder read
    once (a link back up the tree would loop); hidden names and dkl run folders are left out."""
    images: list[Path] = []
    runs: list[Path] = []
    seen = {os.path.realpath(folder)}
    for top, dirs, names in os.walk(folder, followlinks=True):
        if _RUN_FILES.intersection(names):
            runs.append(Path(top))
            dirs[:] = []
            continue
        keep = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(top, d))
            if not d.startswith(".") and real not in seen:
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        for n in names:
            p = Path(top, n)
            if not n.startswith(".") and p.suffix.lower() in ext and p.is_file():
                images.append(p)
    return sorted(images), runs


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _classes(folder: Path) -> dict[str, list[Path]]:
    """The class folders of ``folder`` and their images; a folder that only holds dkl run folders
    (``runs/`` inside a flat data folder) is no class. Run folders left out get one warning."""
    ext = _image_extensions()
    found: dict[str, list[Path]] = {}
    runs: list[Path] = []
    for c in _class_folders(folder):
        images, skipped = _scan(folder / c, ext)
        runs += skipped
        if images or not skipped:
            found[c] = images
    if runs:
        shown = ", ".join(str(p.relative_to(folder)) for p in runs[:3])
        more = f", ... (+{len(runs) - 3} more)" if len(runs) > 3 else ""
        _log.warning(
            f"data 'imagefolder': left out {len(runs)} dkl run folder(s) under '{folder}' "
            f"({shown}{more}): they hold a run's outputs ({', '.join(sorted(_RUN_FILES))}), "
            f"not images; keep train.out_dir outside data.root"
        )
    return found


#: how :class:`FolderImages` decodes a file (part of its fingerprint): EXIF orientation applied
_DECODING = b"exif-orientation-applied"


class FolderImages:
    """The images under ``folder/<class>/`` as ``(PIL image, label)``, read on access.

    ``files`` maps each class to its image files (found as :mod:`dkl.data.sources` says when not
    given). An unreadable file is a ``ValueError`` naming its path.
    """

    def __init__(
        self, folder: Path, classes: list[str], files: dict[str, list[Path]] | None = None
    ) -> None:
        ext = _image_extensions()
        self.folder = folder
        self.samples: list[tuple[Path, int]] = []
        for label, c in enumerate(classes):
            found = files[c] if files is not None else _scan(folder / c, ext)[0]
            if not found:
                raise FileNotFoundError(
                    f"data 'imagefolder': no image files ({', '.join(ext[:4])}, ...) in "
                    f"'{folder / c}'"
                )
            self.samples += [(p, label) for p in found]
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, i: int) -> str:
        return f"image '{self.samples[i][0]}'"

    def fingerprint(self) -> str:
        """A digest of every file's path, label, size and modification time: it changes when an
        image is replaced, added or removed (the key of the cached mean / std). It starts with
        how files are decoded, so statistics cached before the EXIF orientation was applied are
        not reused."""
        h = hashlib.blake2b(_DECODING, digest_size=16)
        for path, label in self.samples:
            st = os.stat(path)
            rel = os.fsencode(os.path.relpath(path, self.folder))
            h.update(b"%s\0%d\0%d\0%d\n" % (rel, label, st.st_size, st.st_mtime_ns))
        return h.hexdigest()

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image, ImageOps, UnidentifiedImageError

        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img.load()
                # upright as a viewer shows it (a phone's portrait is stored on its side with
                # an EXIF Orientation tag); torchvision's ImageFolder reads it as stored
                ImageOps.exif_transpose(img, in_place=True)
        except Image.DecompressionBombError as e:
            raise ValueError(
                f"cannot read image '{path}': {str(e).rstrip('.')}; if you trust the file, raise "
                f"PIL's limit in Python before building the data (PIL.Image.MAX_IMAGE_PIXELS = "
                f"None), or shrink the image"
            ) from None
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            why = str(e).replace(f"'{path}'", "").replace(str(path), "").strip(" :") or repr(e)
            raise ValueError(f"cannot read image '{path}': {why}") from None
        return img, label


class _Part:
    """Some of the items of a :class:`FolderImages` (a held-out split), by index."""

    def __init__(self, source: FolderImages, indices: np.ndarray) -> None:
        self.source, self.indices = source, [int(i) for i in indices]
        self.targets = [source.targets[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self, i: int) -> str:
        return self.source.describe(self.indices[i])

    def fingerprint(self) -> str:
        picked = hashlib.blake2b(np.asarray(self.indices, np.int64).tobytes(), digest_size=8)
        return f"{self.source.fingerprint()}:{picked.hexdigest()}"

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.source[self.indices[i]]


def _held_out(
    root: Path, folder: Path, classes: list[str], files: dict[str, list[Path]], fraction: float
) -> tuple[_Part, _Part]:
    """A fixed stratified ``fraction`` of ``folder``'s images as the test split."""
    images = FolderImages(folder, classes, files)
    tr, te = stratified_split(images.targets, fraction)
    if len(te) == 0:
        raise ValueError(
            f"data 'imagefolder': '{folder}' has no test folder and too few images per class to "
            f"hold out data.val_fraction={fraction} of them; add {root}/val/<class>/ "
            f"or more images"
        )
    looked_for = f"no {', '.join(f'{s}/' for s in TEST_SPLITS['imagefolder'])} folder in '{root}'"
    _holding_out("imagefolder", looked_for, fraction, len(te), len(images))
    return _Part(images, tr), _Part(images, te)


@register_dataset("imagefolder")
def _imagefolder(request: DataRequest) -> ImageSplits:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test/``, ``validation/``,
    ``valid/``); with no test folder, or with class folders directly under ``root``, a fixed
    stratified ``data.val_fraction`` of the images is held out as the test split (the same images
    for every seed)."""
    no_options("imagefolder", request)
    root = Path(request.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data 'imagefolder': data.root '{root}' is not a folder")
    train_dir = root / "train"
    found = [s for s in TEST_SPLITS["imagefolder"] if (root / s).is_dir()]
    test_dir = root / found[0] if found else None
    if not train_dir.is_dir():
        if test_dir is not None or not _class_folders(root):
            seen = f"; found {test_dir.name}/ but no train/" if test_dir is not None else ""
            raise FileNotFoundError(
                f"data 'imagefolder': expected class folders under '{train_dir}' (layout: "
                f"{root}/train/<class>/*.png and {root}/val/<class>/*.png, or {root}/<class>/*.png "
                f"with data.val_fraction held out){seen}"
            )
        train_dir = root  # root/<class>/*: one pool of images
    files = _classes(train_dir)
    classes = list(files)
    if not classes:
        raise FileNotFoundError(f"data 'imagefolder': no class folders in '{train_dir}'")
    if test_dir is None:
        train, test = _held_out(root, train_dir, classes, files, request.val_fraction)
        return ImageSplits(train, test, classes)
    _choice("imagefolder", [str(root / s) for s in found], "'{}'")
    test_files = _classes(test_dir)
    test_classes = list(test_files)
    if classes != test_classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise ValueError(
            f"data 'imagefolder': class folders differ between '{train_dir}' and '{test_dir}' "
            f"(only in {train_dir.name}: {only_train or 'none'}; only in {test_dir.name}: "
            f"{only_test or 'none'})"
        )
    return ImageSplits(
        FolderImages(train_dir, classes, files),
        FolderImages(test_dir, classes, test_files),
        classes,
    )


# --------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------


def _array(f: Any, key: str, path: Path, expected: str = "a numeric array") -> np.ndarray:
    """Array ``key`` of an open .npz, with a one-line error when it cannot be read."""
    try:
        return f[key]
    except (OSError, ValueError, EOFError, KeyError) as e:  # damaged, or a pickled object array
        if "allow_pickle" in str(e):
            raise ValueError(
                f"data 'npz': '{path}': '{key}' is an object array, which only pickle can read "
                f"(not loaded: a pickle can run code); expected {expected}"
            ) from None
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


def _class_names(f: Any, path: Path, classes: int) -> list[str]:
    """The ``classes`` array of an open .npz as names (bytes decoded as UTF-8)."""
    expected = "(K,) class names as strings: classes=np.array(names, dtype=str)"
    raw = _array(f, "classes", path, expected)
    if raw.ndim != 1 or raw.dtype.kind not in "USiu":
        raise ValueError(
            f"data 'npz': '{path}': 'classes' must be {expected}, got shape {raw.shape} dtype "
            f"{raw.dtype}"
        )
    names = [c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c) for c in raw.tolist()]
    if len(names) < classes:
        raise ValueError(
            f"data 'npz': '{path}': {len(names)} class names for labels up to {classes - 1}"
        )
    return names


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
        for s in TEST_SPLITS["npz"]:
            if (f"x_{s}" in keys) != (f"y_{s}" in keys):
                raise ValueError(f"data 'npz': '{path}' holds one of x_{s} / y_{s}, not both")
        found = [s for s in TEST_SPLITS["npz"] if f"x_{s}" in keys]
        x = _images_from_array(_array(f, "x", path), path, "x")
        if len(x) == 0:
            raise ValueError(f"data 'npz': '{path}': 'x' holds no images (shape {tuple(x.shape)})")
        y = _labels_from_array(_array(f, "y", path), len(x), path, "y")
        pairs = ", ".join(f"x_{s} / y_{s}" for s in TEST_SPLITS["npz"])
        if found:
            xk, yk = f"x_{found[0]}", f"y_{found[0]}"
            _choice("npz", found, "x_{0} / y_{0}")
            x_test = _images_from_array(_array(f, xk, path), path, xk)
            y_test = _labels_from_array(_array(f, yk, path), len(x_test), path, yk)
            if x_test.shape[1:] != x.shape[1:]:
                raise ValueError(
                    f"data 'npz': '{path}': {xk} images are {tuple(x_test.shape[1:])}, x "
                    f"images {tuple(x.shape[1:])}"
                )
            if len(y_test) == 0:
                raise ValueError(f"data 'npz': '{path}': {xk} / {yk} hold no images")
        else:
            tr, te = stratified_split(y.numpy(), request.val_fraction)
            if len(te) == 0:
                raise ValueError(
                    f"data 'npz': '{path}' has no test split ({pairs}) and too few images per "
                    f"class to hold out data.val_fraction={request.val_fraction} of them; add a "
                    f"test split or more images"
                )
            _holding_out("npz", f"no {pairs} in '{path}'", request.val_fraction, len(te), len(y))
            tr_t, te_t = torch.as_tensor(tr), torch.as_tensor(te)
            x, x_test, y, y_test = x[tr_t], x[te_t], y[tr_t], y[te_t]
        classes: Any = int(max(int(y.max()), int(y_test.max()))) + 1
        if "classes" in keys:
            classes = _class_names(f, path, classes)
    return ImageSplits(TensorImageDataset(x, y), TensorImageDataset(x_test, y_test), classes)


# --------------------------------------------------------------------------------------------
# hf
# --------------------------------------------------------------------------------------------


class HFImages:
    """``(image, label)`` items of a Hugging Face ``datasets.Dataset`` (only two columns read).

    ``targets``: the class ids of the rows (of ``indices`` when given); when not given, the label
    column's integers. ``split`` names the split in error messages.
    """

    def __init__(
        self,
        ds: Any,
        image_key: str,
        label_key: str,
        indices: Any = None,
        *,
        targets: list[int] | None = None,
        split: str = "train",
    ) -> None:
        self.dtype = _stored_dtype(ds.features[image_key])
        ds = ds.select_columns([image_key, label_key])
        self.ds = ds if indices is None else ds.select(indices)
        self.rows = None if indices is None else [int(i) for i in indices]
        self.image_key, self.label_key, self.split = image_key, label_key, split
        self.targets = (
            [int(v) for v in self.ds[label_key]] if targets is None else [int(t) for t in targets]
        )

    def __len__(self) -> int:
        return len(self.ds)

    def describe(self, i: int) -> str:
        row = i if self.rows is None else self.rows[i]
        return f"row {row} of split '{self.split}'"

    def fingerprint(self) -> str:
        """The data set's own fingerprint and the size and time of its files on disk."""
        h = hashlib.blake2b(str(getattr(self.ds, "_fingerprint", "")).encode(), digest_size=16)
        for f in getattr(self.ds, "cache_files", None) or []:
            try:
                st = os.stat(f["filename"])
            except (OSError, KeyError, TypeError):
                continue
            h.update(f"{f['filename']}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def __getitem__(self, i: int) -> tuple[Any, int]:
        row = self.ds[int(i)]
        image = row[self.image_key]
        if image is None:
            raise ValueError(
                f"data 'hf': {self.describe(i)} has no image (column '{self.image_key}' is None); "
                f"drop or fill that row"
            )
        if not hasattr(image, "getbands"):  # not a PIL image: an array or nested lists
            if self.dtype is not None and not hasattr(image, "dtype"):
                image = np.asarray(image, dtype=self.dtype)  # uint16 lists stay 16-bit
            image = to_chw(image, what=f"{self.describe(i)}, column '{self.image_key}'")
        return image, self.targets[i]


def _stored_dtype(feature: Any) -> np.dtype | None:
    """The NumPy dtype of a column of nested numbers (``List(List(Value('uint16')))``,
    ``Array3D(dtype='uint16')``), which rows lose as Python lists; ``None`` for others."""
    while feature is not None:
        dtype = getattr(feature, "dtype", None)
        if isinstance(dtype, str):
            try:
                found = np.dtype(dtype)
            except (TypeError, ValueError):  # "string", "PIL.Image.Image", "timestamp[s]"
                return None
            return found if found.kind in "uif" else None
        feature = getattr(feature, "feature", None)
    return None


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


def _class_ids(
    ds: Any, key: str, split: str, train: tuple[list[str] | None, bool] | None = None
) -> tuple[list[int], list[str] | None, bool]:
    """``(ids, names, numbered)``: the labels of ``ds[key]`` as class ids, the class names they
    number (``None`` for plain integers) and whether the data numbered them (a ``ClassLabel``)
    rather than dkl (string labels, sorted).

    ``train``: ``None`` for the training split; for the test split, the training split's
    ``(names, numbered)``, to which its labels are matched by name.
    """
    feature = ds.features[key]
    values = ds[key]
    own = list(feature.names) if type(feature).__name__ == "ClassLabel" else None
    where = f"data 'hf': split '{split}', column '{key}'"
    names, numbered = train if train is not None else (None, True)
    if own is None and values and all(isinstance(v, str) for v in values):
        if train is not None and names is None:
            raise ValueError(
                f"{where}: class names (strings, e.g. {values[0]!r}) where the training split has "
                f"class ids (integers); store both splits' labels the same way"
            )
        own = sorted(set(values)) if names is None else names
        index = {n: i for i, n in enumerate(own)}
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise ValueError(
                f"{where}: labels {unknown[:5]} are not classes of the training split "
                f"({len(own)} classes: {own[:5]}{', ...' if len(own) > 5 else ''})"
            )
        return [index[v] for v in values], own, train is not None and numbered

    def wrong(v: Any) -> bool:  # not of the kind of the first label (names or ids)
        if isinstance(values[0], str):
            return not isinstance(v, str)
        return isinstance(v, bool) or not isinstance(v, (int, np.integer))

    bad = next((i for i, v in enumerate(values) if wrong(v)), None)
    if bad is not None:
        v = values[bad]
        raise ValueError(
            f"{where}: expected class ids (integers, a ClassLabel) or class names (strings), got "
            f"{type(v).__name__} {v!r} in row {bad}"
        )
    ids = [int(v) for v in values]
    if train is None:
        return ids, own, True
    if own is None:
        if names is not None and not numbered:
            raise ValueError(
                f"{where}: class ids (integers) where the training split has class names "
                f"(strings, e.g. {names[0]!r}); store both splits' labels the same way"
            )
        return ids, names, numbered  # plain ids: numbered as the training split's
    if own == names:
        return ids, names, numbered
    if names is None:
        raise ValueError(
            f"{where}: a ClassLabel ({own[:5]}{', ...' if len(own) > 5 else ''}) where the "
            f"training split has plain class ids; give both splits the same ClassLabel"
        )
    # the test split's ClassLabel numbers the names its own way: map its ids by name
    index = {n: i for i, n in enumerate(names)}
    used = sorted({own[i] for i in set(ids) if 0 <= i < len(own)})
    unknown = [n for n in used if n not in index]
    if unknown:
        raise ValueError(
            f"{where}: classes {unknown[:5]} of its ClassLabel are not in the training split's "
            f"({names[:5]}{', ...' if len(names) > 5 else ''})"
        )
    to_train = [index.get(n, -1) for n in own]
    return [to_train[i] if 0 <= i < len(own) else i for i in ids], names, numbered


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
    found = [s for s in TEST_SPLITS["hf"] if s in splits and s != train_name]
    test_name = opts.get("test_split") or (found[0] if found else None)
    if test_name is not None and test_name not in splits:
        raise ValueError(f"data 'hf': no split {test_name!r} in '{root}' (splits: {list(splits)})")
    train_ds = splits[train_name]
    features = dict(train_ds.features)
    image_key = _pick_column(features, opts.get("image_key"), "Image", _IMAGE_COLUMNS, "image")
    label_key = _pick_column(features, opts.get("label_key"), "ClassLabel", _LABEL_COLUMNS, "label")
    targets, names, numbered = _class_ids(train_ds, label_key, train_name)
    if test_name is not None:
        if not opts.get("test_split"):
            _choice("hf", found, "'{}'")
        test_ds = splits[test_name]
        for key in (image_key, label_key):
            if key not in test_ds.features:
                raise ValueError(
                    f"data 'hf': split {test_name!r} has no column {key!r}, which split "
                    f"{train_name!r} has (its columns: {sorted(test_ds.features)})"
                )
        test_targets = _class_ids(test_ds, label_key, test_name, (names, numbered))[0]
        train = HFImages(train_ds, image_key, label_key, targets=targets, split=train_name)
        test = HFImages(test_ds, image_key, label_key, targets=test_targets, split=test_name)
    else:
        tr, te = stratified_split(np.asarray(targets, dtype=np.int64), request.val_fraction)
        looked_for = f"no split {', '.join(TEST_SPLITS['hf'])} in '{root}'"
        _holding_out("hf", looked_for, request.val_fraction, len(te), len(targets))
        train = HFImages(train_ds, image_key, label_key, tr.tolist(),
                         targets=[targets[i] for i in tr], split=train_name)  # fmt: skip
        test = HFImages(train_ds, image_key, label_key, te.tolist(),
                        targets=[targets[i] for i in te], split=train_name)  # fmt: skip
    classes: Any = names
    if names is None:
        classes = max(max(train.targets, default=0), max(test.targets, default=0)) + 1
    n = classes if isinstance(classes, int) else len(classes)
    for split in (train, test):
        bad = [t for t in split.targets if not 0 <= t < n]
        if bad:
            unlabeled = "; -1 marks a row without a label" if bad[0] == -1 else ""
            raise ValueError(
                f"data 'hf': split '{split.split}', column '{label_key}': label {bad[0]} is "
                f"outside 0..{n - 1} ({n} classes){unlabeled}"
            )
    return ImageSplits(train, test, classes)
