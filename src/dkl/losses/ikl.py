"""Improved KL (Cui et al., NeurIPS 2024): :func:`ikl_loss` and :class:`IKLLoss`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dkl._checks import check_class_weights, check_weight_values
from dkl.losses._common import (
    Loss,
    as_dtype,
    check_call,
    check_impl,
    compute_dtype,
    fused,
    nan_where_invalid,
    no_autocast,
    read_rows,
    use_triton,
    valid_rows,
    weights_as,
)
from dkl.losses._function import loss
from dkl.losses.parts import (
    GAP_TEMPERATURE,
    dot,
    exact_scaled,
    fast_weight_scaled,
    plus_inf,
    raw_gaps,
    rowdot,
    sce_exact,
    tempered,
    wmse_exact,
    wmse_fast,
    wmse_unit,
)

__all__ = ["IKLLoss", "ikl_loss"]


class _IKL:
    r"""``β wMSE(z_t, z_s; w) + α sCE_T``: both sides get the wMSE's gradient ``± β W w (e - ē)``,
    the input alone the sCE's ``α (q - p) / T``. ``weights`` gives ``w`` (detached) from the
    target logits and the class weights; subclasses change it and the wMSE's scale."""

    def __init__(
        self, alpha: float, beta: float, temperature: float, weight_temperature: float
    ) -> None:
        self.alpha, self.beta = alpha, beta
        self.temperature, self.weight_temperature = temperature, weight_temperature

    # ---- the weights: σ(z_t / T2) (their rows sum to 1), or the class weights as given
    def weights(self, t, cw, p, scale_fn):
        if cw is not None:
            return cw, False
        if self.weight_temperature == self.temperature:
            return p, True
        return torch.softmax(scale_fn(t, self.weight_temperature), 1), True

    def scaled_weights(self, w, *extras):
        """The weights and the wMSE's factor: β (GKL divides by the batch's mean of W_i²)."""
        return w, self.beta

    # ---- the rule
    def prepare(self, s, t, cw, *extras):
        self.fast_beta = self.beta
        self.set_factors(unit_coef=cw is None)
        return (cw,)

    def set_factors(self, unit_coef: bool) -> None:
        # gradients of a row: α/T (q - p) - c w (e - ē) (input), c w (e - ē) (target), with
        # c = β for softmax weights and β W otherwise; the constant parts are applied in backward.
        # α/T is taken out of the input's only while T/α stays moderate: the wMSE's part is
        # divided by it, and must not overflow (α = 1e-40 would make it inf in float32)
        a = self.alpha / self.temperature
        self.gs_factor = a if a > 0 and 1.0 / a <= 1e4 else 1.0
        self.gt_factor = self.fast_beta if unit_coef else 1.0

    def block_weights(self, t, consts, p):
        return self.weights(t, consts[0], p, fast_weight_scaled)

    def fast(self, s, t, consts, gs, gt, rows):
        T = self.temperature
        log_p, p, log_q = tempered(s, t, T)
        w, unit_total = self.block_weights(t, consts, p)
        # the wMSE is ½ c Σ w (e - ē)², its gradient with respect to the target c w (e - ē):
        # c = β for softmax weights, β W per row otherwise. The gaps e come in units of T as
        # T (log p - log q) at moderate T for softmax weights (free, and e up to a per-row
        # shift), else raw: a class far below the others (masked at -1e9 on both sides) has
        # log-probabilities rounded to ulp(1e9 / T), which only a softmax weight makes harmless
        if T <= GAP_TEMPERATURE and unit_total:
            gaps, unit = log_p.sub_(log_q), T
        else:
            gaps, unit = raw_gaps(t, s, w, pairs=not unit_total), 1.0
        if unit_total:
            wmse, wc = wmse_unit(gaps, w, rows)
            coef = self.fast_beta * unit
            per_row = dot(p, log_q, rows).mul_(-self.alpha)
            per_row.add_(wmse, alpha=0.5 * self.fast_beta * unit * unit)
        else:
            wmse, wc, totals = wmse_fast(gaps, w)
            per_row = rowdot(p, log_q).mul_(-self.alpha)
            per_row.addcmul_(wmse, totals, value=0.5 * self.fast_beta * unit * unit)
            per_row = per_row if rows else per_row.sum()
            coef = totals.mul_(self.fast_beta * unit).unsqueeze(1)
        if gs is not None:
            # (q - p) α/T / gs_factor, then the wMSE's part over gs_factor
            torch.exp(log_q, out=gs).sub_(p)
            if self.gs_factor == 1.0:
                gs.mul_(self.alpha / T)
            k = -1.0 / self.gs_factor
            if unit_total:
                gs.add_(wc, alpha=k * coef)
            else:
                gs.addcmul_(wc, coef, value=k)
        if gt is not None:  # times gt_factor (β for softmax weights) in backward
            torch.mul(wc, unit if unit_total else coef, out=gt)
        return per_row

    def exact(self, s, t, cw, *extras):
        T = self.temperature
        tc = t.detach()
        kept = ~torch.isneginf(tc)
        p = F.softmax(exact_scaled(tc, T), dim=1)
        w, _ = self.weights(tc, cw, p, exact_scaled)
        w, beta = self.exact_weights(w, kept, *extras)
        wmse, missed = wmse_exact(t, s, w, kept)
        sce, missed_too = sce_exact(F.log_softmax(exact_scaled(s, T), dim=1), p)
        return plus_inf(missed | missed_too, beta * wmse + self.alpha * sce)

    def exact_weights(self, w, kept, *extras):
        return self.scaled_weights(w, *extras)


def ikl_loss(
    input: Tensor,
    target: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    temperature: float = 1.0,
    weight_temperature: float = 1.0,
    class_weights: Tensor | None = None,
    reduction: str = "mean",
    mask: Tensor | None = None,
    impl: str = "auto",
) -> Tensor:
    r"""Improved KL: wMSE on raw logits that moves both sides, plus a tempered soft-label CE.

    .. math::

        \mathrm{IKL}_i = \beta\,\tfrac12 W_i \sum_j w_{ij}(e_{ij} - \bar e_i)^2
            - \alpha \sum_j \mathrm{sg}(\sigma(z_{t,i}/T))_j \log\sigma(z_{s,i}/T)_j,
        \qquad e = z_t - z_s,

    with detached weights :math:`w = \sigma(z_t / T_2)` (``weight_temperature``), or the given
    ``class_weights`` (the rows of a :class:`~dkl.ClassPrior` picked by label: the GI variant).
    ``alpha`` weighs the sCE and ``beta`` the wMSE, as in the authors' configs. The wMSE is on raw
    logits (no temperature) and has no stop-gradient: ``target`` receives its gradient too when it
    requires grad (adversarial training); the sCE moves ``input`` only. Second derivatives are
    exact on the torch path.

    Args:
        input: ``(B, C)`` logits :math:`z_s` being trained.
        target: ``(B, C)`` logits :math:`z_t`.
        alpha: weight of the soft-label cross-entropy.
        beta: weight of the wMSE.
        temperature: :math:`T > 0` of the sCE.
        weight_temperature: :math:`T_2 > 0` of the per-sample weights.
        class_weights: optional ``(B, C)`` non-negative weights that replace
            :math:`\sigma(z_t / T_2)`; treated as constants.
        reduction, mask, impl: as in :func:`~dkl.kl_loss`.

    Shape:
        ``(B,)`` for ``reduction="none"``, else a scalar; float32 for half inputs, otherwise the
        wider of the two dtypes.

    Example:
        >>> z_s = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]], requires_grad=True)
        >>> z_t = torch.tensor([[2.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
        >>> loss = ikl_loss(z_s, z_t, alpha=1.0, beta=2.0, temperature=4.0, weight_temperature=1.0)
        >>> loss
        tensor(2.3490, grad_fn=<...>)
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
        temperature=temperature,
        weight_temperature=weight_temperature,
    )
    summable = True
    if class_weights is not None:  # the values decide the path too: one host sync
        check_class_weights(class_weights, input)
        summable = check_weight_values("class_weights", read_rows(class_weights, mask))
    temperatures = (hp["temperature"], hp["weight_temperature"])
    if use_triton(impl, input, target, temperatures, summable):
        out = fused(
            "ikl",
            input,
            target,
            reduction,
            mask,
            class_weights=None if class_weights is None else class_weights.detach(),
            _weights_checked=class_weights is not None and summable,
            **hp,
        )
    else:
        dtype = compute_dtype(input, target)
        with no_autocast(input):
            cw = weights_as("class_weights", class_weights, dtype)
            zs, zt, cw = valid_rows(mask, as_dtype(input, dtype), as_dtype(target, dtype), cw)
            out = loss(_IKL(**hp), zs, zt, cw, reduction=reduction, mask=mask)
    return nan_where_invalid(out, class_weights, reduction, mask)


class IKLLoss(Loss):
    """Module form of :func:`ikl_loss`; pass ``class_weights`` per call for the GI variant.

    Example:
        >>> criterion = IKLLoss(alpha=1.0, beta=8.0, temperature=4.0, weight_temperature=100.0)
        >>> student = torch.randn(4, 10, requires_grad=True)
        >>> criterion(student, torch.randn(4, 10)).backward()
        >>> student.grad.shape
        torch.Size([4, 10])
    """

    alpha: float
    beta: float
    temperature: float
    weight_temperature: float

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        beta: float = 1.0,
        temperature: float = 1.0,
        weight_temperature: float = 1.0,
        reduction: str = "mean",
        impl: str = "auto",
    ):
        super().__init__(
            reduction,
            alpha=alpha,
            beta=beta,
            temperature=temperature,
            weight_temperature=weight_temperature,
        )
        self.impl = check_impl(impl)

    def forward(
        self,
        input: Tensor,
        target: Tensor,
        class_weights: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        return ikl_loss(
            input,
            target,
            alpha=self.alpha,
            beta=self.beta,
            temperature=self.temperature,
            weight_temperature=self.weight_temperature,
            class_weights=class_weights,
            reduction=self.reduction,
            mask=mask,
            impl=self.impl,
        )
