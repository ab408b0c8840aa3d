r"""Knowledge distillation: ``ce``, ``kd`` (Hinton), ``dkd`` (Zhao et al. 2022), ``ikl``, ``gkl``.

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
  (the closed form of :func:`dkl.ikl_loss`; no :math:`T^2`), :math:`w = \sigma(z_t / T_2)` per
  sample, or with ``gi: true`` the row :math:`P[y]` of a :class:`dkl.ClassPrior` fed with the
  teacher's logits of each training batch (at ``prior_temperature``, default :math:`T_2` as in
  the authors' code) and stepped at every epoch end.
- ``gkl``: as ``ikl`` with :func:`dkl.gkl_loss` (the authors' successor, DKLv2): the weights
  (``gi``: the prior rows; else :math:`\sigma(z_t / T_2)`) raised to ``gamma`` and the wMSE
  normalised by the batch's total pair weight.

A teacher comes from a checkpoint file: a dkl run's ``best.pt`` (trained with ``method: ce``),
one of mdistiller's released CIFAR-100 teachers (``{"model": state_dict}``), or a torchvision
weight file; ``teacher.name`` may be left empty for a dkl checkpoint (its config names the model).

With ``label_fraction`` < 1 the student sees the labels of a class-balanced share of the training
images only (Hinton et al. 2015, section 2: a transfer set whose correct labels are known for
some of it). Each step then takes two batches of ``data.batch_size``: one from every training
image for the teacher's term, one from the labeled share (an endless seeded stream, as in
semi-supervised learning) for the CE term; ``ce`` takes the labeled batch only. The teacher's
term reads no label: where a method needs one (dkd's target class, the GI prior's row) the
teacher's top class stands in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dkl.config import ConfigError, DistillConfig, ModelConfig, TeacherConfig, preset_for_run
from dkl.data import InfiniteBatchSampler, mix_seed, raw_images, split_labeled
from dkl.losses import GKLLoss, IKLLoss, KLLoss, kl_loss
from dkl.prior import ClassPrior
from dkl.recipes import register_recipe
from dkl.train import StepContext, Task, load_checkpoint
from dkl.train.checkpoint import class_record, data_changes, saved_normalization

__all__ = [
    "METHODS",
    "DistillConfig",
    "DistillLoss",
    "DistillTask",
    "TeacherConfig",
    "dkd_loss",
    "kd_loss",
]

METHODS = ("ce", "kd", "dkd", "ikl", "gkl")


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    r"""Hinton's KD term :math:`T^2\,\mathrm{KL}(\sigma(z_t/T)\,\|\,\sigma(z_s/T))`, batch mean.

    >>> kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 4.0)
    tensor(0.)
    """
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


class DistillLoss(nn.Module):
    """The student's loss for one distillation method, built once from a :class:`DistillConfig`.

    ``forward(student, teacher, labels, *, epoch, class_weights=None)`` returns ``{"loss", "ce"}``
    and, when a teacher is used, ``"kd"`` (the distillation term after warm-up); the parts are
    detached. ``epoch`` (from 1) drives the warm-up :math:`\\min(e / \\text{warmup}, 1)` of dkd
    and ikl; ``class_weights`` are the GI prior's rows for ikl. ``labeled``, the ``(logits, labels)``
    of a separate batch of labeled images, moves the CE term onto it; ``labels`` then only serve
    the teacher's term (dkd's target class).

    >>> crit = DistillLoss(DistillConfig(method="kd"))
    >>> z = torch.zeros(2, 3)
    >>> out = crit(z, z, torch.tensor([0, 1]), epoch=1)
    >>> sorted(out), round(out["loss"].item(), 4)
    (['ce', 'kd', 'loss'], 1.0986)
    """

    def __init__(self, cfg: DistillConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.kl = KLLoss(temperature=cfg.temperature)
        self.ikl = IKLLoss(
            alpha=cfg.alpha,
            beta=cfg.beta,
            temperature=cfg.temperature,
            weight_temperature=cfg.weight_temperature,
        )
        self.gkl = GKLLoss(
            alpha=cfg.alpha,
            beta=cfg.beta,
            gamma=cfg.gamma,
            temperature=cfg.temperature,
            weight_temperature=cfg.weight_temperature,
        )

    def forward(
        self,
        student: Tensor,
        teacher: Tensor | None,
        labels: Tensor,
        *,
        epoch: int,
        class_weights: Tensor | None = None,
        labeled: tuple[Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        c = self.cfg
        student = student.float()
        if labeled is None:
            ce = F.cross_entropy(student, labels)
        else:
            ce = F.cross_entropy(labeled[0].float(), labeled[1])
        if c.method == "ce":
            return {"loss": ce, "ce": ce.detach()}
        if teacher is None:
            raise ValueError(f"method {c.method!r} needs teacher logits")
        teacher = teacher.float()
        ramp = 1.0 if c.warmup <= 0 else min(epoch / c.warmup, 1.0)
        if c.method == "kd":
            term = c.kd_weight * (self.kl(student, teacher) * c.temperature**2)
        elif c.method == "dkd":
            term = ramp * dkd_loss(
                student, teacher, labels, alpha=c.alpha, beta=c.beta, temperature=c.temperature
            )
        elif c.method == "ikl":
            term = ramp * self.ikl(student, teacher, class_weights)
        else:
            term = ramp * self.gkl(student, teacher, class_weights)
        return {"loss": c.ce_weight * ce + term, "ce": ce.detach(), "kd": term.detach()}


def pick_labeled(train_set, fraction: float, num_classes: int, *, seed: int) -> list[int]:
    """The sorted indices of ``max(1, round(fraction * N / num_classes))`` training images of
    every class, chosen by :func:`dkl.data.split_labeled` with ``seed``."""
    try:
        labels = raw_images(train_set)[1]
    except ValueError:
        labels = getattr(train_set, "targets", None)
        if labels is None:
            raise ConfigError(
                f"distill.label_fraction: the training set ({type(train_set).__name__}) exposes "
                f"no labels to pick a share from (expected .labels or .targets)"
            ) from None
    per_class = max(1, round(fraction * len(labels) / num_classes))
    return split_labeled(labels, per_class, seed=seed)[0]


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


def _missing_teacher(path: str) -> str:
    """What to run when the teacher's weight file is not there."""
    where = Path(path).resolve()
    msg = f"distill.teacher.checkpoint: no teacher weights at '{path}' (looked for {where})"
    preset = preset_for_run(Path(path).parent.name)
    if preset:
        msg += (
            f"; train the teacher first: `dkl train {preset}` (with --out DIR, point this at "
            f"DIR/{Path(path).parent.name}/{Path(path).name})"
        )
    else:
        msg += "; train a teacher with distill.method=ce and point this at its best.pt or final.pt"
    return msg


@register_recipe("distill", config=DistillConfig)
class DistillTask(Task):
    """Trains ``cfg.model`` as a student of ``cfg.distill.teacher`` with ``cfg.distill.method``."""

    state_members = ("prior",)

    def __init__(self, cfg, ctx) -> None:
        super().__init__(cfg, ctx)
        d: DistillConfig = cfg.distill
        self.dcfg = d
        self.criterion = DistillLoss(d)
        self.teacher: nn.Module | None = None
        self.prior: ClassPrior | None = None
        self.teacher_metrics: dict = {}
        if d.method != "ce" and not ctx.eval_only:
            self.teacher = self._load_teacher(d.teacher)
            self.teacher_metrics = ctx.evaluate(self.teacher)
            ctx.log(
                f"teacher {d.teacher.name or '(from checkpoint)'}: "
                f"top1={self.teacher_metrics['top1']:.2f} top5={self.teacher_metrics['top5']:.2f}"
            )
        self.labeled_idx: list[int] | None = None
        if d.label_fraction < 1 and not ctx.eval_only:
            self.labeled_idx = pick_labeled(
                self.train_set, d.label_fraction, ctx.info.num_classes, seed=cfg.seed
            )
            n = len(self.train_set)  # type: ignore[arg-type]
            ctx.log(
                f"label_fraction={d.label_fraction:g}: the CE term sees the labels of "
                f"{len(self.labeled_idx)} of {n} training images"
                + ("" if self.teacher is None else f"; the teacher sees all {n}")
            )
        if d.method in ("ikl", "gkl") and d.gi:
            self.prior = ClassPrior(
                ctx.info.num_classes,
                temperature=d.prior_temperature or d.weight_temperature,
                momentum=d.prior_momentum,
            ).to(ctx.device)

    def _load_teacher(self, t: TeacherConfig) -> nn.Module:
        if not t.checkpoint:
            raise ConfigError(
                f"distill.teacher.checkpoint: method '{self.dcfg.method}' needs a teacher; train "
                f"one with method=ce (e.g. `dkl train kd/digits_teacher`) and point this at its "
                f"best.pt, or at a released teacher file"
            )
        if not Path(t.checkpoint).is_file():
            raise FileNotFoundError(_missing_teacher(t.checkpoint))
        name, kwargs, normalize = t.name, dict(t.kwargs), t.normalize
        # plain safetensors weights carry no dkl record (no config, classes or normalisation)
        plain = Path(t.checkpoint).suffix == ".safetensors"
        state = {} if plain else load_checkpoint(t.checkpoint)
        self._check_teacher_classes(state, t.checkpoint)
        if not name:
            mc = (state.get("config") or {}).get("model") if isinstance(state, dict) else None
            if not mc:
                raise ConfigError(
                    f"distill.teacher.name: '{t.checkpoint}' carries no config; name the model"
                )
            # the model as that run built it: its name, kwargs and input normalisation
            name, kwargs = mc["name"], mc.get("kwargs") or {}
            normalize = bool(mc.get("normalize", t.normalize))
        mcfg = ModelConfig(name=name, kwargs=kwargs, normalize=normalize, checkpoint=t.checkpoint)
        # a dkl teacher normalises its inputs as it was trained to, not with this data's numbers
        try:
            teacher = self.ctx.build_model(mcfg, stats=saved_normalization(state))
        except ValueError as e:  # the loader's hint (replace_classifier) is for a student
            found = str(e).split(" | only the classifier")[0]
            raise ConfigError(
                f"distill.teacher.checkpoint: {found} | a teacher loads whole and must predict "
                f"this data's {self.ctx.info.num_classes} classes"
            ) from None
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def _check_teacher_classes(self, state: Any, path: str) -> None:
        """A dkl teacher trained on other classes (names, not only their number) would be read
        in this data's class order: refused."""
        saved = state.get("data") if isinstance(state, dict) else None
        if not isinstance(saved, dict):
            return
        diffs = data_changes(saved, class_record(self.ctx.info))
        if diffs:
            raise ConfigError(
                f"distill.teacher.checkpoint: '{path}' was trained on other classes than this "
                f"data's ({diffs[0]}): a teacher must predict the student's classes, in the same "
                f"order. Distil from a teacher trained on this data's classes"
            )

    def train_batches(self, epoch: int, start: int):
        if self.labeled_idx is None:
            return super().train_batches(epoch, start)
        # the labeled stream goes on across epochs: its position is the number of steps done
        spe = self.steps_run_per_epoch()
        idx = self.labeled_idx
        keys = InfiniteBatchSampler(
            len(idx),
            self.ctx.batch_per_rank,
            seed=mix_seed(self.cfg.seed, 1),
            rank=self.ctx.rank,
            world=self.ctx.world,
            start=(epoch - 1) * spe + start,
        )
        labeled = self.ctx.make_loader(self.train_set, ([idx[p] for p, _ in b] for b in keys))
        if self.teacher is None:  # ce: the labeled images are all it learns from
            if hasattr(self.train_set, "set_epoch"):
                self.train_set.set_epoch(epoch)
            return labeled
        return ((*full, *lab) for full, lab in zip(super().train_batches(epoch, start), labeled))

    def train_step(self, batch, ctx: StepContext) -> dict:
        x, y, *lab = batch  # with label_fraction < 1: (x, y, x_labeled, y_labeled)
        if lab and self.teacher is not None:
            logits, z_lab = self.model(torch.cat([x, lab[0]])).split([len(x), len(lab[0])])
        else:
            logits, z_lab = self.model(x), None
        z_t = weights = None
        targets = y
        if self.teacher is not None:
            with torch.no_grad():
                z_t = self.teacher(x)
            if lab:  # the teacher's batch carries no label the student may use
                targets = z_t.argmax(1)
            if self.prior is not None:
                weights = self.prior.weights(targets)
                self.prior.update(z_t.float(), targets)
        out = self.criterion(
            logits,
            z_t,
            targets,
            epoch=ctx.epoch,
            class_weights=weights,
            labeled=None if z_lab is None else (z_lab, lab[1]),
        )
        out.update(logits=logits, labels=y)  # training accuracy on the teacher's batch
        return out

    def end_epoch(self, ctx: StepContext) -> dict:
        if self.prior is not None:
            self.prior.step()
        return {}

    def summary(self, history: list[dict]) -> dict:
        s: dict = {"method": self.dcfg.method}
        if self.labeled_idx is not None:
            s["labeled_images"] = len(self.labeled_idx)
        if self.teacher is not None:
            s["teacher_top1"] = self.teacher_metrics["top1"]
            s["teacher_params"] = sum(p.numel() for p in self.teacher.parameters())
        return s
