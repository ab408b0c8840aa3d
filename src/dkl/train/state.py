"""The trainer's training state: what ``last.pt`` holds and how a run resumes from it.

Under DDP each rank keeps some things to itself (its RNG state, its running metric sums, its
task's sums such as a prior's): :meth:`TrainingState._rank_states` gathers them, so that every
rank gets its own back on resume; a run resumed by another number of ranks gives rank 0 the sum of
them all.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from dkl.config import ConfigError, config_from_dict, config_to_dict
from dkl.models import unwrap_normalization
from dkl.train import checkpoint as ckpt
from dkl.train import distributed as D
from dkl.train import rundir

__all__ = ["TrainingState", "load_model_state"]

#: settings a resumed run takes over from the new config as they are: the optimiser's hyper-
#: parameters and the schedule are re-applied at the restored position; the rest is bookkeeping
SAFE_TO_CHANGE = (
    "name", "description", "train.epochs", "train.iterations", "train.eval_every",
    "train.device", "train.threads", "train.deterministic", "train.out_dir", "train.overwrite",
    "train.save_every", "train.keep_best", "train.progress", "train.tensorboard",
    "train.log_every", "train.plot", "train.grad_clip", "train.divergence_factor",
    "train.dist_timeout",
    "optim.lr", "optim.weight_decay", "optim.momentum", "optim.nesterov", "optim.betas", "sched.",
    "data.root", "data.download", "data.eval_batch_size", "data.num_workers",
)  # fmt: skip
#: settings with which the checkpoint cannot be continued at all
NEVER_CHANGE = ("recipe", "model.name", "model.kwargs", "model.normalize")
#: safe at an epoch boundary (the schedule is re-counted in the new epoch length), not mid-epoch
EPOCH_LENGTH = ("data.batch_size", "train.max_steps_per_epoch", "data.drop_last")
#: optimiser hyper-parameters taken from the new config on resume
_OPTIM_KEYS = ("lr", "weight_decay", "momentum", "nesterov", "betas", "dampening", "eps")


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p.rstrip(".") or key.startswith(p.rstrip(".") + ".") for p in patterns)


def load_model_state(
    model: torch.nn.Module,
    saved: dict,
    source: str = "the checkpoint",
    num_classes: int | None = None,
) -> None:
    """``model.load_state_dict(saved)``, with a one-line :class:`CheckpointError` when ``saved``
    belongs to another architecture or width (what is missing, unexpected or reshaped). With
    ``num_classes`` (the data's), a mismatch only in the class dimension blames the data."""
    try:
        model.load_state_dict(saved)
    except RuntimeError:
        own = model.state_dict()
        cause = "was model.name or model.kwargs changed?"
        old = _class_count(own, saved, num_classes)
        if old is not None:
            cause = (
                f"the data has {num_classes} classes, the checkpoint's model {old}: was the data "
                f"(data.name, data.root) changed?"
            )
        raise ckpt.CheckpointError(
            f"{source} holds the weights of another model than this {type(model).__name__} "
            f"({_model_mismatch(own, saved)}); {cause}"
        ) from None


def _class_count(own: dict, saved: dict, num_classes: int | None) -> int | None:
    """The checkpoint's class count when the models differ only in their class dimension."""
    if num_classes is None or set(own) - set(saved) - {k for k in own if "num_batches" in k}:
        return None
    if set(saved) - set(own):
        return None
    counts = set()
    for k, t in own.items():
        s = saved.get(k)
        if not hasattr(s, "shape") or s.shape == t.shape:
            continue
        if t.dim() == 0 or t.shape[0] != num_classes or s.shape[1:] != t.shape[1:]:
            return None
        counts.add(int(s.shape[0]))
    return counts.pop() if len(counts) == 1 else None


def _model_mismatch(own: dict, saved: dict) -> str:
    missing = [k for k in own if k not in saved and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in saved if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in saved and hasattr(saved[k], "shape") and saved[k].shape != own[k].shape
    ]
    parts = [f"{len(missing)} missing", f"{len(unexpected)} unexpected", f"{len(shapes)} reshaped"]
    example = shapes[:1] or missing[:1] or unexpected[:1]
    return ", ".join(parts) + (f" (e.g. {example[0]})" if example else "")


def _per_world(running: dict, factor: float) -> dict:
    """Running metrics summed over the ranks that wrote them, re-weighted for ``factor`` times
    as many ranks: each step adds one loss (and one of each extra) per rank, so the steps done
    before count as ``factor`` times as many rank-steps as they were (their mean stays the mean
    per step; images, and so the accuracy, add up as they are)."""
    return {
        **running,
        "loss": running["loss"] * factor,
        "steps": running["steps"] * factor,
        "extra": {k: v * factor for k, v in running["extra"].items()},
    }


class TrainingState:
    """Mixin of :class:`dkl.train.Trainer`: its ``state_dict`` / ``load_state_dict`` and the
    checkpoint files it writes."""

    def _rank_states(self) -> list[dict] | None:
        """Every rank's own part (RNG state, running sums): a collective; ``None`` for one process."""
        mine = {
            "rng": ckpt.rng_state(),
            "running": copy.deepcopy(self.running.state_dict()),
            "recipe": ckpt.tree_cpu(self.task.rank_state()),
        }
        return D.all_gather_objects(mine)

    def state_dict(self, ranks: list[dict] | None = None) -> dict:
        """The full training state; ``ranks`` from :meth:`_rank_states` (gathered on all ranks)."""
        state = {
            "format": ckpt.CHECKPOINT_FORMAT,
            "model": unwrap_normalization(self.raw_model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "recipe": self.task.state_dict(),
            "engine": {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "best": self.best,
                "history": self.history,
                "elapsed": self.elapsed,
                "train_time": self.train_time,
                "samples_seen": self.samples_seen,
                "running": self.running.state_dict(),
                "last_lr": self.last_lr,
                "finished": self.finished,
            },
            "rng": ckpt.rng_state(),
            "config": config_to_dict(self.cfg),
            "made_from": self.sources,
            "data": self._data_fingerprint(),
            "normalization": self._normalization(),
        }
        if ranks is not None:
            state["ranks"] = ranks
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != ckpt.CHECKPOINT_FORMAT:
            raise ValueError(
                f"not a dkl training checkpoint of this version (format {state.get('format')!r}, "
                f"expected {ckpt.CHECKPOINT_FORMAT!r}); use model.checkpoint= for plain weights"
            )
        load_model_state(
            unwrap_normalization(self.raw_model), state["model"],
            num_classes=self.ctx.info.num_classes,
        )  # fmt: skip
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.task.load_state_dict(state["recipe"])
        e = state["engine"]
        self.epoch, self.step_in_epoch = e["epoch"], e["step_in_epoch"]
        self.global_step, self.best, self.history = e["global_step"], e["best"], e["history"]
        self.elapsed, self.train_time = e["elapsed"], e["train_time"]
        self.samples_seen, self.last_lr = e["samples_seen"], e["last_lr"]
        ranks = state.get("ranks")
        if ranks is None:  # written by one process: its sums are those the task just loaded
            ranks = [{"rng": state["rng"], "running": e["running"],
                      "recipe": ckpt.tree_cpu(self.task.rank_state())}]  # fmt: skip
        if len(ranks) == self.world:
            mine = ranks[self.rank]
            ckpt.set_rng_state(mine["rng"])
        else:
            # written by another number of ranks: rank 0 carries the sums of them all (they come
            # out the same once all-reduced), the others start from zero; each reseeds its stream
            total = {k: ranks[0][k] for k in ("running", "recipe")}
            for part in ranks[1:]:
                total = ckpt.tree_add(total, {k: part[k] for k in ("running", "recipe")})
            total["running"] = _per_world(total["running"], self.world / len(ranks))
            mine = total if self.rank == 0 else ckpt.tree_zeros(total)
            if self.world == 1:
                ckpt.set_rng_state(ranks[0]["rng"])
            else:
                D.seed_all(D.rank_seed(self.cfg.seed + self.global_step, self.rank))
            self.log(
                f"resume: the checkpoint was written by {len(ranks)} rank(s), this run has "
                f"{self.world}; the random draws from here on differ from an uninterrupted run"
            )
        self.running.load_state_dict(mine["running"])
        self.task.load_rank_state(mine["recipe"])

    def _resume(self, last: Path, new_epoch: bool = False) -> None:
        """Continue from ``last``: exactly, or with the changed settings that can be applied.

        Settings in ``SAFE_TO_CHANGE`` (epochs, lr, weight decay, the schedule, logging, paths)
        are applied at the restored position and logged. Anything else that changed would make the
        run something else: it stops with a :class:`ConfigError` naming the key and both values,
        unless ``new_epoch`` is set, which applies the changes from the start of the next epoch.
        A changed epoch length (batch size) is fine at an epoch boundary.
        """
        if not last.is_file():
            raise FileNotFoundError(
                f"--resume: no checkpoint at '{last}' (start the run without --resume, or check "
                f"name= / --out)"
            )
        try:
            state = ckpt.load_checkpoint(last, map_location=self.device)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"--resume: {e}; remove it to start over") from None
        if not isinstance(state, dict) or "engine" not in state:
            raise ckpt.CheckpointError(
                f"--resume: '{last}' is not a training state (a best.pt/final.pt copy holds "
                f"only weights); use model.checkpoint= to start a new run from those weights"
            )
        defaults = config_to_dict(config_from_dict({"recipe": self.cfg.recipe}))
        changes = ckpt.config_changes(
            state.get("config") or {}, config_to_dict(self.cfg), defaults=defaults
        )
        fixed = [c for c in changes if _matches(c[0], NEVER_CHANGE)]
        if fixed:
            k, a, b = fixed[0]
            raise ConfigError(
                f"--resume: {k} differs from the checkpoint's ({a!r} in '{last}', {b!r} now); a "
                f"checkpoint continues only with its own {k}: start a new run (another name= "
                f"or --out)"
            )
        mid_epoch = state["engine"]["step_in_epoch"] > 0
        other = [
            c
            for c in changes
            if not _matches(c[0], SAFE_TO_CHANGE)
            and not (_matches(c[0], EPOCH_LENGTH) and not mid_epoch)
        ]
        if other and not new_epoch:
            k, a, b = other[0]
            where = "mid-epoch " if _matches(k, EPOCH_LENGTH) else ""
            more = f" (and {len(other) - 1} more)" if len(other) > 1 else ""
            raise ConfigError(
                f"--resume: {k} changed {where}({a!r} -> {b!r}){more}; that makes it another run. "
                f"Restore it, start a new run (another name= or --out), or add --new-epoch to "
                f"continue from the next epoch with the new settings"
            )
        self._check_data(state.get("data"), last, new_epoch)
        self._check_sources(state.get("made_from") or {}, last, new_epoch)
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.load_state_dict(state)
        for k, a, b in changes:
            self.log(f"resume: {k} changed ({a!r} -> {b!r}): applied")
        if other and self.step_in_epoch > 0:
            self.log(
                f"resume: --new-epoch: the rest of epoch {self.epoch} is skipped (its partial "
                f"metrics and running sums with it); epoch {self.epoch + 1} starts with the new "
                "settings"
            )
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            # the next epoch's record and the prior's next step see that epoch alone
            self.running.reset()
            self.task.load_rank_state(ckpt.tree_zeros(ckpt.tree_cpu(self.task.rank_state())))
        recount = any(_matches(k, EPOCH_LENGTH) for k, _, _ in changes)
        self._apply_optimizer_settings(fresh, recount=recount)
        self.log(
            f"resumed {last} at epoch {self.epoch}, step {self.step_in_epoch} "
            f"(global step {self.global_step})"
        )

    def _data_fingerprint(self) -> dict:
        """What the model was made for: classes, input shape and split sizes of the data."""
        info = self.ctx.info
        return {
            **ckpt.class_record(info),
            "input_shape": list(info.input_shape),
            "train_images": len(self.ctx.train_set),  # type: ignore[arg-type]
            "test_images": len(self.ctx.test_set),  # type: ignore[arg-type]
        }

    def _normalization(self) -> dict:
        """The input normalisation the run's models were built with (their ``Normalize``
        buffers are not in the state dict): a teacher or an evaluation built from the
        checkpoint on other data must use these, not that data's statistics."""
        info = self.ctx.info
        return {"mean": [float(v) for v in info.mean], "std": [float(v) for v in info.std]}

    def _check_data(self, saved: dict | None, last: Path, new_epoch: bool) -> None:
        """Refuse to resume on data other than the run's (older checkpoints record none)."""
        if not isinstance(saved, dict):
            return
        now = self._data_fingerprint()
        diffs = ckpt.data_changes(saved, now)
        if not diffs:
            return
        d = self.cfg.data
        what = f"data.name={d.name!r}, data.root={d.root!r}: {'; '.join(diffs)}"
        model_fits = all(
            saved.get(k, now.get(k)) == now.get(k)
            for k in ("num_classes", "input_shape", "classes")
        )
        if model_fits and new_epoch:
            self.log(f"resume: --new-epoch: the data changed ({what}): applied")
            return
        fix = (
            "; or add --new-epoch to continue on the new data from the next epoch"
            if model_fits
            else "; the checkpoint's model was made for the old classes / inputs"
        )
        raise ConfigError(
            f"--resume: the data changed since '{last}' was written ({what}); restore the data "
            f"or start a new run (another name= or --out){fix}"
        )

    def _check_sources(self, saved: dict, last: Path, new_epoch: bool) -> None:
        """Refuse to resume when a file the run is made from (its teacher) changed in place."""
        for key, rec in saved.items():
            now = self.sources.get(key)
            if not isinstance(rec, dict) or now is None or now["path"] != rec.get("path"):
                continue  # not there (the task says so) or another path (a config change)
            if now["sha256"] == rec.get("sha256"):
                continue
            what = rundir.describe_source(key)
            change = (
                f"the {what} file '{now['path']}' ({key}) changed since the run started "
                f"(SHA-256 {str(rec.get('sha256'))[:12]}... then, {now['sha256'][:12]}... now)"
            )
            if key == "model.checkpoint":  # read once, to initialise: the checkpoint has the rest
                self.log(f"resume: note: {change}; it only gave the initial weights")
            elif new_epoch:
                self.log(f"resume: --new-epoch: {change}: the new one is used from here on")
            else:
                raise ConfigError(
                    f"--resume: {change}; continuing would mix two {what}s in one run. Restore "
                    f"the file, start a new run (another name= or --out), or add --new-epoch to "
                    f"continue with the new {what}"
                )

    def _apply_optimizer_settings(self, fresh: list[dict], recount: bool = False) -> None:
        """The new config's optimiser hyper-parameters and schedule, at the restored position.

        ``fresh`` holds the param groups of the optimiser built from the new config (``lr`` there
        is the schedule's start, ``initial_lr`` the base). With ``recount`` (the epoch length
        changed) an epoch run's schedule position is re-counted in the new length; then every
        group's lr is recomputed from it: ``initial_lr`` times the schedule's factor.
        """
        groups, sched = self.optimizer.param_groups, self.scheduler
        if len(fresh) != len(groups):
            raise ckpt.CheckpointError(
                f"--resume: the checkpoint's optimiser has {len(groups)} parameter group(s), "
                f"this run builds {len(fresh)}; was the model or recipe changed?"
            )
        old_base = [g.get("initial_lr", g["lr"]) for g in groups]
        for g, f in zip(groups, fresh, strict=True):
            for k in _OPTIM_KEYS:
                if k in f:
                    g[k] = f[k]
            g["initial_lr"] = f.get("initial_lr", f["lr"])
        if recount and self.cfg.train.iterations <= 0 and self.step_in_epoch == 0:
            # optimiser steps before this epoch, in the new epoch length
            sched.last_epoch = self.global_step = (self.epoch - 1) * self._steps_per_epoch
        if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            sched.base_lrs = [g["initial_lr"] for g in groups]
            for g, base, fn in zip(groups, sched.base_lrs, sched.lr_lambdas, strict=True):
                g["lr"] = base * fn(sched.last_epoch)
        else:  # another scheduler: keep its shape, rescale it to the new base lr
            if hasattr(sched, "base_lrs"):
                sched.base_lrs = [g["initial_lr"] for g in groups]
            for g, old in zip(groups, old_base, strict=True):
                g["lr"] *= g["initial_lr"] / old if old else 1.0
        self.last_lr = groups[0]["lr"]

    def _export(self) -> dict:
        """What ``best.pt`` / ``final.pt`` hold: the evaluated model's bare weights."""
        return {
            "model": unwrap_normalization(self.task.eval_model()).state_dict(),
            "config": config_to_dict(self.cfg),
            "metrics": self.history[-1] if self.history else {},
            "made_from": self.sources,
            "data": self._data_fingerprint(),
            "normalization": self._normalization(),
        }

    def _save_training_state(self) -> Path:
        """Write ``last.pt`` (a collective under DDP: every rank must call it)."""
        path = self.cfg.run_dir / "last.pt"
        ranks = self._rank_states()
        if self.rank == 0:
            ckpt.save_checkpoint(self.state_dict(ranks), path)
        return path
