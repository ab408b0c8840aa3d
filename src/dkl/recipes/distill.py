r"""Knowledge distillation: ``ce``, ``kd`` (Hinton), ``dkd`` (Zhao et al. 2022) and ``ikl``.

With student logits :math:`z_s`, teacher logits :math:`z_t` (teacher in eval mode, no grad),
labels :math:`y`, temperature :math:`T` and the warm-up factor
:math:`\omega_e = \min(e / \text{warmup}, 1)` (epochs :math:`e` counted from 1):

- ``ce``:  :math:`\mathrm{CE}(z_s, y)` (the student alone; also how a teacher is trained)
- ``kd``:  :math:`w_{ce}\,\mathrm{CE} + w_{kd}\,T^2\,\mathrm{KL}(\sigma(z_t/T)\,\|\,\sigma(z_s/T))`
  (the :math:`T^2` keeps gradient magnitudes comparable across temperatures, as Hinton et al.)
- ``dkd``: :math:`w_{ce}\,\mathrm{CE} + \omega_e\,T^2\,(\alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD})`,
  TCKD = KL between the binary (target, rest) distributions, NCKD = KL between the softmaxes over
  the non-target classes only (both at temperature :math:`T`).
- ``ikl``: :math:`w_{ce}\,\mathrm{CE} + \omega_e\,\mathrm{IKL}(z_s, z_t; \alpha, \beta, T, w)`
  (SPEC §3; no :math:`T^2`), :math:`w = \sigma(z_t / T_2)` per sample, or with ``gi: true`` the
  row :math:`P[y]` of a :class:`dkl.ClassPrior` fed with the teacher's logits of each training
  batch (at ``prior_temperature``, default :math:`T`) and stepped at every epoch end.

A teacher comes from a checkpoint file: a dkl run's ``best.pt`` (trained with ``method: ce``),
one of mdistiller's released CIFAR-100 teachers (``{"model": state_dict}``), or a torchvision
weight file; ``teacher.name`` may be left empty for a dkl checkpoint (its config names the model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dkl.config import ConfigError, ModelConfig, register_section
from dkl.engine import Recipe, StepContext, load_checkpoint
from dkl.recipes import register_recipe

__all__ = ["DistillConfig", "DistillRecipe", "TeacherConfig", "distill_loss", "dkd_loss", "kd_loss"]

METHODS = ("ce", "kd", "dkd", "ikl")


@dataclass
class TeacherConfig:
    name: str = ""  # model name; empty: read from the checkpoint's config (dkl checkpoints)
    kwargs: dict = field(default_factory=dict)
    checkpoint: str = ""
    normalize: bool = True  # same Normalize(mean, std) wrapper as the student


@dataclass
class DistillConfig:
    method: Literal["ce", "kd", "dkd", "ikl"] = "ce"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    temperature: float = 4.0
    ce_weight: float = 1.0
    kd_weight: float = 0.9  # kd only
    alpha: float = 1.0  # dkd: TCKD weight; ikl: sCE weight
    beta: float = 8.0  # dkd: NCKD weight; ikl: wMSE weight
    warmup: float = 20.0  # dkd, ikl: epochs of linear loss warm-up (0: none)
    weight_temperature: float = 100.0  # ikl: T2 of w = softmax(z_t / T2)
    gi: bool = False  # ikl: class-wise prior weights instead of per-sample ones
    prior_temperature: float = 0.0  # ikl + gi: 0 means `temperature`
    prior_momentum: float = 1.0

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.weight_temperature <= 0:
            raise ValueError(f"weight_temperature must be > 0, got {self.weight_temperature}")


register_section("distill", DistillConfig)


# --------------------------------------------------------------------------------------------
# Losses (functional; the IKL and KL parts come from dkl.losses)
# --------------------------------------------------------------------------------------------


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    r"""Hinton's KD term :math:`T^2\,\mathrm{KL}(\sigma(z_t/T)\,\|\,\sigma(z_s/T))`, batch mean.

    >>> kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 4.0)
    tensor(0.)
    """
    from dkl import kl_loss

    return kl_loss(student, teacher, temperature=temperature) * temperature**2


def dkd_loss(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    *,
    alpha: float,
    beta: float,
    temperature: float,
) -> Tensor:
    r"""Decoupled KD (Zhao et al. 2022): :math:`T^2(\alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD})`.

    Computed in log space from log-sum-exps and by gathering the :math:`C - 1` non-target
    columns, so no masking constant is needed and large logits stay finite. Batch mean.

    >>> z = torch.tensor([[2.0, 0.0, 0.0]])
    >>> dkd_loss(z, z, torch.tensor([0]), alpha=1.0, beta=8.0, temperature=4.0)
    tensor(0.)
    """
    from dkl import kl_loss

    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"Expected student and teacher logits of the same shape (B, C), got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    b, c = student.shape
    if c < 2:
        raise ValueError(f"DKD needs C >= 2 classes, got {c}")
    s, t = student.float() / temperature, teacher.float() / temperature
    gt = F.one_hot(labels, c).bool()
    others = torch.arange(c, device=s.device).expand(b, c)[~gt].view(b, c - 1)
    s_nt, t_nt = s.gather(1, others), t.gather(1, others)
    s_gt, t_gt = s.gather(1, labels[:, None]).squeeze(1), t.gather(1, labels[:, None]).squeeze(1)
    lse_s, lse_t = s.logsumexp(1), t.logsumexp(1)
    log_bs = torch.stack([s_gt - lse_s, s_nt.logsumexp(1) - lse_s], 1)
    log_bt = torch.stack([t_gt - lse_t, t_nt.logsumexp(1) - lse_t], 1)
    tckd = (log_bt.exp() * (log_bt - log_bs)).sum(1).mean()
    nckd = kl_loss(s_nt, t_nt, temperature=1.0)
    return temperature**2 * (alpha * tckd + beta * nckd)


def distill_loss(
    cfg: DistillConfig,
    student: Tensor,
    teacher: Tensor | None,
    labels: Tensor,
    *,
    epoch: int,
    class_weights: Tensor | None = None,
) -> dict[str, Tensor]:
    """The loss of ``cfg.method`` for one batch: ``{"loss", "ce", "kd"}`` (all scalars)."""
    from dkl import ikl_loss

    student = student.float()
    ce = F.cross_entropy(student, labels)
    if cfg.method == "ce":
        return {"loss": ce, "ce": ce.detach()}
    if teacher is None:
        raise ValueError(f"method {cfg.method!r} needs teacher logits")
    teacher = teacher.float()
    ramp = 1.0 if cfg.warmup <= 0 else min(epoch / cfg.warmup, 1.0)
    if cfg.method == "kd":
        term = cfg.kd_weight * kd_loss(student, teacher, cfg.temperature)
    elif cfg.method == "dkd":
        term = ramp * dkd_loss(
            student, teacher, labels, alpha=cfg.alpha, beta=cfg.beta, temperature=cfg.temperature
        )
    elif cfg.method == "ikl":
        term = ramp * ikl_loss(
            student,
            teacher,
            alpha=cfg.alpha,
            beta=cfg.beta,
            temperature=cfg.temperature,
            weight_temperature=cfg.weight_temperature,
            class_weights=class_weights,
        )
    else:
        raise ValueError(f"unknown distillation method {cfg.method!r}; expected one of {METHODS}")
    return {"loss": cfg.ce_weight * ce + term, "ce": ce.detach(), "kd": term.detach()}


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


@register_recipe("distill")
class DistillRecipe(Recipe):
    """Trains ``cfg.model`` as a student of ``cfg.distill.teacher`` with ``cfg.distill.method``."""

    def __init__(self, cfg, engine) -> None:
        super().__init__(cfg, engine)
        self.dcfg: DistillConfig = cfg.distill
        self.teacher: nn.Module | None = None
        self.prior = None
        self.teacher_metrics: dict = {}
        d = self.dcfg
        if d.method != "ce" and not engine.eval_only:
            self.teacher = self._load_teacher(d.teacher)
            self.teacher_metrics = engine.evaluate(self.teacher)
            engine.log(
                f"teacher {d.teacher.name or '(from checkpoint)'}: top1={self.teacher_metrics['top1']:.2f} "
                f"top5={self.teacher_metrics['top5']:.2f}"
            )
        if d.method == "ikl" and d.gi:
            from dkl import ClassPrior

            self.prior = ClassPrior(
                engine.info.num_classes,
                temperature=d.prior_temperature or d.temperature,
                momentum=d.prior_momentum,
            ).to(engine.device)

    def _load_teacher(self, t: TeacherConfig) -> nn.Module:
        if not t.checkpoint:
            raise ConfigError(
                f"distill.teacher.checkpoint: method '{self.dcfg.method}' needs a teacher; train "
                f"one with method=ce (e.g. `dkl train kd/digits_teacher`) and point this at its "
                f"best.pt, or at a released teacher file"
            )
        name, kwargs = t.name, dict(t.kwargs)
        if not name:
            state = load_checkpoint(t.checkpoint)
            mc = (state.get("config") or {}).get("model") if isinstance(state, dict) else None
            if not mc:
                raise ConfigError(
                    f"distill.teacher.name: '{t.checkpoint}' carries no config; name the model"
                )
            name, kwargs = mc["name"], mc.get("kwargs") or {}
        mcfg = ModelConfig(name=name, kwargs=kwargs, normalize=t.normalize, checkpoint=t.checkpoint)
        teacher = self.engine.build_model(mcfg)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def train_step(self, batch, ctx: StepContext) -> dict:
        x, y = batch
        logits = self.model(x)
        z_t = None
        weights = None
        if self.teacher is not None:
            with torch.no_grad():
                z_t = self.teacher(x)
            if self.prior is not None:
                weights = self.prior.weights(y)
                self.prior.update(z_t.float(), y)
        out = distill_loss(self.dcfg, logits, z_t, y, epoch=ctx.epoch, class_weights=weights)
        out.update(logits=logits, labels=y)
        return out

    def end_epoch(self, ctx: StepContext) -> dict:
        if self.prior is not None:
            self.prior.step()
        return {}

    def state_dict(self) -> dict:
        return {"prior": self.prior.state_dict()} if self.prior is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.prior is not None and "prior" in state:
            self.prior.load_state_dict(state["prior"])

    def rank_state(self) -> dict:
        return {"prior": self.prior.running_state()} if self.prior is not None else {}

    def load_rank_state(self, state: dict) -> None:
        if self.prior is not None and "prior" in state:
            self.prior.load_running_state(state["prior"])

    def summary(self) -> dict:
        s: dict = {"method": self.dcfg.method}
        if self.teacher_metrics:
            s["teacher_top1"] = self.teacher_metrics["top1"]
            s["teacher_params"] = sum(p.numel() for p in self.teacher.parameters())
        return s


# --------------------------------------------------------------------------------------------
# The digits demo: `dkl demo`
# --------------------------------------------------------------------------------------------

DEMO_METHODS = ("ce", "kd", "dkd", "ikl")


def run_demo(args) -> int:
    """Teacher once, then ce / kd / dkd / ikl students over ``args.seeds`` seeds, on digits.

    Writes ``<out>/summary.json``, ``<out>/results.md`` and ``<out>/accuracy.png``; each run's
    own folder (config, metrics, checkpoints, curves) sits under ``<out>/``.
    """
    import json
    import statistics
    import time
    from pathlib import Path

    from dkl.config import load_config
    from dkl.engine import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [
        f"train.out_dir={out}",
        "train.overwrite=true",
        "train.progress=false",
        "train.plot=false",
    ]
    if getattr(args, "epochs", 0):
        common.append(f"train.epochs={args.epochs}")
    quiet = lambda msg: None
    t0 = time.time()
    print(
        f"dkl demo: knowledge distillation on digits (1,347 train / 450 test images), "
        f"{args.seeds} seed(s) per method -> {out}/",
        flush=True,
    )
    tcfg = load_config("kd/digits_teacher", common)
    teacher = train(tcfg, log=quiet)
    teacher_ckpt = out / tcfg.name / "best.pt"
    print(
        f"  teacher  {tcfg.model.name}{tcfg.model.kwargs}  {teacher['params']:,} params  "
        f"top-1 {teacher['last']['top1']:.2f}  ({teacher['wall_time_s']:.1f}s)",
        flush=True,
    )

    results: dict = {}
    for method in DEMO_METHODS:
        runs = []
        for seed in range(args.seeds):
            cfg = load_config(
                f"kd/digits_{method}",
                [
                    *common,
                    f"name=digits_{method}_s{seed}",
                    f"seed={seed}",
                    f"distill.teacher.checkpoint={teacher_ckpt}",
                ],
            )
            s = train(cfg, log=quiet)
            hist = [json.loads(line) for line in (out / cfg.name / "metrics.jsonl").open()]
            runs.append(
                {
                    "seed": seed,
                    "top1": s["last"]["top1"],
                    "best_top1": s["best"]["top1"],
                    "time_s": s["wall_time_s"],
                    "curve": [h["top1"] for h in hist],
                    "params": s["params"],
                }
            )
            print(
                f"  {method:<4} seed {seed}  top-1 {s['last']['top1']:.2f}  "
                f"({s['wall_time_s']:.1f}s)",
                flush=True,
            )
        top1 = [r["top1"] for r in runs]
        results[method] = {
            "top1_mean": statistics.fmean(top1),
            "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
            "time_s_mean": statistics.fmean(r["time_s"] for r in runs),
            "params": runs[0]["params"],
            "runs": runs,
            "config": f"kd/digits_{method}",
        }

    student = load_config("kd/digits_ce").model
    lines = [
        (
            f"Digits, teacher `{tcfg.model.name}` {dict(tcfg.model.kwargs)} "
            f"({teacher['params']:,} params, top-1 {teacher['last']['top1']:.2f}) -> student "
            f"`{student.name}` {dict(student.kwargs)} ({results['ce']['params']:,} params), "
            f"{tcfg.train.epochs} epochs, {args.seeds} seeds (last-epoch top-1 on the 450 test "
            f"images)."
        ),
        "",
        "| method | top-1 (mean ± std) | time / run |",
        "|---|---|---|",
    ]
    for m, r in results.items():
        lines.append(
            f"| {m} | {r['top1_mean']:.2f} ± {r['top1_std']:.2f} | {r['time_s_mean']:.1f} s |"
        )
    table = "\n".join(lines)
    total = time.time() - t0
    summary = {
        "teacher": {
            "model": tcfg.model.name,
            "kwargs": tcfg.model.kwargs,
            "params": teacher["params"],
            "top1": teacher["last"]["top1"],
        },
        "student": {"model": student.name, "kwargs": student.kwargs},
        "epochs": tcfg.train.epochs,
        "seeds": args.seeds,
        "methods": results,
        "total_time_s": round(total, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
    _plot_demo(results, out / "accuracy.png", teacher["last"]["top1"])
    print()
    print(table)
    print(f"\ntotal {total:.0f}s; wrote {out}/summary.json, results.md, accuracy.png")
    return 0


def _plot_demo(results: dict, path, teacher_top1: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m, r in results.items():
        curves = np.array([run["curve"] for run in r["runs"]], dtype=float)
        x = np.arange(1, curves.shape[1] + 1)
        mean, std = curves.mean(0), curves.std(0)
        ax.plot(x, mean, label=f"{m} ({r['top1_mean']:.2f})")
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.axhline(teacher_top1, color="k", ls="--", lw=1, label=f"teacher ({teacher_top1:.2f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("digits: student test accuracy per epoch (mean ± std over seeds)")
    lo = min(
        float(
            np.min(
                [
                    run["curve"][len(run["curve"]) // 3 :]
                    for r in results.values()
                    for run in r["runs"]
                ]
            )
        )
        - 1,
        95,
    )
    ax.set_ylim(lo, 100)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _register_demo() -> None:
    from dkl.cli import register_demo

    def add_arguments(p) -> None:
        p.add_argument(
            "--epochs", type=int, default=0, help="epochs per run (default: the presets' 30)"
        )

    register_demo(
        "kd", "knowledge distillation on digits: ce / kd / dkd / ikl", run_demo, add_arguments
    )


_register_demo()
