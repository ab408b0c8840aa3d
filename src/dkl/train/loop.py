"""The training loop: :class:`Trainer` runs one config with one :class:`~dkl.train.Task`.

Units: epoch runs (``train.epochs``) evaluate and checkpoint at every epoch end; iteration runs
(``train.iterations`` > 0) every ``train.eval_every`` steps, cycling through data epochs as needed.

Exact resume: the data order of an epoch is a function of ``(seed, epoch)`` and augmentation is
seeded per sample, so a checkpoint needs only the position (epoch, step within it) besides the
model, optimiser, schedule, scaler, task state, running metrics and every rank's RNG states. On
SIGTERM or SIGINT the trainer finishes the step, writes ``last.pt`` and raises
:class:`Interrupted`; ``fit(resume=True)`` continues from there and, on CPU with
``train.deterministic=true``, ends with exactly the metrics of an uninterrupted run.
"""

from __future__ import annotations

import math
import signal
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dkl.config import Config, ConfigError, config_to_dict, config_warnings, save_config
from dkl.data import UnknownDatasetError, build_datasets
from dkl.train import checkpoint as ckpt
from dkl.train import distributed as D
from dkl.train import rundir
from dkl.train.metrics import RunningMetrics
from dkl.train.optim import build_optimizer
from dkl.train.outputs import RunWriter, format_record, format_time, plot_history, progress_bar
from dkl.train.state import TrainingState
from dkl.train.task import RunContext, StepContext, Task

__all__ = ["DivergenceError", "Interrupted", "NonFiniteLossError", "Trainer"]


class Interrupted(RuntimeError):
    """Raised after a SIGTERM/SIGINT once the checkpoint is written; resume with ``--resume``."""

    def __init__(self, signum: int, path: Path) -> None:
        self.signum, self.path = signum, path
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped and saved {path}; continue with --resume")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: the run stops rather than train on garbage."""


class DivergenceError(NonFiniteLossError):
    """The run diverged: a non-finite loss, parameter or buffer, or a loss that exploded.

    Raised before anything of the diverged state is written: ``last.pt`` keeps the last finite
    training state.
    """


#: methods whose wMSE acts on raw logits (a too-large beta is the usual cause of trouble)
_RAW_LOGIT_METHODS = ("ikl", "dkl", "gkl")
#: steps of training loss the explosion check and the learning check look back on
_LOSS_WINDOW = 50


class Trainer(TrainingState):
    """Builds the run (device, DDP, data, the task and its model, optimiser) and trains it."""

    def __init__(
        self, cfg: Config, task_cls: type[Task], *, log: Any = None, eval_only: bool = False
    ) -> None:
        self.cfg = cfg
        self.log = log or (lambda msg: print(msg, flush=True) if D.is_main_process() else None)
        self.dist = D.setup(cfg.train.device, cfg.train.dist_timeout)
        self.rank, self.world = self.dist.rank, self.dist.world
        D.check_same_config(config_to_dict(cfg))
        self.device = D.select_device(cfg.train, self.dist)
        # every rank builds its models from the same seed (identical init; DDP also broadcasts
        # rank 0's weights); the data order is sharded by rank, not by seed
        D.seed_all(cfg.seed)
        d = cfg.data
        options = {**d.dataset_options(), "download": d.download and self.rank == 0}
        # an `auto` mean / std is cached in the run folder; an evaluation creates no folder (its
        # config's out_dir is relative to wherever the run was trained)
        cache = None if eval_only and not cfg.run_dir.is_dir() else str(cfg.run_dir)
        try:
            train_set, test_set, info = build_datasets(
                **options, seed=cfg.seed, cache_dir=cache, check_test=not eval_only
            )
        except UnknownDatasetError as e:
            raise ConfigError(f"data.name: {e}") from None
        if self.world > 1:
            torch.distributed.barrier()  # rank 0 has downloaded
        if d.batch_size % self.world:
            raise ConfigError(
                f"data.batch_size: the global batch {d.batch_size} is not divisible by the "
                f"world size {self.world}"
            )
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
        self.ctx = RunContext(
            cfg, self.device, self.rank, self.world, info, train_set, test_set,
            amp_dtype=amp, eval_only=eval_only, log=self.log,
        )  # fmt: skip
        self.task = task_cls(cfg, self.ctx)
        self.raw_model = self.task.build_model().to(self.device)
        self.model: nn.Module = self.raw_model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.raw_model, device_ids=ids)
        self.task.model, self.task.raw_model = self.model, self.raw_model
        self.optimizer = build_optimizer(cfg.optim, self.task.param_groups(self.raw_model))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")
        self.scheduler: Any = None  # built by fit(), once the epoch length is known

        # position and running state (all of it goes into the checkpoint)
        self.epoch, self.step_in_epoch, self.global_step = 1, 0, 0
        self.best: dict = {}
        self.history: list[dict] = []
        self.elapsed = self.train_time = 0.0
        self.samples_seen = 0
        self.running = RunningMetrics()
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self._stop_signal: int | None = None
        self._writer: RunWriter | None = None
        self._steps_per_epoch = 0
        self._recent_losses: deque[float] = deque(maxlen=_LOSS_WINDOW)
        self._first_losses: list[float] = []  # the run's first steps (the learning check)
        self.sources: dict = {}  # the files the run is made from (teacher...): their SHA-256
        # Models are built: from here on each rank draws its own random numbers (dropout, drop
        # path, attack starts), or every rank would repeat rank 0's draws on its own shard.
        if self.world > 1:
            D.seed_all(D.rank_seed(cfg.seed, self.rank))

    # ---------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, new_epoch: bool = False) -> dict:
        """Train to the end (or until a signal); return the summary dict (rank 0 writes it).

        ``resume`` continues ``last.pt``; settings that change what the run is (see
        :meth:`_resume`) are refused unless ``new_epoch``, which applies them from the next epoch.
        """
        cfg, t = self.cfg, self.cfg.train
        spe = self.task.steps_run_per_epoch()
        if spe <= 0:
            raise ConfigError(
                f"data.batch_size: {cfg.data.batch_size} leaves no full batch per epoch"
            )
        self._steps_per_epoch = spe
        self.scheduler = self.task.build_scheduler(self.optimizer, spe)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        for warning in config_warnings(cfg, steps_per_epoch=spe):
            self.log(f"warning: {warning}")
        self.sources = rundir.source_files(config_to_dict(cfg))
        # one live run per folder: rank 0 holds the lock for the whole run
        lock, busy = (rundir.RunLock(cfg.run_dir), None) if self.rank == 0 else (None, None)
        if lock is not None:
            try:
                lock.acquire()
            except rundir.RunFolderBusy as e:
                busy = e
        if D.any_rank(busy is not None):
            raise busy or rundir.RunFolderBusy(f"run folder '{cfg.run_dir}' is in use")
        try:
            self._start(resume, new_epoch)
            final = cfg.run_dir / "final.pt"
            if self.finished and self.rank == 0 and not final.is_file():
                # a finished last.pt without final.pt (killed between the two by an older dkl, or
                # final.pt deleted): last.pt holds the model final.pt is exported from
                ckpt.save_checkpoint(self._export(), final)
                self.log(f"resume: the run had finished; wrote the missing {final}")
            total = t.iterations if t.iterations > 0 else t.epochs * spe
            self.log(
                f"run '{cfg.name}': recipe={cfg.recipe} data={cfg.data.name} "
                f"model={cfg.model.name} device={self.device} world={self.world} "
                f"global_batch={cfg.data.batch_size} ({self.ctx.batch_per_rank}/rank) "
                f"steps/epoch={spe} total_steps={total} amp={t.amp}"
            )
            old_handlers = self._install_signals()
            t_start = time.time() - self.elapsed
            try:
                while not self.finished:
                    self._run_epoch(spe, total, t_start)
            finally:
                for s, h in old_handlers.items():
                    signal.signal(s, h)
                if self._writer is not None:
                    self._writer.close()
            summary = self._summary()
            if self.rank == 0:
                RunWriter(cfg.run_dir).summary(summary)
                if t.plot:
                    plot_history(self.history, cfg.run_dir / "curves.png", title=cfg.name)
            return summary
        finally:
            if lock is not None:
                lock.release()

    def _start(self, resume: bool, new_epoch: bool) -> None:
        """With the folder locked: continue ``last.pt``, or start afresh where no run's results
        would be lost; write the config."""
        cfg, t = self.cfg, self.cfg.train
        if self.rank == 0:
            for p in ckpt.remove_stale_temporaries(cfg.run_dir):
                self.log(f"removed {p}, left by an interrupted write")
        if resume:
            self._resume(cfg.run_dir / "last.pt", new_epoch=new_epoch)
        else:
            found = rundir.previous_run(cfg.run_dir)
            if D.any_rank(bool(found) and not t.overwrite):  # every rank stops together
                state = "a finished run" if "final.pt" in found else "a run"
                raise FileExistsError(
                    f"'{cfg.run_dir}' already holds {state} ({', '.join(found) or 'on rank 0'}); "
                    f"pass --resume to continue it, choose another name=... or --out, or set "
                    f"train.overwrite=true to replace it"
                )
            if found and self.rank == 0:
                rundir.clear_previous_run(cfg.run_dir)
                self.log(f"train.overwrite: removed the previous run's {', '.join(found)}")
        if self.rank == 0:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, cfg.run_dir / "config.yaml")
            self._writer = RunWriter(cfg.run_dir, tensorboard=t.tensorboard)

    @property
    def finished(self) -> bool:
        t = self.cfg.train
        return self.global_step >= t.iterations if t.iterations > 0 else self.epoch > t.epochs

    def close(self) -> None:
        """Drop the DDP wrapper (and with it the reducer's hold on the process group).

        :func:`dkl.api.train` calls this before it destroys the group it started.
        """
        self.model = self.task.model = self.raw_model

    def evaluate(self) -> dict:
        """The task's evaluated model on the test split, plus the task's own evaluation: on every
        rank with rank 0's buffers, so the ranks score the model rank 0 saves."""
        model = self.task.eval_model()
        with torch.no_grad():  # the trained model's too: DDP would copy them at the next step
            for m in {id(m): m for m in (model, self.raw_model)}.values():
                D.broadcast_buffers(m)
        out = self.ctx.evaluate(model)
        out.update(self.task.evaluate(self.ctx.test_loader()) or {})
        return out

    # the loop ------------------------------------------------------------------------------
    def _run_epoch(self, spe: int, total: int, t_start: float) -> None:
        t = self.cfg.train
        iterations = t.iterations > 0
        self.model.train()
        desc = f"epoch {self.epoch}" + ("" if iterations else f"/{t.epochs}")
        bar = progress_bar(t.progress and self.rank == 0, spe, self.step_in_epoch, desc)
        batches = iter(self.task.train_batches(self.epoch, self.step_in_epoch))
        try:
            while self.step_in_epoch < spe:
                t0 = time.time()
                batch = next(batches, None)
                if batch is None:
                    break
                self._step(D.to_device(batch, self.device), spe, total)
                self.train_time += time.time() - t0
                if bar is not None:
                    bar.update(1)
                    if self.step_in_epoch % max(t.log_every, 1) == 0 or self.step_in_epoch == spe:
                        bar.set_postfix(self._bar_stats(t_start, total), refresh=False)
                if self.step_in_epoch >= spe:  # the epoch's end: evaluated below
                    break
                # an evaluation that is due runs before a signal is honoured: the saved state
                # is past it, and a resume would not do it again
                if iterations and (self.global_step % t.eval_every == 0 or self.finished):
                    self._eval_point(t_start)
                    if self.finished:
                        return
                self._honour_signal(t_start)
        finally:
            if bar is not None:
                bar.close()
        ctx = StepContext(self.epoch, self.step_in_epoch, self.global_step, spe, total)
        extra = self.task.end_epoch(ctx) or {}
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if not iterations or self.global_step % t.eval_every == 0 or self.finished:
            self._eval_point(t_start, extra, epoch=self.epoch - 1)
        if not self.finished:  # a finished run ends as usual (final.pt), signal or not
            self._honour_signal(t_start)

    def _honour_signal(self, t_start: float) -> None:
        """Save the training state and stop, if any rank got SIGINT / SIGTERM (a collective)."""
        # the signal any rank got (torchrun passes one on to every rank; a scheduler may not)
        signum = int(D.max_over_ranks(float(self._stop_signal or 0)))
        if signum:
            self.elapsed = time.time() - t_start
            path = self._save_training_state()
            raise Interrupted(signal.Signals(signum), path)

    def _step(self, batch: Any, spe: int, total: int) -> None:
        ctx = StepContext(self.epoch, self.step_in_epoch, self.global_step, spe, total)
        with self.ctx.autocast():
            out = self.task.train_step(batch, ctx)
        loss = out["loss"]
        loss_value = float(loss.detach())
        self._check_loss(loss_value)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.train.grad_clip)
        self.task.before_optimizer_step()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.task.after_step(ctx)
        self.running.add(loss_value, out)
        labels = out.get("labels")
        self.samples_seen += (labels.numel() if labels is not None else 0) * self.world
        self.step_in_epoch += 1
        self.global_step += 1

    # divergence and learning checks -------------------------------------------------------
    def _check_loss(self, value: float) -> None:
        """Stop on a non-finite loss, or one far above the median of the recent steps."""
        factor = self.cfg.train.divergence_factor
        recent = self._recent_losses
        bad = None
        if not math.isfinite(value):
            bad = f"the training loss is {value}"
        elif factor > 0 and len(recent) >= 5:
            median = statistics.median(recent)
            if median > 0 and value > factor * median:
                bad = (
                    f"the training loss exploded to {value:.4g}, {value / median:.3g}x the median "
                    f"{median:.4g} of the last {len(recent)} steps"
                )
        if D.any_rank(bad is not None):
            self._diverged(bad or "another rank's training loss diverged")
        recent.append(value)
        if self.global_step == len(self._first_losses) and len(self._first_losses) < 10:
            self._first_losses.append(value)

    def _nonfinite_state(self) -> str | None:
        """The first parameter or buffer of the trained (or evaluated) model that is NaN or inf."""
        models = {"model": self.raw_model}
        evaluated = self.task.eval_model()
        if evaluated is not self.raw_model:  # an EMA copy, say; else it was just checked
            models["evaluated model"] = evaluated
        for label, model in models.items():
            for kind, named in (
                ("parameter", model.named_parameters),
                ("buffer", model.named_buffers),
            ):
                for name, t in named():
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        return f"{label} {kind} '{name}' holds NaN or inf"
        return None

    def _diverged(self, what: str) -> None:
        cfg = self.cfg
        hint = f"lower optim.lr (now {cfg.optim.lr:g})"
        beta = getattr(cfg.section, "beta", None)
        if getattr(cfg.section, "method", "") in _RAW_LOGIT_METHODS and beta:
            hint += (
                f" or the loss weights: IKL's wMSE acts on raw logits, so a smaller "
                f"{cfg.recipe}.beta (now {beta:g}) often fixes it"
            )
        if cfg.train.amp == "fp16":
            hint += "; or use train.amp=bf16"
        last = cfg.run_dir / "last.pt"
        kept = (
            f"; last finite checkpoint: {last}" if self.rank == 0 and last.is_file() else
            "; no checkpoint was written"
        )  # fmt: skip
        raise DivergenceError(
            f"run '{cfg.name}' diverged at epoch {self.epoch}, step {self.step_in_epoch} (global "
            f"step {self.global_step}): {what}; stopped before saving it. Try: {hint}{kept}"
        )

    def _learning_check(self, record: dict) -> None:
        """Warn once, at the first evaluation, when the first epoch's loss did not go down."""
        first, recent = self._first_losses, list(self._recent_losses)
        n = min(len(first), len(recent) // 2, 10)
        if len(self.history) != 1 or n < 2:
            return
        start, end = statistics.fmean(first[:n]), statistics.fmean(recent[-n:])
        acc = record.get("train_acc")
        chance = 100.0 / self.ctx.info.num_classes
        if end < 0.97 * start or (acc is not None and acc > 1.5 * chance):
            return
        cfg = self.cfg
        causes = [
            f"optim.lr (now {cfg.optim.lr:g}) too high or too low",
            "inputs on the wrong scale (data.mean / data.std, model.normalize)",
        ]
        if getattr(cfg.section, "method", "") in _RAW_LOGIT_METHODS:
            causes.append(f"a too-large {cfg.recipe}.beta (IKL's wMSE acts on raw logits)")
        accuracy = f", train top-1 {acc:.1f}% (chance {chance:.1f}%)" if acc is not None else ""
        self.log(
            f"warning: the training loss has not gone down in the first {len(self.history)} "
            f"evaluation period ({start:.4g} at the start, {end:.4g} now{accuracy}). Likely "
            f"causes: {'; '.join(causes)}. The run continues."
        )

    def _bar_stats(self, t_start: float, total: int) -> dict:
        post = {"loss": f"{self.running.mean_loss():.4f}"}
        acc = self.running.accuracy()
        if acc is not None:
            post["acc"] = f"{acc:.2f}"
        rate = (time.time() - t_start) / max(self.global_step, 1)
        post["eta"] = format_time(rate * (total - self.global_step))
        return post

    def _eval_point(
        self, t_start: float, extra: dict | None = None, epoch: int | None = None
    ) -> None:
        t = self.cfg.train
        record: dict[str, Any] = {
            "epoch": epoch if epoch is not None else self.epoch,
            "step": self.global_step,
            "lr": self.last_lr,
        }
        record.update(self.running.reduce())
        record.update(self.evaluate())
        record.update({k: float(v) if torch.is_tensor(v) else v for k, v in (extra or {}).items()})
        record["time"] = round(time.time() - t_start, 3)
        bad = None
        if not math.isfinite(float(record.get("test_loss", 0.0))):
            bad = f"the test loss is {record['test_loss']}"
        bad = bad or self._nonfinite_state()
        if D.any_rank(bad is not None):
            self._diverged(bad or "another rank's model diverged")
        self.running.reset()
        self.history.append(record)
        self._learning_check(record)
        improved = not self.best or record["top1"] > self.best["top1"]
        if improved:
            self.best = {k: record[k] for k in ("top1", "top5", "epoch", "step")}
        self.elapsed = time.time() - t_start
        self.log(format_record(record))
        # the same decision on every rank: the gather below is a collective
        save_last = (t.save_every > 0 and len(self.history) % t.save_every == 0) or self.finished
        ranks = self._rank_states() if save_last else None
        if self.rank != 0:
            return
        assert self._writer is not None
        self._writer.history(self.history)
        self._writer.scalars(record)
        if improved and t.keep_best:
            ckpt.save_checkpoint(self._export(), self.cfg.run_dir / "best.pt")
        # final.pt before the finished last.pt: a kill between the two leaves a last.pt that a
        # resume continues (and so writes final.pt), never a finished one without final.pt
        if self.finished:
            ckpt.save_checkpoint(self._export(), self.cfg.run_dir / "final.pt")
        if save_last:
            ckpt.save_checkpoint(self.state_dict(ranks), self.cfg.run_dir / "last.pt")

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
        s.update(self.task.summary(self.history))
        if self.world > 1:  # how far the replicas drifted apart (0 when DDP works)
            groups = {"params": list(self.raw_model.parameters())}
            buffers = [b for b in self.raw_model.buffers() if b.is_floating_point()]
            if buffers:
                groups["buffers"] = buffers
            for k, v in self.task.state_dict().items():
                ts = [x for x in v.values() if torch.is_tensor(x)] if isinstance(v, dict) else []
                if ts:
                    groups[k] = ts
            s["rank_sync"] = {
                f"{k}_max_abs_diff": D.max_abs_diff_across_ranks(ts) for k, ts in groups.items()
            }
        return s

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
