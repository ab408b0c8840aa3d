r"""Semi-supervised learning with IKL consistency: FixMatch and MeanTeacher, with and without IKL.

Every method trains ``CE(labeled) + λ_u · L_u`` where the unsupervised term is a **mean over the
whole unlabeled batch** of a per-sample consistency loss times a confidence mask:

.. math::

    L_u = \frac{1}{B_u} \sum_{i=1}^{B_u} m_i\,\ell(z^{in}_i, z^{tg}_i), \qquad
    m_i = [\max_j \sigma(z^{tg}_i)_j \ge \tau]

(masked samples still count in the denominator, as in USB's ``(loss * mask).mean()``).

========================  ===============================  =====================  ==========================
method                    target logits ``z^tg``           input logits ``z^in``  per-sample loss ``ℓ``
========================  ===============================  =====================  ==========================
``supervised``            --                               --                     (labeled CE only)
``fixmatch``              model, weak view (detached)      model, strong view     CE to the pseudo-label
``fixmatch_ikl``          model, weak view                 model, strong view     IKL(z^in, z^tg; α, β, T, T2)
``meanteacher``           EMA teacher, weak view, no grad  model, 2nd weak view   mean_j (σ(z^in) − σ(z^tg))²
``meanteacher_ikl``       EMA teacher, weak view, no grad  model, 2nd weak view   IKL(z^in, z^tg; α, β, T, T2)
========================  ===============================  =====================  ==========================

FixMatch runs labeled, weak and strong images through the model in **one** forward pass (USB's
``use_cat``). Its pseudo-label is ``argmax σ(z_w)`` (``hard_label=True``) or the soft
``σ(z_w / T_pl)``. Note on USB: with ``hard_label: False`` its FixMatch hands *probabilities* to
the pseudo-label hook with ``softmax=False``, so the configured ``T: 0.5`` never takes effect and
the soft target is ``σ(z_w)``; that is ``pl_temperature=1`` here (the CIFAR presets use it).
In FixMatch-IKL the authors' code passes the weak logits **without** detaching them, so the wMSE
part of IKL also moves the weak view (``detach_target=False``, the default); the IKL weights and
the sCE target are always detached (see :func:`dkl.ikl_loss`).
MeanTeacher's student sees a second, independently drawn **weak** view (USB's data set returns a
weak view as ``x_ulb_s`` for MeanTeacher); the teacher is an EMA of the student (momentum 0.999,
no grad), run on the weak view in train mode as USB does (``teacher_train_mode``).

The per-batch losses are pure functions of logits (:func:`fixmatch_loss`, :func:`ikl_consistency`,
:func:`meanteacher_loss`); :class:`SemiSupTask` wires them to a model.

>>> z_w = torch.tensor([[4.0, 0.0], [0.0, 0.1]])     # confident, unsure
>>> z_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
>>> loss, mask = fixmatch_loss(z_s, z_w, threshold=0.95, hard_label=True)
>>> mask.tolist(), round(loss.item(), 4)           # CE(z_s[0], 0) / 2: the mean is over both rows
([1.0, 0.0], 0.1566)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dkl.models_vit  # noqa: F401  (registers the ViT models)
from dkl._checks import check_logits
from dkl.config import ConfigError, register_section
from dkl.ema import ModelEMA
from dkl.engine import Recipe, StepContext
from dkl.losses import ikl_loss, soft_cross_entropy
from dkl.recipes import register_recipe
from dkl.semisup_data import (
    DigitsStrong,
    DigitsWeak,
    SemiSupLoader,
    ViewDataset,
    cifar_strong,
    cifar_weak,
    split_labeled,
)

__all__ = [
    "METHODS",
    "SemiSupConfig",
    "SemiSupTask",
    "build_optimizer",
    "confidence_mask",
    "fixmatch_loss",
    "ikl_consistency",
    "masked_batch_mean",
    "meanteacher_loss",
    "param_groups",
    "vit_layer_id",
]

METHODS = ("supervised", "fixmatch", "fixmatch_ikl", "meanteacher", "meanteacher_ikl")


# --------------------------------------------------------------------------------------------
# Per-batch losses on logits
# --------------------------------------------------------------------------------------------


def confidence_mask(target_logits: Tensor, threshold: float) -> Tensor:
    """``1.0`` where ``max_j softmax(target)_j >= threshold``, else ``0.0``; shape ``(B,)``, no grad.

    ``threshold <= 0`` keeps every sample.
    """
    if target_logits.ndim != 2:
        raise ValueError(f"Expected target logits (B, C), got {tuple(target_logits.shape)}")
    with torch.no_grad():
        conf = F.softmax(target_logits.detach().float(), dim=1).amax(dim=1)
        return (conf >= threshold).to(conf.dtype)


def masked_batch_mean(per_sample: Tensor, mask: Tensor) -> Tensor:
    """``mean_i(mask_i · loss_i)`` over the **whole** batch (not over the kept samples)."""
    if per_sample.shape != mask.shape or per_sample.ndim != 1:
        raise ValueError(
            f"Expected per-sample loss and mask of the same shape (B,), got "
            f"{tuple(per_sample.shape)} and {tuple(mask.shape)}"
        )
    return (per_sample * mask.to(per_sample.dtype)).mean()


def fixmatch_loss(
    input: Tensor,
    target: Tensor,
    *,
    threshold: float = 0.95,
    hard_label: bool = False,
    pl_temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    r"""FixMatch's unsupervised loss: masked CE of the strong view to the weak view's pseudo-label.

    ``hard_label``: target ``argmax σ(z_w)``; else the soft target ``σ(z_w / T_pl)``.
    Returns ``(loss, mask)``; loss = :func:`masked_batch_mean`.
    """
    check_logits(input, target)
    if pl_temperature <= 0:
        raise ValueError(f"Expected pl_temperature > 0, got {pl_temperature}")
    mask = confidence_mask(target, threshold)
    zt = target.detach().float()
    if hard_label:
        per = F.cross_entropy(input.float(), zt.argmax(dim=1), reduction="none")
    else:
        per = soft_cross_entropy(input.float(), F.softmax(zt / pl_temperature, dim=1))
    return masked_batch_mean(per, mask), mask


def ikl_consistency(
    input: Tensor,
    target: Tensor,
    *,
    threshold: float = 0.95,
    alpha: float = 1.0,
    beta: float = 0.1,
    temperature: float = 1.0,
    weight_temperature: float = 1.0,
    detach_target: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""Masked IKL consistency: ``mean_B(mask · IKL(z_in, z_tg))`` with the mask from ``z_tg``.

    IKL = β·wMSE(z_tg, z_in; w = σ(z_tg/T2)) + α·sCE_T (:func:`dkl.ikl_loss`, per sample). With
    ``detach_target=False`` the wMSE moves the target too when it carries gradient (FixMatch-IKL's
    weak view, as in the authors' code); an EMA teacher's logits carry none anyway.
    """
    check_logits(input, target)
    mask = confidence_mask(target, threshold)
    tg = target.detach() if detach_target else target
    per = ikl_loss(
        input,
        tg,
        alpha=alpha,
        beta=beta,
        temperature=temperature,
        weight_temperature=weight_temperature,
        reduction="none",
    )
    return masked_batch_mean(per, mask), mask


def meanteacher_loss(
    input: Tensor, target: Tensor, *, threshold: float = 0.95
) -> tuple[Tensor, Tensor]:
    r"""MeanTeacher's masked MSE of probabilities: ``ℓ_i = mean_j (σ(z_in)_ij − σ(z_tg)_ij)²``.

    The mean over classes is USB's ``F.mse_loss(..., reduction='none').mean(dim=1)``; the target
    probabilities are detached.
    """
    check_logits(input, target)
    mask = confidence_mask(target, threshold)
    p_in = F.softmax(input.float(), dim=1)
    p_tg = F.softmax(target.detach().float(), dim=1)
    per = (p_in - p_tg).pow(2).mean(dim=1)
    return masked_batch_mean(per, mask), mask


# --------------------------------------------------------------------------------------------
# Optimiser: AdamW with layer-wise lr decay; USB's warm-up + cosine
# --------------------------------------------------------------------------------------------

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_STEM = ("cls_token", "reg_token", "dist_token", "pos_embed", "patch_embed.", "norm_pre.")


def vit_layer_id(name: str, depth: int) -> int:
    """Layer index of a ViT parameter for layer-wise lr decay (USB's / timm's grouping).

    stem (``cls_token``, ``pos_embed``, ``patch_embed``) → 0; ``blocks.i`` → ``i + 1``; the final
    ``norm`` → ``depth`` (joins the last block); anything else (``head``, ``fc_norm``) →
    ``depth + 1``.

    >>> [vit_layer_id(n, 12) for n in ("pos_embed", "blocks.0.attn.qkv.weight", "norm.bias",
    ...                                  "head.weight")]
    [0, 1, 12, 13]
    """
    if name.startswith(_STEM) or name in _STEM:
        return 0
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)) + 1
    if name.startswith("norm."):
        return depth
    return depth + 1


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float = 1.0,
) -> list[dict]:
    """Optimiser parameter groups: no weight decay on 1-D tensors (biases, norms) and on the
    names in ``model.no_weight_decay()`` (``pos_embed``, ``cls_token``); with ``layer_decay < 1``
    the lr of layer ``l`` is ``lr · layer_decay ** (L − 1 − l)`` (:func:`vit_layer_id`, ``L`` =
    depth + 2 layers: the head gets ``lr``). Each group records its ``base_lr``.

    ``layer_decay < 1`` needs a ViT-like model (``blocks`` as a sequence); a model that has been
    wrapped (for example with input normalisation) is searched for an attribute ``blocks``.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"Expected layer_decay in (0, 1], got {layer_decay}")
    prefix, core = "", model
    if layer_decay < 1.0:
        for name, mod in model.named_modules():
            if isinstance(getattr(mod, "blocks", None), nn.Sequential | nn.ModuleList):
                prefix, core = (name + "." if name else ""), mod
                break
        else:
            raise ValueError(
                f"layer_decay={layer_decay} needs a ViT-like model with `blocks`; "
                f"{type(model).__name__} has none (use layer_decay=1)"
            )
    skip = {prefix + n for n in _no_weight_decay_names(core)}
    depth = len(core.blocks) if layer_decay < 1.0 else 0
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name in skip)
        layer = 0
        scale = 1.0
        if layer_decay < 1.0:
            if not name.startswith(prefix):
                raise ValueError(f"parameter {name!r} lies outside the ViT at {prefix!r}")
            layer = vit_layer_id(name[len(prefix) :], depth)
            scale = layer_decay ** (depth + 1 - layer)
        g = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "param_names": [],
                "lr": lr * scale,
                "base_lr": lr * scale,
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        g["params"].append(p)
        g["param_names"].append(name)
    # head first: the engine logs the lr of group 0, which is then the undecayed one
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], not k[1]))]


def build_optimizer(
    model: nn.Module,
    *,
    name: str = "adamw",
    lr: float = 5e-4,
    weight_decay: float = 5e-4,
    layer_decay: float = 1.0,
    momentum: float = 0.9,
    nesterov: bool = True,
    betas: Iterable[float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """AdamW (or SGD) over :func:`param_groups`, as USB's ``get_optimizer`` builds it."""
    groups = param_groups(model, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)
    for g in groups:
        g.pop("param_names")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    if name == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
        )
    raise ValueError(f"Unknown optimizer {name!r}: expected 'adamw' or 'sgd'")


# --------------------------------------------------------------------------------------------
# The task: one training step
# --------------------------------------------------------------------------------------------


@dataclass
class SemiSupConfig:
    """The ``semisup:`` section of a config (defaults: SPEC §5's FixMatch-IKL on CIFAR-100)."""

    method: Literal["supervised", "fixmatch", "fixmatch_ikl", "meanteacher", "meanteacher_ikl"] = (
        "fixmatch_ikl"
    )
    num_labels_per_class: int = 2
    include_labeled_in_unlabeled: bool = False  # USB: true (include_lb_to_ulb)
    uratio: int = 1  # unlabeled batch = uratio * labeled batch (data.batch_size)
    threshold: float = 0.95  # confidence mask (USB's p_cutoff)
    lambda_u: float = 1.0
    unsup_warmup: float = 0.0  # fraction of the iterations over which λ_u ramps up (0: none)
    hard_label: bool = False  # FixMatch: argmax pseudo-label instead of the soft one
    pl_temperature: float = 1.0  # FixMatch soft pseudo-label σ(z_w / T_pl) (USB in effect: 1)
    alpha: float = 1.0  # IKL: weight of the sCE
    beta: float = 0.1  # IKL: weight of the wMSE
    temperature: float = 1.0  # IKL: sCE temperature
    weight_temperature: float = 1.0  # IKL: T2 of the weights σ(z_tg / T2)
    detach_target: bool = False  # FixMatch-IKL: stop the wMSE gradient into the weak view
    ema_momentum: float = 0.999  # MeanTeacher's teacher; the evaluation EMA with eval_ema
    eval_ema: bool = (
        False  # FixMatch: evaluate an EMA copy (MeanTeacher always evaluates its teacher)
    )
    teacher_train_mode: bool = True  # MeanTeacher: teacher forward in train mode (as USB)
    layer_decay: float = 1.0  # ViT layer-wise lr decay (SPEC: 0.5); needs a ViT
    crop_ratio: float = 0.875  # CIFAR views: reflect padding int(32 · (1 − ratio)) = 4
    randaugment_ops: int = 3
    randaugment_magnitude: int = 9

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field (the config loader calls this)."""
        if self.method not in METHODS:
            raise ValueError(f"Unknown semisup.method {self.method!r}: expected one of {METHODS}")
        if self.uratio < 1:
            raise ValueError(f"Expected semisup.uratio >= 1, got {self.uratio}")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(f"Expected semisup.ema_momentum in [0, 1), got {self.ema_momentum}")

    @property
    def uses_unlabeled(self) -> bool:
        return self.method != "supervised"

    @property
    def uses_teacher(self) -> bool:
        return self.method.startswith("meanteacher")

    @property
    def student_view(self) -> str:
        """The view of an unlabeled image the student sees: strong (FixMatch) or weak (MT)."""
        return "weak" if self.uses_teacher else "strong"


register_section("semisup", SemiSupConfig)


class SemiSupTask:
    """One SSL training step on ``(labeled, unlabeled)`` batches from a :class:`SemiSupLoader`.

    ``labeled = (x, y, index)``; ``unlabeled = (x_weak, x_student, y_true, index)`` (``None`` for
    ``supervised``). :meth:`step` returns the loss (to back-propagate) and detached metrics:
    ``logits_lb``, ``sup_loss``, ``unsup_loss``, ``mask_ratio`` (share of the unlabeled batch
    above the threshold), ``pl_correct``/``pl_count`` (pseudo-labels right among the kept
    samples) and ``pl_correct_all``/``unl_count`` (over all unlabeled samples).

    ``model`` is what is called (DDP-wrapped under torchrun), ``raw`` the bare module the EMA
    follows. :attr:`ema` (a :class:`dkl.ema.ModelEMA`, buffers copied as USB does) is the
    MeanTeacher teacher or the evaluation EMA; call :meth:`after_step` after each optimiser step.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: SemiSupConfig,
        *,
        raw: nn.Module | None = None,
        total_iters: int = 0,
    ) -> None:
        self.model, self.raw, self.cfg = model, raw if raw is not None else model, cfg
        self.total_iters = int(total_iters)
        cfg.validate()
        self.ema: ModelEMA | None = None
        if cfg.uses_teacher or cfg.eval_ema:
            self.ema = ModelEMA(self.raw, cfg.ema_momentum, buffers="copy")

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.raw

    def lambda_u(self, it: int) -> float:
        if self.cfg.unsup_warmup <= 0 or self.total_iters <= 0:
            return self.cfg.lambda_u
        ramp = it / (self.cfg.unsup_warmup * self.total_iters)
        return self.cfg.lambda_u * min(max(ramp, 0.0), 1.0)

    def unsup(self, input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        c = self.cfg
        if c.method == "fixmatch":
            return fixmatch_loss(
                input,
                target,
                threshold=c.threshold,
                hard_label=c.hard_label,
                pl_temperature=c.pl_temperature,
            )
        if c.method == "meanteacher":
            return meanteacher_loss(input, target, threshold=c.threshold)
        return ikl_consistency(
            input,
            target,
            threshold=c.threshold,
            alpha=c.alpha,
            beta=c.beta,
            temperature=c.temperature,
            weight_temperature=c.weight_temperature,
            detach_target=c.detach_target,
        )

    def _teacher_logits(self, x: Tensor) -> Tensor:
        assert self.ema is not None
        teacher = self.ema.module
        teacher.train(self.cfg.teacher_train_mode)
        try:
            with torch.no_grad():
                return teacher(x)
        finally:
            teacher.eval()

    def step(
        self, labeled: tuple[Tensor, ...], unlabeled: tuple[Tensor, ...] | None, it: int = 0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x_lb, y_lb = labeled[0], labeled[1]
        n_lb = x_lb.shape[0]
        method = self.cfg.method
        if method == "supervised":
            logits_lb = self.model(x_lb)
            sup = F.cross_entropy(logits_lb, y_lb)
            return sup, {"logits_lb": logits_lb.detach(), "sup_loss": sup.detach()}
        if unlabeled is None:
            raise ValueError(f"method {method!r} needs an unlabeled batch, got None")
        x_w, x_st, y_true = unlabeled[0], unlabeled[1], unlabeled[2]
        if method.startswith("fixmatch"):
            logits = self.model(torch.cat([x_lb, x_w, x_st]))
            logits_lb = logits[:n_lb]
            target, input = logits[n_lb:].chunk(2)
        else:
            target = self._teacher_logits(x_w)
            logits = self.model(torch.cat([x_lb, x_st]))
            logits_lb, input = logits[:n_lb], logits[n_lb:]
        sup = F.cross_entropy(logits_lb, y_lb)
        unsup, mask = self.unsup(input, target)
        loss = sup + self.lambda_u(it) * unsup
        with torch.no_grad():
            correct = (target.argmax(dim=1) == y_true).float()
            metrics = {
                "logits_lb": logits_lb.detach(),
                "sup_loss": sup.detach(),
                "unsup_loss": unsup.detach(),
                "mask_ratio": mask.mean(),
                "pl_correct": (correct * mask).sum(),
                "pl_count": mask.sum(),
                "pl_correct_all": correct.sum(),
                "unl_count": torch.tensor(float(correct.numel()), device=correct.device),
            }
        return loss, metrics

    def after_step(self) -> None:
        """Move the EMA towards the current weights (call after ``optimizer.step()``)."""
        if self.ema is not None:
            self.ema.update(self.raw)


# --------------------------------------------------------------------------------------------
# The engine recipe
# --------------------------------------------------------------------------------------------

_PL_KEYS = ("pl_correct", "pl_count", "pl_correct_all", "unl_count")


def _raw_images(train_set: Any) -> tuple[Any, Any]:
    """The un-augmented images and labels behind one of :func:`dkl.data.build_datasets`' sets."""
    if hasattr(train_set, "images") and hasattr(train_set, "labels"):  # digits (tensors)
        return train_set.images, train_set.labels
    base = getattr(train_set, "base", train_set)  # SeededDataset around a torchvision set
    if hasattr(base, "data") and hasattr(base, "targets"):
        return base.data, base.targets
    raise ConfigError(
        f"recipe semisup: data set {type(base).__name__} exposes neither (images, labels) nor "
        f"(data, targets); supported: digits, cifar10, cifar100"
    )


def build_views(data_name: str, cfg: SemiSupConfig) -> tuple[Any, Any]:
    """``(weak, strong)`` transforms for a data set name (digits: tensor views; CIFAR: USB's)."""
    if data_name == "digits":
        return DigitsWeak(), DigitsStrong()
    if data_name in ("cifar10", "cifar100"):
        weak = cifar_weak(32, cfg.crop_ratio)
        strong = cifar_strong(32, cfg.crop_ratio, cfg.randaugment_ops, cfg.randaugment_magnitude)
        return weak, strong
    raise ConfigError(
        f"recipe semisup: no views for data '{data_name}' (digits, cifar10, cifar100)"
    )


@register_recipe("semisup")
class SemiSupRecipe(Recipe):
    """``recipe: semisup``: FixMatch / MeanTeacher (± IKL) and the supervised baseline.

    ``data.batch_size`` is the labeled batch; the unlabeled batch is ``uratio`` times larger.
    One data "epoch" is one pass over the unlabeled pool; runs are meant to be iteration-based
    (``train.iterations``, ``train.eval_every``). The labeled indices go to
    ``<run>/labeled_indices.json``. Each evaluation adds ``mask_ratio``, ``pl_acc`` (pseudo-labels
    right among the unlabeled samples above the threshold, %) and ``pl_acc_all`` (over all
    unlabeled samples, %) to the record; ``ssl_curves.png`` plots them with top-1.
    """

    def __init__(self, cfg: Any, engine: Any) -> None:
        super().__init__(cfg, engine)
        self.scfg: SemiSupConfig = cfg.semisup
        images, labels = _raw_images(engine.train_set)
        self.labels = torch.as_tensor(labels).long()
        self.labeled_idx, self.unlabeled_idx = split_labeled(
            self.labels,
            self.scfg.num_labels_per_class,
            seed=cfg.seed,
            include_labeled_in_unlabeled=self.scfg.include_labeled_in_unlabeled,
        )
        weak, strong = build_views(cfg.data.name, self.scfg)
        student = strong if self.scfg.student_view == "strong" else weak
        self.labeled_set = ViewDataset(
            images, self.labels, self.labeled_idx, [weak], seed=cfg.seed, stream=0
        )
        self.unlabeled_set = ViewDataset(
            images, self.labels, self.unlabeled_idx, [weak, student], seed=cfg.seed, stream=1
        )
        self.task: SemiSupTask | None = None
        self._pl = dict.fromkeys(_PL_KEYS, 0.0)
        self._wrote_indices = False

    # model and optimiser ----------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        model = self.engine.build_model(self.cfg.model)
        self.task = SemiSupTask(model, self.scfg, raw=model, total_iters=self.cfg.train.iterations)
        return model

    def param_groups(self, model: nn.Module) -> Iterable:
        o = self.cfg.optim
        try:
            groups = param_groups(
                model, lr=o.lr, weight_decay=o.weight_decay, layer_decay=self.scfg.layer_decay
            )
        except ValueError as e:
            raise ConfigError(f"semisup.layer_decay: {e}") from None
        for g in groups:
            g.pop("param_names")
        return groups

    def eval_model(self) -> nn.Module:
        assert self.task is not None
        return self.task.eval_model

    def after_step(self, ctx: StepContext) -> None:
        assert self.task is not None
        self.task.after_step()  # the EMA teacher follows the weights just updated

    # data ---------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        per_step = self.engine.batch_per_rank * self.scfg.uratio * self.engine.world
        return max(1, math.ceil(len(self.unlabeled_idx) / per_step))

    def _effective_spe(self) -> int:
        spe, cap = self.steps_per_epoch(), self.cfg.train.max_steps_per_epoch
        return min(spe, cap) if cap > 0 else spe

    def write_labeled_indices(self, run_dir: Path) -> Path:
        path = Path(run_dir) / "labeled_indices.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "seed": self.cfg.seed,
                    "num_labels_per_class": self.scfg.num_labels_per_class,
                    "indices": self.labeled_idx,
                    "labels": self.labels[self.labeled_idx].tolist(),
                    "num_unlabeled": len(self.unlabeled_idx),
                }
            )
            + "\n"
        )
        return path

    def train_batches(self, epoch: int, start: int) -> Iterator:
        e = self.engine
        if not self._wrote_indices and e.rank == 0:
            self.write_labeled_indices(e.run_dir)
            self._wrote_indices = True
        spe = self._effective_spe()
        loader = SemiSupLoader(
            self.labeled_set,
            self.unlabeled_set if self.scfg.uses_unlabeled else None,
            batch_size=e.batch_per_rank,
            uratio=self.scfg.uratio,
            seed=self.cfg.seed,
            num_workers=self.cfg.data.num_workers,
            rank=e.rank,
            world=e.world,
        )
        loader.load_state_dict({"step": (epoch - 1) * spe + start})
        for _ in range(start, spe):
            yield next(loader)

    # step ---------------------------------------------------------------------------------
    def train_step(self, batch: Any, ctx: StepContext) -> dict:
        assert self.task is not None
        labeled, unlabeled = batch
        loss, m = self.task.step(labeled, unlabeled, ctx.global_step)
        for k in _PL_KEYS:
            if k in m:
                self._pl[k] += float(m.pop(k))
        out = {"loss": loss, "logits": m.pop("logits_lb"), "labels": labeled[1]}
        out.update(m)
        return out

    def evaluate(self, loader: Iterable) -> dict | None:
        vals = torch.tensor([self._pl[k] for k in _PL_KEYS], dtype=torch.float64)
        if torch.distributed.is_initialized() and self.engine.world > 1:
            vals = vals.to(self.engine._comm_device())
            torch.distributed.all_reduce(vals)
            vals = vals.cpu()
        self._pl = dict.fromkeys(_PL_KEYS, 0.0)
        correct, count, correct_all, n = vals.tolist()
        if n == 0:
            return None
        out = {"mask_ratio": count / n, "pl_acc_all": 100.0 * correct_all / n}
        if count > 0:  # left out while no sample passes the threshold (no NaN in the logs)
            out["pl_acc"] = 100.0 * correct / count
        return out

    # state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        assert self.task is not None
        state: dict = {"pl": dict(self._pl), "labeled_indices": list(self.labeled_idx)}
        if self.task.ema is not None:
            state["ema"] = self.task.ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        assert self.task is not None
        if state.get("labeled_indices", self.labeled_idx) != self.labeled_idx:
            raise ValueError(
                "checkpoint was trained on another labeled subset (seed or "
                "num_labels_per_class differ)"
            )
        self._pl = {k: float(state["pl"].get(k, 0.0)) for k in _PL_KEYS}
        if self.task.ema is not None:
            self.task.ema.load_state_dict(state["ema"])

    def rank_state(self) -> dict:
        return {"pl": dict(self._pl)}  # this rank's pseudo-label counts since the last eval

    def load_rank_state(self, state: dict) -> None:
        self._pl = {k: float(state["pl"].get(k, 0.0)) for k in _PL_KEYS}

    def summary(self) -> dict:
        e = self.engine
        if e.rank == 0 and self.cfg.train.plot and e.history and not e.eval_only:
            plot_ssl(e.history, e.run_dir / "ssl_curves.png", title=self.cfg.name)
        return {
            "method": self.scfg.method,
            "num_labeled": len(self.labeled_idx),
            "num_unlabeled": len(self.unlabeled_idx),
        }


def plot_ssl(history: list[dict], path: str | Path, title: str = "") -> None:
    """Top-1, mask ratio and pseudo-label accuracy per evaluation (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [h["step"] for h in history]
    nan = float("nan")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(x, [h.get("top1") for h in history], label="test top-1")
    if any("pl_acc" in h for h in history):
        a1.plot(x, [h.get("pl_acc", nan) for h in history], label="pseudo-label acc (masked)")
        a1.plot(x, [h.get("pl_acc_all", nan) for h in history], label="pseudo-label acc (all)")
    a1.set_xlabel("iteration")
    a1.set_ylabel("accuracy (%)")
    a1.legend()
    if any("mask_ratio" in h for h in history):
        a2.plot(x, [h.get("mask_ratio", nan) for h in history], label="mask ratio")
    a2.plot(x, [h.get("train_sup_loss", nan) for h in history], label="labeled CE")
    if any("train_unsup_loss" in h for h in history):
        a2.plot(x, [h.get("train_unsup_loss", nan) for h in history], label="unsupervised loss")
    a2.set_xlabel("iteration")
    a2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The digits demo: dkl demo --recipe semisup
# --------------------------------------------------------------------------------------------

DEMO_METHODS = ("supervised", "fixmatch", "fixmatch_ikl")
_TABLE_HEAD = (
    "| method | top-1 (%) mean ± std | per seed | mask ratio (last) | pseudo-label acc. (last, %) |"
)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def run_demo(
    out: str | Path = "runs/demo_ssl",
    *,
    seeds: int = 3,
    methods: Iterable[str] = DEMO_METHODS,
    overrides: Iterable[str] = (),
    log: Any = print,
) -> tuple[str, dict[str, list[dict]]]:
    """Train ``semisup/digits_<method>`` for each method and seed; return (markdown table, runs).

    The seed picks the labeled subset as well as the initialisation, so the spread includes the
    luck of the labels. Top-1 is the final model's (no best-of-run picking).
    """
    from dkl.config import load_config
    from dkl.engine import Engine

    runs: dict[str, list[dict]] = {}
    for method in methods:
        for seed in range(seeds):
            cfg = load_config(
                f"semisup/digits_{method}",
                [
                    f"seed={seed}",
                    f"name={method}_seed{seed}",
                    f"train.out_dir={out}",
                    "train.overwrite=true",
                    "train.progress=false",
                    *overrides,
                ],
            )
            engine = Engine(cfg, log=lambda m: None)
            summary = engine.fit()
            last = engine.history[-1]
            runs.setdefault(method, []).append(
                {
                    "seed": seed,
                    "top1": summary["last"]["top1"],
                    "time_s": summary["wall_time_s"],
                    "mask_ratio": last.get("mask_ratio"),
                    "pl_acc": last.get("pl_acc"),
                }
            )
            log(
                f"  {method:13s} seed {seed}: top-1 {summary['last']['top1']:.2f}  "
                f"({summary['wall_time_s']:.0f} s)"
            )
    lines = [
        _TABLE_HEAD,
        "|---|---|---|---|---|",
    ]
    for method, rs in runs.items():
        m, s = _mean_std([r["top1"] for r in rs])
        per = ", ".join(f"{r['top1']:.1f}" for r in rs)
        masks = [r["mask_ratio"] for r in rs if r["mask_ratio"] is not None]
        pls = [r["pl_acc"] for r in rs if r["pl_acc"] is not None]
        mask = "–" if not masks else "{:.2f} ± {:.2f}".format(*_mean_std(masks))
        pl = "–" if not pls else "{:.1f} ± {:.1f}".format(*_mean_std(pls))
        lines.append(f"| {method} | {m:.2f} ± {s:.2f} | {per} | {mask} | {pl} |")
    table = "\n".join(lines)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "ssl_table.md").write_text(table + "\n")
    return table, runs


def _demo_cli(args: Any) -> int:
    # The digits models are tiny: one thread is faster than two, and immune to oversubscription.
    torch.set_num_threads(1)
    seeds = int(getattr(args, "seeds", 3))
    out = Path(getattr(args, "out", "runs/demo"))
    if out.name == "demo":  # the shared default: keep the SSL runs apart from the KD demo's
        out = out.parent / "demo_ssl"
    overrides = list(getattr(args, "ssl_set", None) or [])
    print(f"SSL demo on digits: {', '.join(DEMO_METHODS)}; {seeds} seed(s); runs in {out}")
    table, _ = run_demo(out, seeds=seeds, overrides=overrides)
    print(table)
    print(f"(table saved to {out / 'ssl_table.md'})")
    return 0


def _demo_args(p: Any) -> None:
    p.add_argument(
        "--ssl-set",
        action="append",
        metavar="KEY=VALUE",
        help="semisup demo: a config override for every run (repeatable), "
        "e.g. --ssl-set train.iterations=300",
    )


def _register_demo() -> None:
    try:
        from dkl.cli import register_demo
    except ImportError:  # pragma: no cover
        return
    register_demo(
        "semisup",
        "semi-supervised digits: supervised vs FixMatch vs FixMatch-IKL",
        _demo_cli,
        _demo_args,
    )


_register_demo()
