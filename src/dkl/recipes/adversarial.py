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

__all__ = ["AWP", "METHODS", "AdversarialLoss", "adversarial_loss"]

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

    def compute(self, model: nn.Module, loss_fn) -> dict[str, Tensor]:
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

    def perturb(self, model: nn.Module, loss_fn) -> None:
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

        def hook(opt, args, kwargs):
            self.restore(model)
            if self._hook is not None:
                self._hook.remove()
                self._hook = None

        self._hook = optimizer.register_step_pre_hook(hook)


# --------------------------------------------------------------------------------------------
# The recipe: `recipe: adversarial`, section `adversarial:`
# --------------------------------------------------------------------------------------------
from dataclasses import field
from pathlib import Path
from typing import Literal

from dkl.config import register_section
from dkl.ema import ModelEMA
from dkl.engine import Recipe, StepContext
from dkl.recipes import register_recipe


@dataclass
class AttackConfig:
    loss: str = ""  # ikl | sce | kl | ce; empty: the method's own (ikl_at: ikl, trades: kl, pgd_at: ce)
    budget: str = "high"  # low: 2 steps of eps_e; high: 5 steps of eps_e / 2
    eps: float = 8 / 255  # eps at the last epoch (ramped 8/255 * e / E unless fixed_eps)
    fixed_eps: bool = False
    init: str = ""  # normal (x + 0.001 N(0,1)) | uniform; empty: uniform for pgd_at, else normal
    alpha: float = 1.0  # ikl attack loss: sCE weight
    beta: float = 1.0  # ikl attack loss: wMSE weight


@dataclass
class AWPConfig:
    gamma: float = 0.0  # 0: off; the SPEC's 0.005
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
    method: Literal["standard", "pgd_at", "trades", "ikl_at"] = "ikl_at"
    alpha: float = 4.0  # ikl_at: sCE weight
    beta: float = 20.0  # ikl_at: wMSE weight
    trades_beta: float = 6.0
    prior_temperature: float = 4.0
    attack: AttackConfig = field(default_factory=AttackConfig)
    aug_view: Literal["", "autoaugment", "cutout"] = ""  # a second augmented view (CIFAR only)
    aug_weight: float = 0.3  # gamma of the second view's robust term
    awp: AWPConfig = field(default_factory=AWPConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: RobustEvalConfig = field(default_factory=RobustEvalConfig)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"adversarial.method: expected one of {METHODS}, got {self.method!r}")
        if not 0.0 <= self.ema.tau < 1.0:
            raise ValueError(f"adversarial.ema.tau: expected [0, 1), got {self.ema.tau}")


register_section("adversarial", AdversarialConfig)


class _TwoViews:
    """A transform returning ``(basic(img), view(img))``: the second-view batches of the authors."""

    def __init__(self, basic, view) -> None:
        self.basic, self.view = basic, view

    def __call__(self, img):
        return self.basic(img), self.view(img)


class _Cutout:
    """Zero one random ``length``×``length`` square (clipped at the border) of a (C, H, W) tensor."""

    def __init__(self, length: int = 16) -> None:
        self.length = length

    def __call__(self, img: Tensor) -> Tensor:
        _, h, w = img.shape
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(cy - self.length // 2, 0), min(cy + self.length // 2, h)
        x0, x1 = max(cx - self.length // 2, 0), min(cx + self.length // 2, w)
        img = img.clone()
        img[:, y0:y1, x0:x1] = 0.0
        return img


def _install_second_view(train_set, kind: str) -> None:
    base = getattr(train_set, "base", train_set)
    if not hasattr(base, "transform") or base.transform is None:
        raise ValueError(
            f"adversarial.aug_view={kind!r} needs a torchvision image data set (cifar10/cifar100)"
        )
    from torchvision import transforms as T

    crop_flip = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    if kind == "autoaugment":
        view = T.Compose([*crop_flip, T.AutoAugment(T.AutoAugmentPolicy.CIFAR10), T.ToTensor()])
    else:
        view = T.Compose([*crop_flip, T.ToTensor(), _Cutout(16)])
    base.transform = _TwoViews(base.transform, view)


@register_recipe("adversarial")
class AdversarialRecipe(Recipe):
    """Adversarial training (``standard`` / ``pgd_at`` / ``trades`` / ``ikl_at``), see the module doc.

    The attack runs on the unwrapped model (eval mode: no DDP synchronisation is needed for it);
    the training forwards go through the engine's (possibly DDP-wrapped) model. The model that is
    evaluated and exported is the epoch-level EMA once it has started.
    """

    def __init__(self, cfg, engine) -> None:
        super().__init__(cfg, engine)
        a: AdversarialConfig = cfg.adversarial
        a.validate()
        self.acfg = a
        attack = None
        if a.method != "standard":
            loss = a.attack.loss or DEFAULT_ATTACK_LOSS[a.method]
            init = a.attack.init or ("uniform" if a.method == "pgd_at" else "normal")
            attack = TrainAttack(loss=loss, budget=a.attack.budget, max_eps=a.attack.eps,
                                 fixed_eps=a.attack.fixed_eps, init=init,
                                 alpha=a.attack.alpha, beta=a.attack.beta)
        self.task = AdversarialLoss(a.method, engine.info.num_classes, attack=attack,
                                    alpha=a.alpha, beta=a.beta, trades_beta=a.trades_beta,
                                    prior_temperature=a.prior_temperature,
                                    aug_weight=a.aug_weight)
        if self.task.prior is not None:
            self.task.prior.to(engine.device)
        if a.aug_view and not getattr(engine, "eval_only", False):
            _install_second_view(engine.train_set, a.aug_view)
        self.awp: AWP | None = None
        self.ema: ModelEMA | None = None
        self._ema_state: dict | None = None
        self.last_eps = 0.0

    # models -------------------------------------------------------------------------------
    def _ensure_ema(self) -> ModelEMA:
        if self.ema is None:
            self.ema = ModelEMA(self.raw_model, self.acfg.ema.tau)
        return self.ema

    def eval_model(self) -> nn.Module:
        if self.ema is not None and self.ema.num_updates > 0:
            return self.ema.module
        return self.raw_model

    # steps --------------------------------------------------------------------------------
    def train_step(self, batch: Any, ctx: StepContext) -> dict:
        inputs, y = batch
        if isinstance(inputs, (list, tuple)):  # (basic, second view)
            x_basic, x_view = inputs
            x = torch.cat([x_basic, x_view])
            labels = torch.cat([y, y])
            n_basic = y.shape[0]
        else:
            x, labels, n_basic = inputs, y, None
        epochs = self.cfg.train.epochs
        if self.awp is not None:
            self.awp.restore(self.raw_model)  # a skipped optimiser step (fp16 overflow) left it
        x_adv = self.task.adversarial_examples(self.raw_model, x, labels, epoch=ctx.epoch,
                                               epochs=epochs)
        if self.task.attack is not None:
            self.last_eps = self.task.attack.schedule(ctx.epoch, epochs)[2]
        model = self.model
        model.train()
        g = self.acfg.awp
        if g.gamma > 0 and ctx.epoch >= g.start_epoch and x_adv is not None:
            if self.awp is None:
                self.awp = AWP(self.raw_model, gamma=g.gamma, lr=g.lr or self.cfg.optim.lr)
            self.awp.perturb(self.raw_model, lambda m: self.task.loss(
                m, x, x_adv, labels, n_basic=n_basic, update_prior=False)["loss"])
            self.awp.restore_before_step(self.engine.optimizer, self.raw_model)
        out = self.task.loss(model, x, x_adv, labels, n_basic=n_basic)
        nb = labels.shape[0] if n_basic is None else n_basic
        return {"loss": out["loss"], "logits": out["logits"][:nb].detach(), "labels": labels[:nb],
                "ce": out["ce"], "robust": out["robust"]}

    def end_epoch(self, ctx: StepContext) -> dict:
        extra: dict[str, Any] = {}
        if self.task.prior is not None:
            self.task.prior.step()
        e = self.acfg.ema
        if e.tau > 0 and ctx.epoch >= e.start_epoch:
            ema = self._ensure_ema()
            if ctx.epoch == e.start_epoch or ema.num_updates == 0:
                ema.reset(self.raw_model)
            else:
                ema.update(self.raw_model)
        if self.task.attack is not None:
            extra["eps"] = self.last_eps
        return extra

    def evaluate(self, loader) -> dict | None:
        n = self.acfg.eval.pgd_examples
        if n <= 0:
            return None
        from dkl.attacks import pgd_attack

        model = self.eval_model()
        eps = self.acfg.attack.eps
        correct = seen = 0
        g = torch.Generator(device=self.engine.device).manual_seed(self.cfg.seed)
        with eval_mode(model):
            for xb, yb in loader:
                if seen >= n:
                    break
                xb = xb[: n - seen].to(self.engine.device)
                yb = yb[: n - seen].to(self.engine.device)
                x_adv = pgd_attack(model, xb, yb, eps=eps, steps=self.acfg.eval.pgd_steps,
                                   generator=g)
                with torch.no_grad():
                    correct += int((model(x_adv).argmax(1) == yb).sum())
                seen += len(yb)
        return {f"pgd{self.acfg.eval.pgd_steps}": 100.0 * correct / max(seen, 1)}

    # state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        s: dict[str, Any] = {"last_eps": self.last_eps}
        if self.task.prior is not None:
            s["prior"] = self.task.prior.state_dict()
        if self.ema is not None:
            s["ema"] = self.ema.state_dict()
        return s

    def load_state_dict(self, state: dict) -> None:
        self.last_eps = float(state.get("last_eps", 0.0))
        if self.task.prior is not None and "prior" in state:
            self.task.prior.load_state_dict(state["prior"])
        if "ema" in state:
            self._ensure_ema().load_state_dict(state["ema"])

    def rank_state(self) -> dict:
        return {"prior": self.task.prior.running_state()} if self.task.prior is not None else {}

    def load_rank_state(self, state: dict) -> None:
        if self.task.prior is not None and "prior" in state:
            self.task.prior.load_running_state(state["prior"])

    def summary(self) -> dict:
        a = self.acfg
        return {"adversarial": {
            "method": a.method, "eps": a.attack.eps,
            "evaluated_model": "ema" if self.eval_model() is not self.raw_model else "model",
        }}


# --------------------------------------------------------------------------------------------
# Command line: `dkl robust RUN` and `dkl demo --recipe adversarial`
# --------------------------------------------------------------------------------------------
def _robust_args(p) -> None:
    p.add_argument("target", help="a run folder (uses final.pt: the EMA) or a dkl checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides (data.root=..., device=cpu)")
    p.add_argument("--n-examples", type=int, default=None, help="first N test points (default: all)")
    p.add_argument("--version", choices=["standard", "fast"], default="standard",
                   help="AutoAttack version; 'fast' (APGD-CE + APGD-T) is NON-STANDARD")
    p.add_argument("--eps", type=float, default=None,
                   help="L-inf radius (default: the run's adversarial.attack.eps, else 8/255)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["auto", "official", "torchattacks"], default="auto")
    p.add_argument("--sanity", choices=["raise", "warn", "off"], default="raise",
                   help="gradient-masking check (default: fail loudly)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _robust_run(args) -> int:
    import json
    import sys

    from dkl.config import ConfigError
    from dkl.robust import GradientMaskingError, evaluate_run, format_table

    try:
        res = evaluate_run(args.target, n_examples=args.n_examples, version=args.version,
                           eps=args.eps, batch_size=args.batch_size, seed=args.seed,
                           backend=args.backend, sanity=args.sanity, overrides=args.overrides,
                           log=None if args.json else print)
    except GradientMaskingError as e:
        print(f"dkl: gradient masking: {e}", file=sys.stderr)
        return 3
    except (ConfigError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"dkl: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(format_table({res["run"]: res}))
        print(f"{res['label']}; L∞ ε = {res['eps']:.5f}; {res['n_examples']} of {res['n_total']} "
              f"test points; backend {res['backend']}; seed {res['seed']}; "
              f"-> {Path(res['checkpoint']).parent / 'robust.json'}")
    return 0


def _demo_args(p) -> None:
    g = p.add_argument_group("adversarial demo")
    g.add_argument("--adv-methods", default="standard,ikl_at",
                   help="digits presets to compare (default standard,ikl_at; also trades, pgd_at)")
    g.add_argument("--adv-n-examples", type=int, default=None,
                   help="test points for AutoAttack (default: all 450)")
    g.add_argument("--adv-version", choices=["standard", "fast"], default="standard")


def run_demo(out: str = "runs/demo_adversarial", *, methods=("standard", "ikl_at"), seeds: int = 1,
             n_examples: int | None = None, version: str = "standard", log=print) -> str:
    """Train the digits presets, evaluate clean / PGD-20 / AutoAttack, return a markdown table."""
    import statistics

    from dkl.config import load_config
    from dkl.engine import Engine
    from dkl.robust import evaluate_run

    rows = []
    for method in methods:
        per_seed = []
        for seed in range(seeds):
            name = f"digits_{method}_s{seed}"
            cfg = load_config(f"adversarial/digits_{method}",
                              [f"seed={seed}", f"name={name}", f"train.out_dir={out}",
                               "train.overwrite=true", "train.progress=false"])
            log(f"== training {name}")
            Engine(cfg, log=lambda m: None).fit()
            res = evaluate_run(Path(out) / name, n_examples=n_examples, version=version,
                               progress=False, log=None)
            log(f"   clean {res['clean']:.2f}  PGD-20 {res['pgd20']:.2f}  "
                f"{res['label'].split(' (')[0]} {res['autoattack']:.2f}")
            per_seed.append(res)

        def ms(key: str, per_seed: list = per_seed) -> str:
            vals = [r[key] for r in per_seed]
            sd = f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
            return f"{statistics.mean(vals):.2f}{sd}"

        rows.append((method, per_seed[0], ms("clean"), ms("pgd20"), ms("autoattack")))
    r0 = rows[0][1]
    aa = "AutoAttack" + ("" if r0["standard"] else " (fast, NON-STANDARD)")
    head = (f"Digits, MLP, L∞ ε = {r0['eps']:g}, {r0['n_examples']} of {r0['n_total']} test points, "
            f"{seeds} seed(s), evaluated model: EMA of the weights; {r0['label']}, "
            f"backend {r0['backend']}\n\n| method | clean | PGD-20 | {aa} |\n|---|---|---|---|")
    table = "\n".join([head] + [f"| {m} | {c} | {p} | {a} |" for m, _, c, p, a in rows])
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "robust_table.md").write_text(table + "\n")
    log(table)
    return table


def _demo_run(args) -> int:
    out = args.out if args.out != "runs/demo" else "runs/demo_adversarial"
    methods = [m.strip() for m in args.adv_methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(f"dkl: error: unknown method(s) {bad}; expected some of {METHODS}")
        return 2
    run_demo(out, methods=methods, seeds=args.seeds, n_examples=args.adv_n_examples,
             version=args.adv_version)
    return 0


def _register_cli() -> None:
    try:
        from dkl.cli import register_command, register_demo
    except ImportError:  # pragma: no cover
        return
    register_command("robust", "clean / PGD-20 / AutoAttack accuracy of a run (SPEC §4)",
                     _robust_args, _robust_run)
    register_demo("adversarial", "digits adversarial training: standard vs IKL-AT, robustness",
                  _demo_run, _demo_args)


_register_cli()
