"""GKL, IKL's successor in the authors' repository (DKLv2): :func:`gkl_loss` and :class:`GKLLoss`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dkl._checks import check_class_weights, check_weight_values
from dkl.losses._common import (
    Loss,
    as_dtype,
    check_call,
    compute_dtype,
    nan_where_invalid,
    no_autocast,
    read_rows,
    reduce,
    valid_rows,
    weights_as,
)
from dkl.losses._function import loss
from dkl.losses.ikl import _IKL
from dkl.losses.parts import fast_weight_scaled

__all__ = ["GKLLoss", "gkl_loss"]


def _unit_scale(weights: Tensor | None) -> Tensor | None:
    """Detached weights divided by the batch's largest, in their own dtype. GKL does not change
    when every weight is divided by the same number, and so divided the weights neither become
    0 or inf in the logits' float32 (float64 weights of 1e-50 or 1e300) nor make their power
    overflow (1e30, ``gamma = 2``) or underflow to 0 all at once (1e-25)."""
    if weights is None or not weights.numel():
        return weights
    weights = weights.detach()
    return weights / weights.amax().clamp_min(torch.finfo(weights.dtype).tiny)


def _power(weights: Tensor, gamma: float) -> Tensor:
    """``weights ** gamma`` of weights :func:`_unit_scale` divided, with zero weights kept at
    zero (also for ``gamma = 0``)."""
    return weights.pow(gamma) if gamma > 0 else (weights > 0).to(weights.dtype)


class _GKL(_IKL):
    r"""IKL with weights :math:`w^\gamma` and the wMSE divided by the mean over the valid rows of
    :math:`W_i^2` (``extras``: the row mask)."""

    def __init__(self, alpha, beta, gamma, temperature, weight_temperature) -> None:
        super().__init__(alpha, beta, temperature, weight_temperature)
        self.gamma = gamma

    def weights(self, t, cw, p, scale_fn):
        if cw is not None:
            return _power(cw, self.gamma), False
        # σ(z_t / T2)^γ as exp(γ log σ): no underflow to 0 before the power
        log_w = F.log_softmax(scale_fn(t, self.weight_temperature), dim=1)
        return torch.exp(self.gamma * log_w), False

    def scaled_weights(self, w, mask):
        # The wMSE over the mean of W_i² is unchanged when every weight is divided by the same
        # number: the largest valid row total, which makes that mean at least 1/B (no underflow
        # for tiny weights); an overflowed total makes it NaN, and the exact form takes over.
        totals = w.sum(dim=1)
        if mask is not None:
            totals = torch.where(mask, totals, totals.new_zeros(()))
        top = totals.amax() if totals.numel() else totals.new_ones(())
        top = top.clamp_min(torch.finfo(w.dtype).tiny)
        norm = reduce((totals / top).square(), "mean", mask)
        # all weights 0: the wMSE is 0 and so is its factor
        beta = self.beta / torch.where(norm == 0, norm.new_full((), float("inf")), norm)
        return w / top, beta

    def prepare(self, s, t, cw, mask):
        w, _ = self.weights(t, cw, None, fast_weight_scaled)
        w, self.fast_beta = self.scaled_weights(w, mask)
        self.set_factors(unit_coef=False)
        return (w,)

    def block_weights(self, t, consts, p):
        return consts[0], False

    def exact_weights(self, w, kept, mask):
        # 0 on ruled-out classes (also at γ = 0, where exp(0 · -inf) is NaN) and in NaN rows,
        # which would otherwise spoil the batch normaliser; divided by the largest weight first,
        # so that no row total overflows
        w = torch.nan_to_num(torch.where(kept, w, w.new_zeros(())), nan=0.0)
        if w.numel():
            w = w / w.amax().clamp_min(torch.finfo(w.dtype).tiny)
        return self.scaled_weights(w, mask)


def gkl_loss(
    input: Tensor,
    target: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    weight_temperature: float = 1.0,
    class_weights: Tensor | None = None,
    reduction: str = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    r"""GKL, the successor of IKL in the authors' repository (DKLv2): powered weights and a wMSE
    normalised by the batch's total pair weight.

    With detached weights :math:`p = w^\gamma`, :math:`w` = ``class_weights`` (the GI prior rows)
    or :math:`\sigma(z_t / T_2)`, and :math:`e = z_t - z_s`,

    .. math::

        \mathrm{GKL} = \beta\,\frac{\tfrac14 \sum_i \sum_{j,k} p_{ij} p_{ik}
            \big((z_{t,ij} - z_{t,ik}) - (z_{s,ij} - z_{s,ik})\big)^2}
            {\sum_i \sum_{j,k} p_{ij} p_{ik}}
            + \alpha\,\frac1B \sum_i \mathrm{sCE}_T(z_{s,i}, z_{t,i}),

    computed in closed form: the numerator is :math:`\sum_i \tfrac12 P_i \sum_j p_{ij}
    (e_{ij} - \bar e_i)^2` and the denominator :math:`\sum_i P_i^2`, :math:`P_i = \sum_j p_{ij}`.
    The normalisation runs over the valid rows of the batch, so the wMSE's scale does not depend
    on the weights' (the authors' ``0.25 * ((delta_n - delta_a) ** 2 * p_n).sum() / p_n.sum()``).
    As in :func:`~dkl.ikl_loss` the wMSE is on raw logits and moves ``target`` too when it
    requires grad; the sCE moves ``input`` only. No :math:`T^2` factor. The value does not depend
    on the weights' scale, also for weights near the float limit. Second derivatives are exact.

    Args:
        input: ``(B, C)`` logits :math:`z_s` being trained.
        target: ``(B, C)`` logits :math:`z_t`.
        alpha: weight of the soft-label cross-entropy, :math:`\ge 0`.
        beta: weight of the normalised wMSE, :math:`\ge 0`.
        gamma: exponent :math:`\gamma \ge 0` of the weights (zero weights stay zero, also at
            :math:`\gamma = 0`).
        temperature: :math:`T > 0` of the sCE.
        weight_temperature: :math:`T_2 > 0` of the per-sample weights.
        class_weights: optional ``(B, C)`` finite non-negative weights (``ClassPrior`` rows, not
            raised to :math:`\gamma`: the power is applied here); treated as constants.
        reduction: ``"mean"`` gives the value above. ``"none"`` gives ``(B,)`` rows
            :math:`\beta\,\mathrm{wMSE}_i / \overline{P^2} + \alpha\,\mathrm{sCE}_i`, whose mean
            over the valid rows is that value (:math:`\overline{P^2}` = mean of :math:`P_i^2`
            over the valid rows); ``"sum"`` is their sum.
        mask: optional bool ``(B,)`` of valid rows; the others count as absent, also in the
            normalisation.

    Shape:
        ``(B,)`` for ``reduction="none"``, else a scalar; float32 for half inputs, otherwise the
        wider of the two dtypes.

    Example:
        >>> z_s = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]], requires_grad=True)
        >>> z_t = torch.tensor([[2.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
        >>> prior_rows = torch.tensor([[0.6, 0.2, 0.2], [0.1, 0.8, 0.1]])
        >>> loss = gkl_loss(z_s, z_t, beta=4.0, gamma=0.5, temperature=4.0, class_weights=prior_rows)
        >>> loss.backward()
        >>> z_s.grad.shape
        torch.Size([2, 3])
    """
    hp = check_call(
        input,
        target,
        reduction,
        mask,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        temperature=temperature,
        weight_temperature=weight_temperature,
    )
    if class_weights is not None:
        check_class_weights(class_weights, input)
        check_weight_values("class_weights", read_rows(class_weights, mask))
    dtype = compute_dtype(input, target)
    with no_autocast(input):
        # rows outside the mask zeroed before the largest weight is taken
        cw = weights_as("class_weights", _unit_scale(valid_rows(mask, class_weights)[0]), dtype)
        zs, zt = valid_rows(mask, as_dtype(input, dtype), as_dtype(target, dtype))
        out = loss(_GKL(**hp), zs, zt, cw, mask, reduction=reduction, mask=mask)
    return nan_where_invalid(out, class_weights, reduction, mask)


class GKLLoss(Loss):
    """Module form of :func:`gkl_loss`; pass ``class_weights`` (the prior rows) per call for GI.

    Example:
        >>> criterion = GKLLoss(alpha=1.0, beta=16.0, gamma=0.05, temperature=4.0)
        >>> student = torch.randn(4, 10, requires_grad=True)
        >>> prior_rows = torch.full((4, 10), 0.1)
        >>> criterion(student, torch.randn(4, 10), prior_rows).backward()
        >>> student.grad.shape
        torch.Size([4, 10])
    """

    alpha: float
    beta: float
    gamma: float
    temperature: float
    weight_temperature: float

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 1.0,
        weight_temperature: float = 1.0,
        reduction: str = "mean",
    ):
        super().__init__(
            reduction,
            alpha=alpha,
            beta=beta,
            gamma=gamma,
            temperature=temperature,
            weight_temperature=weight_temperature,
        )

    def forward(
        self,
        input: Tensor,
        target: Tensor,
        class_weights: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        return gkl_loss(
            input,
            target,
            alpha=self.alpha,
            beta=self.beta,
            gamma=self.gamma,
            temperature=self.temperature,
            weight_temperature=self.weight_temperature,
            class_weights=class_weights,
            reduction=self.reduction,
            mask=mask,
        )
