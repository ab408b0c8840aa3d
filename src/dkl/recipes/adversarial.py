r"""Adversarial training: ``standard``, ``pgd_at`` (Madry), ``trades``, ``ikl_at`` (Cui et al., NeurIPS 2024), ``gkl_at``.

With natural logits :math:`z_{nat} = f(x)`, adversarial logits :math:`z_{adv} = f(x_{adv})` (both
from the training forward, both carrying gradient) and labels :math:`y`:

- ``standard``: :math:`\mathrm{CE}(f(x), y)` (no attack);
- ``pgd_at``:   :math:`\mathrm{CE}(z_{adv}, y)`, attack on CE;
- ``trades``:   :math:`\mathrm{CE}(z_{nat}, y) + \beta\,\mathrm{KL}(\sigma(z_{nat})\,\|\,\sigma(z_{adv}))`
  (β = 6), attack on the same KL;
- ``ikl_at``:   :math:`\mathrm{CE}(z_{nat}, y) + \beta\,\mathrm{wMSE}(z_{nat}, z_{adv}; P[y])
  + \alpha\,\mathrm{sCE}(\sigma(z_{nat}), z_{adv})` (:func:`dkl.ikl_loss`, T = 1 in the sCE), with
  :math:`P` a :class:`dkl.ClassPrior` (T = 4) fed with :math:`z_{nat}` of the training forward and
  stepped at each epoch end; attack on IKL (α = β = 1) or on sCE alone;
- ``gkl_at``:   as ``ikl_at`` with :func:`dkl.gkl_loss` (the authors' successor, DKLv2): the prior
  rows raised to ``gamma`` and the wMSE normalised by the batch's total pair weight; attack on GKL
  with α = β = γ = 1.

All losses are batch means. The adversarial examples come from :class:`dkl.attacks.TrainAttack`
(natural logits computed once per batch, in eval mode, without grad).

Second augmented view (``x_aug``, AutoAugment / Cutout), as the authors' code runs it: both views
are attacked and forwarded as one batch of 2B; the CE term is the mean over all 2B rows, the
robust term is ``robust(basic) + γ · robust(view)``, and only the basic view feeds the prior.

AWP (:class:`dkl.awp.AWP`, Wu et al. 2020), from ``awp.start_epoch``, perturbs the weights for
the training forward and backward and puts them back right before the optimiser step. Its proxy
step ascends the loss of the whole batch as one: with a second view that is the authors'
``CE(2B rows) + robust(all 2B rows)`` = CE + ½(robust(basic) + robust(view)), without γ.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dkl.attacks import TrainAttack, eval_mode, pgd_attack
from dkl.awp import AWP
from dkl.config import AdversarialConfig, ConfigError
from dkl.data import with_second_view
from dkl.data.seeding import mix_seed
from dkl.ema import ModelEMA
from dkl.losses import gkl_loss, ikl_loss
from dkl.prior import ClassPrior
from dkl.recipes import register_recipe
from dkl.train import StepContext, Task
from dkl.train.distributed import all_reduce_sum

__all__ = [
    "DEFAULT_ATTACK_LOSS",
    "METHODS",
    "AdversarialConfig",
    "AdversarialLoss",
    "AdversarialTask",
    "adversarial_loss",
]

METHODS = ("standard", "pgd_at", "trades", "ikl_at", "gkl_at")
#: the attack loss each method uses unless the config says otherwise
DEFAULT_ATTACK_LOSS = {"pgd_at": "ce", "trades": "kl", "ikl_at": "ikl", "gkl_at": "gkl"}


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"Expected method in {METHODS}, got {method!r}")


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def adversarial_loss(
    method: str,
    z_nat: Tensor | None,
    z_adv: Tensor | None,
    labels: Tensor,
    *,
    alpha: float = 4.0,
    beta: float = 20.0,
    gamma: float = 1.0,
    trades_beta: float = 6.0,
    class_weights: Tensor | None = None,
    n_basic: int | None = None,
    aug_weight: float = 1.0,
) -> dict[str, Tensor]:
    """The training loss of one batch: ``{"loss", "ce", "robust"}`` (batch means).

    ``n_basic``: with a second view stacked after the basic one (rows ``[:n_basic]`` basic,
    ``[n_basic:]`` view), the robust term is ``robust(basic) + aug_weight · robust(view)``.
    ``class_weights``: ``(B, C)`` GI rows for ``ikl_at`` and ``gkl_at`` (``gamma``: their power).
    """
    _check_method(method)
    if method == "standard":
        ce = F.cross_entropy(z_nat, labels)
        return {"loss": ce, "ce": ce.detach(), "robust": torch.zeros((), device=ce.device)}
    if z_adv is None:
        raise ValueError(f"method {method!r} needs adversarial logits z_adv")
    b = labels.shape[0]
    n_basic = b if n_basic is None else n_basic
    if not 0 < n_basic <= b:
        raise ValueError(f"Expected 0 < n_basic <= {b}, got {n_basic}")

    def robust_part(rows: slice) -> Tensor:
        if method == "trades":
            log_p_adv = F.log_softmax(z_adv[rows], dim=1)
            log_p_nat = F.log_softmax(z_nat[rows], dim=1)
            kl = F.kl_div(log_p_adv, log_p_nat, reduction="batchmean", log_target=True)
            return trades_beta * kl
        if method == "ikl_at":
            w = None if class_weights is None else class_weights[rows]
            return ikl_loss(z_adv[rows], z_nat[rows], alpha=alpha, beta=beta, class_weights=w)
        if method == "gkl_at":
            w = None if class_weights is None else class_weights[rows]
            return gkl_loss(z_adv[rows], z_nat[rows], alpha=alpha, beta=beta, gamma=gamma,
                            class_weights=w)  # fmt: skip
        # pgd_at: the robust term is the whole loss (CE on the adversarial examples)
        return F.cross_entropy(z_adv[rows], labels[rows])

    robust = robust_part(slice(0, n_basic))
    if n_basic < b:
        robust = robust + aug_weight * robust_part(slice(n_basic, b))
    if method == "pgd_at":
        return {"loss": robust, "ce": robust.detach(), "robust": robust.detach()}
    ce = F.cross_entropy(z_nat, labels)
    return {"loss": ce + robust, "ce": ce.detach(), "robust": robust.detach()}


class AdversarialLoss(nn.Module):
    """:func:`adversarial_loss` of one method, its weights fixed at construction.

    ``forward(z_nat, z_adv, labels, *, class_weights=None, n_basic=None)``.
    """

    def __init__(
        self,
        method: str,
        *,
        alpha: float = 4.0,
        beta: float = 20.0,
        gamma: float = 1.0,
        trades_beta: float = 6.0,
        aug_weight: float = 1.0,
    ) -> None:
        super().__init__()
        _check_method(method)
        self.method, self.alpha, self.beta, self.gamma = method, alpha, beta, gamma
        self.trades_beta, self.aug_weight = trades_beta, aug_weight

    def forward(
        self,
        z_nat: Tensor | None,
        z_adv: Tensor | None,
        labels: Tensor,
        *,
        class_weights: Tensor | None = None,
        n_basic: int | None = None,
    ) -> dict[str, Tensor]:
        return adversarial_loss(
            self.method, z_nat, z_adv, labels, alpha=self.alpha, beta=self.beta, gamma=self.gamma,
            trades_beta=self.trades_beta, class_weights=class_weights, n_basic=n_basic,
            aug_weight=self.aug_weight,
        )  # fmt: skip


def training_attack(cfg: AdversarialConfig) -> TrainAttack | None:
    """The attack that makes the training examples of ``cfg.method`` (``None`` for standard)."""
    if cfg.method == "standard":
        return None
    a = cfg.attack
    loss = a.loss or DEFAULT_ATTACK_LOSS[cfg.method]
    if cfg.method == "pgd_at" and loss != "ce":
        raise ValueError(f"adversarial.attack.loss: pgd_at attacks CE, got {loss!r}")
    init = a.init or ("uniform" if cfg.method == "pgd_at" else "normal")
    return TrainAttack(loss=loss, budget=a.budget, max_eps=a.eps, fixed_eps=a.fixed_eps,
                       init=init, alpha=a.alpha, beta=a.beta, gamma=a.gamma,
                       step_size=a.step_size)  # fmt: skip


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


# the stream of mix_seed that keys the test points' PGD random starts
_PGD_STARTS = 31


@register_recipe("adversarial", config=AdversarialConfig)
class AdversarialTask(Task):
    """Adversarial training (``standard``, ``pgd_at``, ``trades``, ``ikl_at``, ``gkl_at``), see above.

    The attack runs on the unwrapped model (eval mode: no DDP synchronisation is needed for it);
    the training forwards go through the (possibly DDP-wrapped) model. The model evaluated and
    exported is the epoch-level EMA once it has started.
    """

    state_members = ("prior", "ema")

    def __init__(self, cfg, ctx) -> None:
        super().__init__(cfg, ctx)
        a: AdversarialConfig = cfg.adversarial
        self.acfg = a
        self.attack = training_attack(a)
        self.criterion = AdversarialLoss(a.method, alpha=a.alpha, beta=a.beta, gamma=a.gamma,
                                         trades_beta=a.trades_beta, aug_weight=a.aug_weight)  # fmt: skip
        self.prior: ClassPrior | None = None
        if a.method in ("ikl_at", "gkl_at"):
            self.prior = ClassPrior(ctx.info.num_classes, temperature=a.prior_temperature)
            self.prior.to(ctx.device)
        if a.aug_view and not ctx.eval_only:
            try:
                self.train_set = with_second_view(ctx.train_set, a.aug_view)
            except ValueError as e:  # digits: no image transform to extend
                raise ConfigError(f"adversarial.aug_view: {e}") from None
        self.awp: AWP | None = None
        self.ema: ModelEMA | None = None

    # models -------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        model = super().build_model()
        if self.acfg.ema.tau > 0:
            self.ema = ModelEMA(model, self.acfg.ema.tau)
        return model

    def eval_model(self) -> nn.Module:
        if self.ema is not None and self.ema.num_updates > 0:
            return self.ema.module
        return super().eval_model()

    # the pieces of a step ------------------------------------------------------------------
    def class_weights(self, labels: Tensor) -> Tensor | None:
        return None if self.prior is None else self.prior.weights(labels)

    def adversarial_examples(self, x: Tensor, labels: Tensor, epoch: int) -> Tensor | None:
        """Attack a batch (``None`` for standard); natural logits computed once, without grad."""
        if self.attack is None:
            return None
        model = self.raw_model
        z_nat = None
        if self.attack.needs_natural_logits():
            with torch.no_grad(), eval_mode(model):
                z_nat = model(x)
        return self.attack(model, x, epoch=epoch, epochs=self.cfg.train.epochs, labels=labels,
                           z_nat=z_nat, class_weights=self.class_weights(labels))  # fmt: skip

    def loss(
        self, model: nn.Module, x: Tensor, x_adv: Tensor | None, labels: Tensor, *,
        n_basic: int | None = None, update_prior: bool = True,
    ) -> dict[str, Any]:  # fmt: skip
        """Training forward(s) of ``model`` (in its current mode) and the loss; feeds the prior."""
        method = self.acfg.method
        z_nat = None if method == "pgd_at" else model(x)
        z_adv = None if method == "standard" else model(x_adv)
        out = self.criterion(z_nat, z_adv, labels, class_weights=self.class_weights(labels),
                             n_basic=n_basic)  # fmt: skip
        if update_prior and self.prior is not None:
            nb = labels.shape[0] if n_basic is None else n_basic
            self.prior.update(z_nat[:nb].detach(), labels[:nb])
        out["logits"] = z_nat if z_nat is not None else z_adv
        return out

    # steps --------------------------------------------------------------------------------
    def train_step(self, batch: Any, ctx: StepContext) -> dict:
        inputs, y = batch
        if isinstance(inputs, (list, tuple)):  # (basic, second view)
            x, labels, n_basic = torch.cat(list(inputs)), torch.cat([y, y]), y.shape[0]
        else:
            x, labels, n_basic = inputs, y, None
        if self.awp is not None:
            self.awp.restore(self.raw_model)
        x_adv = self.adversarial_examples(x, labels, ctx.epoch)
        self.model.train()
        g = self.acfg.awp
        if g.gamma > 0 and ctx.epoch >= g.start_epoch and x_adv is not None:
            if self.awp is None:
                self.awp = AWP(self.raw_model, gamma=g.gamma, lr=g.lr or self.cfg.optim.lr)
            # the authors' AWP loss treats the 2B rows of two views as one batch (no γ)
            self.awp.perturb(self.raw_model, lambda m: self.loss(
                m, x, x_adv, labels, update_prior=False)["loss"])  # fmt: skip
        out = self.loss(self.model, x, x_adv, labels, n_basic=n_basic)
        nb = labels.shape[0] if n_basic is None else n_basic
        return {"loss": out["loss"], "logits": out["logits"][:nb].detach(), "labels": labels[:nb],
                "ce": out["ce"], "robust": out["robust"]}  # fmt: skip

    def before_optimizer_step(self) -> None:
        if self.awp is not None:
            self.awp.restore(self.raw_model)  # the update computed at w + γd applies to w

    def end_epoch(self, ctx: StepContext) -> dict:
        if self.prior is not None:
            self.prior.step()
        e = self.acfg.ema
        if self.ema is not None and ctx.epoch >= e.start_epoch:
            if ctx.epoch == e.start_epoch or self.ema.num_updates == 0:
                self.ema.reset(self.raw_model)
            else:
                self.ema.update(self.raw_model)
        if self.attack is None:
            return {}
        return {"eps": self.attack.schedule(ctx.epoch, self.cfg.train.epochs)[2]}

    def evaluate(self, loader) -> dict | None:
        """PGD accuracy on the test split's first ``pgd_examples`` points, over all ranks: this
        rank's shard holds every ``world``-th point from its rank on, so its first
        ``ceil((n - rank) / world)`` are its share of those points."""
        n_all = self.acfg.eval.pgd_examples
        if n_all <= 0:
            return None
        rank, world = self.ctx.rank, self.ctx.world
        n = max(0, -(-(n_all - rank) // world))
        model, device = self.eval_model(), self.ctx.device
        correct = seen = 0
        with eval_mode(model):
            for xb, yb in loader:
                if seen >= n:
                    break
                xb, yb = xb[: n - seen].to(device), yb[: n - seen].to(device)
                # each point's random start from its own generator, keyed by its place in the
                # test split: the same start on any number of ranks and in any batch
                points = range(rank + world * seen, rank + world * (seen + len(yb)), world)
                starts = [torch.Generator().manual_seed(mix_seed(self.cfg.seed, _PGD_STARTS, i))
                          for i in points]  # fmt: skip
                x_adv = pgd_attack(model, xb, yb, eps=self.acfg.attack.eps,
                                   steps=self.acfg.eval.pgd_steps, generator=starts)  # fmt: skip
                with torch.no_grad():
                    correct += int((model(x_adv).argmax(1) == yb).sum())
                seen += len(yb)
        correct, seen = all_reduce_sum(torch.tensor([correct, seen], dtype=torch.float64)).tolist()
        return {f"pgd{self.acfg.eval.pgd_steps}": 100.0 * correct / max(seen, 1)}

    def summary(self, history: list[dict]) -> dict:
        a = self.acfg
        evaluated = "ema" if self.eval_model() is not self.raw_model else "model"
        return {"adversarial": {"method": a.method, "eps": a.attack.eps,
                                "evaluated_model": evaluated}}  # fmt: skip
