"""Decoupled KL (Theorem 1 of Cui et al., NeurIPS 2024): :func:`dkl_loss` and :class:`DKLLoss`."""

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
from dkl.losses.kl import kl_loss  # noqa: F401  (Theorem 1 in the example compares the two)
from dkl.losses.parts import (
    dot,
    exact_scaled,
    plus_inf,
    sce_exact,
    tempered,
    wmse_exact,
    wmse_unit,
)

__all__ = ["DKLLoss", "dkl_loss"]


class _DKL:
    r"""``β wMSE(u_t, sg(u_s); sg(p)) + α sCE``, ``u = z / T``, ``p = σ(u_t)``: the target gets the
    wMSE's gradient ``β W p (e - ē) / T``, the input the sCE's ``α (q - p) / T``."""

    def __init__(self, alpha: float, beta: float, temperature: float) -> None:
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.gs_factor, self.gt_factor = alpha / temperature, beta / temperature

    def prepare(self, s, t):
        return ()

    def fast(self, s, t, consts, gs, gt, rows):
        T = self.temperature
        log_p, p, log_q = tempered(s, t, T)
        per_row = dot(p, log_q, rows).mul_(-self.alpha)
        # the gaps u_t - u_s up to a per-row shift, and W = Σ p = 1
        wmse, wc = wmse_unit(log_p.sub_(log_q), p, rows)
        per_row.add_(wmse, alpha=0.5 * self.beta)
        if gs is not None:  # q - p, from the sCE alone
            torch.exp(log_q, out=gs).sub_(p)
        if gt is not None:  # p (e - ē), from the wMSE alone
            gt.copy_(wc)
        return per_row

    def exact(self, s, t):
        us, ut = exact_scaled(s, self.temperature), exact_scaled(t, self.temperature)
        p = F.softmax(ut.detach(), dim=1)
        kept = p > 0  # as in kl_loss: a class whose p underflows adds 0, whatever u_s is
        wmse, missed = wmse_exact(ut, us.detach(), p, kept)
        sce, missed_too = sce_exact(F.log_softmax(us, dim=1), p)
        return plus_inf(missed | missed_too, self.beta * wmse + self.alpha * sce)


def dkl_loss(
    input: Tensor,
    target: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    temperature: float = 1.0,
    reduction: str = "mean",
    mask: Tensor | None = None,
    impl: str = "auto",
) -> Tensor:
    r"""Decoupled KL (Theorem 1): a wMSE that moves only the target plus a soft-label CE.

    With :math:`u = z / T` and :math:`w = \mathrm{sg}(\sigma(u_t))`,

    .. math::

        \mathrm{DKL} = \beta\,\mathrm{wMSE}(u_t, \mathrm{sg}(u_s); w)
            - \alpha \sum_j w_j \log\sigma(u_s)_j .

    With :math:`\alpha = \beta = 1` the gradients equal those of :func:`kl_loss` with respect to
    both ``input`` and ``target``, for any :math:`T` (only the gradients agree, not the values).
    That asymmetry is the point: with a frozen teacher the wMSE term gives the student nothing.

    Args:
        input: ``(B, C)`` logits :math:`z_s` (receives only the sCE gradient).
        target: ``(B, C)`` logits :math:`z_t` (receives only the wMSE gradient).
        alpha: weight of the soft-label cross-entropy.
        beta: weight of the wMSE.
        temperature: :math:`T > 0`.
        reduction, mask, impl: as in :func:`kl_loss`.

    Shape:
        ``(B,)`` for ``reduction="none"``, else a scalar (dtype as in :func:`kl_loss`).

    Example:
        >>> z_s = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
        >>> z_t = torch.tensor([[2.0, 1.0, 0.0]], requires_grad=True)
        >>> g_dkl = torch.autograd.grad(dkl_loss(z_s, z_t, temperature=2.0), (z_s, z_t))
        >>> g_kl = torch.autograd.grad(kl_loss(z_s, z_t, temperature=2.0), (z_s, z_t))
        >>> all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_dkl, g_kl))  # Theorem 1
        True
    """
    hp = check_call(input, target, reduction, mask, alpha=alpha, beta=beta, temperature=temperature)
    if use_triton(impl, input, target, (hp["temperature"],)):
        return fused(
            "dkl",
            input,
            target,
            reduction,
            mask,
            alpha=hp["alpha"],
            beta=hp["beta"],
            temperature=hp["temperature"],
            weight_temperature=hp["temperature"],
            class_weights=None,
        )
    dtype = compute_dtype(input, target)
    with no_autocast(input):
        zs, zt = valid_rows(mask, as_dtype(input, dtype), as_dtype(target, dtype))
        return loss(_DKL(**hp), zs, zt, reduction=reduction, mask=mask)


class DKLLoss(Loss):
    """Module form of :func:`dkl_loss`.

    Example:
        >>> criterion = DKLLoss(alpha=1.0, beta=1.0, temperature=4.0)
        >>> criterion(torch.zeros(2, 5), torch.zeros(2, 5))
        tensor(1.6094)
    """

    alpha: float
    beta: float
    temperature: float

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        beta: float = 1.0,
        temperature: float = 1.0,
        reduction: str = "mean",
        impl: str = "auto",
    ):
        super().__init__(reduction, alpha=alpha, beta=beta, temperature=temperature)
        self.impl = check_impl(impl)

    def forward(self, input: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return dkl_loss(
            input,
            target,
            alpha=self.alpha,
            beta=self.beta,
            temperature=self.temperature,
            reduction=self.reduction,
            mask=mask,
            impl=self.impl,
        )
