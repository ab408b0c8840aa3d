"""The recipe interface: a :class:`Task` and the :class:`RunContext` it is handed.

A task owns the models and the loss; the :class:`~dkl.train.Trainer` owns everything else
(device, AMP, DDP, optimiser and schedule, backward, checkpoints, resume, logs). A task gets a
:class:`RunContext`, never the trainer: the device, rank and world, autocast, ``build_model``,
``log``, the run folder, the data sets and loaders, the test-set evaluation and the sum over ranks.

Only :meth:`Task.train_step` must be written. The rest has defaults:

``__init__(cfg, ctx)``
    Build what the task needs besides the trained model (a teacher, loss modules, a prior). It
    runs before the trained model is built.
``build_model() -> nn.Module``
    The trained model (default: ``cfg.model``). The trainer wraps it in DDP under torchrun and
    sets ``self.model`` (what to call in ``train_step``) and ``self.raw_model`` (unwrapped).
``param_groups(model)`` / ``build_scheduler(optimizer, steps_per_epoch)``
    What the optimiser gets (default ``model.parameters()``) and the lr schedule (default: the
    ``sched`` section as a ``LambdaLR``; any ``torch.optim.lr_scheduler.LRScheduler`` will do).
``train_step(batch, ctx) -> dict``
    Runs under autocast; returns ``{"loss": scalar tensor, "logits": (B, C) or None, "labels":
    (B,) or None, <name>: float or 0-d tensor, ...}``. Logits + labels give the training accuracy;
    other entries are averaged over the steps and logged as ``train_<name>``.
``before_optimizer_step()`` / ``after_step(ctx)`` / ``end_epoch(ctx) -> dict``
    After backward and clipping, before the update (AWP puts the weights back); after every
    update (a per-step EMA); after the last step of each data epoch (a prior's step, an
    epoch-level EMA; the dict joins the epoch's record).
``train_batches(epoch, start)`` / ``steps_per_epoch()``
    The batches of data epoch ``epoch`` (from 1), skipping the first ``start`` (exact resume).
    Default: a seeded, sharded sampler over ``self.train_set`` (``ctx.train_set`` unless the task
    sets its own view of it).
``eval_model()`` / ``evaluate(loader) -> dict | None``
    The model evaluated, saved and reported (default: the trained one; an EMA where the task keeps
    one); extra evaluation merged into each record.
``summary(history) -> dict``
    Extra fields for ``summary.json`` (and the place for a recipe's own plots).

State: name the attributes that carry state in :attr:`Task.state_members`. Each member has
``state_dict()`` / ``load_state_dict()`` (a :class:`dkl.ClassPrior`, a :class:`dkl.ema.ModelEMA`,
a :class:`Counters`); members that also have ``running_state()`` / ``load_running_state()`` keep
sums of their own on each rank between all-reduces, and the trainer saves every rank's copy, so a
DDP run resumes exactly. A member that is ``None`` is skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dkl._files import CheckpointError
from dkl.config import Config, ConfigError, ModelConfig
from dkl.data import DataInfo, ShardedBatchSampler, collate, shard_indices
from dkl.train.distributed import all_reduce_sum
from dkl.train.metrics import evaluate_classifier
from dkl.train.optim import build_scheduler

__all__ = ["Counters", "RunContext", "StepContext", "Task"]


@dataclass(frozen=True)
class StepContext:
    """Where a step sits: data ``epoch`` (from 1), ``step`` within it (from 0), ``global_step``
    (optimiser steps done before this one), ``steps_per_epoch`` and ``total_steps``."""

    epoch: int
    step: int
    global_step: int
    steps_per_epoch: int
    total_steps: int


@dataclass
class RunContext:
    """What a task may use of the run. Built by the trainer; a task never sees the trainer."""

    cfg: Config
    device: torch.device
    rank: int
    world: int
    info: DataInfo
    train_set: Dataset
    test_set: Dataset
    amp_dtype: torch.dtype | None = None
    eval_only: bool = False
    log: Callable[[str], None] = print

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def batch_per_rank(self) -> int:
        """This rank's share of the global ``data.batch_size``."""
        return self.cfg.data.batch_size // self.world

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        )

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over ranks, in float64 (``t`` itself for one process)."""
        return all_reduce_sum(t)

    def build_model(
        self,
        mcfg: ModelConfig,
        *,
        normalize: bool | None = None,
        stats: dict | None = None,
    ) -> nn.Module:
        """``create_model`` + optional initial weights + the normalisation wrapper (the data set's
        mean and std, or ``stats``' own: those a teacher was trained with), on the run's device.
        Weights load into the bare model (mdistiller / torchvision key names)."""
        from dkl import models

        try:
            m = models.create_model(
                mcfg.name, self.info.num_classes, input_shape=self.info.input_shape, **mcfg.kwargs
            )
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"model '{mcfg.name}': {e}") from None
        if mcfg.checkpoint:
            models.load_weights(m, mcfg.checkpoint, replace_classifier=mcfg.replace_classifier)
            for name, t in m.state_dict().items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise CheckpointError(
                        f"'{mcfg.checkpoint}' holds NaN or inf weights ('{name}'): the weights "
                        f"of a diverged run? Use an earlier checkpoint"
                    )
        if mcfg.normalize if normalize is None else normalize:
            mean, std = (stats["mean"], stats["std"]) if stats else (self.info.mean, self.info.std)
            m = models.with_normalization(m, mean, std)
        return m.to(self.device)

    def make_loader(self, dataset: Dataset, batch_sampler: Iterable) -> DataLoader:
        """A DataLoader over ``batch_sampler`` that never touches the global RNG.

        (DataLoader draws its worker base seed from the global generator unless given one, which
        would make the random stream depend on where an epoch started.)
        """
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=self.cfg.data.num_workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.cfg.seed),
            persistent_workers=False,
        )

    def batch_sampler(self, n: int) -> ShardedBatchSampler:
        """This rank's seeded, resumable batches over ``n`` training samples."""
        return ShardedBatchSampler(
            n,
            self.batch_per_rank,
            shuffle=True,
            seed=self.cfg.seed,
            rank=self.rank,
            world=self.world,
            drop_last=self.cfg.data.drop_last,
        )

    def test_loader(self) -> DataLoader:
        """This rank's shard of the test split, in order."""
        idx = shard_indices(len(self.test_set), self.rank, self.world)  # type: ignore[arg-type]
        bs = self.cfg.data.eval_batch_size
        return self.make_loader(self.test_set, [idx[i : i + bs] for i in range(0, len(idx), bs)])

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Top-1 / top-5 (%) and CE of ``model`` on the test split, over all ranks."""
        return evaluate_classifier(model, self.test_loader(), self.device, self.autocast)


class Counters:
    """Named float sums a task adds to between evaluations (e.g. pseudo-label hits).

    They are a task state member with per-rank sums: :meth:`reduce` returns the totals over ranks
    and starts again from zero.
    """

    def __init__(self, *names: str) -> None:
        self.names = names
        self.values = dict.fromkeys(names, 0.0)

    def add(self, **values: Any) -> None:
        for k, v in values.items():
            self.values[k] += float(v)

    def reduce(self) -> dict[str, float]:
        vals = torch.tensor([self.values[k] for k in self.names], dtype=torch.float64)
        totals = all_reduce_sum(vals).tolist()
        self.values = dict.fromkeys(self.names, 0.0)
        return dict(zip(self.names, totals))

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, state: dict) -> None:
        self.values = {k: float(state.get(k, 0.0)) for k in self.names}

    running_state = state_dict
    load_running_state = load_state_dict


class Task:
    """Base class of a training recipe; see the module docstring for the interface."""

    name: ClassVar[str] = "task"
    #: attributes holding state to checkpoint (see the module docstring)
    state_members: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Config, ctx: RunContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.train_set: Dataset = ctx.train_set
        self.model: nn.Module | None = None  # set by the trainer once built
        self.raw_model: nn.Module | None = None

    # models and optimisation -------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return self.ctx.build_model(self.cfg.model)

    def param_groups(self, model: nn.Module) -> Iterable:
        return model.parameters()

    def build_scheduler(
        self, optimizer: torch.optim.Optimizer, steps_per_epoch: int
    ) -> torch.optim.lr_scheduler.LRScheduler:
        t = self.cfg.train
        return build_scheduler(
            optimizer,
            self.cfg.sched,
            steps_per_epoch=steps_per_epoch,
            epochs=t.epochs,
            iterations=t.iterations,
        )

    def eval_model(self) -> nn.Module:
        assert self.raw_model is not None
        return self.raw_model

    # data ---------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return self.ctx.batch_sampler(len(self.train_set)).batches_per_epoch()  # type: ignore[arg-type]

    def steps_run_per_epoch(self) -> int:
        """The steps an epoch runs: :meth:`steps_per_epoch`, cut to
        ``train.max_steps_per_epoch`` where that is set."""
        spe, cap = self.steps_per_epoch(), self.cfg.train.max_steps_per_epoch
        return min(spe, cap) if cap > 0 else spe

    def train_batches(self, epoch: int, start: int) -> Iterable:
        sampler = self.ctx.batch_sampler(len(self.train_set))  # type: ignore[arg-type]
        sampler.set_position(epoch, start)
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        return self.ctx.make_loader(self.train_set, sampler)

    # steps --------------------------------------------------------------------------------
    def train_step(self, batch: Any, ctx: StepContext) -> dict:
        raise NotImplementedError(f"{type(self).__name__}.train_step")

    def before_optimizer_step(self) -> None:
        """After backward (and gradient clipping), right before the optimiser step."""

    def after_step(self, ctx: StepContext) -> None:
        """After every optimiser step."""

    def end_epoch(self, ctx: StepContext) -> dict:
        return {}

    def evaluate(self, loader: Iterable) -> dict | None:
        return None

    def summary(self, history: list[dict]) -> dict:
        return {}

    # state --------------------------------------------------------------------------------
    def _members(self) -> dict[str, Any]:
        members = {n: getattr(self, n, None) for n in self.state_members}
        return {n: m for n, m in members.items() if m is not None}

    def state_dict(self) -> dict:
        """The state of :attr:`state_members` (tensors, numbers, strings, lists, dicts only:
        checkpoints load with ``weights_only=True``)."""
        return {n: m.state_dict() for n, m in self._members().items()}

    def load_state_dict(self, state: dict) -> None:
        for n, m in self._members().items():
            if n in state:
                m.load_state_dict(state[n])

    def rank_state(self) -> dict:
        """What this rank has summed on its own since the last all-reduce (additive over ranks)."""
        return {
            n: m.running_state() for n, m in self._members().items() if hasattr(m, "running_state")
        }

    def load_rank_state(self, state: dict) -> None:
        for n, m in self._members().items():
            if n in state and hasattr(m, "load_running_state"):
                m.load_running_state(state[n])
