r"""The optimiser and the learning-rate schedule.

One builder, :func:`build_optimizer`, for every recipe (a recipe shapes the parameter groups, e.g.
layer-wise lr decay, and hands them over). The schedule is a ``torch.optim.lr_scheduler.LambdaLR``
over the pure function :func:`lr_factor` of the optimiser-step count, so a resumed run gets exactly
the lr it would have had, and any other ``LRScheduler`` can take its place
(:meth:`dkl.train.Task.build_scheduler`).

Schedules (``sched.name``), in the run's unit ``t`` (epochs done, or iterations done):

- ``multistep``: ``gamma ** (number of milestones <= t)``;
- ``cosine``: ``min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + cos(pi * x))``;
- ``usb_cosine``: ``max(0, cos(pi * cycles * x))`` (USB's and FixMatch's; with ``cycles = 7/16``
  it ends at ``cos(7 pi / 16)`` ≈ 0.195 of the peak);
- ``constant``;

with ``x = (t + offset - warmup) / (total - warmup)`` clipped to [0, 1] (``total`` defaults to the
run length) and, before that, ``warmup`` units of linear warm-up from ``warmup_start``.

>>> from dkl.config import SchedConfig
>>> s = SchedConfig(name="multistep", milestones=[2, 4], gamma=0.1)
>>> [lr_factor(s, t, total=6) for t in range(6)]
[1.0, 1.0, 0.1, 0.1, 0.010000000000000002, 0.010000000000000002]
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from dkl.config import ConfigError, OptimConfig, SchedConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_factor"]


def build_optimizer(cfg: OptimConfig, params: Iterable) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov), AdamW or Adam over ``params`` (tensors or groups)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
        )
    if cfg.name in ("adamw", "adam"):
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ConfigError(f"optim.name: unknown optimiser {cfg.name!r} (known: sgd, adamw, adam)")


def lr_factor(s: SchedConfig, t: float, total: float) -> float:
    """Multiplier of the base lr at position ``t`` of a run of length ``total``."""
    if s.warmup > 0 and t < s.warmup:
        return s.warmup_start + (1.0 - s.warmup_start) * t / s.warmup
    if s.name == "constant":
        return 1.0
    if s.name == "multistep":
        return s.gamma ** sum(t >= m for m in s.milestones)
    horizon = (s.total or total) - s.warmup
    x = min(max(t + s.offset - s.warmup, 0.0) / max(horizon, 1e-12), 1.0)
    if s.name == "cosine":
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * x))
    if s.name == "usb_cosine":
        return max(0.0, math.cos(math.pi * s.cycles * x))
    raise ConfigError(f"sched.name: unknown schedule {s.name!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: SchedConfig,
    *,
    steps_per_epoch: int,
    epochs: int = 0,
    iterations: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` whose factor at optimiser step ``k`` is :func:`lr_factor` at that position.

    Iteration runs (``iterations`` > 0) count iterations. Epoch runs count epochs: the lr changes
    at epoch boundaries, or at every step with ``sched.per_step`` (``t = k / steps_per_epoch``).
    """
    if iterations > 0:

        def factor(k: int) -> float:
            return lr_factor(cfg, float(k), float(iterations))

    else:

        def factor(k: int) -> float:
            done, step = divmod(k, steps_per_epoch)
            t = done + (step / steps_per_epoch if cfg.per_step else 0.0)
            return lr_factor(cfg, t, float(epochs))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
