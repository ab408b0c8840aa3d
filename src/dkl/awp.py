r"""Adversarial weight perturbation (AWP, Wu et al. 2020) with a proxy model.

A proxy copy of the model takes one SGD step on the negated training loss; per weight tensor with more than one dimension the change
``d`` is rescaled to ``‖w‖ · d / ‖d‖`` and ``w + γ·d`` is used for the training forward and
backward. The original weights are written back bit for bit right before the optimiser step
(:meth:`AWP.restore`), so the update computed at the perturbed point is applied to the
unperturbed weights. (The authors subtract ``γ·d`` after the step instead; the two differ only in
the weight-decay term, evaluated at ``w`` here and at ``w + γ·d`` there: O(lr·wd·γ·‖w‖).)
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["AWP"]


class AWP:
    """Adversarial weight perturbation with a proxy model (see the module docstring).

    Args:
        model: the trained model (unwrapped); the proxy is a deep copy of it.
        gamma: relative size γ of the perturbation (0.005).
        lr: learning rate of the proxy's single SGD step (the authors: the run's initial lr).

    Use per step: ``awp.perturb(model, loss_fn)`` (``loss_fn(m) -> scalar`` is the training loss
    of the batch on ``m``), forward/backward on the perturbed model, then ``awp.restore(model)``
    before ``optimizer.step()``.
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
