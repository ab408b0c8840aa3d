"""float64 references the fused paths are checked against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def wmse64(e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """½ W Σ_j w_j (e_j - ē)² per row, ē the w-weighted mean (= ¼ Σ_jk w_j w_k (e_j - e_k)²)."""
    total = w.sum(1, keepdim=True)
    mean = (w * e).sum(1, keepdim=True) / total.clamp_min(1e-300)
    return 0.5 * total.squeeze(1) * (w * (e - mean) ** 2).sum(1)


def oracle(
    s,
    t,
    *,
    kind,
    alpha=1.0,
    beta=1.0,
    temperature=1.0,
    weight_temperature=1.0,
    class_weights=None,
    mask=None,
):
    """Per-row KL / DKL / IKL in float64. A ``-inf`` target logit is a class of probability 0:
    each row is restricted to its finite target classes (no KL, sCE or wMSE term, whatever the
    class weight), the student's softmax still runs over all classes."""
    s64, t64 = s.double(), t.double()
    finite = torch.isfinite(t64)
    log_q = F.log_softmax(s64 / temperature, 1)
    log_p = torch.where(finite, F.log_softmax(t64 / temperature, 1), 0.0)  # no 0 · (-inf)
    p = torch.where(finite, log_p.exp(), 0.0)
    if kind == "kl":
        per = (p * (log_p - log_q)).sum(1)
    elif kind == "dkl":
        w = p.detach()
        e = torch.where(finite, (t64 - s64.detach()) / temperature, 0.0)
        per = beta * wmse64(e, w) - alpha * (w * log_q).sum(1)
    else:
        if class_weights is not None:
            w = torch.where(finite, class_weights.double(), 0.0)
        else:
            w = F.softmax(t64.detach() / weight_temperature, 1)
        e = torch.where(finite, t64 - s64, 0.0)
        per = beta * wmse64(e, w) - alpha * (p.detach() * log_q).sum(1)
    if mask is not None:
        per = torch.where(mask, per, 0.0)
    return per
