"""Data: data sets by name, seeded augmentations, resumable samplers, semi-supervised streams.

Images are float tensors in [0, 1]; normalisation lives in the model (:class:`DataInfo` carries
the mean and std). Every random draw is seeded from the run's seed with :func:`mix_seed`, so what
a step sees depends on the seed and the step only, never on workers or on a resume.

- :mod:`~dkl.data.datasets`: :func:`build_datasets` by name, :func:`register_dataset` (add your
  own), :class:`DataInfo`, the normalisation constants, :class:`SeededDataset`; built in: digits,
  CIFAR-10/100 and, in :mod:`~dkl.data.sources`, your own images (imagefolder, npz, hf).
- :mod:`~dkl.data.preprocess`: channels, size, the augmentation policies (transforms v2), the
  ``auto`` mean / std, the fixed stratified split.
- :mod:`~dkl.data.samplers`: :class:`ShardedBatchSampler` (epochs), :class:`InfiniteBatchSampler`
  (endless draws).
- :mod:`~dkl.data.transforms`: the CIFAR crop + flip, the semi-supervised weak / strong views,
  the adversarial second view (:func:`with_second_view`).
- :mod:`~dkl.data.semisup`: :func:`split_labeled`, :class:`ViewDataset`, :class:`SemiSupLoader`.
- :func:`collate`: the ``collate_fn`` of every loader; :func:`mix_seed`: the seed mixing.
"""

from . import sources as sources  # registers imagefolder, npz, hf
from .collate import collate
from .datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataInfo,
    DataRequest,
    ImageSplits,
    SeededDataset,
    TensorImageDataset,
    UnknownDatasetError,
    build_datasets,
    list_datasets,
    prepare_images,
    raw_images,
    register_dataset,
)
from .preprocess import (
    POLICIES,
    PreparedImages,
    channel_stats,
    image_transforms,
    stratified_split,
    to_chw,
)
from .samplers import InfiniteBatchSampler, ShardedBatchSampler, shard_indices
from .seeding import mix_seed
from .semisup import SemiSupLoader, ViewDataset, split_labeled
from .transforms import (
    SECOND_VIEWS,
    Cutout,
    DigitsStrong,
    DigitsWeak,
    TwoViews,
    build_views,
    cifar_strong,
    cifar_weak,
    crop_flip,
    with_second_view,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "POLICIES",
    "SECOND_VIEWS",
    "Cutout",
    "DataInfo",
    "DataRequest",
    "DigitsStrong",
    "DigitsWeak",
    "ImageSplits",
    "InfiniteBatchSampler",
    "PreparedImages",
    "SeededDataset",
    "SemiSupLoader",
    "ShardedBatchSampler",
    "TensorImageDataset",
    "TwoViews",
    "UnknownDatasetError",
    "ViewDataset",
    "build_datasets",
    "build_views",
    "channel_stats",
    "cifar_strong",
    "cifar_weak",
    "collate",
    "crop_flip",
    "image_transforms",
    "list_datasets",
    "mix_seed",
    "prepare_images",
    "raw_images",
    "register_dataset",
    "shard_indices",
    "split_labeled",
    "stratified_split",
    "to_chw",
    "with_second_view",
]
