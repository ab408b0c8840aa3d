"""The typed run configuration: the sections every run has, and :class:`Config` itself."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dkl.config.sections import AdversarialConfig, DistillConfig, SemiSupConfig

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "SchedConfig",
    "TrainConfig",
]


class ConfigError(ValueError):
    """A configuration problem; the message is one line that names the offending key."""


#: the augmentation policies ``data.augment`` names (dkl.data.POLICIES holds the same tuple)
AUGMENT_POLICIES = (
    "default",
    "none",
    "crop_flip",
    "random_resized_crop",
    "randaugment",
    "imagenet",
)
_STATS = ("default", "auto", "imagenet")


@dataclass
class DataConfig:
    """Which data set, how its images are prepared, how it is batched.

    ``batch_size`` is the GLOBAL batch (all ranks). Preprocessing (``dkl.data.build_datasets``):

    - ``image_size``: the side images are resized to (0: as stored; they must then all be one size).
    - ``channels``: 1 (grey) or 3 (RGB); 0 keeps what the data holds: grey stays grey (1 when 16
      evenly spaced training images are all grey, else 3).
    - ``augment``: the train augmentation policy: ``none``; ``crop_flip`` (random crop after
      ``crop_padding`` pixels of zero padding, -1 = one eighth of the side, 4 at 32);
      ``random_resized_crop`` (area share in ``crop_scale``); ``randaugment`` (``ra_ops``
      operations of magnitude ``ra_magnitude``); ``imagenet`` (random resized crop for training,
      resize to side / 0.875 + centre crop for evaluation); ``default``: the data set's standard
      (``crop_flip`` for CIFAR, ``none`` otherwise). ``flip`` adds a horizontal flip (p = 1/2)
      to every policy but ``none``. Evaluation sees the images as ``none`` would (resized only),
      except under ``imagenet``. ``true`` / ``false`` mean ``default`` / ``none``.
    - ``mean`` / ``std``: per-channel lists for the model's input normalisation, or ``auto``
      (computed on the training split, cached in the run folder), ``imagenet``, or ``default``
      (the data set's published values where it has them and they fit ``channels``, else auto).
    - ``val_fraction``: the share held out (stratified, fixed) as the test split of a data set
      that has none (npz, hf). ``options``: extra arguments of the data set's builder.
    """

    name: str = "digits"  # digits, cifar10, cifar100, imagefolder, npz, hf or a registered name
    root: str = "data"
    download: bool = False
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    image_size: int = 0
    channels: int = 0
    augment: str | bool = "default"
    flip: bool = True
    crop_padding: int = -1
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ra_ops: int = 2
    ra_magnitude: int = 9
    mean: list | str = "default"
    std: list | str = "default"
    val_fraction: float = 0.2
    options: dict = field(default_factory=dict)
    drop_last: bool = False

    def validate(self) -> None:
        if isinstance(self.augment, bool):  # the v0.1 switch
            self.augment = "default" if self.augment else "none"
        if self.augment not in AUGMENT_POLICIES:
            raise ConfigError(
                f"data.augment: expected one of {', '.join(AUGMENT_POLICIES)}, got {self.augment!r}"
            )
        if self.channels not in (0, 1, 3):
            raise ConfigError(f"data.channels: expected 0 (as stored), 1 or 3, got {self.channels}")
        lo_hi = self.crop_scale  # each in (0, 1]: dkl.config.RANGES
        if len(lo_hi) != 2 or not lo_hi[0] <= lo_hi[1]:
            raise ConfigError(f"data.crop_scale: expected [lo, hi] with lo <= hi, got {lo_hi}")
        for key in ("mean", "std"):
            setattr(self, key, self._stats(key, getattr(self, key)))

    def _stats(self, key: str, value: list | str) -> list | str:
        if isinstance(value, str):
            if value not in _STATS:
                raise ConfigError(
                    f"data.{key}: expected a list of per-channel values or one of "
                    f"{', '.join(_STATS)}, got {value!r}"
                )
            return value
        try:
            values = [float(v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError(f"data.{key}: expected numbers, got {value!r}") from None
        if len(values) not in (1, 3) or (self.channels and len(values) != self.channels):
            want = self.channels or "1 or 3"
            raise ConfigError(f"data.{key}: expected {want} per-channel values, got {len(values)}")
        if key == "std" and min(values) <= 0:
            raise ConfigError(f"data.std: expected every value > 0, got {values}")
        return values

    def dataset_options(self) -> dict:
        """The keyword arguments of ``dkl.data.build_datasets`` this section sets."""
        skip = ("batch_size", "eval_batch_size", "num_workers", "drop_last")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclass
class ModelConfig:
    """A model built by ``dkl.models.create_model(name, num_classes, **kwargs)``."""

    name: str = "mlp"
    kwargs: dict = field(default_factory=dict)
    normalize: bool = True  # wrap with the data set's Normalize(mean, std): inputs stay in [0, 1]
    checkpoint: str = ""  # optional initial weights (dkl.models.load_weights)
    # a pretrained file for other classes (torchvision / timm ImageNet weights): its classifier is
    # replaced by the model's new one, with one logged line; anything else must still fit
    replace_classifier: bool = False


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class SchedConfig:
    """Learning-rate schedule, in the run's unit: epochs (epoch-based) or iterations.

    ``multistep``: ``lr * gamma ** (number of milestones passed)``; ``cosine``:
    ``lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + cos(pi * t / total)))`` with ``total``
    defaulting to the run length; ``constant``. ``warmup`` units of linear warm-up from
    ``warmup_start`` * lr. With ``per_step: false`` (default for epochs) the lr changes only at
    epoch boundaries; ``per_step: true`` interpolates within an epoch. ``offset`` shifts the cosine's
    position: with ``total: 201, offset: 1`` epoch ``e`` (from 1) gets ``0.5 (1 + cos(pi e / 201))``,
    the adversarial-training schedule of the IKL-AT authors. ``usb_cosine``:
    ``lr * max(0, cos(pi * cycles * x))`` with ``x`` the position after warm-up over the rest of
    the run (USB's and FixMatch's schedule; with ``cycles = 7/16`` it ends at ``cos(7 pi / 16)``
    ≈ 0.195 of the peak, not at 0).
    """

    name: Literal["constant", "multistep", "cosine", "usb_cosine"] = "multistep"
    milestones: list[int | float] = field(default_factory=list)
    gamma: float = 0.1
    warmup: float = 0.0
    warmup_start: float = 0.0
    total: float = 0.0
    offset: float = 0.0
    min_lr_ratio: float = 0.0
    cycles: float = 7.0 / 16.0
    per_step: bool = False


@dataclass
class TrainConfig:
    """The loop. Set ``epochs`` for epoch-based runs or ``iterations`` (+ ``eval_every``)."""

    epochs: int = 10
    iterations: int = 0  # > 0: iteration-based; evaluation every `eval_every` iterations
    eval_every: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    amp: Literal["none", "bf16", "fp16"] = "none"
    deterministic: bool = False
    threads: int = 0  # torch CPU threads; 0 = torch's default. Tiny models run fastest on 1.
    out_dir: str = "runs"
    save_every: int = 1  # checkpoint every N evaluation points (last.pt); 0 = only at the end
    keep_best: bool = True
    progress: bool = True
    tensorboard: bool = False
    grad_clip: float = 0.0
    log_every: int = 20  # progress-bar refresh, in steps
    max_steps_per_epoch: int = 0  # > 0: cut every epoch short (smoke tests)
    plot: bool = True
    overwrite: bool = False  # allow a new run to replace runs/<name>/ (otherwise: --resume)
    # stop when a step's loss exceeds this many times the median of the last 50 (0 = off)
    divergence_factor: float = 1.0e4
    # minutes a rank waits for the others in a collective before the run stops (0 = torch's
    # default: 30 on CPU / gloo, 10 on CUDA / NCCL); a hung rank stops the others after it
    dist_timeout: float = 0.0


@dataclass
class Config:
    """A whole run: top-level fields, the shared sections and the section of its recipe.

    Only the running recipe's section is set (``cfg.distill`` for ``recipe: distill``); the
    sections of the other built-in recipes are ``None`` and are not saved. A recipe registered
    outside dkl with a section of its own finds it in ``sections[recipe]``.
    """

    name: str = "run"
    recipe: str = "distill"
    seed: int = 0
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig | None = None
    adversarial: AdversarialConfig | None = None
    semisup: SemiSupConfig | None = None
    sections: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out_dir) / self.name

    @property
    def section(self) -> Any:
        """The running recipe's own section (``None`` for a recipe without one)."""
        if self.recipe in BUILTIN_SECTIONS:
            return getattr(self, self.recipe)
        return self.sections.get(self.recipe)


#: the shared sections, by YAML key
COMMON_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "sched": SchedConfig,
    "train": TrainConfig,
}
#: the built-in recipes' sections, by recipe name (= YAML key = attribute of Config)
BUILTIN_SECTIONS: dict[str, type] = {
    "distill": DistillConfig,
    "adversarial": AdversarialConfig,
    "semisup": SemiSupConfig,
}
TOP_LEVEL: dict[str, type] = {"name": str, "recipe": str, "seed": int, "description": str}
