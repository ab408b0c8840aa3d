"""The configuration sections of the built-in recipes: ``distill:``, ``adversarial:``, ``semisup:``.

They live beside the shared sections (and not in the recipe modules) so that reading or validating
a config never imports torch or a recipe; each recipe module re-exports its own section.
The range of every number here is in :data:`dkl.config.RANGES`, checked when a config loads.
A run's config holds only the section of its own recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "AWPConfig",
    "AdversarialConfig",
    "AttackConfig",
    "DistillConfig",
    "EMAConfig",
    "RobustEvalConfig",
    "SemiSupConfig",
    "TeacherConfig",
]


# --------------------------------------------------------------------------------------------
# Knowledge distillation: `recipe: distill`
# --------------------------------------------------------------------------------------------


@dataclass
class TeacherConfig:
    # model name; empty: name, kwargs and normalize read from the checkpoint's config (dkl's)
    name: str = ""
    kwargs: dict = field(default_factory=dict)
    checkpoint: str = ""
    normalize: bool = True  # same Normalize(mean, std) wrapper as the student


@dataclass
class DistillConfig:
    method: Literal["ce", "kd", "dkd", "ikl", "gkl"] = "ce"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    temperature: float = 4.0
    ce_weight: float = 1.0
    kd_weight: float = 0.9  # kd only
    alpha: float = 1.0  # dkd: TCKD weight; ikl: sCE weight
    beta: float = 8.0  # dkd: NCKD weight; ikl: wMSE weight
    warmup: float = 20.0  # dkd, ikl: epochs of linear loss warm-up (0: none)
    weight_temperature: float = 100.0  # ikl: T2 of w = softmax(z_t / T2)
    gi: bool = False  # ikl, gkl: class-wise prior weights instead of per-sample ones
    prior_temperature: float = 0.0  # ikl + gi: 0 means weight_temperature (the authors' T2)
    gamma: float = 1.0  # gkl: exponent of the weights (the prior rows or softmax(z_t / T2))
    prior_momentum: float = 1.0
    # share of the training images whose labels the CE term sees (a class-balanced subset picked
    # with the run's seed); the teacher's term sees every image (Hinton et al. 2015, section 2)
    label_fraction: float = 1.0


# --------------------------------------------------------------------------------------------
# Adversarial training: `recipe: adversarial`
# --------------------------------------------------------------------------------------------


@dataclass
class AttackConfig:
    loss: Literal["", "ikl", "gkl", "sce", "kl", "ce"] = ""  # empty: the method's own (ikl_at: ikl,
    # gkl_at: gkl, trades: kl, pgd_at: ce)
    budget: Literal["low", "high", "pgd10"] = "high"  # steps of eps_e: low 2 x 1, high 5 x 1/2,
    # pgd10 10 x 1/4
    eps: float = 8 / 255  # eps at the last epoch (ramped 8/255 * e / E unless fixed_eps)
    fixed_eps: bool = False
    init: Literal["", "normal", "uniform"] = ""  # normal: x + 0.001 N(0, 1); empty: uniform
    # for pgd_at, normal for the others
    alpha: float = 1.0  # ikl attack loss: sCE weight
    beta: float = 1.0  # ikl attack loss: wMSE weight
    gamma: float = 1.0  # gkl attack loss: weight exponent
    step_size: float = 0.0  # absolute step size; 0: the budget's fraction of eps_e


@dataclass
class AWPConfig:
    gamma: float = 0.0  # 0: off; the IKL-AT presets use 0.005 (Wu et al. 2020)
    start_epoch: int = 10
    lr: float = 0.0  # the proxy's SGD lr; 0: optim.lr (the authors' choice)


@dataclass
class EMAConfig:
    tau: float = 0.9  # epoch-level EMA of the weights; 0: off (the trained model is reported)
    start_epoch: int = 1


@dataclass
class RobustEvalConfig:
    pgd_examples: int = 0  # > 0: PGD accuracy of the eval model on this many test points per epoch
    pgd_steps: int = 10


@dataclass
class AdversarialConfig:
    method: Literal["standard", "pgd_at", "trades", "ikl_at", "gkl_at"] = "ikl_at"
    alpha: float = 4.0  # ikl_at, gkl_at: sCE weight
    beta: float = 20.0  # ikl_at, gkl_at: wMSE weight
    gamma: float = 1.0  # gkl_at: exponent of the GI prior rows (the authors' DKLv2: 1 or 0.4)
    trades_beta: float = 6.0
    prior_temperature: float = 4.0
    attack: AttackConfig = field(default_factory=AttackConfig)
    aug_view: Literal["", "autoaugment", "cutout"] = ""  # a second augmented view (CIFAR only)
    aug_weight: float = 0.3  # gamma of the second view's robust term
    awp: AWPConfig = field(default_factory=AWPConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: RobustEvalConfig = field(default_factory=RobustEvalConfig)


# --------------------------------------------------------------------------------------------
# Semi-supervised learning: `recipe: semisup`
# --------------------------------------------------------------------------------------------


@dataclass
class SemiSupConfig:
    """Defaults: FixMatch-IKL on CIFAR-100 with 2 labels per class, as the IKL authors ran it."""

    method: Literal["supervised", "fixmatch", "fixmatch_ikl", "meanteacher", "meanteacher_ikl"] = (
        "fixmatch_ikl"
    )
    num_labels_per_class: int = 2
    include_labeled_in_unlabeled: bool = False  # USB: true (include_lb_to_ulb)
    uratio: int = 1  # unlabeled batch = uratio * labeled batch (data.batch_size)
    threshold: float = 0.95  # confidence mask (USB's p_cutoff)
    lambda_u: float = 1.0
    unsup_warmup: float = 0.0  # fraction of the run's steps over which λ_u ramps up (0: none)
    hard_label: bool = False  # FixMatch: argmax pseudo-label instead of the soft one
    pl_temperature: float = 1.0  # FixMatch soft pseudo-label σ(z_w / T_pl) (USB in effect: 1)
    alpha: float = 1.0  # IKL: weight of the sCE
    beta: float = 0.1  # IKL: weight of the wMSE
    temperature: float = 1.0  # IKL: sCE temperature
    weight_temperature: float = 1.0  # IKL: T2 of the weights σ(z_tg / T2)
    detach_target: bool = False  # FixMatch-IKL: stop the wMSE gradient into the weak view
    # FixMatch-IKL: detach the wMSE weights softmax(z_weak / T2); the authors' code does not, so
    # the weights pass gradient into the weak logits too (no effect when the target is detached)
    detach_weights: bool = False
    ema_momentum: float = 0.999  # MeanTeacher's teacher; the evaluation EMA with eval_ema
    eval_ema: bool = False  # FixMatch: evaluate an EMA copy (MeanTeacher evaluates its teacher)
    teacher_train_mode: bool = True  # MeanTeacher: teacher forward in train mode (as USB)
    layer_decay: float = 1.0  # ViT layer-wise lr decay (USB's ViT presets: 0.5); needs a ViT
    crop_ratio: float = 0.875  # CIFAR views: reflect padding int(32 · (1 − ratio)) = 4
    randaugment_ops: int = 3  # CIFAR strong view: USB's RandAugment (random magnitudes) + Cutout

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
