"""Run a config and evaluate what it wrote: the entry points behind ``dkl train`` / ``dkl eval``.

::

    from dkl.config import load_config
    from dkl.api import train

    cfg = load_config("kd/digits_ikl", ["train.epochs=5", "seed=1"])
    summary = train(cfg)                 # resume=True continues runs/<name>/last.pt
    print(summary["last"]["top1"])

This is the layer that knows the recipes: it picks the config's recipe (``recipe: distill``) from
:mod:`dkl.recipes` and hands its task to :class:`dkl.train.Trainer`.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dkl._files import atomic_write
from dkl.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)
from dkl.config.ranges import check_values
from dkl.models import unwrap_normalization
from dkl.recipes import get_recipe
from dkl.robust import check_backend, evaluate_robustness
from dkl.train import CheckpointError, Trainer, find_checkpoint, load_checkpoint
from dkl.train.checkpoint import data_changes, saved_normalization
from dkl.train.state import load_model_state

__all__ = ["evaluate_checkpoint", "evaluate_run", "load_run", "make_trainer", "train"]


def make_trainer(cfg: Config, *, log: Callable[[str], None] | None = None, **kw: Any) -> Trainer:
    """A :class:`~dkl.train.Trainer` for ``cfg`` with its recipe's task.

    ``cfg`` is checked as a loaded config is (:data:`dkl.config.RANGES`, the run's name), so a
    :class:`~dkl.config.Config` built or edited in Python meets the same rule.
    """
    check_values(cfg, config_to_dict(cfg))
    try:
        task_cls = get_recipe(cfg.recipe)
    except KeyError as e:
        raise ConfigError(f"recipe: {e.args[0]}") from None
    return Trainer(cfg, task_cls, log=log, **kw)


def train(
    cfg: Config,
    *,
    resume: bool = False,
    new_epoch: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train ``cfg`` to the end; the summary dict comes back. ``log`` gets each log line.

    ``resume`` continues ``<run_dir>/last.pt``: exactly, or with changed settings that can be
    applied there (epochs, lr, weight decay, the schedule, logging); a change that would make it
    another run (data, batch size mid-epoch, the recipe's settings) raises
    :class:`~dkl.config.ConfigError` unless ``new_epoch``, which applies it from the next epoch.

    Under ``torchrun`` it also tears down the process group it started, in the safe order (a
    DDP wrapper freed after its group, at interpreter exit, can abort the process): with a
    :class:`~dkl.train.Trainer` of your own, call ``trainer.close()`` before
    ``torch.distributed.destroy_process_group()``.
    """
    owns_group = not dist.is_initialized()
    trainer = None
    try:
        trainer = make_trainer(cfg, log=log)
        summary = trainer.fit(resume=resume, new_epoch=new_epoch)
        if dist.is_initialized() and trainer.world > 1:
            dist.barrier()  # rank 0 has written its files before anyone leaves
        return summary
    finally:
        if trainer is not None:
            trainer.close()
        del trainer
        if owns_group and dist.is_initialized():
            # Nothing may still hold the group when it goes: a DDP reducer freed later, during
            # interpreter shutdown, takes gloo's threads down with it and can abort the process.
            gc.collect()
            dist.destroy_process_group()
            gc.collect()


def load_run(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Trainer, nn.Module]:
    """An evaluation-only trainer rebuilt from a checkpoint's own config, and the model the run
    reports (the task's ``eval_model()``, e.g. an EMA, for a full training state). A config file
    with ``model.checkpoint=FILE`` evaluates that file's plain weights (a torchvision / timm /
    mdistiller state dict) as the config builds the model."""
    p = find_checkpoint(path)
    if p.suffix.lower() in (".yaml", ".yml", ".json"):
        cfg = load_config(p, ["train.progress=false", *overrides])
        if not cfg.model.checkpoint:
            raise CheckpointError(
                f"'{p}' is a config file: give the weights to evaluate with it (dkl eval {p} "
                f"model.checkpoint=FILE), or evaluate a run folder or dkl checkpoint"
            )
        trainer = make_trainer(cfg, log=lambda m: None, eval_only=True)
        return trainer, trainer.raw_model
    state = load_checkpoint(p)
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise CheckpointError(
            f"'{p}' is not a dkl checkpoint (no config and model inside); evaluate plain weights "
            f"with a config: dkl eval CONFIG model.checkpoint={p}"
        )
    # the model's input normalisation as it was trained, whatever data it is evaluated on
    # (the data's own statistics would quietly adapt the model to it)
    own = saved_normalization(state)
    given = {o.split("=", 1)[0].strip() for o in overrides if "=" in o}
    fixed = [
        f"data.{k}={list(own[k])}" for k in ("mean", "std") if own and f"data.{k}" not in given
    ]
    cfg = config_from_dict(
        apply_overrides(state["config"], ["train.progress=false", *fixed, *overrides])
    )
    trainer = make_trainer(cfg, log=lambda m: None, eval_only=True)
    saved = state.get("data")
    if isinstance(saved, dict):  # written with a record of its data: is this the same?
        now = trainer._data_fingerprint()
        diffs = data_changes(saved, now, ("num_classes", "input_shape", "classes"))
        if diffs:
            d = cfg.data
            raise CheckpointError(
                f"'{p}' was trained on other data than data.name={d.name!r}, data.root="
                f"{d.root!r} gives ({'; '.join(diffs)}); evaluate it on its own data (data.root=...)"
            )
    if state.get("format") is not None:  # a training state (last.pt)
        trainer.scheduler = trainer.task.build_scheduler(trainer.optimizer, 1)
        trainer.load_state_dict(state)
        return trainer, trainer.task.eval_model()
    load_model_state(
        unwrap_normalization(trainer.raw_model), state["model"], f"'{p}'",
        num_classes=trainer.ctx.info.num_classes,
    )  # fmt: skip
    return trainer, trainer.raw_model


def evaluate_checkpoint(path: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Top-1 / top-5 / loss of a run folder (see :func:`dkl.train.find_checkpoint` for which
    file it means) or of a checkpoint file written by dkl. ``overrides`` change its config
    (``data.root=...``, ``train.device=cpu``)."""
    p = find_checkpoint(path)
    trainer, model = load_run(p, overrides)
    res = trainer.ctx.evaluate(model)
    res["checkpoint"] = str(p)
    return res


def evaluate_run(
    target,
    *,
    n_examples: int | None = None,
    version: str = "standard",
    eps: float | None = None,
    batch_size: int = 256,
    seed: int = 0,
    backend: str = "auto",
    sanity: str = "raise",
    overrides: list[str] | tuple[str, ...] = (),
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    write: bool = True,
) -> dict[str, Any]:
    """:func:`dkl.robust.evaluate_robustness` of a dkl run folder or checkpoint on its test split.

    The model is the one the run exports (``final.pt``: the EMA for adversarial runs). ``eps``
    defaults to the run's ``adversarial.attack.eps`` (8/255 for other recipes). With ``write``,
    the result goes to ``robust.json`` beside the checkpoint and under ``"robust"`` in its
    ``summary.json``; for plain weights given through a config (``model.checkpoint=FILE``), to
    ``robust.json`` beside that file alone.
    """
    if n_examples is not None and n_examples < 1:
        raise ValueError(f"n_examples: expected a number of test points >= 1, got {n_examples}")
    if eps is not None and not 0 <= eps <= 1:
        raise ValueError(
            f"eps: expected an L-inf radius in [0, 1], on pixels in [0, 1] (8/255 = 0.0314), "
            f"got {eps}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    check_backend(backend)  # before the run is loaded and attacked
    path = find_checkpoint(target)
    torch.manual_seed(seed)
    trainer, model = load_run(path, overrides)
    cfg = trainer.cfg
    if eps is None:
        eps = float(cfg.adversarial.attack.eps) if cfg.adversarial is not None else 8 / 255
    xs, ys, have = [], [], 0
    for xb, yb in trainer.ctx.test_loader():
        xs.append(xb)
        ys.append(yb)
        have += len(yb)
        if n_examples is not None and have >= n_examples:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    n_total = len(trainer.ctx.test_set)
    res = evaluate_robustness(
        model.float(),
        x,
        y,
        eps=eps,
        n_examples=n_examples,
        version=version,
        batch_size=batch_size,
        seed=seed,
        backend=backend,
        sanity=sanity,
        progress=progress,
        log=log,
    )
    res["n_total"] = n_total
    res["checkpoint"] = str(path)
    res["run"] = cfg.name
    # plain weights evaluated through a config are not that run's model: their result goes
    # beside the weights file, and no run's summary is touched
    plain = path.suffix.lower() in (".yaml", ".yml", ".json")
    if plain:
        res["checkpoint"] = str(cfg.model.checkpoint)
        res["config"] = str(path)
    out = Path(cfg.model.checkpoint).parent if plain else path.parent
    if write:  # each file replaced whole or not at all (a full disk keeps the old one)
        text = (json.dumps(res, indent=2) + "\n").encode()
        atomic_write(out / "robust.json", lambda f: f.write(text), "robust.json")
        summary = path.parent / "summary.json"
        if not plain and summary.is_file():
            data = json.loads(summary.read_text())
            data["robust"] = res
            text = (json.dumps(data, indent=2) + "\n").encode()
            atomic_write(summary, lambda f: f.write(text), "summary")
    return res
