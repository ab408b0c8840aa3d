r"""The per-chunk math of the vocabulary-scale losses, in closed form.

For one chunk of ``n`` tokens it takes the student's and the teacher's logits ``(n, V)`` and returns
the per-token loss and its gradient with respect to the student's logits, without autograd (the
chunked drivers turn that gradient into hidden-state and head gradients right away).

Zero-probability classes: a teacher logit of ``-inf`` (a masked class, a padded vocabulary entry,
a class outside a top-k teacher) has probability 0. It contributes 0 to the KL
(:math:`0 \log 0 = 0`), 0 to the soft-label CE, and has weight 0 in IKL's wMSE, where its
difference :math:`e_j = z_{t,j} - z_{s,j} = -\infty` is dropped instead of multiplied
(:math:`0 \cdot \infty` would be NaN). A class whose weight underflows to 0 drops out the same way,
which changes nothing: its term was 0. In the JSD the mixture :math:`m = \beta p + (1-\beta) q`
is > 0 wherever :math:`p` or :math:`q` is, so both of its KL terms stay finite. The reverse KL
:math:`\sum_j q_j \log(q_j / p_j)` is :math:`+\infty` when :math:`p_j = 0 < q_j`:
:func:`unbounded_rows` finds those tokens and the callers refuse them (a finite stand-in such as
clamping :math:`\log p_j` would be a number that depends on the float type, not the divergence).
The other way round, a ``-inf`` student logit on a class the teacher keeps makes the forward KL,
IKL and the CE ``+inf`` for that token (IKL's difference :math:`e_j = +\infty` is taken as 0 there,
so the gradients stay finite, as in :func:`dkl.ikl_loss` and the fused kernel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dkl.losses._common import no_autocast

DIVERGENCES = ("ikl", "kl", "reverse_kl", "jsd")
"""The divergences of the chunked losses by name: IKL, forward KL, reverse KL, generalised JSD."""
KERNEL_KINDS = ("ikl", "kl")  # the ones the fused Triton kernel of dkl.ops computes
TAILS = ("renormalize", "uniform")


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    return torch.linalg.vecdot(a, b, dim=1)


@dataclass(frozen=True)
class LogitTransform:
    r"""``z -> c·tanh(s·z / c)`` (soft-capping after scaling), or ``z -> s·z`` without a cap.

    Gemma-2 caps its final logits at ``c = 30`` (``final_logit_softcapping``); Cohere multiplies
    them by ``logit_scale``; Granite divides them by ``logits_scaling`` (``s = 1 / logits_scaling``).
    ``-inf`` stays ``-inf`` (a masked class stays masked; the cap would make it ``-c``).
    """

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"Expected a finite logit scale > 0, got {self.scale}")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise ValueError(f"Expected a finite softcap > 0 (or None), got {self.softcap}")

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, z: Tensor, need_grad: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(transformed, dz'/dz)``; the derivative is ``None`` for the identity and when not asked."""
        if self.identity:
            return z, None
        if self.softcap is None:
            return z * self.scale, (torch.full_like(z[:1, :1], self.scale) if need_grad else None)
        t = torch.tanh(z * (self.scale / self.softcap))
        out = torch.where(z == -math.inf, z, t * self.softcap)
        return out, ((1.0 - t * t).mul_(self.scale) if need_grad else None)


@dataclass
class ChunkResult:
    rows: Tensor  # (n,) loss per token, 0 for ignored tokens
    grad: Tensor | None  # (n, V) d rows / d student logits (unscaled), 0 for ignored tokens
    parts: dict[str, Tensor]  # name -> (n,) unweighted parts, 0 for ignored tokens


def effective_kind(kind: str, beta: float) -> str:
    """The JSD at ``beta`` 0 / 1 is forward / reverse KL exactly (as TRL's ``GKDTrainer`` has it:
    the mixture formula would give 0 there)."""
    if kind == "jsd" and beta in (0.0, 1.0):
        return "kl" if beta == 0.0 else "reverse_kl"
    return kind


def unbounded_rows(zs: Tensor, zt: Tensor, kind: str, beta: float) -> Tensor | None:
    """``(n,)`` bool: tokens whose reverse KL is ``+inf`` (a class with a ``-inf`` teacher logit and
    a finite student one); ``None`` for the divergences that are finite there."""
    if effective_kind(kind, beta) != "reverse_kl":
        return None
    return ((zt == -math.inf) & (zs > -math.inf)).any(1)


def unbounded_error(count: int) -> ValueError:
    return ValueError(
        "Expected a teacher that gives every class probability > 0 for the reverse KL (jsd with "
        f"beta = 1), got {count} token(s) with a -inf teacher logit where the student's is "
        "finite: the reverse KL is +inf there. A top-k teacher needs topk_tail='uniform' (with "
        "missing mass > 0); or use jsd with beta < 1, or the forward KL"
    )


def empty_rows_error(count: int) -> ValueError:
    return ValueError(
        f"Expected teacher logits with at least one finite entry per token, got {count} "
        "token(s) whose teacher logits are all -inf (no class has probability > 0)"
    )


def divergence_rows(
    zs: Tensor,
    zt: Tensor,
    *,
    kind: str,
    alpha: float,
    beta: float,
    temperature: float,
    weight_temperature: float,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    r"""A divergence per row of ``(n, V)`` logits and its gradient w.r.t. ``zs``.

    With :math:`p = \sigma(z_t/T)`, :math:`q = \sigma(z_s/T)`:

    - IKL: :math:`\beta\,\tfrac12 W \sum_j w_j (e_j - \bar e)^2 - \alpha \sum_j p_j \log q_j`
      with :math:`e = z_t - z_s`, :math:`w = \sigma(z_t/T_2)`; gradient
      :math:`-\beta W w (e - \bar e) + \tfrac{\alpha}{T}(q - p)`.
    - KL: :math:`\sum_j p_j(\log p_j - \log q_j)`; gradient :math:`\tfrac1T (q - p)`.
    - reverse KL: :math:`\sum_j q_j d_j` with :math:`d = \log q - \log p`; gradient
      :math:`\tfrac1T\, q \odot (d - \langle q, d\rangle)`.
    - JSD (``beta`` is its mixture weight, not IKL's): with :math:`m = \beta p + (1-\beta) q`,
      :math:`\beta\,\mathrm{KL}(p\|m) + (1-\beta)\,\mathrm{KL}(q\|m)`; gradient
      :math:`\tfrac{1-\beta}{T}\, q \odot (r - \langle q, r\rangle)` with
      :math:`r = \log q - \log m`. ``beta`` 0 / 1 give the KL / reverse KL rows.

    The parts are named ``wmse`` and ``sce`` (IKL) or after the kind (``kl``, ``rkl``, ``jsd``).
    """
    inv_t = 1.0 / temperature
    name = {"kl": "kl", "reverse_kl": "rkl", "jsd": "jsd"}.get(kind)
    kind = effective_kind(kind, beta)
    if kind == "reverse_kl":
        return _reverse_kl_rows(zs, zt, inv_t, name, need_grad)
    if kind == "jsd":
        return _jsd_rows(zs, zt, beta, inv_t, need_grad)
    log_q, log_p = _log_softmax(zs, inv_t), _log_softmax(zt, inv_t)
    p = log_p.exp()
    if kind == "kl":
        d = (log_p - log_q).masked_fill_(p == 0, 0.0)  # 0 · log 0 = 0
        rows = _rowdot(p, d)
        parts = {name: rows}
        if not need_grad:
            return rows, None, parts
        return rows, log_q.exp_().sub_(p).mul_(inv_t), parts

    sce = -_rowdot(p, log_q)
    if weight_temperature == temperature:
        w = p
    else:
        w = F.softmax(zt * (1.0 / weight_temperature), dim=1)
    e = (zt - zs).masked_fill_(w == 0, 0.0)  # zero-weight classes drop out (no 0 · inf)
    # a -inf student logit on a kept class: e = +inf there, taken as 0 (the row's loss is +inf
    # through the sCE; the other classes' gradients stay finite, as in dkl.ikl_loss)
    e.masked_fill_(torch.isposinf(e), 0.0)
    total = w.sum(1)
    mean = _rowdot(w, e) / total.clamp_min(torch.finfo(e.dtype).tiny)
    centred = e.sub_(mean.unsqueeze(1))
    wc = w * centred
    wmse = 0.5 * total * _rowdot(wc, centred)
    rows = beta * wmse + alpha * sce
    # +inf where the student rules out a class the teacher keeps (sce is +inf exactly there),
    # also at alpha = 0
    rows = torch.where(torch.isposinf(sce), math.inf, rows)
    parts = {"wmse": wmse, "sce": sce}
    if not need_grad:
        return rows, None, parts
    grad = log_q.exp_().sub_(p).mul_(alpha * inv_t)
    grad.sub_(wc.mul_((beta * total).unsqueeze(1)))
    return rows, grad, parts


def _log_softmax(z: Tensor, inv_t: float) -> Tensor:
    return F.log_softmax(z * inv_t if inv_t != 1.0 else z, dim=1)


def _reverse_kl_rows(zs, zt, inv_t, name, need_grad):
    r""":math:`\mathrm{KL}(q\|p)` per row; classes with :math:`q_j = 0` drop out (0 log 0 = 0).
    Three ``(n, V)`` buffers at most. Rows with :math:`p_j = 0 < q_j` come out ``inf`` / NaN: the
    callers refuse them (:func:`unbounded_rows`)."""
    log_q, log_p = _log_softmax(zs, inv_t), _log_softmax(zt, inv_t)
    q = log_q.exp()
    d = log_q.sub_(log_p).masked_fill_(q == 0, 0.0)
    del log_p
    rows = _rowdot(q, d)
    parts = {name: rows}
    if not need_grad:
        return rows, None, parts
    return rows, d.sub_(rows.unsqueeze(1)).mul_(q).mul_(inv_t), parts


def _jsd_rows(zs, zt, beta, inv_t, need_grad):
    """The JSD for ``0 < beta < 1``, the mixture in log space (no underflow of :math:`m`); four
    ``(n, V)`` buffers at most."""
    log_q, log_p = _log_softmax(zs, inv_t), _log_softmax(zt, inv_t)
    log_m = log_p + math.log(beta)
    other = log_q + math.log1p(-beta)
    torch.logaddexp(log_m, other, out=log_m)
    del other
    p = log_p.exp()
    kl_pm = _rowdot(p, log_p.sub_(log_m).masked_fill_(p == 0, 0.0))
    del p, log_p
    q = log_q.exp()
    r = log_q.sub_(log_m).masked_fill_(q == 0, 0.0)
    del log_m
    kl_qm = _rowdot(q, r)
    rows = beta * kl_pm + (1.0 - beta) * kl_qm
    parts = {"jsd": rows}
    if not need_grad:
        return rows, None, parts
    return rows, r.sub_(kl_qm.unsqueeze(1)).mul_(q).mul_((1.0 - beta) * inv_t), parts


def ce_rows(zs: Tensor, labels: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Hard-label cross-entropy per row and its gradient ``softmax(zs) - onehot(y)``.

    ``labels`` must already be in ``[0, V)`` (ignored tokens clamped; the caller zeroes them)."""
    log_q = F.log_softmax(zs, dim=1)
    rows = -log_q.gather(1, labels.unsqueeze(1)).squeeze(1)
    if not need_grad:
        return rows, None
    grad = log_q.exp_()
    grad.scatter_add_(1, labels.unsqueeze(1), grad.new_full((zs.shape[0], 1), -1.0))
    return rows, grad


def chunk_loss(
    zs: Tensor,
    zt: Tensor,
    *,
    kind: str,
    alpha: float,
    beta: float,
    temperature: float,
    weight_temperature: float,
    ce_weight: float,
    labels: Tensor | None,
    valid: Tensor | None,
    need_grad: bool,
) -> ChunkResult:
    """Divergence (+ ``ce_weight`` · hard CE) per token of one chunk; ignored tokens give 0.

    Autocast is off here: under it the row sums (``vecdot``) would run in bfloat16 / float16."""
    with no_autocast(zs):
        rows, grad, parts = divergence_rows(
            zs,
            zt,
            kind=kind,
            alpha=alpha,
            beta=beta,
            temperature=temperature,
            weight_temperature=weight_temperature,
            need_grad=need_grad,
        )
        if ce_weight > 0:
            ce, g_ce = ce_rows(zs, labels.clamp_min(0), need_grad)
            rows = rows + ce_weight * ce
            parts["ce"] = ce
            if need_grad:
                grad.add_(g_ce, alpha=ce_weight)
        if valid is not None:
            zero = rows.new_zeros(())
            rows = torch.where(valid, rows, zero)
            parts = {k: torch.where(valid, v, zero) for k, v in parts.items()}
            if grad is not None:
                grad.masked_fill_(~valid.unsqueeze(1), 0.0)
        return ChunkResult(rows, grad, parts)


def dense_from_topk(
    indices: Tensor, values: Tensor, vocab: int, tail: str, dtype: torch.dtype
) -> Tensor:
    r"""``(n, V)`` teacher logits from its top-k ``(indices, values)``.

    ``tail="renormalize"``: every class outside the top-k gets ``-inf`` (probability 0), so the
    teacher is its top-k renormalised; ``values`` may be logits or log-probabilities (a per-row
    shift changes neither the softmax nor the wMSE). ``tail="uniform"``: ``values`` are
    log-probabilities of the full distribution, and the missing mass
    :math:`m = 1 - \sum_k e^{v_k}` (formed in float64) is spread evenly over the student's other
    classes, each getting the log-probability :math:`\log(m / (V - k'))` (``-inf`` when
    :math:`m = 0`).

    Entries with an index ``>= V`` (a teacher vocabulary larger than the student's) are dropped,
    as the dense path cuts the teacher's logits to the student's ``V`` classes; ``k'`` counts the
    entries kept. The softmax of the result renormalises over the ``V`` classes.
    """
    n = indices.shape[0]
    values = values.to(dtype)
    indices = indices.long()
    inside = indices < vocab
    dense = values.new_full((n, vocab + 1), -math.inf)  # column V collects the dropped entries
    if tail == "uniform":
        # 1 - Σ e^v in float64 as -expm1(logsumexp v): a confident teacher's missing mass
        # (1e-8) is below float32's rounding of a sum near 1, which made it 0 or 3x too large
        mass = (-torch.expm1(torch.logsumexp(values.double(), 1))).clamp_min(0.0)
        others = (vocab - inside.sum(1)).clamp_min(1)
        dense[:, :vocab] = torch.log(mass / others).to(dtype).unsqueeze(1)
    dense.scatter_(1, torch.where(inside, indices, vocab), values)
    return dense[:, :vocab]
