r"""KL, DKL, IKL and GKL losses from logits, exact and O(B·C) in time and memory.

Notation: ``input`` holds the logits :math:`z_s` of the side being trained (student,
adversarial example, strongly augmented view) and ``target`` the logits :math:`z_t` it is pulled
towards (teacher, natural example, weak view). Both are ``(B, C)``. :math:`\sigma` is the softmax
over classes and :math:`\mathrm{sg}` a stop-gradient.

The weighted MSE between logit vectors is written pairwise in the paper,

.. math::

    \mathrm{wMSE}_i = \tfrac14 \sum_{j,k} w_{ij} w_{ik}
        \big((z_{t,ij} - z_{t,ik}) - (z_{s,ij} - z_{s,ik})\big)^2,

which needs ``(B, C, C)`` tensors. With :math:`e = z_t - z_s`, :math:`W_i = \sum_j w_{ij}` and
:math:`\bar e_i = \sum_j w_{ij} e_{ij} / W_i` it equals half the weighted variance of :math:`e`,

.. math::

    \mathrm{wMSE}_i = \tfrac12 W_i \sum_j w_{ij} (e_{ij} - \bar e_i)^2,

and that centred form is what this module computes (it does not cancel catastrophically). Its
gradient is :math:`\partial/\partial e_{ij} = W_i w_{ij} (e_{ij} - \bar e_i)`, applied with a plus
sign to :math:`z_t` and a minus sign to :math:`z_s`.

All reductions go through one :func:`_reduce`: ``"none"`` gives ``(B,)``, ``"mean"`` the mean over
the (valid) rows, ``"sum"`` the sum. Half-precision inputs (``float16``, ``bfloat16``) are computed in
``float32`` and the loss comes back as ``float32``; ``float32`` and ``float64`` inputs give a loss
of their own dtype. Gradients reach the inputs in the inputs' dtype.

Non-finite logits follow one rule in every loss (and in the fused kernel):

- a ``-inf`` target logit marks a class the target rules out: its probability is 0, so it adds 0 to
  the KL / soft-label CE and carries no wMSE weight, whatever ``class_weights`` say (the loss
  equals the one computed on the finite classes alone, as ``F.kl_div`` does);
- a ``-inf`` student logit on a class whose target logit is finite makes that row's loss ``+inf``
  (the student gives zero probability to a possible class); its gradient is then not meaningful;
- a row whose target logits are all ``-inf``, or any NaN / ``+inf`` logit, gives NaN for that row:
  the target is not a distribution. Pass ``mask`` for rows without a target: rows outside the mask
  are never read, so whatever they hold gives 0 loss and 0 gradient.

An empty batch ``(0, C)`` gives what an all-False mask gives: 0 for ``"mean"`` and ``"sum"``, a
``(0,)`` tensor for ``"none"``, with a gradient graph when the inputs require grad.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dkl._checks import (
    check_class_weights,
    check_logits,
    check_non_negative_scalar,
    check_positive,
    check_row_mask,
    check_weight_values,
    is_compiling,
)

__all__ = [
    "DKLLoss",
    "GKLLoss",
    "IKLLoss",
    "KLLoss",
    "dkl_loss",
    "gkl_loss",
    "ikl_loss",
    "kl_loss",
    "soft_cross_entropy",
    "weighted_mse",
]

REDUCTIONS = ("none", "mean", "sum")
IMPLS = ("auto", "torch", "triton")
_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- input checks
def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"Unknown reduction {reduction!r}: expected one of {REDUCTIONS}")


def _check_call(
    input: Any,
    target: Any,
    temperature: float,
    reduction: str,
    mask: Tensor | None,
    **loss_weights: float,
) -> None:
    """The checks every loss function runs on its arguments (``loss_weights``: alpha, beta...)."""
    check_logits(input, target)
    check_positive("temperature", temperature)
    _check_scalars(**loss_weights)
    _check_reduction(reduction)
    check_row_mask(mask, input)


def _check_scalars(**loss_weights: float) -> None:
    for name, value in loss_weights.items():
        check_non_negative_scalar(name, value)


# --------------------------------------------------------------------------- shared pieces
def _compute_dtype(x: Tensor) -> Tensor:
    """Half inputs are promoted to float32; float32/float64 are kept."""
    return x.float() if x.dtype in _HALF else x


def _reduce(per_row: Tensor, reduction: str, mask: Tensor | None = None) -> Tensor:
    """The one reduction: rows outside ``mask`` count as absent, not as zero-loss samples; with
    no row to average (empty batch, all-False mask) the mean is 0."""
    if mask is not None:
        per_row = torch.where(mask, per_row, per_row.new_zeros(()))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    count = max(per_row.shape[0], 1) if mask is None else mask.sum().clamp_min(1)
    return per_row.sum() / count


def _valid_rows(mask: Tensor | None, *xs: Tensor | None) -> tuple[Tensor | None, ...]:
    """Rows outside ``mask`` replaced by zeros: nothing they hold (-inf, NaN) reaches the loss or
    its gradient, as in the fused kernel, which never reads them."""
    if mask is None:
        return xs
    keep = mask.unsqueeze(1)
    return tuple(None if x is None else _zero_where(~keep, x) for x in xs)


_INF = float("inf")


def _zero_where(cond: Tensor, x: Tensor) -> Tensor:
    """``x`` with 0 where ``cond`` (a 0-d tensor operand: faster than a Python scalar on CPU)."""
    return torch.where(cond, x.new_zeros(()), x)


def _plus_inf(rows: Tensor, per_row: Tensor) -> Tensor:
    """``+inf`` added on ``rows`` (a NaN row stays NaN)."""
    return per_row + torch.where(rows, per_row.new_full((), _INF), per_row.new_zeros(()))


def _neginf_to_zero(x: Tensor) -> Tensor:
    """``x`` with its -inf entries set to 0 and everything else (NaN, +inf) kept: one fused pass
    on detached values (``torch.where`` costs several times more on CPU)."""
    return torch.nan_to_num(x, nan=float("nan"), posinf=_INF, neginf=0.0)


def _logit_gap(target: Tensor, input: Tensor) -> tuple[Tensor, Tensor]:
    """Detached ``e = target - input`` for the wMSE, and the rows the student rules out.

    ``e`` is 0 where the target logit is -inf (alone or with the input's): those classes carry
    no weight. Where only the input is -inf, ``e`` is ``+inf``: those rows are returned, and
    ``e`` is set to 0 there too (the caller makes the row ``+inf``). NaN is set to 0 as well;
    every loss that calls this also computes the sCE of the same logits, which stays NaN.
    """
    e = torch.nan_to_num(target.detach() - input.detach(), nan=0.0, posinf=_INF, neginf=0.0)
    ruled_out = e.amax(dim=1) == _INF
    return e.nan_to_num_(posinf=0.0), ruled_out


def _scaled(x: Tensor, temperature: float) -> Tensor:
    """``x / T`` as one multiplication, and no pass at all for ``T = 1``."""
    return x if temperature == 1.0 else x * (1.0 / temperature)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(1)`` without the (B, C) product."""
    return torch.linalg.vecdot(a, b, dim=1)


class _WeightedMSE(torch.autograd.Function):
    """Centred closed form of wMSE with its exact gradient ``W w (e - ē)``.

    Takes ``e = target - input`` already computed (detached, 0 on ruled-out classes); saves one
    (B, C) tensor, ``w (e - ē)``, and the row totals ``W``; backward is one scaled copy per side
    that needs it (autograd through the expression would keep four tensors).
    """

    @staticmethod
    def forward(ctx, target: Tensor, input: Tensor, weights: Tensor, e: Tensor) -> Tensor:  # type: ignore[override]
        total = weights.sum(dim=1)
        # W = 0 only when every weight is 0; the row's loss and gradient are then 0.
        mean = _rowdot(weights, e) / total.clamp_min(torch.finfo(e.dtype).tiny)
        centred = e - mean.unsqueeze(1)
        wc = weights * centred
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(wc, total)
        return 0.5 * total * _rowdot(wc, centred)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        wc, total = ctx.saved_tensors
        scale = (grad_output * total).unsqueeze(1)
        return (
            wc * scale if ctx.needs_input_grad[0] else None,
            wc * -scale if ctx.needs_input_grad[1] else None,
            None,
            None,
        )


class _SoftCrossEntropy(torch.autograd.Function):
    """``-Σ_j p_j log σ(u)_j`` with ``0 · log 0 = 0`` and its gradient ``σ(u) Σ_j p_j - p``.

    Saves ``log σ(u)``; ``p`` is a constant. A class with ``p_j = 0`` adds 0 even where
    ``u_j = -inf``; one with ``p_j > 0`` there adds 0 too, and the callers mark that row ``+inf``.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, probs: Tensor) -> Tensor:  # type: ignore[override]
        log_q = F.log_softmax(logits, dim=1)
        ctx.save_for_backward(log_q, probs)
        return -_rowdot(probs, _neginf_to_zero(log_q))

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        log_q, p = ctx.saved_tensors
        # log_softmax's own backward of -g p: -g p + σ(u) Σ_j g p_j, in one fused pass
        grad = torch._log_softmax_backward_data(
            p * -grad_output.unsqueeze(1), log_q, 1, log_q.dtype
        )
        return grad, None


class _KLDivergence(torch.autograd.Function):
    """Row-wise ``Σ_j p_j (log p_j - log q_j)``, ``p = σ(u_t)``, ``q = σ(u_s)``, over the classes
    the target keeps; ``+inf`` where ``q_j = 0`` on one of them. Gradients ``q - p`` (input) and
    ``p (log p - log q - KL)`` (target)."""

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        log_q = F.log_softmax(input, dim=1)
        log_p = F.log_softmax(target, dim=1)
        p = log_p.exp()
        diff = _neginf_to_zero(log_p) - _neginf_to_zero(log_q)
        kl = _rowdot(p, diff)
        ctx.save_for_backward(log_q, p, diff, kl)
        # -inf in log q - log p only where q = 0 and p > 0 (both 0 gives NaN, dropped here)
        gap = torch.nan_to_num(log_q - log_p, nan=0.0, posinf=0.0, neginf=-_INF)
        ruled_out = gap.amin(dim=1) == -_INF
        return _plus_inf(ruled_out, kl)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        log_q, p, diff, kl = ctx.saved_tensors
        g = grad_output.unsqueeze(1)
        grad_s = grad_t = None
        if ctx.needs_input_grad[0]:  # g (q - p) = log_softmax's backward of -g p (Σ p = 1)
            grad_s = torch._log_softmax_backward_data(p * -g, log_q, 1, log_q.dtype)
        if ctx.needs_input_grad[1]:
            grad_t = p * (diff - kl.unsqueeze(1)) * g
        return grad_s, grad_t


def _present(weights: Tensor, target: Tensor) -> Tensor:
    """Given (finite) weights set to 0 on the classes the target rules out (softmax weights
    already are). ``0 · z_t`` is NaN exactly where ``z_t`` is not finite: three fused passes
    instead of ``torch.where``'s slower one (a NaN / +inf target row is NaN through its sCE)."""
    return torch.nan_to_num(weights + 0.0 * target.detach(), nan=0.0)


def weighted_mse(target: Tensor, input: Tensor, weights: Tensor) -> Tensor:
    r"""Per-row weighted MSE between logit vectors, :math:`\tfrac12 W \sum_j w_j (e_j - \bar e)^2`.

    Args:
        target: ``(B, C)`` logits :math:`z_t`; receives gradient if it requires grad. A ``-inf``
            entry gives its class weight 0.
        input: ``(B, C)`` logits :math:`z_s`; receives gradient if it requires grad. A ``-inf``
            entry where ``target`` is finite makes the row ``+inf``.
        weights: ``(B, C)`` non-negative weights, treated as constants (detached).

    Returns:
        ``(B,)`` per-row values, equal to the paper's pairwise
        :math:`\tfrac14 \sum_{j,k} w_j w_k (e_j - e_k)^2`.

    Example:
        >>> t = torch.tensor([[1.0, 2.0, 4.0]])
        >>> s = torch.zeros(1, 3)
        >>> weighted_mse(t, s, torch.ones(1, 3))  # ¼ Σ_jk (e_j - e_k)² = ¼·2·(1 + 9 + 4)
        tensor([7.])
    """
    absent = torch.isneginf(target)
    e = _zero_where(absent, target.detach() - input.detach())  # NaN stays NaN
    w = _zero_where(absent, weights.detach().to(target.dtype))
    per_row = _WeightedMSE.apply(target, input, w, e)
    ruled_out = (torch.isneginf(input) > absent).any(dim=1)
    return torch.where(ruled_out, per_row.new_full((), _INF), per_row)


def soft_cross_entropy(input: Tensor, target_probs: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Per-row :math:`-\sum_j p_j \log\sigma(z_s / T)_j` with ``target_probs`` held constant.

    Classes with :math:`p_j = 0` add 0, even where :math:`z_s = -\infty`; a ``-inf`` logit
    where :math:`p_j > 0` makes the row ``+inf``.
    """
    p = target_probs.detach()
    per_row = _SoftCrossEntropy.apply(_scaled(input, temperature), p)
    return _plus_inf((torch.isneginf(input) & (p > 0)).any(dim=1), per_row)


def _use_triton(impl: str, input: Tensor, target: Tensor) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"Unknown impl {impl!r}: expected one of {IMPLS}")
    if impl == "torch":
        return False
    if impl == "auto" and (not input.is_cuda or input.dtype == torch.float64 or is_compiling()):
        return False  # the torch reference serves CPU, float64 and compiled graphs
    from dkl import ops  # lazy: triton is optional

    reason = ops.triton_unavailable_reason(input, target)
    if impl == "triton" and reason is not None:
        raise RuntimeError(f"impl='triton' cannot run: {reason}. Use impl='torch' or 'auto'.")
    return reason is None


def _fused(
    kind: str, input: Tensor, target: Tensor, reduction: str, mask: Tensor | None, **kw
) -> Tensor:
    from dkl.ops import fused_divergence

    per_row = fused_divergence(input, target, kind=kind, row_mask=mask, **kw)
    return _reduce(per_row, reduction, mask)


# --------------------------------------------------------------------------- the losses
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
    Gradients reach both ``input`` and ``target`` when they require grad.

    Args:
        input: ``(B, C)`` logits :math:`z_s`.
        target: ``(B, C)`` logits :math:`z_t`.
        temperature: softmax temperature :math:`T > 0`.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
        mask: optional bool ``(B,)`` of valid rows; ``"mean"`` divides by their count.
        impl: ``"auto"`` | ``"torch"`` | ``"triton"`` (fused kernel, CUDA only).

    Shape:
        ``(B,)`` for ``reduction="none"``, else a scalar; float32 for half inputs, otherwise the
        input dtype.

    Example:
        >>> z_s = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
        >>> z_t = torch.tensor([[2.0, 1.0, 0.0]])
        >>> loss = kl_loss(z_s, z_t)
        >>> loss
        tensor(1.1504, grad_fn=<DivBackward0>)
        >>> loss.backward()
    """
    _check_call(input, target, temperature, reduction, mask)
    if _use_triton(impl, input, target):
        return _fused(
            "kl",
            input,
            target,
            reduction,
            mask,
            alpha=1.0,
            beta=1.0,
            temperature=temperature,
            weight_temperature=1.0,
            class_weights=None,
        )
    with torch.autocast(input.device.type, enabled=False):
        zs, zt = _valid_rows(mask, _compute_dtype(input), _compute_dtype(target))
        per_row = _KLDivergence.apply(_scaled(zs, temperature), _scaled(zt, temperature))
        return _reduce(per_row, reduction, mask)


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
        >>> all(torch.allclose(a, b) for a, b in zip(g_dkl, g_kl))  # Theorem 1
        True
    """
    _check_call(input, target, temperature, reduction, mask, alpha=alpha, beta=beta)
    if _use_triton(impl, input, target):
        return _fused(
            "dkl",
            input,
            target,
            reduction,
            mask,
            alpha=alpha,
            beta=beta,
            temperature=temperature,
            weight_temperature=temperature,
            class_weights=None,
        )
    with torch.autocast(input.device.type, enabled=False):
        zs, zt = _valid_rows(mask, _compute_dtype(input), _compute_dtype(target))
        us, ut = _scaled(zs, temperature), _scaled(zt, temperature)
        e, ruled_out = _logit_gap(ut, us)
        w = F.softmax(ut.detach(), dim=1)  # 0 on ruled-out classes
        wmse = _WeightedMSE.apply(ut, us.detach(), w, e)
        per_row = beta * wmse + alpha * _SoftCrossEntropy.apply(us, w)
        return _reduce(_plus_inf(ruled_out, per_row), reduction, mask)


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
    requires grad (adversarial training); the sCE moves ``input`` only.

    Args:
        input: ``(B, C)`` logits :math:`z_s` being trained.
        target: ``(B, C)`` logits :math:`z_t`.
        alpha: weight of the soft-label cross-entropy.
        beta: weight of the wMSE.
        temperature: :math:`T > 0` of the sCE.
        weight_temperature: :math:`T_2 > 0` of the per-sample weights.
        class_weights: optional ``(B, C)`` non-negative weights that replace
            :math:`\sigma(z_t / T_2)`; treated as constants.
        reduction, mask, impl: as in :func:`kl_loss`.

    Shape:
        ``(B,)`` for ``reduction="none"``, else a scalar; float32 for half inputs, otherwise the
        input dtype.

    Example:
        >>> z_s = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]], requires_grad=True)
        >>> z_t = torch.tensor([[2.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
        >>> loss = ikl_loss(z_s, z_t, alpha=1.0, beta=2.0, temperature=4.0, weight_temperature=1.0)
        >>> loss
        tensor(2.3490, grad_fn=<DivBackward0>)
        >>> loss.backward()
        >>> z_s.grad.shape
        torch.Size([2, 3])
    """
    _check_call(input, target, temperature, reduction, mask, alpha=alpha, beta=beta)
    check_positive("weight_temperature", weight_temperature)
    if class_weights is not None:
        check_class_weights(class_weights, input)
    if _use_triton(impl, input, target):  # the kernel's entry point checks the weights' values
        return _fused(
            "ikl",
            input,
            target,
            reduction,
            mask,
            alpha=alpha,
            beta=beta,
            temperature=temperature,
            weight_temperature=weight_temperature,
            class_weights=None if class_weights is None else class_weights.detach(),
        )
    if class_weights is not None:
        check_weight_values("class_weights", class_weights)
    with torch.autocast(input.device.type, enabled=False):
        zs, zt = _compute_dtype(input), _compute_dtype(target)
        cw = None if class_weights is None else class_weights.detach().to(zt.dtype)
        zs, zt, cw = _valid_rows(mask, zs, zt, cw)
        e, ruled_out = _logit_gap(zt, zs)
        zt_const = zt.detach()
        p = F.softmax(_scaled(zt_const, temperature), dim=1)
        if cw is not None:
            w = _present(cw, zt)
        elif weight_temperature == temperature:
            w = p  # softmax weights are 0 on ruled-out classes already
        else:
            w = F.softmax(_scaled(zt_const, weight_temperature), dim=1)
        sce = _SoftCrossEntropy.apply(_scaled(zs, temperature), p)
        per_row = beta * _WeightedMSE.apply(zt, zs, w, e) + alpha * sce
        return _reduce(_plus_inf(ruled_out, per_row), reduction, mask)


def _power(weights: Tensor, gamma: float) -> Tensor:
    """``weights ** gamma`` with zero weights kept at zero (also for ``gamma = 0``)."""
    return weights.pow(gamma) if gamma > 0 else (weights > 0).to(weights.dtype)


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
    As in :func:`ikl_loss` the wMSE is on raw logits and moves ``target`` too when it requires
    grad; the sCE moves ``input`` only. No :math:`T^2` factor.

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
        input dtype.

    Example:
        >>> z_s = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]], requires_grad=True)
        >>> z_t = torch.tensor([[2.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
        >>> prior_rows = torch.tensor([[0.6, 0.2, 0.2], [0.1, 0.8, 0.1]])
        >>> loss = gkl_loss(z_s, z_t, beta=4.0, gamma=0.5, temperature=4.0, class_weights=prior_rows)
        >>> loss.backward()
        >>> z_s.grad.shape
        torch.Size([2, 3])
    """
    _check_call(input, target, temperature, reduction, mask, alpha=alpha, beta=beta, gamma=gamma)
    check_positive("weight_temperature", weight_temperature)
    if class_weights is not None:
        check_class_weights(class_weights, input)
        check_weight_values("class_weights", class_weights)
    with torch.autocast(input.device.type, enabled=False):
        zs, zt = _compute_dtype(input), _compute_dtype(target)
        cw = None if class_weights is None else class_weights.detach().to(zt.dtype)
        zs, zt, cw = _valid_rows(mask, zs, zt, cw)
        e, ruled_out = _logit_gap(zt, zs)
        zt_const = zt.detach()
        p = F.softmax(_scaled(zt_const, temperature), dim=1)
        if cw is not None:
            w = _power(cw, gamma)
        else:  # σ(z_t / T2)^γ as exp(γ log σ): no underflow to 0 before the power
            w = torch.exp(gamma * F.log_softmax(_scaled(zt_const, weight_temperature), dim=1))
        # 0 on ruled-out classes: also at γ = 0 (exp(0 · -inf) is NaN) and in a row without
        # any kept class, which would otherwise spoil the batch normaliser
        w = _present(w, zt)
        norm = _reduce(w.sum(dim=1).square(), "mean", mask)  # mean of P_i² over the valid rows
        wmse = _WeightedMSE.apply(zt, zs, w, e) / norm.clamp_min(torch.finfo(w.dtype).tiny)
        sce = _SoftCrossEntropy.apply(_scaled(zs, temperature), p)
        per_row = beta * wmse + alpha * sce
        return _reduce(_plus_inf(ruled_out, per_row), reduction, mask)


# --------------------------------------------------------------------------- modules
class _Loss(nn.Module):
    def __init__(self, reduction: str) -> None:
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction


class KLLoss(_Loss):
    """Module form of :func:`kl_loss`.

    Example:
        >>> criterion = KLLoss(temperature=4.0)
        >>> criterion(torch.zeros(2, 5), torch.zeros(2, 5))
        tensor(0.)
    """

    def __init__(self, *, temperature: float = 1.0, reduction: str = "mean", impl: str = "auto"):
        super().__init__(reduction)
        check_positive("temperature", temperature)
        self.temperature, self.impl = temperature, impl

    def forward(self, input: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return kl_loss(
            input,
            target,
            temperature=self.temperature,
            reduction=self.reduction,
            mask=mask,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"


class DKLLoss(_Loss):
    """Module form of :func:`dkl_loss`.

    Example:
        >>> criterion = DKLLoss(alpha=1.0, beta=1.0, temperature=4.0)
        >>> criterion(torch.zeros(2, 5), torch.zeros(2, 5))
        tensor(1.6094)
    """

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        beta: float = 1.0,
        temperature: float = 1.0,
        reduction: str = "mean",
        impl: str = "auto",
    ):
        super().__init__(reduction)
        check_positive("temperature", temperature)
        _check_scalars(alpha=alpha, beta=beta)
        self.alpha, self.beta, self.temperature, self.impl = alpha, beta, temperature, impl

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

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, "
            f"reduction={self.reduction!r}"
        )


class IKLLoss(_Loss):
    """Module form of :func:`ikl_loss`; pass ``class_weights`` per call for the GI variant.

    Example:
        >>> criterion = IKLLoss(alpha=1.0, beta=8.0, temperature=4.0, weight_temperature=100.0)
        >>> student = torch.randn(4, 10, requires_grad=True)
        >>> criterion(student, torch.randn(4, 10)).backward()
        >>> student.grad.shape
        torch.Size([4, 10])
    """

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
        super().__init__(reduction)
        check_positive("temperature", temperature)
        check_positive("weight_temperature", weight_temperature)
        _check_scalars(alpha=alpha, beta=beta)
        self.alpha, self.beta = alpha, beta
        self.temperature, self.weight_temperature, self.impl = temperature, weight_temperature, impl

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

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, "
            f"weight_temperature={self.weight_temperature}, reduction={self.reduction!r}"
        )


class GKLLoss(_Loss):
    """Module form of :func:`gkl_loss`; pass ``class_weights`` (the prior rows) per call for GI.

    Example:
        >>> criterion = GKLLoss(alpha=1.0, beta=16.0, gamma=0.05, temperature=4.0)
        >>> student = torch.randn(4, 10, requires_grad=True)
        >>> prior_rows = torch.full((4, 10), 0.1)
        >>> criterion(student, torch.randn(4, 10), prior_rows).backward()
        >>> student.grad.shape
        torch.Size([4, 10])
    """

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
        super().__init__(reduction)
        check_positive("temperature", temperature)
        check_positive("weight_temperature", weight_temperature)
        _check_scalars(alpha=alpha, beta=beta, gamma=gamma)
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.temperature, self.weight_temperature = temperature, weight_temperature

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

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, "
            f"temperature={self.temperature}, weight_temperature={self.weight_temperature}, "
            f"reduction={self.reduction!r}"
        )
