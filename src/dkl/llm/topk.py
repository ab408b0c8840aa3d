r"""Sparse (top-k) teachers: losses from a teacher's top-k outputs, and a disk cache of them.

A served or cached teacher often gives only its ``k`` most likely next tokens per position, as
``(indices, values)`` with values being logits or log-probabilities. The classes outside the
top-k are treated in one of two documented ways (``tail``):

- ``"renormalize"`` (default): they get probability 0, i.e. the teacher is its top-k renormalised.
  They then contribute nothing to the KL and have weight 0 in IKL's wMSE (exactly as ``-inf``
  logits do); the JSD (``beta < 1``) stays finite through its mixture. Works with logits or
  log-probabilities (a per-token shift changes none of these losses). The reverse KL is ``+inf``
  there (the student gives those classes mass the teacher does not), so it refuses this tail
  for ``k < V``.
- ``"uniform"``: ``values`` are log-probabilities of the full distribution; the missing mass
  :math:`m = 1 - \sum_k e^{v_k}` is spread evenly over the other ``V - k`` classes. Every
  divergence takes it (the reverse KL as long as :math:`m > 0`).

With ``k = V`` both equal the full loss. How far they are from it for smaller ``k`` depends on how
peaked the teacher is; ``benchmarks/llm_loss.py --topk`` measures it on a trained model.

:class:`~dkl.llm.topk_cache.TopKCache` runs a teacher once over a tokenised data set and stores
its top-k log-probabilities per token on disk (NumPy memory maps: nothing is loaded until read),
so the teacher need not be in memory while the student trains.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dkl.llm._checks import (
    _check_mixture,
    _check_weight,
    refuse_double_backward,
    refuse_functorch,
)
from dkl.llm._chunk import (
    TAILS,
    chunk_loss,
    dense_from_topk,
    empty_rows_error,
    unbounded_error,
    unbounded_rows,
)
from dkl.llm._teachers import check_topk_entries

__all__ = [
    "TopKCache",
    "TopKCollator",
    "topk_ikl_loss",
    "topk_jsd_loss",
    "topk_kl_loss",
    "topk_logprobs",
    "topk_reverse_kl_loss",
]

REDUCTIONS = ("none", "mean", "sum")


def topk_logprobs(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest log-probabilities per row of ``(..., V)`` logits: ``(indices, values)``.

    >>> idx, val = topk_logprobs(torch.tensor([[0.0, 2.0, 1.0]]), 2)
    >>> idx.tolist(), [round(v, 4) for v in val[0].tolist()]
    ([[1, 2]], [-0.4076, -1.4076])
    """
    if not isinstance(k, int) or not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"Expected 1 <= k <= V = {logits.shape[-1]}, got {k!r}")
    values, indices = F.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return indices, values


class _RowLoss(torch.autograd.Function):
    """Per-row loss whose gradient w.r.t. the logits is computed in forward (closed form)."""

    @staticmethod
    def forward(ctx, input, target, mask, cfg):
        res = chunk_loss(
            input.to(cfg["dtype"]),
            target,
            labels=None,
            valid=mask,
            need_grad=ctx.needs_input_grad[0],
            ce_weight=0.0,
            **{k: cfg[k] for k in ("kind", "alpha", "beta", "temperature", "weight_temperature")},
        )
        ctx.save_for_backward(res.grad)
        ctx.input_dtype = input.dtype
        return res.rows

    @staticmethod
    def backward(ctx, grad_rows):
        refuse_double_backward("The top-k dkl.llm loss")
        (grad,) = ctx.saved_tensors
        return (grad * grad_rows.unsqueeze(1)).to(ctx.input_dtype), None, None, None


def _topk_loss(kind, input, topk_indices, topk_values, *, tail, reduction, mask, **kw) -> Tensor:
    if not isinstance(input, Tensor) or input.dim() != 2 or not input.is_floating_point():
        got = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(f"Expected input logits of shape (B, V), got {got}")
    B, V = input.shape
    for name, x in (("topk_indices", topk_indices), ("topk_values", topk_values)):
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != B:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Expected {name} of shape (B, k) with B = {B}, got {got}")
    if topk_indices.shape != topk_values.shape:
        raise ValueError(
            f"Expected topk_values of the indices' shape {tuple(topk_indices.shape)}, got "
            f"{tuple(topk_values.shape)}"
        )
    if tail not in TAILS:
        raise ValueError(f"Unknown tail {tail!r}: expected one of {TAILS}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"Unknown reduction {reduction!r}: expected one of {REDUCTIONS}")
    if mask is not None and (
        not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (B,)
    ):
        raise ValueError(f"Expected mask a bool tensor of shape (B,) = ({B},)")
    check_topk_entries(topk_indices, topk_values, V, tail, mask)
    cfg = {
        "kind": kind,
        "alpha": _check_weight("alpha", kw.get("alpha", 1.0), positive=False),
        "beta": (
            _check_mixture(kw["beta"])
            if kind == "jsd"
            else _check_weight("beta", kw.get("beta", 1.0), positive=False)
        ),
        "temperature": _check_weight("temperature", kw["temperature"], positive=True),
        "weight_temperature": _check_weight(
            "weight_temperature", kw.get("weight_temperature", 1.0), positive=True
        ),
        "dtype": torch.float64 if input.dtype == torch.float64 else torch.float32,
    }
    target = dense_from_topk(topk_indices, topk_values.detach(), V, tail, cfg["dtype"])
    empty = target.amax(1) == -math.inf
    n = int((empty & mask).sum() if mask is not None else empty.sum())
    if n:
        raise empty_rows_error(n)
    unbounded = unbounded_rows(input.detach(), target, kind, cfg["beta"])
    if unbounded is not None:
        n = int((unbounded & mask).sum() if mask is not None else unbounded.sum())
        if n:
            raise unbounded_error(n)
    refuse_functorch("The top-k dkl.llm loss")
    rows = _RowLoss.apply(input, target, mask, cfg)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = mask.sum().clamp_min(1) if mask is not None else max(B, 1)
    return rows.sum() / count


def topk_ikl_loss(
    input: Tensor,
    topk_indices: Tensor,
    topk_values: Tensor,
    *,
    alpha: float,
    beta: float,
    temperature: float,
    weight_temperature: float,
    tail: str = "renormalize",
    reduction: str = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    r"""IKL of student logits ``(B, V)`` against a top-k teacher ``(B, k)`` indices and values.

    The teacher's logits are the top-k values at their indices and, outside, ``-inf``
    (``tail="renormalize"``) or :math:`\log(m/(V-k))` (``tail="uniform"``, values being
    log-probabilities); then the loss is :func:`dkl.ikl_loss`'s. ``mask`` (bool ``(B,)``) drops
    rows as in :func:`dkl.ikl_loss`.

    Example:
        >>> import dkl
        >>> z_s, z_t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
        >>> idx, val = topk_logprobs(z_t, 10)  # k = V: the full loss
        >>> hp = dict(alpha=1.0, beta=1.0, temperature=2.0, weight_temperature=1.0)
        >>> full = dkl.ikl_loss(z_s, z_t, **hp)
        >>> bool(torch.allclose(topk_ikl_loss(z_s, idx, val, **hp), full, atol=1e-5))
        True
    """
    return _topk_loss(
        "ikl",
        input,
        topk_indices,
        topk_values,
        tail=tail,
        reduction=reduction,
        mask=mask,
        alpha=alpha,
        beta=beta,
        temperature=temperature,
        weight_temperature=weight_temperature,
    )


def topk_kl_loss(
    input: Tensor,
    topk_indices: Tensor,
    topk_values: Tensor,
    *,
    temperature: float = 1.0,
    tail: str = "renormalize",
    reduction: str = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    r"""KL of student logits ``(B, V)`` against a top-k teacher; the tail as in
    :func:`topk_ikl_loss`, the loss as :func:`dkl.kl_loss` (no :math:`T^2`)."""
    return _topk_loss(
        "kl",
        input,
        topk_indices,
        topk_values,
        tail=tail,
        reduction=reduction,
        mask=mask,
        temperature=temperature,
    )


def topk_reverse_kl_loss(
    input: Tensor,
    topk_indices: Tensor,
    topk_values: Tensor,
    *,
    temperature: float = 1.0,
    tail: str = "uniform",
    reduction: str = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    r"""Reverse KL :math:`\mathrm{KL}(\sigma(z_s/T) \,\|\, \sigma(z_t/T))` of student logits
    ``(B, V)`` against a top-k teacher (the loss of :func:`dkl.llm.fused_linear_reverse_kl`).

    ``tail="uniform"`` (the default here) needs top-k *log-probabilities* with missing mass > 0;
    ``tail="renormalize"`` gives the classes outside the top-k probability 0, where the reverse KL
    is ``+inf``, and so raises unless the top-k covers every class.

    Example:
        >>> z_s, z_t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
        >>> idx, val = topk_logprobs(z_t, 3)
        >>> topk_reverse_kl_loss(z_s, idx, val, temperature=2.0).backward()
    """
    return _topk_loss(
        "reverse_kl",
        input,
        topk_indices,
        topk_values,
        tail=tail,
        reduction=reduction,
        mask=mask,
        temperature=temperature,
    )


def topk_jsd_loss(
    input: Tensor,
    topk_indices: Tensor,
    topk_values: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: str = "renormalize",
    reduction: str = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    r"""Generalised JSD of student logits ``(B, V)`` against a top-k teacher (the loss of
    :func:`dkl.llm.fused_linear_jsd`: ``beta`` 0 / 1 are the forward / reverse KL); both tails
    work for ``beta < 1``, ``beta = 1`` has :func:`topk_reverse_kl_loss`'s rules.

    Example:
        >>> z_s, z_t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
        >>> idx, val = topk_logprobs(z_t, 3)
        >>> topk_jsd_loss(z_s, idx, val, beta=0.5).backward()
    """
    return _topk_loss(
        "jsd",
        input,
        topk_indices,
        topk_values,
        tail=tail,
        reduction=reduction,
        mask=mask,
        beta=beta,
        temperature=temperature,
    )


# the disk cache lives in dkl.llm.topk_cache; its names stay importable from here
from dkl.llm.topk_cache import TopKCache, TopKCollator
