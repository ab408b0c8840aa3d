"""The walk over token chunks and the autograd function around it.

Per chunk: both logits, the loss (and a hard-label CE when asked) and the gradient with respect to
the student's chunk of logits, turned at once into the gradients of the student's hidden states,
head weight and bias. ``reduction="mean"`` / ``"sum"`` keep those gradients from forward and only
scale them in backward; ``"none"`` recomputes the chunks in backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dkl._checks import savable
from dkl.llm._checks import _use_kernel, refuse_double_backward
from dkl.llm._chunk import (
    KERNEL_KINDS,
    ChunkResult,
    LogitTransform,
    chunk_loss,
    empty_rows_error,
    unbounded_error,
    unbounded_rows,
)
from dkl.ops.divergence import loss_and_grad_one_launch


def _sweep(
    hs: Tensor,
    ws: Tensor,
    bs: Tensor | None,
    teacher,
    labels: Tensor | None,
    valid: Tensor | None,
    cfg: dict,
    *,
    row_scale: Tensor | None,
    need: tuple[bool, bool, bool],
    keep_rows: bool,
    weight_scale: float = 1.0,
) -> dict:
    """One pass over the token chunks.

    ``row_scale`` ``(N,)`` multiplies each token's gradient (``None``: no gradients at all);
    ``weight_scale`` multiplies the head weight's gradient once more, inside its matmul (before
    it is rounded to the weight's dtype).
    Returns the summed loss, optionally the ``(N,)`` per-token losses, the summed parts, the
    gradients asked for in ``need`` (hidden, weight, bias), the count of valid tokens whose
    teacher logits are all ``-inf`` and that of valid tokens whose reverse KL is ``+inf``.
    """
    N, V = hs.shape[0], ws.shape[0]
    dev = hs.device
    cdt = torch.float64 if hs.dtype == torch.float64 else torch.float32
    need_h, need_w, need_b = need if row_scale is not None else (False, False, False)
    any_grad = need_h or need_w or need_b
    out = {
        "total": torch.zeros((), device=dev, dtype=cdt),
        "rows": torch.zeros(N, device=dev, dtype=cdt) if keep_rows else None,
        "parts": {},  # summed, or per token (N,) with keep_rows
        "grad_h": torch.zeros_like(hs) if need_h else None,
        # accumulated in the weight's dtype, like one matmul over all tokens (rounded per chunk)
        "grad_w": torch.zeros_like(ws) if need_w else None,
        "grad_b": torch.zeros(V, device=dev, dtype=cdt) if need_b else None,
        "empty_rows": torch.zeros((), device=dev, dtype=torch.long),
        "unbounded_rows": torch.zeros((), device=dev, dtype=torch.long),
    }
    s_tf: LogitTransform = cfg["student_transform"]
    loss_kw = {k: cfg[k] for k in ("alpha", "beta", "temperature", "weight_temperature")}
    use_kernel = (
        cfg["kind"] in KERNEL_KINDS
        and _use_kernel(cfg["impl"], hs, (cfg["temperature"], cfg["weight_temperature"]))
        and cdt == torch.float32
    )
    # The kernel reads half logits as they are and writes the student's gradient over its own
    # logits, scaled per token and with the hard CE included: two chunk buffers in the logits'
    # dtype, where the float32 route below holds three float32 ones. An elementwise student
    # transform (soft-capping, scaling) needs its derivative on the float32 gradient: that
    # keeps the float32 route.
    in_place = use_kernel and s_tf.identity
    for start in range(0, N, cfg["chunk_size"]):
        end = min(start + cfg["chunk_size"], N)
        h = hs[start:end]
        mask = valid[start:end] if valid is not None else None
        y = labels[start:end] if labels is not None else None
        if in_place:
            zs, deriv = F.linear(h, ws, bs), None
            zt = teacher.logits(start, end, None)
        else:
            zs, deriv = s_tf(F.linear(h, ws, bs).to(cdt), need_grad=any_grad)
            zt = teacher.logits(start, end, cdt)
        empty = zt.amax(1) == -math.inf
        out["empty_rows"] += (empty & mask).sum() if mask is not None else empty.sum()
        unbounded = unbounded_rows(zs, zt, cfg["kind"], cfg["beta"])
        if unbounded is not None:
            out["unbounded_rows"] += (
                (unbounded & mask).sum() if mask is not None else unbounded.sum()
            )
        if use_kernel:
            scale = row_scale[start:end] if in_place and any_grad else None
            res = _kernel_chunk(zs, zt, y, mask, cfg, loss_kw, scale=scale, overwrite=in_place)
        else:
            res = chunk_loss(
                zs,
                zt,
                kind=cfg["kind"],
                ce_weight=cfg["ce_weight"],
                labels=y,
                valid=mask,
                need_grad=any_grad,
                **loss_kw,
            )
        out["total"] += res.rows.sum()
        if keep_rows:
            out["rows"][start:end] = res.rows
        for k, v in res.parts.items():
            if keep_rows:
                out["parts"].setdefault(k, torch.zeros(N, device=dev, dtype=cdt))[start:end] = v
            else:
                out["parts"][k] = out["parts"].get(k, 0.0) + v.sum()
        del zs, zt
        if not any_grad:
            continue
        g = res.grad
        if not in_place:  # the kernel has scaled it already
            g.mul_(row_scale[start:end].to(cdt).unsqueeze(1))
            if deriv is not None:
                g.mul_(deriv)
        g_lin = g.to(hs.dtype)
        if need_h:
            out["grad_h"][start:end] = g_lin @ ws
        if need_w:
            if mask is not None:  # ignored tokens' g rows are 0, and 0 · NaN would not be
                h = torch.where(mask.unsqueeze(1), h, h.new_zeros(()))
            out["grad_w"].addmm_(g_lin.t().to(ws.dtype), h.to(ws.dtype), alpha=weight_scale)
        if need_b:
            out["grad_b"] += g.sum(0, dtype=cdt)
        del g, g_lin, res
    return out


def _kernel_chunk(zs, zt, labels, mask, cfg, loss_kw, *, scale, overwrite):
    """Divergence and hard CE from one kernel launch. ``overwrite``: the gradient, multiplied by
    ``scale``, is written over ``zs`` (the returned ``grad`` is ``zs``); otherwise it comes in a
    buffer of its own for the caller to scale."""
    ce_weight = cfg["ce_weight"]
    rows, g, _, ce = loss_and_grad_one_launch(
        zs,
        zt,
        kind=cfg["kind"],
        row_mask=mask,
        grad_scale=scale,
        labels=labels.clamp_min(0) if ce_weight > 0 else None,
        ce_weight=ce_weight,
        overwrite_input=overwrite,
        **loss_kw,
    )
    if ce is None:
        return ChunkResult(rows, g, {cfg["kind"]: rows})
    return ChunkResult(rows, g, {cfg["kind"]: rows - ce_weight * ce, "ce": ce})


def _raise_bad_rows(out: dict) -> None:
    n = int(out["empty_rows"])
    if n:
        raise empty_rows_error(n)
    n = int(out["unbounded_rows"])
    if n:
        raise unbounded_error(n)


def _matmul_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype the head's matmuls give: autocast's where it is on for ``hidden``'s device."""
    kind = hidden.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        get = getattr(torch, "get_autocast_dtype", None)  # torch >= 2.4
        if get is not None:
            return get(kind)
        return torch.get_autocast_gpu_dtype() if kind == "cuda" else torch.get_autocast_cpu_dtype()
    return hidden.dtype


class _FusedLinear(torch.autograd.Function):
    """``mean`` / ``sum``: gradients in forward, scaled in backward. ``none``: recomputed."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, teacher, labels, valid, cfg):
        N = s_hidden.shape[0]
        per_token = cfg["reduction"] == "none"
        sdt = torch.float64 if s_hidden.dtype == torch.float64 else torch.float32
        if cfg["reduction"] == "mean":
            count = valid.sum() if valid is not None else torch.tensor(N, device=s_hidden.device)
            scale = 1.0 / count.clamp_min(1).to(sdt)  # all ignored: loss and grads 0
        else:
            scale = torch.ones((), device=s_hidden.device, dtype=sdt)
        need = ctx.needs_input_grad[:3]
        # float16 holds numbers down to 6e-8 only: each token's gradient divided by the token
        # count (and by nothing yet of a loss scale, which comes in backward) would lose its
        # small entries at a few thousand tokens. There the hidden states' and the bias's
        # gradients are kept per token (order 1) and divided in backward, in float32 with the
        # upstream gradient; the weight's, a sum over the tokens, is divided inside its matmul.
        deferred = _matmul_dtype(s_hidden) == torch.float16 and not per_token and any(need)
        out = _sweep(
            s_hidden,
            s_weight,
            s_bias,
            teacher,
            labels,
            valid,
            cfg,
            row_scale=None
            if per_token
            else (torch.ones_like(scale) if deferred else scale).expand(N),
            need=need,
            keep_rows=per_token,
            weight_scale=float(scale) if deferred else 1.0,
        )
        ctx.deferred = scale if deferred else None
        _raise_bad_rows(out)
        if cfg["parts_out"] is not None:
            cfg["parts_out"].update({k: (v * scale).detach() for k, v in out["parts"].items()})
        ctx.cfg, ctx.teacher = cfg, teacher
        ctx.bias_dtype = s_bias.dtype if s_bias is not None else None
        ctx.used = False
        if per_token:
            ctx.save_for_backward(*savable(s_hidden, s_weight, s_bias, labels, valid))
            return out["rows"].to(
                torch.float32 if s_hidden.dtype != torch.float64 else s_hidden.dtype
            )
        ctx.save_for_backward(out["grad_h"], out["grad_w"], out["grad_b"])
        return (out["total"] * scale).to(
            torch.float64 if s_hidden.dtype == torch.float64 else torch.float32
        )

    @staticmethod
    def backward(ctx, grad_output):
        refuse_double_backward("The chunked dkl.llm loss")
        nones = (None,) * 4
        if ctx.cfg["reduction"] == "none":
            s_hidden, s_weight, s_bias, labels, valid = ctx.saved_tensors
            out = _sweep(
                s_hidden,
                s_weight,
                s_bias,
                ctx.teacher,
                labels,
                valid,
                ctx.cfg,
                row_scale=grad_output.detach(),
                need=ctx.needs_input_grad[:3],
                keep_rows=False,
            )
            grad_b = out["grad_b"].to(ctx.bias_dtype) if out["grad_b"] is not None else None
            return (out["grad_h"], out["grad_w"], grad_b, *nones)
        if ctx.used:
            raise RuntimeError(
                "the fused dkl.llm losses compute their gradients in forward and scale them in "
                "place in backward, so their backward can run only once (no retain_graph through "
                "them)"
            )
        ctx.used = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # the upstream gradient stays float32 (a loss scale of 2^16 is inf in float16, and
        # 1 / 3 of gradient accumulation is 0.4 % off in bfloat16): each product is formed in
        # float32 and rounded once
        g = grad_output.detach().float() if grad_output.dtype != torch.float64 else grad_output
        per_token = g if ctx.deferred is None else g * ctx.deferred
        if grad_h is not None:
            grad_h.mul_(per_token)
        if grad_w is not None:
            grad_w.mul_(g)
        if grad_b is not None:
            grad_b = (grad_b * per_token).to(ctx.bias_dtype)
        return (grad_h, grad_w, grad_b, *nones)
