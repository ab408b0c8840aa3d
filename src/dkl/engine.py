"""The one training loop, shared by every recipe (KD, adversarial training, semi-supervised).

Usage::

    from dkl.config import load_config
    from dkl.engine import Engine

    cfg = load_config("kd/digits_ikl", ["train.epochs=5", "seed=1"])
    summary = Engine(cfg).fit()          # resume=True continues runs/<name>/last.pt
    print(summary["last"]["top1"])

Under ``torchrun`` prefer :func:`train`, which also tears the process group down in the safe
order; with an ``Engine`` of your own, call ``engine.close()`` before
``torch.distributed.destroy_process_group()`` (a DDP wrapper freed after its group, at
interpreter exit, can abort the process).

What the engine owns: device and AMP, DDP under ``torchrun``, seeding and deterministic mode, the
optimiser and the lr schedule, the step (autocast, GradScaler, clipping), evaluation (top-1/top-5,
gathered over ranks), checkpoints and exact resume, signals, logs, plots and the progress bar.

What a recipe owns: the models and the loss. A recipe is a subclass of :class:`Recipe`, registered
with ``dkl.recipes.register_recipe("name")`` and selected by ``recipe: name`` in the config. Its
interface (all methods have defaults except :meth:`Recipe.train_step`):

``__init__(cfg, engine)``
    Build extra objects (teacher, loss modules, :class:`dkl.ClassPrior`, EMA copies). The engine
    has already built data (``engine.train_set``, ``engine.test_set``, ``engine.info``), chosen the
    device and seeded the RNGs; ``engine.build_model(model_cfg)`` builds a model on the device.
``build_model() -> nn.Module``
    The trainable model (default: from ``cfg.model``). The engine wraps it in DDP when needed;
    call it through ``self.model`` (wrapped) in ``train_step``; ``self.raw_model`` is unwrapped.
``param_groups(model) -> iterable``
    What the optimiser gets (default ``model.parameters()``); for layer-wise lr decay etc.
``train_step(batch, ctx) -> dict``
    Runs under autocast; returns ``{"loss": scalar tensor, "logits": (B, C) or None,
    "labels": (B,) or None, <name>: float or 0-d tensor ...}``. Logits + labels feed the training
    accuracy; other entries are averaged over the steps and logged. The engine does backward,
    clipping, the optimiser and lr steps. ``ctx`` is a :class:`StepContext` (epoch from 1, step
    within the epoch, global step, ``ctx.warmup(n)`` = ``min(epoch / n, 1)``).
``train_batches(epoch, start) -> iterable`` and ``steps_per_epoch() -> int``
    The training batches of one data epoch, skipping the first ``start`` (exact resume); default:
    :class:`dkl.data.ShardedBatchSampler` over ``engine.train_set``. SSL overrides these to
    zip a labeled and an unlabeled loader.
``after_step(ctx)``
    Called after every optimiser step (a per-step EMA teacher).
``end_epoch(ctx) -> dict``
    Called after the last step of each data epoch (``ClassPrior.step()``, epoch-level EMA).
``eval_model() -> nn.Module``
    The model evaluated, saved as ``best.pt`` and reported (default: the trained model; an EMA
    copy where the recipe keeps one).
``evaluate(loader) -> dict | None``
    Extra evaluation; ``None`` (default) means the engine's top-1/top-5/loss on ``eval_model()``.
``state_dict() / load_state_dict(sd)``
    Everything else a resume needs (prior with its running sums, EMA weights, counters). Values
    must be tensors / numbers / strings / lists / dicts (checkpoints load with
    ``weights_only=True``). Saved from rank 0.
``rank_state() / load_rank_state(sd)``
    What each rank sums on its own between all-reduces (a prior's running sums, pseudo-label
    counts): saved for every rank, so a DDP run resumes exactly.

Units: epoch-based runs (``train.epochs``) evaluate and checkpoint at every epoch end; iteration
runs (``train.iterations`` > 0) evaluate and checkpoint every ``train.eval_every`` steps and
cycle through data epochs as needed. The lr schedule is a pure function of the global step.

Exact resume: the data order of an epoch is a function of ``(seed, epoch)`` and augmentation is
seeded per sample, so a checkpoint needs only the position (epoch, step within it) plus model,
optimiser, scaler, recipe state, running metrics and the torch/numpy/python RNG states (every
rank's, under DDP: each rank draws its own stream once the models are built, and keeps its own
running sums and its recipe's, see :meth:`Recipe.rank_state`). On
SIGTERM or SIGINT the engine finishes the current step, writes ``last.pt`` and raises
:class:`Interrupted`; ``fit(resume=True)`` continues from there and, on CPU with
``train.deterministic=true``, ends with exactly the metrics of an uninterrupted run.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dkl.config import Config, ConfigError, ModelConfig, config_to_dict, save_config
from dkl.data import ShardedBatchSampler, build_datasets, collate_fn, shard_indices

__all__ = [
    "Engine",
    "Interrupted",
    "NonFiniteLossError",
    "Recipe",
    "StepContext",
    "evaluate_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]

CHECKPOINT_FORMAT = "dkl-checkpoint-1"


class Interrupted(RuntimeError):
    """Raised after a SIGTERM/SIGINT once the checkpoint is written; resume with ``--resume``."""

    def __init__(self, signum: int, path: Path) -> None:
        self.signum, self.path = signum, path
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped and saved {path}; continue with --resume")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: the run stops rather than train on garbage."""


# --------------------------------------------------------------------------------------------
# Recipe base class
# --------------------------------------------------------------------------------------------


@dataclass
class StepContext:
    epoch: int  # data epoch, from 1
    step: int  # step within the epoch, from 0
    global_step: int  # steps done before this one
    steps_per_epoch: int
    total_steps: int

    @property
    def progress(self) -> float:
        return self.global_step / max(self.total_steps, 1)

    def warmup(self, length: float) -> float:
        """``min(epoch / length, 1)``: the SPEC's loss warm-up (epochs counted from 1)."""
        return 1.0 if length <= 0 else min(self.epoch / length, 1.0)


class Recipe:
    """Base class of a training recipe; see the module docstring for the interface."""

    name = "base"

    def __init__(self, cfg: Config, engine: Engine) -> None:
        self.cfg = cfg
        self.engine = engine

    # models -------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return self.engine.build_model(self.cfg.model)

    def param_groups(self, model: nn.Module) -> Iterable:
        return model.parameters()

    @property
    def model(self) -> nn.Module:
        """The trainable model as called in training (DDP-wrapped under torchrun)."""
        return self.engine.model

    @property
    def raw_model(self) -> nn.Module:
        return self.engine.raw_model

    def eval_model(self) -> nn.Module:
        return self.engine.raw_model

    # data ---------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return self.engine.train_sampler.batches_per_epoch()

    def train_batches(self, epoch: int, start: int) -> Iterable:
        e = self.engine
        e.train_sampler.set_position(epoch, start)
        if hasattr(e.train_set, "set_epoch"):
            e.train_set.set_epoch(epoch)
        return e.make_loader(e.train_set, e.train_sampler)

    # steps --------------------------------------------------------------------------------
    def train_step(self, batch: Any, ctx: StepContext) -> dict:
        raise NotImplementedError

    def after_step(self, ctx: StepContext) -> None:
        """Called after every optimiser step (EMA teachers and other per-step updates)."""

    def end_epoch(self, ctx: StepContext) -> dict:
        return {}

    def evaluate(self, loader: Iterable) -> dict | None:
        return None

    # state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def rank_state(self) -> dict:
        """What this rank has summed since the last all-reduce (e.g. a prior's running sums).

        Numbers and tensors in (nested) dicts, additive across ranks. The engine saves every
        rank's copy and gives each rank its own back on resume; resumed by another number of
        ranks, rank 0 gets the sum of them all and the others zeros.
        """
        return {}

    def load_rank_state(self, state: dict) -> None:
        pass

    def summary(self) -> dict:
        """Extra fields for summary.json."""
        return {}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def _tree_add(a: Any, b: Any) -> Any:
    """Sum of two nested dicts of numbers / tensors (a key missing on one side counts as 0)."""
    if isinstance(a, dict):
        return {k: _tree_add(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k))
                for k in {**a, **b}}
    return a + b


def _tree_zeros(a: Any) -> Any:
    if isinstance(a, dict):
        return {k: _tree_zeros(v) for k, v in a.items()}
    return torch.zeros_like(a) if torch.is_tensor(a) else type(a)(0)


def _tree_cpu(a: Any) -> Any:
    if isinstance(a, dict):
        return {k: _tree_cpu(v) for k, v in a.items()}
    return a.detach().cpu().clone() if torch.is_tensor(a) else a


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random stream during training (rank 0 keeps ``seed``)."""
    return seed if rank == 0 else (seed * 1_000_003 + 7_919 * rank) % (2**63 - 1)


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(obj: dict, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``.

    A crash at any moment leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (a file from elsewhere cannot run code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


def _lr_factor(cfg: Config, t: float, total: float) -> float:
    """Multiplier of the base lr at position ``t`` (epochs done or iterations done)."""
    s = cfg.sched
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


def _accuracy_counts(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> tuple[int, int]:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top == labels[:, None]
    return int(hit[:, 0].sum()), int(hit.any(dim=1).sum())


def bare_model(m: nn.Module) -> nn.Module:
    """The model inside the normalisation wrapper: its keys are the architecture's own
    (mdistiller / torchvision), which is what every dkl checkpoint stores under ``"model"``."""
    from dkl.models import unwrap_normalization

    return unwrap_normalization(m)


def _diff_config(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff_config(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} ({a!r} -> {b!r})")
    return out


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


# --------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------


class Engine:
    """Runs one config end to end. See the module docstring."""

    def __init__(self, cfg: Config, *, log: Any = None, eval_only: bool = False) -> None:
        self.cfg = cfg
        self.eval_only = eval_only  # recipes may skip what only training needs (a teacher)
        self.log = log or (lambda msg: print(msg, flush=True) if _is_main() else None)
        self._setup_distributed()
        self._setup_device()
        self._seed_everything(cfg.seed)
        self.run_dir = cfg.run_dir

        d = cfg.data
        self.train_set, self.test_set, self.info = build_datasets(
            d.name,
            root=d.root,
            download=d.download and self.rank == 0,
            augment=d.augment,
            seed=cfg.seed,
            image_size=d.image_size,
        )
        if self.world > 1:
            dist.barrier()
        if d.batch_size % self.world:
            raise ConfigError(
                f"data.batch_size: the global batch {d.batch_size} is not divisible by the "
                f"world size {self.world}"
            )
        self.batch_per_rank = d.batch_size // self.world
        self.train_sampler = ShardedBatchSampler(
            len(self.train_set),  # type: ignore[arg-type]
            self.batch_per_rank,
            shuffle=True,
            seed=cfg.seed,
            rank=self.rank,
            world=self.world,
            drop_last=d.drop_last,
        )

        from dkl.recipes import get_recipe

        self.recipe: Recipe = get_recipe(cfg.recipe)(cfg, self)
        self.raw_model = self.recipe.build_model().to(self.device)
        self.model: nn.Module = self.raw_model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.raw_model, device_ids=ids)
        self.optimizer = self._build_optimizer()
        for g in self.optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")

        # position and running state (all of it goes into the checkpoint)
        self.epoch = 1
        self.step_in_epoch = 0
        self.global_step = 0
        self.best: dict = {}
        self.history: list[dict] = []
        self.elapsed = 0.0
        self.samples_seen = 0
        self.train_time = 0.0
        self._reset_running()
        self._stop_signal: int | None = None
        self._tb = None
        # Models are built: from here on each rank draws its own random numbers (dropout, drop
        # path, attack starts), or every rank would repeat rank 0's draws on its own shard.
        if self.world > 1:
            _seed_all(_rank_seed(cfg.seed, self.rank))

    # setup ---------------------------------------------------------------------------------
    def _setup_distributed(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            want_cuda = self.cfg.train.device != "cpu" and torch.cuda.is_available()
            if want_cuda:
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group("nccl" if want_cuda else "gloo")
        if dist.is_initialized():
            self.world, self.rank = dist.get_world_size(), dist.get_rank()

    def _setup_device(self) -> None:
        want = self.cfg.train.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(f"train.device: '{want}' requested but CUDA is not available")
            if want == "cuda":
                want = f"cuda:{self.local_rank if self.world > 1 else torch.cuda.current_device()}"
        self.device = torch.device(want)
        if self.cfg.train.threads > 0:
            torch.set_num_threads(self.cfg.train.threads)
        if self.device.type == "cuda":
            if self.cfg.train.deterministic:
                # CPU kernels are already deterministic for a fixed thread count; on CUDA ask
                # torch to pick deterministic kernels (and warn where none exists)
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.use_deterministic_algorithms(True, warn_only=True)
                torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = not self.cfg.train.deterministic
        amp = self.cfg.train.amp
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def _seed_everything(self, seed: int) -> None:
        # every rank builds its models from the same seed (identical init; DDP also broadcasts
        # rank 0's weights); the data order is sharded by rank, not by seed
        _seed_all(seed)

    def build_model(self, mcfg: ModelConfig, *, normalize: bool | None = None) -> nn.Module:
        """``create_model`` + optional initial weights + the data set's normalisation wrapper.

        Weights load into the bare model (mdistiller / torchvision key names), before wrapping.
        """
        from dkl import models

        try:
            m = models.create_model(mcfg.name, self.info.num_classes, **mcfg.kwargs)
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"model '{mcfg.name}': {e}") from None
        if mcfg.checkpoint:
            models.load_weights(m, mcfg.checkpoint)
        if mcfg.normalize if normalize is None else normalize:
            m = models.with_normalization(m, self.info.mean, self.info.std)
        return m.to(self.device)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        params = self.recipe.param_groups(self.raw_model)
        if o.name == "sgd":
            return torch.optim.SGD(
                params,
                lr=o.lr,
                momentum=o.momentum,
                weight_decay=o.weight_decay,
                nesterov=o.nesterov,
            )
        if o.name == "adamw":
            return torch.optim.AdamW(
                params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay
            )
        if o.name == "adam":
            return torch.optim.Adam(
                params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay
            )
        raise ConfigError(f"optim.name: unknown optimiser {o.name!r}")

    def make_loader(self, dataset: Any, batch_sampler: Any) -> torch.utils.data.DataLoader:
        """A DataLoader over ``batch_sampler`` that never touches the global RNG.

        (DataLoader draws its worker base seed from the global generator unless given one, which
        would make the RNG stream depend on where an epoch started.)
        """
        nw = self.cfg.data.num_workers
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=nw,
            collate_fn=collate_fn,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.cfg.seed),
            persistent_workers=False,
        )

    def test_loader(self) -> torch.utils.data.DataLoader:
        idx = shard_indices(len(self.test_set), self.rank, self.world)  # type: ignore[arg-type]
        bs = self.cfg.data.eval_batch_size
        batches = [idx[i : i + bs] for i in range(0, len(idx), bs)]
        return self.make_loader(self.test_set, batches)

    # running metrics -------------------------------------------------------------------------
    def _reset_running(self) -> None:
        self.running = {"loss": 0.0, "correct": 0, "seen": 0, "steps": 0, "extra": {}}

    def _accumulate(self, loss: float, out: dict) -> None:
        r = self.running
        r["loss"] += loss
        r["steps"] += 1
        logits, labels = out.get("logits"), out.get("labels")
        if logits is not None and labels is not None:
            r["correct"] += int((logits.detach().argmax(1) == labels).sum())
            r["seen"] += int(labels.numel())
        for k, v in out.items():
            if k in ("loss", "logits", "labels") or v is None:
                continue
            v = float(v.detach()) if torch.is_tensor(v) else float(v)
            r["extra"][k] = r["extra"].get(k, 0.0) + v

    def _reduce_running(self) -> dict:
        r = self.running
        keys = sorted(r["extra"])
        vals = torch.tensor(
            [r["loss"], r["correct"], r["seen"], r["steps"], *[r["extra"][k] for k in keys]],
            dtype=torch.float64,
        )
        if self.world > 1:
            vals = vals.to(self._comm_device())
            dist.all_reduce(vals)
            vals = vals.cpu()
        loss, correct, seen, steps, *extra = vals.tolist()
        out = {"train_loss": loss / max(steps, 1)}
        if seen:
            out["train_acc"] = 100.0 * correct / seen
        for k, v in zip(keys, extra):
            out[f"train_{k}"] = v / max(steps, 1)
        return out

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    # evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict:
        """Top-1 / top-5 / CE loss on the test split, gathered over ranks (percentages)."""
        extra = None
        loader = self.test_loader()
        if model is None:  # the recipe's own model: its extra evaluation runs too
            model = self.recipe.eval_model()
            extra = self.recipe.evaluate(loader)
        was_training = model.training
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64)
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with self.autocast():
                logits = model(x)
            logits = logits.float()
            c1, c5 = _accuracy_counts(logits, y)
            sums += torch.tensor(
                [c1, c5, float(F.cross_entropy(logits, y, reduction="sum")), y.numel()],
                dtype=torch.float64,
            )
        if self.world > 1:
            sums = sums.to(self._comm_device())
            dist.all_reduce(sums)
            sums = sums.cpu()
        c1, c5, loss, n = sums.tolist()
        model.train(was_training)
        out = {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "test_loss": loss / n}
        if extra:
            out.update(extra)
        return out

    def autocast(self):
        return torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        )

    # checkpoints ----------------------------------------------------------------------------
    def _rank_states(self) -> list[dict] | None:
        """What differs between ranks (RNG state, running metric sums), gathered from every
        rank: a collective under DDP; ``None`` for one process."""
        if self.world == 1:
            return None
        states: list[Any] = [None] * self.world
        mine = {
            "rng": _rng_state(),
            "running": copy.deepcopy(self.running),
            "recipe": _tree_cpu(self.recipe.rank_state()),
        }
        dist.all_gather_object(states, mine)
        return states

    def state_dict(self, ranks: list[dict] | None = None) -> dict:
        """The full training state. ``ranks``: each rank's own part, from
        :meth:`_rank_states` (a collective, so the caller gathers it on all ranks)."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": bare_model(self.raw_model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "recipe": self.recipe.state_dict(),
            "engine": {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "best": self.best,
                "history": self.history,
                "elapsed": self.elapsed,
                "train_time": self.train_time,
                "samples_seen": self.samples_seen,
                "running": self.running,
                "finished": self._finished(),
            },
            "rng": _rng_state(),
            "config": config_to_dict(self.cfg),
        }
        if ranks is not None:
            state["ranks"] = ranks
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"not a dkl training checkpoint (format {state.get('format')!r}, expected "
                f"{CHECKPOINT_FORMAT!r}); use model.checkpoint= for plain weights"
            )
        bare_model(self.raw_model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.recipe.load_state_dict(state["recipe"])
        e = state["engine"]
        self.epoch, self.step_in_epoch = e["epoch"], e["step_in_epoch"]
        self.global_step, self.best, self.history = e["global_step"], e["best"], e["history"]
        self.elapsed, self.train_time = e["elapsed"], e["train_time"]
        self.samples_seen = e["samples_seen"]
        ranks = state.get("ranks")
        if ranks is None:  # written by one process: its sums are those the recipe just loaded
            ranks = [{"rng": state["rng"], "running": e["running"],
                      "recipe": _tree_cpu(self.recipe.rank_state())}]
        if len(ranks) == self.world:
            mine = ranks[self.rank]
            _set_rng_state(mine["rng"])
            self.running = mine["running"]
            self.recipe.load_rank_state(mine["recipe"])
            return
        # written by another number of ranks: rank 0 carries the sums of them all (they come
        # out the same once all-reduced), the others start from zero; each reseeds its stream
        total = {k: ranks[0][k] for k in ("running", "recipe")}
        for part in ranks[1:]:
            total = _tree_add(total, {k: part[k] for k in ("running", "recipe")})
        mine = total if self.rank == 0 else _tree_zeros(total)
        self.running = mine["running"]
        self.recipe.load_rank_state(mine["recipe"])
        if self.world == 1:
            _set_rng_state(ranks[0]["rng"])
        else:
            _seed_all(_rank_seed(self.cfg.seed + self.global_step, self.rank))
        self.log(
            f"resume: the checkpoint was written by {len(ranks)} rank(s), this run has "
            f"{self.world}; the random draws from here on differ from an uninterrupted run"
        )

    def _export(self) -> dict:
        """What ``best.pt`` / ``final.pt`` hold: the bare model's weights (mdistiller-style keys)."""
        return {
            "model": bare_model(self.recipe.eval_model()).state_dict(),
            "config": config_to_dict(self.cfg),
            "metrics": self.history[-1] if self.history else {},
        }

    def _save(self, name: str = "last.pt") -> Path:
        """Write the training state (collective under DDP: every rank must call it)."""
        path = self.run_dir / name
        ranks = self._rank_states()
        if self.rank == 0:
            save_checkpoint(self.state_dict(ranks), path)
        return path

    # the loop -------------------------------------------------------------------------------
    def _total_steps(self, spe: int) -> int:
        t = self.cfg.train
        return t.iterations if t.iterations > 0 else t.epochs * spe

    def _finished(self) -> bool:
        t = self.cfg.train
        if t.iterations > 0:
            return self.global_step >= t.iterations
        return self.epoch > t.epochs

    def _set_lr(self, spe: int) -> None:
        t, s = self.cfg.train, self.cfg.sched
        if t.iterations > 0:
            pos, total = float(self.global_step), float(t.iterations)
        else:
            done = self.epoch - 1
            pos = done + (self.step_in_epoch / spe if s.per_step else 0.0)
            total = float(t.epochs)
        f = _lr_factor(self.cfg, pos, total)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f

    def _install_signals(self) -> dict:
        def handler(signum, frame):
            if self._stop_signal is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum

        old = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                old[s] = signal.signal(s, handler)
            except ValueError:  # not the main thread
                pass
        return old

    def _all_finite(self, value: float) -> bool:
        """True when the loss is finite on every rank (all ranks stop together otherwise)."""
        ok = math.isfinite(value)
        if self.world > 1:
            t = torch.tensor([float(not ok)], device=self._comm_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            ok = not bool(t.item())
        return ok

    def _should_stop(self) -> bool:
        flag = self._stop_signal is not None
        if self.world > 1:
            t = torch.tensor([float(flag)], device=self._comm_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self._stop_signal is None:
                self._stop_signal = signal.SIGTERM
        return flag

    def fit(self, resume: bool = False) -> dict:
        """Train to the end (or until a signal); return the summary dict (rank 0 writes it)."""
        cfg = self.cfg
        last = self.run_dir / "last.pt"
        if resume:
            if not last.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint at '{last}'")
            state = load_checkpoint(last, map_location=self.device)
            changed = _diff_config(state.get("config", {}), config_to_dict(cfg))
            if changed:
                self.log(
                    "resume: the config differs from the checkpoint's in " + ", ".join(changed)
                )
            self.load_state_dict(state)
            self.log(
                f"resumed {last} at epoch {self.epoch}, step {self.step_in_epoch} "
                f"(global step {self.global_step})"
            )
        elif last.exists() and not cfg.train.overwrite:
            raise FileExistsError(
                f"'{self.run_dir}' already holds a run; pass --resume to continue it, or choose "
                f"another name=... (or train.overwrite=true)"
            )
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            if cfg.train.tensorboard:
                self._tb = _tensorboard(self.run_dir)
        spe = self.recipe.steps_per_epoch()
        if cfg.train.max_steps_per_epoch > 0:
            spe = min(spe, cfg.train.max_steps_per_epoch)
        if spe <= 0:
            raise ConfigError(
                f"data.batch_size: {cfg.data.batch_size} leaves no full batch per epoch"
            )
        total = self._total_steps(spe)
        self.log(
            f"run '{cfg.name}': recipe={cfg.recipe} data={cfg.data.name} model={cfg.model.name} "
            f"device={self.device} world={self.world} global_batch={cfg.data.batch_size} "
            f"({self.batch_per_rank}/rank) steps/epoch={spe} total_steps={total} amp={cfg.train.amp}"
        )
        old_handlers = self._install_signals()
        t_start = time.time() - self.elapsed
        try:
            while not self._finished():
                self._run_epoch(spe, total, t_start)
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            if self._tb is not None:
                self._tb.close()
        summary = self._summary()
        if self.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if cfg.train.plot:
                plot_history(self.history, self.run_dir / "curves.png", title=cfg.name)
        return summary

    def close(self) -> None:
        """Drop the DDP wrapper (and with it the reducer's hold on the process group).

        :func:`train` calls this before it destroys the group it started. The model stays
        usable as ``engine.raw_model``.
        """
        self.model = self.raw_model

    def _run_epoch(self, spe: int, total: int, t_start: float) -> None:
        cfg, t = self.cfg, self.cfg.train
        iteration_mode = t.iterations > 0
        model = self.model
        model.train()
        batches = self.recipe.train_batches(self.epoch, self.step_in_epoch)
        bar = _progress(
            t.progress and self.rank == 0,
            spe,
            self.step_in_epoch,
            f"epoch {self.epoch}" + ("" if iteration_mode else f"/{t.epochs}"),
        )
        it: Iterator = iter(batches)
        try:
            while self.step_in_epoch < spe:
                t0 = time.time()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                batch = _to_device(batch, self.device)
                self._set_lr(spe)
                ctx = StepContext(self.epoch, self.step_in_epoch, self.global_step, spe, total)
                with self.autocast():
                    out = self.recipe.train_step(batch, ctx)
                loss = out["loss"]
                loss_value = float(loss.detach())
                if not self._all_finite(loss_value):
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss_value}) at epoch {self.epoch}, step "
                        f"{self.step_in_epoch} "
                        f"(global step {self.global_step}) of run '{cfg.name}'; stopped without "
                        f"updating. Lower optim.lr or the loss weights (IKL's beta on raw logits "
                        f"grows with their spread: SPEC §3 Stability), or use amp=bf16 instead of "
                        f"fp16. Last good checkpoint: {self.run_dir / 'last.pt'}"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if t.grad_clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.raw_model.parameters(), t.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.recipe.after_step(ctx)
                self._accumulate(loss_value, out)
                labels = out.get("labels")
                self.samples_seen += (labels.numel() if labels is not None else 0) * self.world
                self.step_in_epoch += 1
                self.global_step += 1
                self.train_time += time.time() - t0
                if bar is not None:
                    bar.update(1)
                    if self.step_in_epoch % max(t.log_every, 1) == 0 or self.step_in_epoch == spe:
                        r = self.running
                        post = {"loss": f"{r['loss'] / max(r['steps'], 1):.4f}"}
                        if r["seen"]:
                            post["acc"] = f"{100.0 * r['correct'] / r['seen']:.2f}"
                        rate = (time.time() - t_start) / max(self.global_step, 1)
                        post["eta"] = _fmt_time(rate * (total - self.global_step))
                        bar.set_postfix(post, refresh=False)
                if self._should_stop():
                    self.elapsed = time.time() - t_start
                    path = self._save()
                    if bar is not None:
                        bar.close()
                        bar = None
                    raise Interrupted(self._stop_signal or signal.SIGTERM, path)
                if iteration_mode and (
                    self.global_step % t.eval_every == 0 or self.global_step >= t.iterations
                ):
                    if self.step_in_epoch >= spe:  # epoch boundary coincides with evaluation
                        break
                    self._eval_point(t_start)
                    if self._finished():
                        return
        finally:
            if bar is not None:
                bar.close()
        # end of the data epoch
        ctx = StepContext(self.epoch, self.step_in_epoch, self.global_step, spe, total)
        epoch_extra = self.recipe.end_epoch(ctx) or {}
        self.epoch += 1
        self.step_in_epoch = 0
        if not iteration_mode or self.global_step % t.eval_every == 0 or self._finished():
            self._eval_point(t_start, epoch_extra, epoch=self.epoch - 1)

    def _eval_point(
        self, t_start: float, extra: dict | None = None, epoch: int | None = None
    ) -> None:
        t = self.cfg.train
        record: dict[str, Any] = {
            "epoch": epoch if epoch is not None else self.epoch,
            "step": self.global_step,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        record.update(self._reduce_running())
        record.update(self.evaluate())
        for k, v in (extra or {}).items():
            record[k] = float(v) if torch.is_tensor(v) else v
        record["time"] = round(time.time() - t_start, 3)
        self._reset_running()
        self.history.append(record)
        improved = not self.best or record["top1"] > self.best["top1"]
        if improved:
            self.best = {
                "top1": record["top1"],
                "top5": record["top5"],
                "epoch": record["epoch"],
                "step": record["step"],
            }
        self.elapsed = time.time() - t_start
        msg = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
        )
        self.log(msg)
        n_points = len(self.history)  # the same on every rank, so is the decision to save
        save_last = (t.save_every > 0 and n_points % t.save_every == 0) or self._finished()
        ranks = self._rank_states() if save_last else None
        if self.rank != 0:
            return
        with open(self.run_dir / "metrics.jsonl", "w") as f:  # rewritten: consistent after resume
            f.writelines(json.dumps(h) + "\n" for h in self.history)
        if improved and t.keep_best:
            save_checkpoint(self._export(), self.run_dir / "best.pt")
        if save_last:
            save_checkpoint(self.state_dict(ranks), self.run_dir / "last.pt")
        if self._finished():
            save_checkpoint(self._export(), self.run_dir / "final.pt")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self._tb.add_scalar(k, v, record["step"])

    def _summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        s = {
            "name": self.cfg.name,
            "recipe": self.cfg.recipe,
            "data": self.cfg.data.name,
            "model": self.cfg.model.name,
            "best": dict(self.best),
            "last": {k: last.get(k) for k in ("top1", "top5", "test_loss", "epoch", "step")},
            "epochs": self.epoch - 1,
            "steps": self.global_step,
            "wall_time_s": round(self.elapsed, 3),
            "train_time_s": round(self.train_time, 3),
            "throughput_samples_per_s": round(self.samples_seen / max(self.train_time, 1e-9), 1),
            "global_batch_size": self.cfg.data.batch_size,
            "world_size": self.world,
            "device": str(self.device),
            "amp": self.cfg.train.amp,
            "params": sum(p.numel() for p in self.raw_model.parameters()),
        }
        s.update(self.recipe.summary())
        if self.world > 1:
            s["rank_sync"] = self._rank_sync()
        return s

    def _rank_sync(self) -> dict:
        """Max |difference| between ranks of the weights and of every recipe-state tensor."""
        out = {}
        groups = {"params": [p.detach().flatten() for p in self.raw_model.parameters()]}
        rs = self.recipe.state_dict()
        for k, v in rs.items():
            if isinstance(v, dict):
                ts = [t.detach().flatten().double() for t in v.values() if torch.is_tensor(t)]
                if ts:
                    groups[k] = ts
        for k, ts in groups.items():
            flat = torch.cat([t.double() for t in ts]).to(self._comm_device())
            ref = flat.clone()
            dist.broadcast(ref, 0)
            diff = (flat - ref).abs().max()
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            out[f"{k}_max_abs_diff"] = float(diff)
        return out


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _progress(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr
    )


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(
            "train.tensorboard=true but tensorboard is not installed (pip install "
            "'dkl[tensorboard]'); continuing without it",
            file=sys.stderr,
        )
        return None
    return SummaryWriter(str(run_dir / "tb"))


def plot_history(history: list[dict], path: str | Path, title: str = "") -> None:
    """Loss and accuracy curves of one run (matplotlib, Agg backend) as a PNG."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xkey = "epoch" if len({h["epoch"] for h in history}) == len(history) else "step"
    x = [h[xkey] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(x, [h.get("train_loss") for h in history], label="train loss")
    a1.plot(x, [h.get("test_loss") for h in history], label="test loss")
    a1.set_xlabel(xkey)
    a1.set_ylabel("loss")
    a1.legend()
    if any("train_acc" in h for h in history):
        a2.plot(x, [h.get("train_acc") for h in history], label="train acc")
    a2.plot(x, [h.get("top1") for h in history], label="test top-1")
    a2.set_xlabel(xkey)
    a2.set_ylabel("accuracy (%)")
    a2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def train(cfg: Config, *, resume: bool = False, log: Any = None) -> dict:
    """Build an :class:`Engine` for ``cfg`` and run it; the summary dict comes back.

    ``log`` receives each log line (default: print on rank 0).
    """
    owns_group = not dist.is_initialized()
    engine = None
    try:
        engine = Engine(cfg, log=log)
        summary = engine.fit(resume=resume)
        if dist.is_initialized() and engine.world > 1:
            dist.barrier()  # rank 0 has written its files before anyone leaves
        return summary
    finally:
        if engine is not None:
            engine.close()
        del engine
        if owns_group and dist.is_initialized():  # we started it: shut it down before exiting
            # Nothing may still hold the group when it goes: a DDP reducer freed later, during
            # interpreter shutdown, takes gloo's threads down with it and can abort the process.
            gc.collect()
            dist.destroy_process_group()
            gc.collect()


def engine_from_checkpoint(
    path: str | Path, overrides: tuple[str, ...] | list[str] = ()
) -> tuple[Engine, nn.Module]:
    """An evaluation-only :class:`Engine` rebuilt from a checkpoint's own config, and the model
    the run reports (the recipe's ``eval_model()``, e.g. an EMA, for full training states)."""
    from dkl.config import apply_overrides, config_from_dict

    p = Path(path)
    state = load_checkpoint(p)
    if "config" not in state:
        raise ValueError(
            f"'{p}' carries no config; evaluate it with a config and model.checkpoint="
        )
    cfg = config_from_dict(apply_overrides(state["config"], ["train.progress=false", *overrides]))
    engine = Engine(cfg, log=lambda m: None, eval_only=True)
    if state.get("format") == CHECKPOINT_FORMAT:
        engine.load_state_dict(state)
        return engine, engine.recipe.eval_model()
    bare_model(engine.raw_model).load_state_dict(state["model"])
    return engine, engine.raw_model


def evaluate_checkpoint(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> dict:
    """Evaluate a run folder (its ``best.pt``) or a checkpoint file written by dkl.

    The file must carry its config (every dkl checkpoint does); ``overrides`` change it
    (e.g. ``data.root=...``, ``device=cpu``).
    """
    p = Path(path)
    if p.is_dir():
        p = next(
            (p / n for n in ("best.pt", "final.pt", "last.pt") if (p / n).is_file()), p / "best.pt"
        )
    engine, model = engine_from_checkpoint(p, overrides)
    res = engine.evaluate(model)
    res["checkpoint"] = str(p)
    return res
