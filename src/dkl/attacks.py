r"""L∞ attacks: the training attack of IKL-AT / TRADES / PGD-AT and PGD / FGSM for evaluation.

All attacks work in pixel space: inputs are in :math:`[0, 1]` and normalisation lives inside the
model (:func:`dkl.models.with_normalization`), so the ε-ball is the true one. Every attack puts the
model in eval mode while it runs and restores the previous mode afterwards, and takes gradients
with :func:`torch.autograd.grad` with respect to the input only (parameter ``.grad`` is untouched).

Training attack, as in the IKL-AT authors' training script::

    x_0     = x + 0.001 · N(0, 1)                      (init="normal"; "uniform" = U(-ε, ε), Madry)
    x_{k+1} = Π_{[0,1]} Π_{B_ε(x)} (x_k + a · sign(∇_x L(f(x_k), z_nat, y)))

The normal start is not projected: the first gradient is taken at ``x + 0.001·N(0, 1)`` itself,
which may lie a little outside [0, 1], as in the TRADES and IKL-AT code; every step after it is
projected. The uniform start is clipped to [0, 1] before the first step.

with the natural logits ``z_nat`` computed **once** per batch (eval mode, no grad) and passed in:
the model is in eval mode and ``x`` does not change, so recomputing them at every step (as the
authors' code does) gives the same numbers at one extra forward per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dkl.losses import gkl_loss, ikl_loss

__all__ = [
    "ATTACK_LOSSES",
    "BUDGETS",
    "TrainAttack",
    "attack_budget",
    "attack_loss",
    "epsilon_schedule",
    "eval_mode",
    "fgsm_attack",
    "perturb",
    "pgd_attack",
]

#: budget name -> (steps, step size as a fraction of ε). "high" is what the authors effectively ran
#: (their staged schedule collapses to its last stage because its ``if``\ s are not ``elif``\ s).
#: "pgd10" (10 steps of ε/4 = 2/255 at 8/255) is the usual PGD-AT / TRADES baseline attack.
BUDGETS: dict[str, tuple[int, float]] = {"low": (2, 1.0), "high": (5, 0.5), "pgd10": (10, 0.25)}

#: attack losses of the training attack (all maximised).
ATTACK_LOSSES = ("ikl", "gkl", "sce", "ce", "kl")
_INITS = ("normal", "uniform", "none")


class eval_mode:
    """``with eval_mode(model):`` puts ``model`` in eval mode and restores its previous mode after.

    Restores per module, so a model whose submodules were in mixed modes comes back unchanged.

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    >>> with eval_mode(m):
    ...     m.training
    False
    >>> m.training
    True
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self._modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, mode in self._modes:
            m.training = mode


def input_gradient(loss: Tensor, x: Tensor) -> Tensor:
    """``d loss / d x``, zero where the loss does not depend on ``x`` at all (a model with an
    ``argmax`` or a ``detach`` inside): the attack then stands still, and the gradient-masking
    check names the model, where ``torch.autograd.grad`` raised from deep inside."""
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def _check_epoch(epoch: int, epochs: int) -> None:
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"Expected epochs >= 1, got {epochs!r}")
    if not (isinstance(epoch, int) and 1 <= epoch <= epochs):
        raise ValueError(f"Expected epoch in [1, {epochs}] (epochs count from 1), got {epoch!r}")


def epsilon_schedule(
    epoch: int, epochs: int, *, max_eps: float = 8 / 255, fixed: bool = False
) -> float:
    r"""ε of epoch ``epoch`` (counted from 1): :math:`\varepsilon_e = \varepsilon_{max} \cdot e / E`.

    ``fixed=True`` returns ``max_eps`` for every epoch.

    >>> epsilon_schedule(1, 4, max_eps=0.4), epsilon_schedule(4, 4, max_eps=0.4)
    (0.1, 0.4)
    >>> epsilon_schedule(1, 4, max_eps=0.4, fixed=True)
    0.4
    """
    _check_epoch(epoch, epochs)
    if not max_eps >= 0:
        raise ValueError(f"Expected max_eps >= 0, got {max_eps}")
    return float(max_eps) if fixed else float(max_eps) * epoch / epochs


def attack_budget(budget: str, eps: float) -> tuple[int, float]:
    """``(steps, step_size)`` of a budget at ε: "low" = 2 steps of ε, "high" = 5 steps of ε/2.

    >>> attack_budget("high", 0.1)
    (5, 0.05)
    """
    if budget not in BUDGETS:
        raise ValueError(f"Expected budget in {tuple(BUDGETS)}, got {budget!r}")
    steps, frac = BUDGETS[budget]
    return steps, eps * frac


def attack_loss(
    kind: str,
    z_adv: Tensor,
    *,
    z_nat: Tensor | None = None,
    labels: Tensor | None = None,
    class_weights: Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> Tensor:
    r"""Summed attack objective (the attack ascends it), one of :data:`ATTACK_LOSSES`.

    * ``"ikl"``: :math:`\beta\,\mathrm{wMSE}(z_{nat}, z_{adv}; w) + \alpha\,\mathrm{sCE}`
      (:func:`dkl.ikl_loss`, ``class_weights`` = GI rows; IKL-AT on CIFAR-100, α = β = 1);
    * ``"gkl"``: :func:`dkl.gkl_loss` with weights ``class_weights ** gamma`` (GKL-AT, the
      authors' DKLv2: α = β = γ = 1), times the batch size;
    * ``"sce"``: :math:`-\sum_j \sigma(z_{nat})_j \log\sigma(z_{adv})_j` (IKL-AT on CIFAR-10);
    * ``"kl"``: :math:`\mathrm{KL}(\sigma(z_{nat}) \,\|\, \sigma(z_{adv}))` (TRADES);
    * ``"ce"``: :math:`\mathrm{CE}(z_{adv}, y)` (PGD-AT).

    Summed over the batch: rows are independent, so the sign of each row's gradient is the same
    as with a mean, and the sum does not shrink with the batch.
    """
    if kind not in ATTACK_LOSSES:
        raise ValueError(f"Expected attack loss in {ATTACK_LOSSES}, got {kind!r}")
    if kind == "ce":
        if labels is None:
            raise ValueError("attack loss 'ce' needs labels")
        return F.cross_entropy(z_adv, labels, reduction="sum")
    if z_nat is None:
        raise ValueError(f"attack loss {kind!r} needs the natural logits z_nat")
    z_nat = z_nat.detach()
    if kind == "gkl":  # the batch mean times B: the same per-row gradient signs as a sum
        mean = gkl_loss(
            z_adv, z_nat, alpha=alpha, beta=beta, gamma=gamma, class_weights=class_weights
        )
        return mean * z_adv.shape[0]
    if kind == "ikl":
        # class_weights None: per-sample weights softmax(z_nat)
        return ikl_loss(
            z_adv, z_nat, alpha=alpha, beta=beta, class_weights=class_weights, reduction="sum"
        )
    log_p_adv = F.log_softmax(z_adv, dim=1)
    if kind == "sce":
        return -(F.softmax(z_nat, dim=1) * log_p_adv).sum()
    return F.kl_div(log_p_adv, F.log_softmax(z_nat, dim=1), reduction="sum", log_target=True)


def _project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    # ε-ball first, then the image box: the result is inside both because x itself is in [0, 1].
    return torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)


def _check_images(x: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(
            f"Expected a floating-point image tensor, got {getattr(x, 'dtype', type(x))}"
        )
    if x.numel():
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                "Expected inputs in [0, 1] (normalisation belongs inside the model), got values "
                f"in [{lo:.3g}, {hi:.3g}]"
            )


def _draw(fn: Callable[..., Tensor], x: Tensor, generator: Any) -> Tensor:
    """``fn`` (``torch.rand`` / ``torch.randn``) of ``x``'s shape, from one generator or one per row."""
    if generator is None or isinstance(generator, torch.Generator):
        return fn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    rows = [fn(x.shape[1:], generator=g, dtype=x.dtype) for g in generator]
    return torch.stack(rows).to(x.device) if rows else fn(x.shape, device=x.device, dtype=x.dtype)


def perturb(
    model: nn.Module,
    x: Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    loss_fn: Callable[[Tensor], Tensor],
    init: str = "normal",
    init_std: float = 0.001,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Generic L∞ signed-gradient ascent on ``loss_fn(model(x_adv))``; returns a detached ``x_adv``.

    The model runs in eval mode and is restored to its previous mode(s). ``init`` is ``"normal"``
    (``x + init_std·N(0,1)``, as in the TRADES and IKL-AT code), ``"uniform"`` (``U(-ε, ε)``) or
    ``"none"``. The normal start is not projected before the first step (as in the TRADES and
    IKL-AT code); the uniform one is. With ``steps = 0`` the projected start point is returned.
    ``generator``: one for the batch, or one (CPU) generator per row of ``x``, whose start then
    depends on that generator alone, not on the batch the row is in (nor on the rank).
    """
    _check_images(x)
    if init not in _INITS:
        raise ValueError(f"Expected init in {_INITS}, got {init!r}")
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"Expected steps >= 0, got {steps!r}")
    if not eps >= 0 or not step_size >= 0:
        raise ValueError(f"Expected eps >= 0 and step_size >= 0, got {eps}, {step_size}")
    if generator is not None and not isinstance(generator, torch.Generator):
        generator = list(generator)  # one per row (an iterator too)
        if len(generator) != x.shape[0]:
            raise ValueError(f"Expected one generator per row ({x.shape[0]}), got {len(generator)}")
    x = x.detach()
    if init == "normal":
        noise = _draw(torch.randn, x, generator)
        x_adv = x + init_std * noise
    elif init == "uniform":
        noise = _draw(torch.rand, x, generator)
        x_adv = _project(x + eps * (2 * noise - 1), x, eps)
    else:
        x_adv = x.clone()
    if steps == 0:
        return _project(x_adv, x, eps)
    with eval_mode(model), torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = loss_fn(model(x_adv))
            grad = input_gradient(loss, x_adv)
            x_adv = _project(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


@dataclass
class TrainAttack:
    """The attack of one training batch, configured once per run.

    Args:
        loss: attack objective, see :func:`attack_loss`.
        budget: ``"low"`` (2 steps of ε_e) or ``"high"`` (5 steps of ε_e / 2).
        max_eps: ε at the last epoch (8/255 on CIFAR).
        fixed_eps: use ``max_eps`` in every epoch instead of the linear ramp.
        init: start point, ``"normal"`` (TRADES, IKL-AT) or ``"uniform"`` (Madry's PGD-AT).
        init_std: std of the normal start.
        alpha, beta: sCE / wMSE weights of the ``"ikl"`` and ``"gkl"`` objectives (α = β = 1 in
            the authors' CIFAR-100 attack).
        gamma: weight exponent of the ``"gkl"`` objective (1 in the authors' attack).
        step_size: an absolute step size that replaces the budget's fraction of ε (0: the
            budget's; TRADES' own script: 0.007 at ε = 0.031).

    >>> atk = TrainAttack(loss="sce", budget="high", max_eps=8 / 255)
    >>> atk.schedule(100, 200)
    (5, 0.0078431..., 0.0156862...)
    """

    loss: str = "ikl"
    budget: str = "high"
    max_eps: float = 8 / 255
    fixed_eps: bool = False
    init: str = "normal"
    init_std: float = 0.001
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    step_size: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in ATTACK_LOSSES:
            raise ValueError(f"Expected attack loss in {ATTACK_LOSSES}, got {self.loss!r}")
        if self.budget not in BUDGETS:
            raise ValueError(f"Expected budget in {tuple(BUDGETS)}, got {self.budget!r}")
        if self.init not in _INITS:
            raise ValueError(f"Expected init in {_INITS}, got {self.init!r}")
        if not self.max_eps >= 0:
            raise ValueError(f"Expected max_eps >= 0, got {self.max_eps}")
        if not self.step_size >= 0:
            raise ValueError(f"Expected step_size >= 0 (0: the budget's), got {self.step_size}")

    def schedule(self, epoch: int, epochs: int) -> tuple[int, float, float]:
        """``(steps, step_size, eps)`` for epoch ``epoch`` of ``epochs`` (counted from 1)."""
        eps = epsilon_schedule(epoch, epochs, max_eps=self.max_eps, fixed=self.fixed_eps)
        steps, step_size = attack_budget(self.budget, eps)
        return steps, self.step_size or step_size, eps

    def needs_natural_logits(self) -> bool:
        return self.loss != "ce"

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        *,
        epoch: int,
        epochs: int,
        labels: Tensor | None = None,
        z_nat: Tensor | None = None,
        class_weights: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Adversarial examples for a batch. ``z_nat`` (no grad) is computed here if not given."""
        steps, step_size, eps = self.schedule(epoch, epochs)
        if self.needs_natural_logits() and z_nat is None:
            with torch.no_grad(), eval_mode(model):
                z_nat = model(x)
        if z_nat is not None:
            z_nat = z_nat.detach()

        def loss_fn(z_adv: Tensor) -> Tensor:
            return attack_loss(
                self.loss,
                z_adv,
                z_nat=z_nat,
                labels=labels,
                class_weights=class_weights,
                alpha=self.alpha,
                beta=self.beta,
                gamma=self.gamma,
            )

        return perturb(
            model,
            x,
            eps=eps,
            steps=steps,
            step_size=step_size,
            loss_fn=loss_fn,
            init=self.init,
            init_std=self.init_std,
            generator=generator,
        )


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    *,
    eps: float = 8 / 255,
    steps: int = 20,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Tensor:
    """PGD-k evaluation attack: CE, uniform random start, step ``eps/4`` (2/255 at 8/255) by default."""
    step_size = eps / 4 if step_size is None else step_size
    return perturb(
        model,
        x,
        eps=eps,
        steps=steps,
        step_size=step_size,
        loss_fn=lambda z: F.cross_entropy(z, labels, reduction="sum"),
        init="uniform" if random_start else "none",
        generator=generator,
    )


def fgsm_attack(model: nn.Module, x: Tensor, labels: Tensor, *, eps: float = 8 / 255) -> Tensor:
    """FGSM: one signed step of size ε on CE from the clean input."""
    return perturb(
        model,
        x,
        eps=eps,
        steps=1,
        step_size=eps,
        init="none",
        loss_fn=lambda z: F.cross_entropy(z, labels, reduction="sum"),
    )
