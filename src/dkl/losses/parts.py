r"""The two parts DKL, IKL and GKL are made of, the weighted MSE between logit vectors and the
soft-label cross-entropy, as public functions, and the pieces the losses build them from.

Fast pieces (``*_fast``) run inside the autograd function with no graph; exact pieces
(``*_exact``) are plain differentiable torch and carry the non-finite rules (see
:mod:`dkl.losses._function` for how the two are combined).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dkl._checks import check_class_weights, check_logits, check_weight_values
from dkl.losses._common import (
    as_dtype,
    check_hyperparameters,
    compute_dtype,
    nan_where_invalid,
    no_autocast,
    weights_as,
)
from dkl.losses._function import constant, log_softmax_backward, row_loss

__all__ = ["soft_cross_entropy", "weighted_mse"]

_INF = float("inf")


# --------------------------------------------------------------------------- shared arithmetic
def scaled(x: Tensor, temperature: float) -> Tensor:
    """``x / T`` as one multiplication, and no pass at all for ``T = 1``."""
    return x if temperature == 1.0 else x * (1.0 / temperature)


def fast_weight_scaled(x: Tensor, temperature: float) -> Tensor:
    """:func:`scaled` for the fast forms' detached weights ``σ(z_t / T_2)``, by a cached constant
    (:func:`constant`) and without :func:`fast_scaled`'s shift: constants whose rounding at large
    logits (ulp(|z| / T_2), 5e-7 relative at z = 500, T_2 = 100) moves no gradient by more, for
    one pass less at the presets' T_2 = 100."""
    return x if temperature == 1.0 else torch.mul(x, constant(1.0 / temperature, x.dtype))


def fast_scaled(x: Tensor, temperature: float) -> Tensor:
    """:func:`scaled` for the softmaxes of the fast forms, by a cached constant
    (:func:`constant`), up to a per-row shift. Multiplying by ``1 / T`` is exact when ``T`` is a
    power of 2; otherwise ``z / T`` of logits far from 0 would round every entry to
    ulp(|z| / T), which the softmax keeps (3e-6 relative at z = 500, T = 3), so each row is
    taken relative to its largest entry first (one pass more, and no softmax changes). The
    largest entry is where the softmax's mass is; any other reference (the first column) could
    be a masked class at -1e9, and the row would round to its ulp."""
    if temperature == 1.0:
        return x
    inv = constant(1.0 / temperature, x.dtype)
    if math.frexp(temperature)[0] == 0.5:  # a power of 2
        return torch.mul(x, inv)
    return torch.sub(x, x.amax(dim=1, keepdim=True)).mul_(inv)


def tempered(s: Tensor, t: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """``log σ(t / T)``, ``σ(t / T)`` and ``log σ(s / T)`` for the fast forms (fresh tensors the
    caller may overwrite)."""
    log_p = torch.log_softmax(fast_scaled(t, temperature), 1)
    return log_p, log_p.exp(), torch.log_softmax(fast_scaled(s, temperature), 1)


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(1)``."""
    return torch.linalg.vecdot(a, b, dim=1)


def dot(a: Tensor, b: Tensor, rows: bool) -> Tensor:
    """``(a * b).sum(1)`` for ``rows``, else the sum of all of ``a * b`` (one BLAS dot product
    of the contiguous blocks, without the product)."""
    if rows:
        return torch.linalg.vecdot(a, b, dim=1)
    return torch.dot(a.reshape(-1), b.reshape(-1))


def exact_scaled(x: Tensor, temperature: float) -> Tensor:
    """``x / T`` shifted by the row's (detached, finite) maximum first: the same softmax and the
    same centred wMSE, and no overflow however small ``T`` is (entries far below the maximum
    become ``-inf``: probability 0, their correctly rounded value)."""
    top = x.detach().amax(dim=1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, top.new_zeros(()))
    return scaled(x - top, temperature)


def plus_inf(rows: Tensor, per_row: Tensor) -> Tensor:
    """``+inf`` added on ``rows`` (a NaN row stays NaN)."""
    return per_row + torch.where(rows, per_row.new_full((), _INF), per_row.new_zeros(()))


# --------------------------------------------------------------------------- wMSE
# Largest temperature at which the fast forms take IKL's raw-logit gaps e = z_t - z_s as
# T (log p - log q) (free, and without the per-row offset that would cost the closed form its
# digits). Each log-probability is rounded to a few ulps of its own size, about |z| / T + log C,
# so the gaps' rounding grows as T log C: at T <= 16 it stays within float32's usual error on
# the loss (about 1e-6 relative); above it the raw gaps are centred instead.
GAP_TEMPERATURE = 16.0


def raw_gaps(a: Tensor, b: Tensor, w: Tensor, pairs: bool = False) -> Tensor:
    """``e = a - b`` up to a per-row shift (a fresh tensor), taken around each row's entries at
    its largest weight ``w``: ``(a - (a_k - b_k)) - b``. Logits of very different levels
    (``z_t = z_s + 1000``) would otherwise round every gap to the offset's ulp (6e-5 at 1000)
    before the centring; here the first subtraction takes the offset out while the levels are
    alike, exactly. The column of the largest weight is the one the centring leans on most; an
    arbitrary one (the first) could be a masked class (-1e9 on one side), whose gap would
    round all the others.

    ``pairs``: each entry subtracts first whichever of ``b`` and ``a_k - b_k`` is nearer to it,
    for weights that may be positive on a class both sides mask (-1e9 in each: its gap ``0``
    would otherwise be rounded to ulp(1e9)); softmax weights are 0 there."""
    top = w.argmax(dim=1, keepdim=True)
    shift = a.gather(1, top) - b.gather(1, top)
    around = torch.sub(a, shift)
    if not pairs:
        return around.sub_(b)
    direct = torch.sub(a, b)
    return torch.where(direct.abs() <= around.abs(), direct.sub_(shift), around.sub_(b))


def wmse_fast(e: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""``Σ_j w_j (e_j - ē)²`` per row of gaps ``e`` (overwritten; any per-row shift, best none
    that is large: see :func:`raw_gaps`), ``w (e - ē)`` and the row totals ``W`` of any
    non-negative weights. The wMSE is ``½ W`` times the first, its gradient with respect to the
    target ``W w (e - ē)``."""
    total = w.sum(dim=1)
    # W = 0 only when every weight is 0; the row's loss and gradient are then 0
    mean = rowdot(w, e) / total.clamp_min(torch.finfo(e.dtype).tiny)
    centred = e.sub_(mean.unsqueeze(1))
    wc = w * centred
    return rowdot(wc, centred), wc, total


def wmse_unit(d: Tensor, w: Tensor, rows: bool) -> tuple[Tensor, Tensor]:
    r"""``Σ_j w_j (d_j - \bar d)²`` (per row for ``rows``, else summed) and ``w (d - \bar d)``
    for weights whose rows sum to 1, from gaps ``d`` (overwritten; any per-row shift, such as
    that of a difference of two log-softmaxes, changes neither the wMSE nor its gradient).

    The gaps are centred before the squares are summed: the uncentred sum
    ``Σ_j w_j (d_j - \bar d) d_j`` equals it, but loses its digits to the common offset of
    ``d`` (a confident teacher's row: 8.5e-8 for 4.35e-5)."""
    mean = rowdot(w, d)
    centred = d.sub_(mean.unsqueeze(1))
    wc = w * centred
    return dot(wc, centred, rows), wc


def wmse_exact(a: Tensor, b: Tensor, w: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
    r"""``½ W Σ_j w_j (e_j - ē)²`` of ``e = a - b`` on the classes in ``kept`` (the target's
    finite ones), and the rows where ``b`` is ``-inf`` on a kept class (their loss is ``+inf``;
    the caller adds it once).

    Nothing overflows that the value itself does not. Rows whose logits reach 2^124 are divided
    by a power of 2 first (their gaps could overflow), and weights above 1 by a power of 2 at
    least their largest; both divisions are exact, and their squares are multiplied back into
    the value last. Each term is formed as ``(w_j c_j) c_j``, which overflows only where the
    term does. Logits of 2e38 and weights near the float limit thus give the correctly rounded
    value instead of NaN. Nothing is ever scaled *up*: the backward multiplies by the scales
    before it divides by them, and factors below 1 (a row whose gaps are all equal, as when the
    student equals the teacher) would underflow there and drop the second derivative. The gaps
    are taken around their weighted mean (:func:`raw_gaps`' reason): no offset between the two
    sides' levels rounds them."""
    finfo = torch.finfo(w.dtype)
    w = torch.where(kept, w, w.new_zeros(()))
    missed = kept & torch.isneginf(b)
    valid = kept & ~missed
    w_top = _power_of_two_above(w.amax(dim=1, keepdim=True), 0)
    w = w / w_top
    big = torch.maximum(a.detach().abs(), b.detach().abs())
    big = torch.where(valid, big, big.new_zeros(())).amax(dim=1, keepdim=True)
    k = _power_of_two_above(big, _LOGIT_ROOM)
    a, b = a / k, b / k
    naive = torch.where(valid, a.detach() - b.detach(), a.new_zeros(()))
    shift = rowdot(w, naive) / w.sum(dim=1).clamp_min(finfo.tiny)
    shift = torch.where(torch.isfinite(shift), shift, shift.new_zeros(())).unsqueeze(1)
    e = torch.where(valid, (a - shift) - b, a.new_zeros(()))
    total = w.sum(dim=1)
    mean = rowdot(w, e) / total.clamp_min(finfo.tiny)
    centred = e - mean.unsqueeze(1)
    value = 0.5 * total * rowdot(w * centred, centred)
    # one at a time: 0 stays 0, a huge product is inf
    for top in (w_top, k, w_top, k):
        value = value * top.squeeze(1)
    return value, missed.any(dim=1)


# logits up to 2^124 are taken as they are: their gaps stay below 2^125, inside float32
_LOGIT_ROOM = 124


def _power_of_two_above(x: Tensor, room: int) -> Tensor:
    """``2^(ceil(log2 x) - room)`` where ``x`` exceeds ``2^room``, else 1: the exact divisor that
    brings ``x`` to at most ``2^room`` (NaN and inf give 1)."""
    highest = math.floor(math.log2(torch.finfo(x.dtype).max))  # 2^highest is finite
    power = (torch.log2(x.clamp_min(1.0)).ceil() - room).clamp(0.0, highest)
    power = torch.where(torch.isfinite(power), power, power.new_zeros(()))
    return torch.exp2(power)


def sce_exact(log_q: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
    r"""``-Σ_j p_j log q_j`` with ``0 · log 0 = 0``, and the rows where ``q_j = 0 < p_j`` (their
    loss is ``+inf``; the caller adds it once)."""
    present = p > 0
    missed = present & torch.isneginf(log_q)
    terms = torch.where(present & ~missed, log_q, log_q.new_zeros(()))
    return -rowdot(p, terms), missed.any(dim=1)


# --------------------------------------------------------------------------- public parts
class _WeightedMSE:
    """``½ W Σ_j w_j (e_j - ē)²`` with ``e = target - input`` (passed in that order); both sides
    get the gradient, ``± W w (e - ē)``. The weights are the one row-wise constant."""

    gs_factor, gt_factor = 1.0, -1.0  # the target's gradient is written in both

    def prepare(self, t, s, w):
        return (w,)

    def fast(self, t, s, consts, gt, gs, rows):
        (w,) = consts
        per_row, wc, total = wmse_fast(raw_gaps(t, s, w, pairs=True), w)
        for out in (gt, gs):
            if out is not None:
                torch.mul(wc, total.unsqueeze(1), out=out)
        return 0.5 * total * per_row

    def exact(self, t, s, w):
        return plus_inf(*reversed(wmse_exact(t, s, w, ~torch.isneginf(t.detach()))))


class _SoftCrossEntropy:
    """``-Σ_j p_j log σ(z / T)_j`` with ``p`` held constant (passed as the second tensor)."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.gs_factor = -1.0 / temperature  # the gradient is (σ Σ_j p_j - p) / T

    def prepare(self, s, p):
        return ()

    def fast(self, s, p, consts, gs, gp, rows):
        log_q = torch.log_softmax(fast_scaled(s, self.temperature), 1)
        if gs is not None:  # p - σ Σ_j p_j
            log_softmax_backward(p, log_q, out=gs)
        return -rowdot(p, log_q)

    def exact(self, s, p):
        log_q = F.log_softmax(exact_scaled(s, self.temperature), dim=1)
        return plus_inf(*reversed(sce_exact(log_q, p)))


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
        :math:`\tfrac14 \sum_{j,k} w_j w_k (e_j - e_k)^2`, in the wider of the inputs' dtypes.

    Example:
        >>> t = torch.tensor([[1.0, 2.0, 4.0]])
        >>> s = torch.zeros(1, 3)
        >>> weighted_mse(t, s, torch.ones(1, 3))  # ¼ Σ_jk (e_j - e_k)² = ¼·2·(1 + 9 + 4)
        tensor([7.])
    """
    check_logits(input, target)
    check_class_weights(weights, input)
    check_weight_values("weights", weights)
    dtype = compute_dtype(target, input)
    with no_autocast(input):
        w = weights_as("weights", weights, dtype)
        out = row_loss(_WeightedMSE(), as_dtype(target, dtype), as_dtype(input, dtype), w)
    return nan_where_invalid(out, weights)


def soft_cross_entropy(input: Tensor, target_probs: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Per-row :math:`-\sum_j p_j \log\sigma(z_s / T)_j` with ``target_probs`` held constant.

    Classes with :math:`p_j = 0` add 0, even where :math:`z_s = -\infty`; a ``-inf`` logit
    where :math:`p_j > 0` makes the row ``+inf``. ``target_probs`` must be finite and
    :math:`\ge 0` (they need not sum to 1).

    Example:
        >>> soft_cross_entropy(torch.zeros(1, 4), torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
        tensor([1.3863])
    """
    check_logits(input, target_probs)
    check_weight_values("target_probs", target_probs)  # a negative "probability" has no CE
    T = check_hyperparameters(temperature=temperature)["temperature"]
    dtype = compute_dtype(input, target_probs)
    with no_autocast(input):
        p = target_probs.detach().to(dtype)
        out = row_loss(_SoftCrossEntropy(T), as_dtype(input, dtype), p)
    return nan_where_invalid(out, target_probs)
