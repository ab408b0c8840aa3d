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
part of IKL also moves the weak view (``detach_target=False``, the default), and it does not
detach the wMSE weights :math:`\sigma(z_w / T_2)` either, so they pass gradient into the weak
logits too (``detach_weights=False``, the default; ``True`` gives :func:`dkl.ikl_loss`'s constant
weights). The sCE target is always detached.
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
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dkl._checks import check_logits
from dkl.config import ConfigError, SemiSupConfig
from dkl.data import SemiSupLoader, ViewDataset, build_views, raw_images, split_labeled
from dkl.ema import ModelEMA
from dkl.losses import ikl_loss, soft_cross_entropy
from dkl.recipes import register_recipe
from dkl.train import Counters, StepContext, Task

__all__ = [
    "METHODS",
    "SemiSupConfig",
    "SemiSupTask",
    "confidence_mask",
    "fixmatch_loss",
    "ikl_consistency",
    "masked_batch_mean",
    "meanteacher_loss",
    "param_groups",
    "plot_ssl",
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
    detach_weights: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""Masked IKL consistency: ``mean_B(mask · IKL(z_in, z_tg))`` with the mask from ``z_tg``.

    IKL = β·wMSE(z_tg, z_in; w = σ(z_tg/T2)) + α·sCE_T, per sample. With ``detach_target=False``
    the wMSE moves the target too when it carries gradient (FixMatch-IKL's weak view, as in the
    authors' code); an EMA teacher's logits carry none anyway. With ``detach_weights=False`` (the
    authors' code) the weights ``w`` pass gradient into the target as well; with ``True`` they
    are constants, as in :func:`dkl.ikl_loss`.
    """
    check_logits(input, target)
    mask = confidence_mask(target, threshold)
    tg = target.detach() if detach_target else target
    if detach_weights or not tg.requires_grad:
        per = ikl_loss(input, tg, alpha=alpha, beta=beta, temperature=temperature,
                       weight_temperature=weight_temperature, reduction="none")  # fmt: skip
    else:
        zs, zt = _compute_dtype(input), _compute_dtype(tg)
        w = F.softmax(zt / weight_temperature, dim=1)  # not detached
        p = F.softmax(zt.detach() / temperature, dim=1)
        per = beta * _wmse_live_weights(zt, zs, w) + alpha * soft_cross_entropy(zs, p, temperature)
    return masked_batch_mean(per, mask), mask


def _compute_dtype(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _wmse_live_weights(target: Tensor, input: Tensor, w: Tensor) -> Tensor:
    """Per-row wMSE ½ W Σ_j w_j (e_j − ē)², e = target − input, through which autograd also
    differentiates ``w``. The closed form equals the pairwise ¼ Σ_jk w_j w_k (e_j − e_k)² for every
    ``w``, so its gradient in ``w`` is the pairwise one too."""
    e = target - input
    total = w.sum(dim=1)
    mean = (w * e).sum(dim=1) / total
    return 0.5 * total * (w * (e - mean.unsqueeze(1)).pow(2)).sum(dim=1)


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
# Optimiser groups: layer-wise lr decay (the schedule is the trainer's sched.name=usb_cosine)
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


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------

_PL_KEYS = ("pl_correct", "pl_count", "pl_correct_all", "unl_count")


#: the data sets semi-supervised runs build weak / strong views for
SEMISUP_DATA = ("digits", "cifar10", "cifar100")


@register_recipe("semisup", config=SemiSupConfig)
class SemiSupTask(Task):
    """``recipe: semisup``: FixMatch / MeanTeacher (± IKL) and the supervised baseline.

    ``data.batch_size`` is the labeled batch; the unlabeled batch is ``uratio`` times larger.
    One data "epoch" is one pass over the unlabeled pool; runs are meant to be iteration-based
    (``train.iterations``, ``train.eval_every``). The labeled indices go to
    ``<run>/labeled_indices.json``. Each evaluation adds ``mask_ratio``, ``pl_acc`` (pseudo-labels
    right among the unlabeled samples above the threshold, %) and ``pl_acc_all`` (over all
    unlabeled samples, %) to the record; ``ssl_curves.png`` plots them with top-1.

    A step takes ``labeled = (x, y, index)`` and ``unlabeled = (x_weak, x_student, y_true,
    index)`` (``None`` for ``supervised``). :attr:`ema` (a :class:`dkl.ema.ModelEMA`, buffers
    copied as USB does) is the MeanTeacher teacher or the evaluation EMA.
    """

    state_members = ("pl", "ema")

    def __init__(self, cfg: Any, ctx: Any) -> None:
        super().__init__(cfg, ctx)
        s: SemiSupConfig = cfg.semisup
        self.scfg = s
        if cfg.data.name not in SEMISUP_DATA:
            raise ConfigError(
                f"recipe semisup: runs on {', '.join(SEMISUP_DATA)} (its weak and strong views "
                f"are those data sets' own, as USB builds them), got data.name={cfg.data.name!r}; "
                f"on your own images use recipe distill or adversarial"
            )
        try:
            images, labels = raw_images(ctx.train_set)
            weak, strong = build_views(
                cfg.data.name,
                crop_ratio=s.crop_ratio,
                randaugment_ops=s.randaugment_ops,
            )
        except ValueError as e:
            raise ConfigError(f"recipe semisup: {e}") from None
        self.labels = torch.as_tensor(labels).long()
        self.labeled_idx, self.unlabeled_idx = split_labeled(
            self.labels,
            s.num_labels_per_class,
            seed=cfg.seed,
            include_labeled_in_unlabeled=s.include_labeled_in_unlabeled,
        )
        student = strong if s.student_view == "strong" else weak
        self.labeled_set = ViewDataset(
            images, self.labels, self.labeled_idx, [weak], seed=cfg.seed, stream=0
        )
        self.unlabeled_set = ViewDataset(
            images, self.labels, self.unlabeled_idx, [weak, student], seed=cfg.seed, stream=1
        )
        self.pl = Counters(*_PL_KEYS)
        self.ema: ModelEMA | None = None
        self._wrote_indices = False

    # model and optimiser ----------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        model = super().build_model()
        if self.scfg.uses_teacher or self.scfg.eval_ema:
            self.ema = ModelEMA(model, self.scfg.ema_momentum, buffers="copy")
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
        return self.ema.module if self.ema is not None else super().eval_model()

    def after_step(self, ctx: StepContext) -> None:
        if self.ema is not None:  # the EMA follows the weights just updated
            self.ema.update(self.raw_model)

    # data ---------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        per_step = self.ctx.batch_per_rank * self.scfg.uratio * self.ctx.world
        return max(1, -(-len(self.unlabeled_idx) // per_step))

    def write_labeled_indices(self, run_dir: Path) -> Path:
        path = Path(run_dir) / "labeled_indices.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "seed": self.cfg.seed,
            "num_labels_per_class": self.scfg.num_labels_per_class,
            "indices": self.labeled_idx,
            "labels": self.labels[self.labeled_idx].tolist(),
            "num_unlabeled": len(self.unlabeled_idx),
        }
        path.write_text(json.dumps(record) + "\n")
        return path

    def train_batches(self, epoch: int, start: int) -> Iterator:
        ctx = self.ctx
        if not self._wrote_indices and ctx.is_main:
            self.write_labeled_indices(ctx.run_dir)
            self._wrote_indices = True
        spe = self.steps_run_per_epoch()
        loader = SemiSupLoader(
            self.labeled_set,
            self.unlabeled_set if self.scfg.uses_unlabeled else None,
            batch_size=ctx.batch_per_rank,
            uratio=self.scfg.uratio,
            seed=self.cfg.seed,
            num_workers=self.cfg.data.num_workers,
            rank=ctx.rank,
            world=ctx.world,
        )
        loader.load_state_dict({"step": (epoch - 1) * spe + start})
        for _ in range(start, spe):
            yield next(loader)

    # step ---------------------------------------------------------------------------------
    def lambda_u(self, it: int) -> float:
        c, t = self.scfg, self.cfg.train
        total = t.iterations
        if total <= 0:  # an epoch run: its steps
            total = t.epochs * self.steps_run_per_epoch()
        if c.unsup_warmup <= 0 or total <= 0:
            return c.lambda_u
        return c.lambda_u * min(max(it / (c.unsup_warmup * total), 0.0), 1.0)

    def unsup(self, input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        c = self.scfg
        if c.method == "fixmatch":
            return fixmatch_loss(input, target, threshold=c.threshold, hard_label=c.hard_label,
                                 pl_temperature=c.pl_temperature)  # fmt: skip
        if c.method == "meanteacher":
            return meanteacher_loss(input, target, threshold=c.threshold)
        return ikl_consistency(
            input, target, threshold=c.threshold, alpha=c.alpha, beta=c.beta,
            temperature=c.temperature, weight_temperature=c.weight_temperature,
            detach_target=c.detach_target, detach_weights=c.detach_weights,
        )  # fmt: skip

    def _teacher_logits(self, x: Tensor) -> Tensor:
        assert self.ema is not None
        teacher = self.ema.module
        teacher.train(self.scfg.teacher_train_mode)
        try:
            with torch.no_grad():
                return teacher(x)
        finally:
            teacher.eval()

    def train_step(self, batch: Any, ctx: StepContext) -> dict:
        labeled, unlabeled = batch
        x_lb, y_lb = labeled[0], labeled[1]
        n_lb = x_lb.shape[0]
        method = self.scfg.method
        if method == "supervised":
            logits_lb = self.model(x_lb)
            sup = F.cross_entropy(logits_lb, y_lb)
            return {"loss": sup, "logits": logits_lb.detach(), "labels": y_lb,
                    "sup_loss": sup.detach()}  # fmt: skip
        if unlabeled is None:
            raise ValueError(f"method {method!r} needs an unlabeled batch, got None")
        x_w, x_st, y_true = unlabeled[0], unlabeled[1], unlabeled[2]
        if method.startswith("fixmatch"):  # one forward for all three (USB's use_cat)
            logits = self.model(torch.cat([x_lb, x_w, x_st]))
            logits_lb = logits[:n_lb]
            target, input = logits[n_lb:].chunk(2)
        else:
            target = self._teacher_logits(x_w)
            logits = self.model(torch.cat([x_lb, x_st]))
            logits_lb, input = logits[:n_lb], logits[n_lb:]
        sup = F.cross_entropy(logits_lb, y_lb)
        unsup, mask = self.unsup(input, target)
        loss = sup + self.lambda_u(ctx.global_step) * unsup
        with torch.no_grad():
            correct = (target.argmax(dim=1) == y_true).float()
            self.pl.add(pl_correct=(correct * mask).sum(), pl_count=mask.sum(),
                        pl_correct_all=correct.sum(), unl_count=float(correct.numel()))  # fmt: skip
        return {"loss": loss, "logits": logits_lb.detach(), "labels": y_lb,
                "sup_loss": sup.detach(), "unsup_loss": unsup.detach(),
                "mask_ratio": mask.mean()}  # fmt: skip

    def evaluate(self, loader: Iterable) -> dict | None:
        t = self.pl.reduce()
        n = t["unl_count"]
        if n == 0:
            return None
        out = {"mask_ratio": t["pl_count"] / n, "pl_acc_all": 100.0 * t["pl_correct_all"] / n}
        if t["pl_count"] > 0:  # left out while no sample passes the threshold (no NaN in logs)
            out["pl_acc"] = 100.0 * t["pl_correct"] / t["pl_count"]
        return out

    # state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "labeled_indices": list(self.labeled_idx)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("labeled_indices", self.labeled_idx) != self.labeled_idx:
            raise ValueError(
                "checkpoint was trained on another labeled subset (seed or "
                "num_labels_per_class differ)"
            )
        super().load_state_dict(state)

    def summary(self, history: list[dict]) -> dict:
        if self.ctx.is_main and self.cfg.train.plot and history and not self.ctx.eval_only:
            plot_ssl(history, self.ctx.run_dir / "ssl_curves.png", title=self.cfg.name)
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
