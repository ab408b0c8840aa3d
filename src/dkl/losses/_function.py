r"""One autograd function for every loss: a fast closed form, an exact fallback, and second
derivatives.

Each loss is a *rule* with three methods:

- ``prepare(s, t, *extras)``: the row-wise constants of the batch (``(B, ·)`` tensors or
  ``None``), e.g. the class weights, or GKL's weights once its batch normaliser is known;
- ``fast(s, t, consts, gs, gt, rows)``: the loss of a block of rows, assuming finite logits, in
  as few full-size passes as the closed form allows: per row for ``rows``, else their sum (the
  mean and the sum need no more, and a whole-block dot product is one BLAS call). Where ``gs`` /
  ``gt`` are given it writes there the gradient of the rows' loss with respect to ``s`` / ``t``,
  divided by the rule's ``gs_factor`` / ``gt_factor`` (constants such as ``1 / T`` are applied
  in backward, with the upstream gradient, to a ``(B,)`` or 0-d tensor instead of a ``(B, C)``);
- ``exact(s, t, *extras)``: the same loss in plain differentiable torch operations, with every
  non-finite rule spelled out (``-inf`` target classes dropped, a ``-inf`` student logit on a kept
  class giving ``+inf``, NaN rows) and scaled so that no intermediate overflows.

The fast form is exact whenever none of its rows comes out NaN: a ``-inf`` target logit always
makes its row NaN there (``0 · -inf``), and so does anything that overflowed. No row of a loss is
``-inf``, so one look at the sum of the rows (not at the ``(B, C)`` logits) decides, and finite
logits pay nothing for the rules; when the sum is NaN, the exact form gives the values and the
gradients (one host sync per call on a GPU, where the fused kernel is the default).

Speed: on CPU the fast form runs on blocks of rows small enough that its temporaries stay in the
cache (a block holds a few rows per thread), and computes the gradient there too, so each logit is
read from memory about once and each gradient written once; backward then scales those buffers
in place by the upstream gradient and hands them to autograd (no copy; a second backward through
a retained graph computes them again, to the same bits). A loss that nobody differentiates
(``torch.no_grad``, inputs without grad) computes no gradient.

Second derivatives: a backward that runs under ``create_graph=True`` (grad mode on) rebuilds the
loss with the exact form from the saved inputs and differentiates it with autograd, so the
gradient it returns is itself differentiable (gradient penalties, meta-learning, Hessian-vector
products). The first-order path never pays for this. In eager mode the exact form runs in float64
for narrower inputs whose logits reach 2^100 (:func:`wide_exact`): its rescaled backward needs
the range there.
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import torch
from torch import Tensor
from torch._C import _functorch

from dkl._checks import in_transform, is_compiling, savable
from dkl.losses._common import reduce

# Elements per block of rows and CPU thread: a few (rows, C) float32 temporaries of 128 KiB per
# thread stay in a 1-2 MiB L2 cache (a whole row is one block when C is larger). GPUs take the
# batch in one block.
BLOCK_ELEMENTS = 1 << 15


@functools.lru_cache(maxsize=256)
def constant(value: float, dtype: torch.dtype) -> Tensor:
    """``value`` as a cached 0-d CPU tensor of ``dtype``: the fast forms multiply by it instead
    of a Python number, which torch wraps into a new tensor on every call (on small batches that
    costs more than the multiplication). Never written to; not for the exact forms, which
    compiled graphs and ``torch.func`` transforms trace."""
    return torch.tensor(value, dtype=dtype)


class Rule(Protocol):
    def prepare(
        self, s: Tensor, t: Tensor, *extras: Tensor | None
    ) -> tuple[Tensor | None, ...]: ...

    def fast(
        self,
        s: Tensor,
        t: Tensor,
        consts: tuple[Tensor | None, ...],
        gs: Tensor | None,
        gt: Tensor | None,
        rows: bool,
    ) -> Tensor: ...

    def exact(self, s: Tensor, t: Tensor, *extras: Tensor | None) -> Tensor: ...


def fast_rows(
    rule: Rule, s: Tensor, t: Tensor, extras: tuple, need_s: bool, need_t: bool, rows: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The fast form over the whole batch, block by block: the per-row loss (``rows``) or its
    sum, and the unit gradients."""
    consts = rule.prepare(s, t, *extras)
    gs = torch.empty_like(s) if need_s else None
    gt = torch.empty_like(t) if need_t else None
    # on CPU each thread takes some rows of a block: scale the block with them
    if not s.is_cpu or s.numel() <= BLOCK_ELEMENTS * torch.get_num_threads():
        return rule.fast(s, t, consts, gs, gt, rows), gs, gt
    B, C = s.shape
    per_block = max(1, BLOCK_ELEMENTS * torch.get_num_threads() // C)
    parts = []
    for i in range(0, B, per_block):
        block = slice(i, i + per_block)
        parts.append(
            rule.fast(
                s[block],
                t[block],
                tuple(None if x is None else x[block] for x in consts),
                None if gs is None else gs[block],
                None if gt is None else gt[block],
                rows,
            )
        )
    return (torch.cat(parts) if rows else torch.stack(parts).sum()), gs, gt


class _RowLoss(torch.autograd.Function):
    """Per-row loss, or its sum times ``total`` (a float) when ``total`` is given."""

    @staticmethod
    def forward(ctx, rule: Rule, total, need_s: bool, need_t: bool, s: Tensor, t: Tensor, *extras):  # type: ignore[override]
        fast, gs, gt = fast_rows(rule, s, t, extras, need_s, need_t, rows=total is None)
        out, ctx.exact = _finish(rule, fast, total, s, t, extras)
        # The unit gradients are the function's own buffers, not inputs or outputs: kept on the
        # context, so that backward can scale them in place and hand them over (no copy).
        ctx.grads = None if ctx.exact else (gs, gt)
        ctx.rule, ctx.total, ctx.need = rule, total, (need_s, need_t)
        ctx.no_extras = (None,) * len(extras)
        ctx.save_for_backward(*savable(s, t, *extras))
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        need_s, need_t = ctx.need
        grads, ctx.grads = ctx.grads, None
        if ctx.exact or torch.is_grad_enabled():
            s, t, *extras = ctx.saved_tensors
            gs, gt = exact_grads(ctx.rule, ctx.total, s, t, extras, g, need_s, need_t)
            return (None, None, None, None, gs, gt, *ctx.no_extras)
        if grads is None:  # a second backward (retain_graph): the same numbers again
            s, t, *extras = ctx.saved_tensors
            grads = fast_rows(ctx.rule, s, t, extras, need_s, need_t, ctx.total is None)[1:]
        gs, gt = grads
        # the constants ride on the upstream gradient, a (B,) or 0-d tensor; in place unless
        # it is batched (vmap, `is_grads_batched`), when the product has more entries
        total, g = (1.0, g.unsqueeze(1)) if ctx.total is None else (ctx.total, g)
        keys = torch._C._dispatch_keys(g)
        inplace = (
            keys.has(_CPU) or keys.has(_CUDA)
        ) and _functorch.peek_interpreter_stack() is None

        def scaled(unit: Tensor | None, factor: str) -> Tensor | None:
            if unit is None:  # not wanted (a rule defines the factors of the sides it moves)
                return None
            scale = g * constant(total * getattr(ctx.rule, factor), g.dtype)
            return unit.mul_(scale) if inplace else unit * scale

        gs, gt = scaled(gs, "gs_factor"), scaled(gt, "gt_factor")
        return (None, None, None, None, gs, gt, *ctx.no_extras)


_CPU, _CUDA = torch._C.DispatchKey.CPU, torch._C.DispatchKey.CUDA


def _finish(rule: Rule, fast: Tensor, total, s, t, extras) -> tuple[Tensor, bool]:
    """The output (the rows, or their sum ``fast`` times ``total``) and whether the exact form
    had to replace the fast one. No loss row is ``-inf``, so the sum is NaN exactly when a row
    is. A sum within a factor 2^16 of the float's overflow takes the exact form too: there the
    fast gradients' intermediates (``log p - log q - KL`` at logits of 2e38) can overflow while
    the loss does not."""
    summed = fast.sum() if total is None else fast
    value = summed.item()
    if not (math.isnan(value) or abs(value) > _near_overflow(summed.dtype)):
        return (fast if total is None else summed.mul_(constant(total, summed.dtype))), False
    per_row = wide_exact(rule, s, t, extras)  # non-finite logits (or an overflow): the exact rules
    return (per_row if total is None else (per_row * total).sum()), True


_WIDENED = (torch.float32, torch.float16, torch.bfloat16)
# finite logits past 2^100 (a gap past 2^124 is scaled down in the exact form, and its backward
# multiplies by that scale squared) take the exact form in float64
_WIDE_LOGITS = 2.0**100


def wide_exact(rule: Rule, s: Tensor, t: Tensor, extras) -> Tensor:
    """The exact form, in float64 for narrower inputs whose finite logits reach 2^100, its rows
    in the input's dtype.

    The exact form divides rows whose logits could make their gaps overflow by a power of 2 and
    multiplies its square back into the value last; its backward multiplies by that square
    first, which a float32 gradient cannot hold (IKL at logits of 2e38). float64 holds every
    such product of float32 numbers. Only eager code comes here (non-finite or near-overflow
    inputs, second derivatives), so the look at the logits is one more reduction; other inputs
    keep their dtype (float64 doubled the time and memory of every Hessian-vector product)."""
    if s.dtype not in _WIDENED or not _reach(s, t, _WIDE_LOGITS):
        return rule.exact(s, t, *extras)
    wide = [x.double() if x is not None and x.is_floating_point() else x for x in extras]
    return rule.exact(s.double(), t.double(), *wide).to(s.dtype)


def _reach(s: Tensor, t: Tensor, limit: float) -> bool:
    """Whether a finite entry of ``s`` or ``t`` reaches ``limit`` in magnitude."""
    for x in (s, t):
        big = x.detach().abs().nan_to_num(nan=0.0, posinf=0.0).amax() if x.numel() else 0.0
        if float(big) >= limit:
            return True
    return False


@functools.lru_cache(maxsize=8)
def _near_overflow(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max / 2**16


def loss(
    rule: Rule, s: Tensor, t: Tensor, *extras: Tensor | None, reduction: str, mask: Tensor | None
) -> Tensor:
    """The reduced loss. Without a mask the mean or sum is taken inside the autograd function
    (one node, and a backward that scales by one number)."""
    if mask is None and reduction != "none":
        B = s.shape[0]
        return row_loss(rule, s, t, *extras, total=1.0 / B if reduction == "mean" and B else 1.0)
    return reduce(row_loss(rule, s, t, *extras), reduction, mask)


def exact_grads(
    rule: Rule,
    total: float | None,
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
        out = wide_exact(rule, s, t, extras)
        if total is not None:
            out = (out * total).sum()
        wanted = [x for x, need in ((s, need_s), (t, need_t)) if need]
        found = torch.autograd.grad(out, wanted, g, create_graph=create, allow_unused=True)
    found = [torch.zeros_like(x) if d is None else d for x, d in zip(wanted, found)]
    gs = found.pop(0) if need_s else None
    gt = found.pop(0) if need_t else None
    return gs, gt


def row_loss(
    rule: Rule, s: Tensor, t: Tensor, *extras: Tensor | None, total: float | None = None
) -> Tensor:
    """Per-row loss ``(B,)`` of ``rule`` (or its sum times ``total``), differentiable to any
    order. Under ``torch.compile``, ``torch.func`` transforms (``grad``, ``hessian``, ``vmap``) and
    forward-mode AD the exact form alone: plain torch operations, which they all understand (and
    the NaN look would break a compiled graph)."""
    # under torch.compile, a torch.func transform or forward-mode AD, or meta tensors
    if is_compiling() or s.is_meta or in_transform(s, t):
        out = rule.exact(s, t, *extras)
        return out if total is None else (out * total).sum()
    grad = torch.is_grad_enabled()
    need_s, need_t = grad and s.requires_grad, grad and t.requires_grad
    if not (need_s or need_t):  # nothing to differentiate: no graph, no gradient computed
        fast = fast_rows(rule, s, t, extras, False, False, rows=total is None)[0]
        return _finish(rule, fast, total, s, t, extras)[0]
    return _RowLoss.apply(rule, total, need_s, need_t, s, t, *extras)


def log_softmax_backward(grad: Tensor, log_q: Tensor, out: Tensor) -> Tensor:
    r"""``grad - σ Σ_j grad_j`` into ``out`` (``log_q = log σ(u)``): the gradient with respect to
    ``u`` of a loss whose gradient with respect to ``log_q`` is ``grad``, by log_softmax's own
    fused backward (``grad = -c p`` gives ``c (σ Σ_j p_j - p)``, the soft-label CE's)."""
    return torch.ops.aten._log_softmax_backward_data.out(grad, log_q, 1, log_q.dtype, out=out)
