"""The KL divergence from logits: :func:`kl_loss` and :class:`KLLoss`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dkl.losses._common import (
    Loss,
    as_dtype,
    check_call,
    check_impl,
    compute_dtype,
    fused,
    no_autocast,
    use_triton,
    valid_rows,
)
from dkl.losses._function import loss
from dkl.losses.parts import dot, exact_scaled, plus_inf, rowdot, tempered

__all__ = ["KLLoss", "kl_loss"]


class _KL:
    r"""Row-wise ``Σ_j p_j (log p_j - log q_j)``, ``p = σ(z_t / T)``, ``q = σ(z_s / T)``.
    Gradients ``(q - p) / T`` (input) and ``p (log p - log q - KL) / T`` (target)."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.gs_factor = self.gt_factor = 1.0 / temperature

    def prepare(self, s, t):
        return ()

    def fast(self, s, t, consts, gs, gt, rows):
        T = self.temperature
        log_p, p, log_q = tempered(s, t, T)
        diff = log_p.sub_(log_q)  # log_p is not needed any more
        kl = dot(p, diff, rows or gt is not None)
        if gs is not None:  # q - p
            torch.exp(log_q, out=gs).sub_(p)
        if gt is not None:  # p (log p - log q - KL)
            torch.mul(diff.sub_(kl.unsqueeze(1)), p, out=gt)
        return kl if rows or gt is None else kl.sum()

    def exact(self, s, t):
        log_q = F.log_softmax(exact_scaled(s, self.temperature), dim=1)
        log_p = F.log_softmax(exact_scaled(t, self.temperature), dim=1)
        # the classes the target keeps (p > 0: at a tiny T a finite log p can underflow to p = 0,
        # and the student's log q, far below, overflow to -inf; such a class adds 0, not +inf)
        p = log_p.exp()
        kept = p > 0
        missed = kept & torch.isneginf(log_q)  # ... and the student rules out
        diff = torch.where(kept & ~missed, log_p - log_q, log_p.new_zeros(()))
        return plus_inf(missed.any(dim=1), rowdot(p, diff))


def kl_loss(
    input: Tensor,
    target: Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    mask: Tensor | None = None,
    impl: str = "auto",
) -> Tensor:
    r"""KL divergence :math:`\mathrm{KL}(\sigma(z_t/T) \,\|\, \sigma(z_s/T))` from logits.

    .. math::

        \mathrm{KL}_i = \sum_j \sigma(z_{t,i}/T)_j
            \big(\log\sigma(z_{t,i}/T)_j - \log\sigma(z_{s,i}/T)_j\big)

    No :math:`T^2` factor is applied (Hinton-style KD multiplies by it; the recipes say so).
    Gradients reach both ``input`` and ``target`` when they require grad, and second
    derivatives are exact (``create_graph=True``) on the torch path.

    Args:
        input: ``(B, C)`` logits :math:`z_s`.
        target: ``(B, C)`` logits :math:`z_t`.
        temperature: softmax temperature :math:`T > 0`.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        mask: optional bool ``(B,)`` of valid rows; ``"mean"`` divides by their count.
        impl: ``"auto"`` | ``"torch"`` | ``"triton"`` (fused kernel, CUDA only).

    Shape:
        ``(B,)`` for ``reduction="none"``, else a scalar; float32 for half inputs, otherwise the
        wider of the two dtypes.

    Example:
        >>> z_s = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
        >>> z_t = torch.tensor([[2.0, 1.0, 0.0]])
        >>> loss = kl_loss(z_s, z_t)
        >>> loss
        tensor(1.1504, grad_fn=<...>)
        >>> loss.backward()
    """
    T = check_call(input, target, reduction, mask, temperature=temperature)["temperature"]
    if use_triton(impl, input, target, (T,)):
        return fused(
            "kl",
            input,
            target,
            reduction,
            mask,
            alpha=1.0,
            beta=1.0,
            temperature=T,
            weight_temperature=1.0,
            class_weights=None,
        )
    dtype = compute_dtype(input, target)
    with no_autocast(input):
        zs, zt = valid_rows(mask, as_dtype(input, dtype), as_dtype(target, dtype))
        return loss(_KL(T), zs, zt, reduction=reduction, mask=mask)


class KLLoss(Loss):
    """Module form of :func:`kl_loss`.

    Example:
        >>> criterion = KLLoss(temperature=4.0)
        >>> criterion(torch.zeros(2, 5), torch.zeros(2, 5))
        tensor(0.)
    """

    temperature: float

    def __init__(self, *, temperature: float = 1.0, reduction: str = "mean", impl: str = "auto"):
        super().__init__(reduction, temperature=temperature)
        self.impl = check_impl(impl)

    def forward(self, input: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return kl_loss(
            input,
            target,
            temperature=self.temperature,
            reduction=self.reduction,
            mask=mask,
            impl=self.impl,
        )
