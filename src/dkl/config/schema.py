"""The typed run configuration: the sections every run has, and :class:`Config` itself."""

from __future__ import annotations

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


@dataclass
class DataConfig:
    """Which data set and how it is batched. ``batch_size`` is the GLOBAL batch (all ranks)."""

    name: str = "digits"  # digits | cifar10 | cifar100 | imagefolder
    root: str = "data"
    download: bool = False
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    augment: bool = True  # standard train augmentation (crop + flip) where the data set has one
    image_size: int = 224  # imagefolder only
    drop_last: bool = False


@dataclass
class ModelConfig:
    """A model built by ``dkl.models.create_model(name, num_classes, **kwargs)``."""

    name: str = "mlp"
    kwargs: dict = field(default_factory=dict)
    normalize: bool = True  # wrap with the data set's Normalize(mean, std): inputs stay in [0, 1]
    checkpoint: str = ""  # optional initial weights (dkl.models.load_weights)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    betas: list = field(default_factory=lambda: [0.9, 0.999])


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
    milestones: list = field(default_factory=list)
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
