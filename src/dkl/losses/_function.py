r"""One autograd function for every loss: a fast closed form, an exact fallback, and second
derivatives.

Each loss is a *rule* with three methods:

- ``fast_forward(s, t, *extras, need_s=, need_t=)``: the per-row loss in as few full-size passes
  as the closed form allows, assuming finite logits, and the tensors its backward reads;
- ``fast_backward(g, saved, need_s, need_t)``: the gradients from those tensors (no autograd);
- ``exact(s, t, *extras)``: the same loss in plain differentiable torch operations, with every
  non-finite rule spelled out (``-inf`` target classes dropped, a ``-inf`` student logit on a kept
  class giving ``+inf``, NaN rows) and scaled so that no intermediate overflows.

The fast form is exact whenever none of its rows comes out NaN: a ``-inf`` target logit always
makes its row NaN there (``0 · -inf``), and so does anything that overflowed. One look at the
``(B,)`` result (not at the ``(B, C)`` logits) decides, so finite logits pay nothing for the
rules; when some row is NaN, the exact form gives the values and the gradients.

Second derivatives: a backward that runs under ``create_graph=True`` (grad mode on) rebuilds the
loss with the exact form from the saved inputs and differentiates it with autograd, so the
gradient it returns is itself differentiable (gradient penalties, meta-learning, Hessian-vector
products). The first-order path never pays for this.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from dkl._checks import is_compiling


class Rule(Protocol):
    def fast_forward(
        self, s: Tensor, t: Tensor, *extras: Tensor | None, need_s: bool, need_t: bool
    ) -> tuple[Tensor, tuple[Any, ...]]: ...

    def fast_backward(
        self, g: Tensor, saved: tuple[Any, ...], need_s: bool, need_t: bool
    ) -> tuple[Tensor | None, Tensor | None]: ...

    def exact(self, s: Tensor, t: Tensor, *extras: Tensor | None) -> Tensor: ...


class _RowLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rule: Rule, s: Tensor, t: Tensor, *extras: Tensor | None) -> Tensor:  # type: ignore[override]
        need_s, need_t = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        per_row, saved = rule.fast_forward(s, t, *extras, need_s=need_s, need_t=need_t)
        ctx.exact = bool(per_row.isnan().any())
        if ctx.exact:  # non-finite logits (or an overflow) somewhere: the exact form decides
            per_row, saved = rule.exact(s, t, *extras), ()
        ctx.rule, ctx.n_saved = rule, len(saved)
        if need_s or need_t:
            tensors = [x if isinstance(x, Tensor) else None for x in saved]
            ctx.others = [None if isinstance(x, Tensor) else x for x in saved]
            ctx.save_for_backward(s, t, *extras, *tensors)
        return per_row

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        need_s, need_t = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        n_extras = len(ctx.needs_input_grad) - 3
        s, t, *rest = ctx.saved_tensors
        extras, saved = rest[:n_extras], rest[n_extras:]
        if ctx.exact or torch.is_grad_enabled():
            gs, gt = exact_grads(ctx.rule, s, t, extras, g, need_s, need_t)
        else:
            saved = tuple(x if x is not None else o for x, o in zip(saved, ctx.others))
            gs, gt = ctx.rule.fast_backward(g, saved, need_s, need_t)
        return (None, gs, gt, *([None] * n_extras))


def exact_grads(
    rule: Rule,
    s: Tensor,
    t: Tensor,
    extras: list[Tensor | None],
    g: Tensor,
    need_s: bool,
    need_t: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Vector-Jacobian product of the exact form. Under ``create_graph=True`` it is built from
    the saved inputs themselves, so the result stays connected to the graph."""
    create = torch.is_grad_enabled()
    if not create:  # fresh leaves: nothing to connect to
        s = s.detach().requires_grad_(need_s)
        t = t.detach().requires_grad_(need_t)
    with torch.enable_grad():
        per_row = rule.exact(s, t, *extras)
        wanted = [x for x, need in ((s, need_s), (t, need_t)) if need]
        found = torch.autograd.grad(per_row, wanted, g, create_graph=create, allow_unused=True)
    found = [torch.zeros_like(x) if d is None else d for x, d in zip(wanted, found)]
    gs = found.pop(0) if need_s else None
    gt = found.pop(0) if need_t else None
    return gs, gt


def row_loss(rule: Rule, s: Tensor, t: Tensor, *extras: Tensor | None) -> Tensor:
    """Per-row loss ``(B,)`` of ``rule``; under ``torch.compile`` the exact form alone (the
    compiler fuses it, and the NaN look would break the graph)."""
    if is_compiling():
        return rule.exact(s, t, *extras)
    return _RowLoss.apply(rule, s, t, *extras)
