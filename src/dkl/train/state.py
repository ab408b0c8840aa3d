"""The trainer's training state: what ``last.pt`` holds and how a run resumes from it.

Under DDP each rank keeps some things to itself (its RNG state, its running metric sums, its
task's sums such as a prior's): :meth:`TrainingState._rank_states` gathers them, so that every
rank gets its own back on resume; a run resumed by another number of ranks gives rank 0 the sum of
them all.
"""

from __future__ import annotations

import copy
from pathlib import Path

from dkl.config import config_to_dict
from dkl.models import unwrap_normalization
from dkl.train import checkpoint as ckpt
from dkl.train import distributed as D

__all__ = ["TrainingState"]


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
        unwrap_normalization(self.raw_model).load_state_dict(state["model"])
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

    def _resume(self, last: Path) -> None:
        if not last.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at '{last}'")
        state = ckpt.load_checkpoint(last, map_location=self.device)
        changed = ckpt.diff_config(state.get("config", {}), config_to_dict(self.cfg))
        if changed:
            self.log("resume: the config differs from the checkpoint's in " + ", ".join(changed))
        self.load_state_dict(state)
        self.log(
            f"resumed {last} at epoch {self.epoch}, step {self.step_in_epoch} "
            f"(global step {self.global_step})"
        )

    def _export(self) -> dict:
        """What ``best.pt`` / ``final.pt`` hold: the evaluated model's bare weights."""
        return {
            "model": unwrap_normalization(self.task.eval_model()).state_dict(),
            "config": config_to_dict(self.cfg),
            "metrics": self.history[-1] if self.history else {},
        }

    def _save_training_state(self) -> Path:
        """Write ``last.pt`` (a collective under DDP: every rank must call it)."""
        path = self.cfg.run_dir / "last.pt"
        ranks = self._rank_states()
        if self.rank == 0:
            ckpt.save_checkpoint(self.state_dict(ranks), path)
        return path
