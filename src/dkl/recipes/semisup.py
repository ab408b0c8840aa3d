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

import copy
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dkl.losses import ikl_loss

__all__ = [
    "METHODS",
    "SemiSupConfig",
    "SemiSupTask",
    "build_optimizer",
    "confidence_mask",
    "ema_update_",
    "fixmatch_loss",
    "ikl_consistency",
    "masked_batch_mean",
    "meanteacher_loss",
    "param_groups",
    "set_lr",
    "usb_cosine_factor",
    "vit_layer_id",
]

METHODS = ("supervised", "fixmatch", "fixmatch_ikl", "meanteacher", "meanteacher_ikl")


# --------------------------------------------------------------------------------------------
# Per-batch losses on logits
# --------------------------------------------------------------------------------------------


def _check_pair(input: Tensor, target: Tensor) -> None:
    if input.ndim != 2 or input.shape != target.shape:
        raise ValueError(
            f"Expected input and target logits of the same shape (B, C), got "
            f"{tuple(input.shape)} and {tuple(target.shape)}"
        )


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
    _check_pair(input, target)
    if pl_temperature <= 0:
        raise ValueError(f"Expected pl_temperature > 0, got {pl_temperature}")
    mask = confidence_mask(target, threshold)
    log_p = F.log_softmax(input.float(), dim=1)
    zt = target.detach().float()
    if hard_label:
        per = F.nll_loss(log_p, zt.argmax(dim=1), reduction="none")
    else:
        per = -(F.softmax(zt / pl_temperature, dim=1) * log_p).sum(dim=1)
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
    _check_pair(input, target)
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
    _check_pair(input, target)
    mask = confidence_mask(target, threshold)
    p_in = F.softmax(input.float(), dim=1)
    p_tg = F.softmax(target.detach().float(), dim=1)
    per = (p_in - p_tg).pow(2).mean(dim=1)
    return masked_batch_mean(per, mask), mask


# --------------------------------------------------------------------------------------------
# EMA teacher
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def ema_update_(ema: nn.Module, model: nn.Module, momentum: float) -> None:
    """``θ_ema ← m·θ_ema + (1 − m)·θ`` for parameters; buffers (BN statistics) are copied.

    This is USB's EMA (``ema_m``): buffers follow the student directly.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"Expected momentum in [0, 1], got {momentum}")
    ema_p, model_p = dict(ema.named_parameters()), dict(model.named_parameters())
    if ema_p.keys() != model_p.keys():
        raise ValueError("EMA and model parameters differ in names; the EMA must be a copy")
    for name, p in model_p.items():
        ema_p[name].lerp_(p.detach(), 1.0 - momentum)
    ema_b = dict(ema.named_buffers())
    for name, b in model.named_buffers():
        ema_b[name].copy_(b)


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
    return [groups[k] for k in sorted(groups)]


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


def usb_cosine_factor(step: int, total: int, warmup: int = 0, cycles: float = 7.0 / 16.0) -> float:
    r"""USB's lr factor at ``step`` (0-based; the factor used for update number ``step``).

    ``step / warmup`` during warm-up, then ``max(0, cos(π · cycles · (step − warmup) / (total −
    warmup)))``. With ``cycles = 7/16`` (USB's default) the lr ends at ``cos(7π/16) ≈ 0.195`` of
    its peak, not at 0.

    >>> [round(usb_cosine_factor(s, 100, 10), 4) for s in (0, 5, 10, 100)]
    [0.0, 0.5, 1.0, 0.1951]
    """
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, math.cos(math.pi * cycles * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's lr to ``base_lr · factor`` (``base_lr`` defaults to the group's lr)."""
    for g in optimizer.param_groups:
        g.setdefault("base_lr", g["lr"])
        g["lr"] = g["base_lr"] * factor


# --------------------------------------------------------------------------------------------
# The task: one training step
# --------------------------------------------------------------------------------------------


@dataclass
class SemiSupConfig:
    """The ``semisup:`` section of a config (defaults: SPEC §5's FixMatch-IKL on CIFAR-100)."""

    method: str = (
        "fixmatch_ikl"  # supervised | fixmatch | fixmatch_ikl | meanteacher | meanteacher_ikl
    )
    num_labels_per_class: int = 2
    include_labeled_in_unlabeled: bool = False  # USB: true (include_lb_to_ulb)
    uratio: int = 1  # unlabeled batch = uratio * labeled batch
    threshold: float = 0.95  # confidence mask (p_cutoff)
    lambda_u: float = 1.0
    unsup_warmup: float = 0.0  # fraction of iterations over which λ_u ramps up linearly (0 = none)
    hard_label: bool = False  # FixMatch: argmax pseudo-label instead of the soft one
    pl_temperature: float = 1.0  # FixMatch soft pseudo-label σ(z_w / T_pl) (USB in effect: 1)
    alpha: float = 1.0  # IKL: weight of sCE
    beta: float = 0.1  # IKL: weight of wMSE
    temperature: float = 1.0  # IKL: sCE temperature
    weight_temperature: float = 1.0  # IKL: T2 of the weights σ(z_tg / T2)
    detach_target: bool = False  # FixMatch-IKL: stop the wMSE gradient into the weak view
    ema_momentum: float = 0.999  # MeanTeacher teacher / evaluation EMA
    eval_ema: bool = False  # evaluate the EMA model (always true for MeanTeacher: the teacher)
    teacher_train_mode: bool = True  # MeanTeacher: teacher forward in train mode (USB)
    layer_decay: float = 1.0  # ViT layer-wise lr decay (SPEC: 0.5)
    warmup_iters: int = 0  # linear lr warm-up, then USB's cosine
    cosine_cycles: float = 7.0 / 16.0
    crop_ratio: float = 0.875
    randaugment_ops: int = 3
    randaugment_magnitude: int = 9
    pretrained: str = ""  # USB ViT checkpoint (local file); head dropped, pos-embed resized

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown semisup.method {self.method!r}: expected one of {METHODS}")
        if self.uratio < 1:
            raise ValueError(f"Expected semisup.uratio >= 1, got {self.uratio}")
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ValueError(f"Expected semisup.ema_momentum in [0, 1], got {self.ema_momentum}")

    @property
    def uses_unlabeled(self) -> bool:
        return self.method != "supervised"

    @property
    def uses_teacher(self) -> bool:
        return self.method.startswith("meanteacher")

    @property
    def student_view(self) -> str:
        """Which view of an unlabeled image the student sees: strong (FixMatch) or weak (MT)."""
        return "weak" if self.uses_teacher else "strong"


class SemiSupTask:
    """One SSL training step on ``(labeled, unlabeled)`` batches from a :class:`SemiSupLoader`.

    ``labeled = (x, y, index)``; ``unlabeled = (x_weak, x_student, y_true, index)`` (``None`` for
    ``supervised``). :meth:`step` returns the loss (to back-propagate) and detached metrics:
    ``sup_loss``, ``unsup_loss``, ``mask_ratio`` (share of the unlabeled batch above the
    threshold), ``pl_correct``/``pl_count`` (pseudo-labels right among the kept samples) and
    ``pl_correct_all``/``unl_count`` (over all unlabeled samples). :attr:`ema` is the EMA copy
    (the MeanTeacher teacher), updated by :meth:`after_step`; it is ``None`` when unused.
    """

    def __init__(self, model: nn.Module, cfg: SemiSupConfig, *, total_iters: int = 0) -> None:
        self.model, self.cfg, self.total_iters = model, cfg, int(total_iters)
        self.ema: nn.Module | None = None
        if cfg.uses_teacher or cfg.eval_ema:
            self.ema = copy.deepcopy(model)
            for p in self.ema.parameters():
                p.requires_grad_(False)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema if self.ema is not None else self.model

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
        was_training = self.ema.training
        self.ema.train(self.cfg.teacher_train_mode)
        with torch.no_grad():
            out = self.ema(x)
        self.ema.train(was_training)
        return out

    def step(
        self, labeled: tuple[Tensor, ...], unlabeled: tuple[Tensor, ...] | None, it: int = 0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x_lb, y_lb = labeled[0], labeled[1]
        n_lb = x_lb.shape[0]
        method = self.cfg.method
        if method == "supervised" or unlabeled is None:
            if method != "supervised":
                raise ValueError(f"method {method!r} needs an unlabeled batch, got None")
            sup = F.cross_entropy(self.model(x_lb), y_lb)
            return sup, {"sup_loss": sup.detach()}
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
        """Update the EMA copy (call after ``optimizer.step()``)."""
        if self.ema is not None:
            ema_update_(self.ema, self.model, self.cfg.ema_momentum)
