r"""Adversarial training: ``standard``, ``pgd_at`` (Madry), ``trades`` and ``ikl_at`` (SPEC §4).

With natural logits :math:`z_{nat} = f(x)`, adversarial logits :math:`z_{adv} = f(x_{adv})` (both
from the training forward, both carrying gradient) and labels :math:`y`:

- ``standard``: :math:`\mathrm{CE}(f(x), y)` (no attack);
- ``pgd_at``:   :math:`\mathrm{CE}(z_{adv}, y)`, attack on CE;
- ``trades``:   :math:`\mathrm{CE}(z_{nat}, y) + \beta\,\mathrm{KL}(\sigma(z_{nat})\,\|\,\sigma(z_{adv}))`
  (β = 6), attack on the same KL;
- ``ikl_at``:   :math:`\mathrm{CE}(z_{nat}, y) + \beta\,\mathrm{wMSE}(z_{nat}, z_{adv}; P[y])
  + \alpha\,\mathrm{sCE}(\sigma(z_{nat}), z_{adv})` (:func:`dkl.ikl_loss`, T = 1 in the sCE), with
  :math:`P` a :class:`dkl.ClassPrior` (T = 4) fed with :math:`z_{nat}` of the training forward and
  stepped at each epoch end; attack on IKL (α = β = 1) or on sCE alone.

All losses are batch means. The adversarial examples come from :class:`dkl.attacks.TrainAttack`
(natural logits computed once per batch, in eval mode, without grad).

Second augmented view (``x_aug``, AutoAugment / Cutout), as the authors' code runs it: both views
are attacked and forwarded as one batch of 2B; the CE term is the mean over all 2B rows, the
robust term is ``robust(basic) + γ · robust(view)``, and only the basic view feeds the prior.

AWP (:class:`AWP`, Wu et al. 2020): from a start epoch, a proxy copy of the model takes one SGD
step on the negated training loss; per weight tensor with more than one dimension the change
``d`` is rescaled to ``‖w‖ · d / ‖d‖`` and ``w + γ·d`` is used for the training forward and
backward. The original weights are written back bit for bit right before the optimiser step (an
optimiser pre-step hook), so the update computed at the perturbed point is applied to the
unperturbed weights. (The authors subtract ``γ·d`` after the step instead; the two differ only in
the weight-decay term, evaluated at ``w`` here and at ``w + γ·d`` there: O(lr·wd·γ·‖w‖).)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dkl.attacks import TrainAttack, eval_mode
from dkl.losses import ikl_loss
from dkl.prior import ClassPrior

__all__ = ["AWP", "AdversarialLoss", "METHODS", "adversarial_loss"]

METHODS = ("standard", "pgd_at", "trades", "ikl_at")
#: the attack loss each method uses unless the config says otherwise
DEFAULT_ATTACK_LOSS = {"pgd_at": "ce", "trades": "kl", "ikl_at": "ikl"}


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"Expected method in {METHODS}, got {method!r}")


def adversarial_loss(
    method: str,
    z_nat: Tensor | None,
    z_adv: Tensor | None,
    labels: Tensor,
    *,
    alpha: float = 4.0,
    beta: float = 20.0,
    trades_beta: float = 6.0,
    class_weights: Tensor | None = None,
    n_basic: int | None = None,
    aug_weight: float = 1.0,
) -> dict[str, Tensor]:
    """The training loss of one batch: ``{"loss", "ce", "robust"}`` (batch means).

    ``n_basic``: with a second view stacked after the basic one (rows ``[:n_basic]`` basic,
    ``[n_basic:]`` view), the robust term is ``robust(basic) + aug_weight · robust(view)``.
    ``class_weights``: ``(B, C)`` GI rows for ``ikl_at``.
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
        # pgd_at: the robust term is the whole loss (CE on the adversarial examples)
        return F.cross_entropy(z_adv[rows], labels[rows])

    robust = robust_part(slice(0, n_basic))
    if n_basic < b:
        robust = robust + aug_weight * robust_part(slice(n_basic, b))
    if method == "pgd_at":
        return {"loss": robust, "ce": robust.detach(), "robust": robust.detach()}
    ce = F.cross_entropy(z_nat, labels)
    return {"loss": ce + robust, "ce": ce.detach(), "robust": robust.detach()}


@dataclass
class AdversarialLoss:
    """One method's whole training step minus the optimiser: attack, forwards, loss, prior.

    Args:
        method: one of :data:`METHODS`.
        num_classes: C (for the prior of ``ikl_at``).
        attack: the training attack (ignored by ``standard``); its ``loss`` must suit the method.
        alpha, beta: sCE / wMSE weights of ``ikl_at`` (CIFAR presets: 4 / 20).
        trades_beta: TRADES' β (6).
        prior_temperature: T of the GI prior (4).
        aug_weight: γ of the second view's robust term (0.3 with AutoAugment).
    """

    method: str
    num_classes: int
    attack: TrainAttack | None = None
    alpha: float = 4.0
    beta: float = 20.0
    trades_beta: float = 6.0
    prior_temperature: float = 4.0
    aug_weight: float = 1.0

    def __post_init__(self) -> None:
        _check_method(self.method)
        if self.method != "standard":
            if self.attack is None:
                self.attack = TrainAttack(loss=DEFAULT_ATTACK_LOSS[self.method])
            if self.method == "pgd_at" and self.attack.loss != "ce":
                raise ValueError(f"pgd_at attacks CE; got attack loss {self.attack.loss!r}")
        self.prior = (ClassPrior(self.num_classes, temperature=self.prior_temperature)
                      if self.method == "ikl_at" else None)

    def class_weights(self, labels: Tensor) -> Tensor | None:
        return None if self.prior is None else self.prior.weights(labels)

    def adversarial_examples(
        self, model: nn.Module, x: Tensor, labels: Tensor, *, epoch: int, epochs: int,
        generator: torch.Generator | None = None,
    ) -> Tensor | None:
        """Attack a batch (``None`` for ``standard``); natural logits computed once, no grad."""
        if self.method == "standard":
            return None
        assert self.attack is not None
        z_nat = None
        if self.attack.needs_natural_logits():
            with torch.no_grad(), eval_mode(model):
                z_nat = model(x)
        return self.attack(model, x, epoch=epoch, epochs=epochs, labels=labels, z_nat=z_nat,
                           class_weights=self.class_weights(labels), generator=generator)

    def loss(
        self, model: nn.Module, x: Tensor, x_adv: Tensor | None, labels: Tensor, *,
        n_basic: int | None = None, update_prior: bool = True,
    ) -> dict[str, Any]:
        """Training forward(s) of ``model`` (its current mode) and the loss; feeds the prior."""
        if self.method == "pgd_at":
            z_nat, z_adv = None, model(x_adv)
        elif self.method == "standard":
            z_nat, z_adv = model(x), None
        else:
            z_nat, z_adv = model(x), model(x_adv)
        out = adversarial_loss(
            self.method, z_nat, z_adv, labels, alpha=self.alpha, beta=self.beta,
            trades_beta=self.trades_beta, class_weights=self.class_weights(labels),
            n_basic=n_basic, aug_weight=self.aug_weight,
        )
        if update_prior and self.prior is not None:
            nb = labels.shape[0] if n_basic is None else n_basic
            self.prior.update(z_nat[:nb].detach(), labels[:nb])
        out["logits"] = (z_nat if z_nat is not None else z_adv)
        out["logits_adv"] = z_adv
        return out


class AWP:
    """Adversarial weight perturbation with a proxy model (see the module docstring).

    Args:
        model: the trained model (unwrapped); the proxy is a deep copy of it.
        gamma: relative size γ of the perturbation (0.005).
        lr: learning rate of the proxy's single SGD step (the authors: the run's initial lr).

    Use per step: ``awp.perturb(model, loss_fn)`` (``loss_fn(m) -> scalar`` is the training loss
    of the batch on ``m``), forward/backward on the perturbed model, then ``awp.restore(model)``
    before ``optimizer.step()`` (or ``awp.restore_before_step(optimizer, model)`` to have the
    optimiser do it).
    """

    def __init__(self, model: nn.Module, *, gamma: float = 0.005, lr: float = 0.1) -> None:
        if not gamma >= 0:
            raise ValueError(f"Expected gamma >= 0, got {gamma}")
        if not lr > 0:
            raise ValueError(f"Expected lr > 0, got {lr}")
        self.gamma = float(gamma)
        self.proxy = copy.deepcopy(model)
        self.proxy_optim = torch.optim.SGD(self.proxy.parameters(), lr=lr)
        self._backup: dict[str, Tensor] | None = None
        self._hook = None

    @staticmethod
    def _perturbable(model: nn.Module) -> dict[str, Tensor]:
        # weights with more than one dimension: conv kernels and linear matrices, not BN or biases
        return {n: p for n, p in model.named_parameters() if p.dim() > 1}

    def compute(self, model: nn.Module, loss_fn) -> dict[str, Tensor]:  # noqa: ANN001
        """The per-layer perturbation direction ``‖w‖ · d / ‖d‖`` from one proxy step on −loss."""
        self.proxy.load_state_dict(model.state_dict())
        self.proxy.train()
        loss = -loss_fn(self.proxy)
        self.proxy_optim.zero_grad(set_to_none=True)
        loss.backward()
        self.proxy_optim.step()
        proxy_params = dict(self.proxy.named_parameters())
        diff = {}
        with torch.no_grad():
            for name, w in self._perturbable(model).items():
                d = proxy_params[name].detach() - w.detach()
                diff[name] = w.norm() / (d.norm() + 1e-20) * d
        return diff

    @torch.no_grad()
    def apply(self, model: nn.Module, diff: dict[str, Tensor]) -> None:
        """Save the weights, then add ``γ · diff``."""
        if self._backup is not None:
            raise RuntimeError("AWP.apply: the model is already perturbed; restore() first")
        params = dict(model.named_parameters())
        self._backup = {n: params[n].detach().clone() for n in diff}
        for n, d in diff.items():
            params[n].add_(d, alpha=self.gamma)

    def perturb(self, model: nn.Module, loss_fn) -> None:  # noqa: ANN001
        self.apply(model, self.compute(model, loss_fn))

    @property
    def active(self) -> bool:
        return self._backup is not None

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Write the saved weights back exactly; a no-op when nothing is perturbed."""
        if self._backup is None:
            return
        params = dict(model.named_parameters())
        for n, w in self._backup.items():
            params[n].copy_(w)
        self._backup = None

    def restore_before_step(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        """Restore right before the next ``optimizer.step()`` (a one-shot pre-step hook)."""
        if self._hook is not None:
            self._hook.remove()

        def hook(opt, args, kwargs):  # noqa: ANN001
            self.restore(model)
            if self._hook is not None:
                self._hook.remove()
                self._hook = None

        self._hook = optimizer.register_step_pre_hook(hook)
