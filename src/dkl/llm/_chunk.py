r"""The per-chunk math of the vocabulary-scale losses, in closed form.

For one chunk of ``n`` tokens it takes the student's and the teacher's logits ``(n, V)`` and returns
the per-token loss and its gradient with respect to the student's logits, without autograd (the
chunked drivers turn that gradient into hidden-state and head gradients right away).

Zero-probability classes: a teacher logit of ``-inf`` (a masked class, a padded vocabulary entry,
a class outside a top-k teacher) has probability 0. It contributes 0 to the KL
(:math:`0 \log 0 = 0`), 0 to the soft-label CE, and has weight 0 in IKL's wMSE, where its
difference :math:`e_j = z_{t,j} - z_{s,j} = -\infty` is dropped instead of multiplied
(:math:`0 \cdot \infty` would be NaN). A class whose weight underflows to 0 drops out the same way,
which changes nothing: its term was 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("ikl", "kl")
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
    r"""IKL or KL per row of ``(n, V)`` logits and the gradient w.r.t. ``zs``.

    IKL: :math:`\beta\,\tfrac12 W \sum_j w_j (e_j - \bar e)^2 - \alpha \sum_j p_j \log q_j` with
    :math:`e = z_t - z_s`, :math:`w = \sigma(z_t/T_2)`, :math:`p = \sigma(z_t/T)`,
    :math:`q = \sigma(z_s/T)`; gradient :math:`-\beta W w (e - \bar e) + \tfrac{\alpha}{T}(q - p)`.
    KL: :math:`\sum_j p_j(\log p_j - \log q_j)`; gradient :math:`\tfrac1T (q - p)`.
    """
    inv_t = 1.0 / temperature
    log_q = F.log_softmax(zs * inv_t if temperature != 1.0 else zs, dim=1)
    log_p = F.log_softmax(zt * inv_t if temperature != 1.0 else zt, dim=1)
    p = log_p.exp()
    if kind == "kl":
        d = (log_p - log_q).masked_fill_(p == 0, 0.0)  # 0 · log 0 = 0
        rows = _rowdot(p, d)
        parts = {"kl": rows}
        if not need_grad:
            return rows, None, parts
        return rows, log_q.exp_().sub_(p).mul_(inv_t), parts

    sce = -_rowdot(p, log_q)
    if weight_temperature == temperature:
        w = p
    else:
        w = F.softmax(zt * (1.0 / weight_temperature), dim=1)
    e = (zt - zs).masked_fill_(w == 0, 0.0)  # zero-weight classes drop out (no 0 · inf)
    total = w.sum(1)
    mean = _rowdot(w, e) / total.clamp_min(torch.finfo(e.dtype).tiny)
    centred = e.sub_(mean.unsqueeze(1))
    wc = w * centred
    wmse = 0.5 * total * _rowdot(wc, centred)
    rows = beta * wmse + alpha * sce
    parts = {"wmse": wmse, "sce": sce}
    if not need_grad:
        return rows, None, parts
    grad = log_q.exp_().sub_(p).mul_(alpha * inv_t)
    grad.sub_(wc.mul_((beta * total).unsqueeze(1)))
    return rows, grad, parts


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
    """Divergence (+ ``ce_weight`` · hard CE) per token of one chunk; ignored tokens give 0."""
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
    :math:`m = 1 - \sum_k e^{v_k}` is spread evenly over the student's other classes, each getting
    the log-probability :math:`\log(m / (V - k'))` (``-inf`` when :math:`m = 0`).

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
        mass = (1.0 - values.exp().sum(1)).clamp_min(0.0)
        others = (vocab - inside.sum(1)).clamp_min(1)
        dense[:, :vocab] = torch.log(mass / others).unsqueeze(1)
    dense.scatter_(1, torch.where(inside, indices, vocab), values)
    return dense[:, :vocab]
