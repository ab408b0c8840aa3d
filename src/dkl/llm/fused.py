r"""Token-level IKL / KL distillation for language models without materialising the (N, V) logits.

:func:`fused_linear_ikl` and :func:`fused_linear_kl` take the last hidden states and the
output-head weights of a student, and a teacher given either the same way (hidden states + head)
or as its top-k logits / log-probabilities (``teacher_topk=(indices, values)``). They walk over the
tokens in chunks: per chunk they compute both logits, the loss (and, when asked, a hard-label
cross-entropy) and the gradient with respect to the student's chunk of logits, then turn that
gradient into the gradients of the student's hidden states, head weight and bias at once. Only
one chunk of logits lives at a time; with ``reduction="mean"`` / ``"sum"`` the backward pass
merely scales the stored gradients. ``reduction="none"`` returns per-token losses and recomputes
the chunks in backward (the per-token upstream gradients are known only then).

Per chunk the loss is computed in closed form in float32 (float64 for float64 inputs); on CUDA
the fused Triton kernel of :mod:`dkl.ops` can serve the divergence part (``impl``).

Vocabulary rule: the teacher's vocabulary may be larger than the student's. The teacher's logits
are then cut to the student's first ``V`` columns (its first ``V`` head rows), which is right when
the student's vocabulary is a prefix of the teacher's (the same tokenizer with a head padded to a
multiple of 64 or 128, or extra special tokens appended at the end). A teacher vocabulary smaller
than the student's is an error. Different hidden sizes are fine.

Zero-probability classes: ``-inf`` teacher logits (a ``-inf`` teacher bias masking padded
vocabulary entries, or the classes outside a top-k teacher) contribute 0 to the KL and have weight
0 in the wMSE, never ``0 · inf = NaN``. A token whose teacher logits are all ``-inf`` is an error.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dkl import ops
from dkl.llm._chunk import TAILS, LogitTransform, chunk_loss, dense_from_topk

__all__ = [
    "FusedLinearIKLLoss",
    "fused_linear_ikl",
    "fused_linear_kl",
    "valid_token_mask",
]

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "torch", "triton")


def valid_token_mask(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Bool mask of the tokens that count: ``labels != ignore_index`` (the row mask of the losses).

    >>> valid_token_mask(torch.tensor([3, -100, 7]))
    tensor([ True, False,  True])
    """
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"Expected integer labels, got {labels.dtype}")
    return labels != ignore_index


# ------------------------------------------------------------------------------- argument checks
def _flatten_tokens(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"Expected {name} a floating tensor of shape (N, H) or (..., H), got {got}"
        )
    return x.reshape(-1, x.shape[-1])


def _check_linear(weight: Any, bias: Tensor | None, hidden: int, name: str) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(
            f"Expected {name}_head_weight of shape (V, H) with H = {hidden}, got {got}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(
            f"Expected {name}_bias of shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
        )


def _check_weight(name: str, value: Any, *, positive: bool) -> float:
    """A finite non-negative (or positive) float; one line naming the argument otherwise."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"Expected {name} a number, got {type(value).__name__}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"Expected {name} {'> 0' if positive else '>= 0'} and finite, got {value}")
    return v


def _use_kernel(impl: str, logits: Tensor) -> bool:
    if impl == "torch":
        return False
    if impl == "auto":
        return logits.is_cuda and ops.triton_unavailable_reason(logits) is None
    reason = ops.triton_unavailable_reason(logits)
    if reason is not None:
        raise RuntimeError(f"impl='triton' cannot run: {reason}. Use impl='torch' or 'auto'.")
    return True


# ------------------------------------------------------------------------------- teachers
class _DenseTeacher:
    """Teacher logits per chunk from hidden states and a head (cut to the student's V rows)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, vocab: int, tf):
        self.hidden = hidden.detach()
        self.weight = weight.detach()[:vocab]  # a view, no copy
        self.bias = bias.detach()[:vocab] if bias is not None else None
        self.transform = tf

    def logits(self, start: int, end: int, dtype: torch.dtype) -> Tensor:
        z = F.linear(self.hidden[start:end], self.weight, self.bias).to(dtype)
        return self.transform(z)[0]


class _TopKTeacher:
    """Teacher logits per chunk from its top-k (indices, values)."""

    def __init__(self, indices: Tensor, values: Tensor, vocab: int, tail: str):
        self.indices, self.values = indices.detach(), values.detach()
        self.vocab, self.tail = vocab, tail

    def logits(self, start: int, end: int, dtype: torch.dtype) -> Tensor:
        return dense_from_topk(
            self.indices[start:end], self.values[start:end], self.vocab, self.tail, dtype
        )


# ------------------------------------------------------------------------------- the sweep
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
) -> dict:
    """One pass over the token chunks.

    ``row_scale`` ``(N,)`` multiplies each token's gradient (``None``: no gradients at all).
    Returns the summed loss, optionally the ``(N,)`` per-token losses, the summed parts, the
    gradients asked for in ``need`` (hidden, weight, bias) and the count of valid tokens whose
    teacher logits are all ``-inf``.
    """
    N, V = hs.shape[0], ws.shape[0]
    dev = hs.device
    cdt = torch.float64 if hs.dtype == torch.float64 else torch.float32
    need_h, need_w, need_b = need if row_scale is not None else (False, False, False)
    any_grad = need_h or need_w or need_b
    out = {
        "total": torch.zeros((), device=dev, dtype=cdt),
        "rows": torch.zeros(N, device=dev, dtype=cdt) if keep_rows else None,
        "parts": {},
        "grad_h": torch.zeros_like(hs) if need_h else None,
        # accumulated in the weight's dtype, like one matmul over all tokens (rounded per chunk)
        "grad_w": torch.zeros_like(ws) if need_w else None,
        "grad_b": torch.zeros(V, device=dev, dtype=torch.float32) if need_b else None,
        "empty_rows": torch.zeros((), device=dev, dtype=torch.long),
    }
    s_tf: LogitTransform = cfg["student_transform"]
    loss_kw = {k: cfg[k] for k in ("alpha", "beta", "temperature", "weight_temperature")}
    use_kernel = None
    for start in range(0, N, cfg["chunk_size"]):
        end = min(start + cfg["chunk_size"], N)
        h = hs[start:end]
        zs, deriv = s_tf(F.linear(h, ws, bs).to(cdt), need_grad=any_grad)
        zt = teacher.logits(start, end, cdt)
        mask = valid[start:end] if valid is not None else None
        y = labels[start:end] if labels is not None else None
        empty = zt.amax(1) == -math.inf
        out["empty_rows"] += (empty & mask).sum() if mask is not None else empty.sum()
        if use_kernel is None:
            use_kernel = _use_kernel(cfg["impl"], zs) and cdt == torch.float32
        if use_kernel:
            res = _kernel_chunk(zs, zt, y, mask, cfg, loss_kw, any_grad)
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
            out["parts"][k] = out["parts"].get(k, 0.0) + v.sum()
        del zs, zt
        if not any_grad:
            continue
        g = res.grad.mul_(row_scale[start:end].to(cdt).unsqueeze(1))
        if deriv is not None:
            g.mul_(deriv)
        g_lin = g.to(hs.dtype)
        if need_h:
            out["grad_h"][start:end] = g_lin @ ws
        if need_w:
            out["grad_w"].addmm_(g_lin.t().to(ws.dtype), h.to(ws.dtype))
        if need_b:
            out["grad_b"] += g.float().sum(0)
        del g, g_lin, res
    return out


def _kernel_chunk(zs, zt, labels, mask, cfg, loss_kw, need_grad):
    """The divergence from the fused Triton kernel, the hard CE in closed form."""
    from dkl.llm._chunk import ChunkResult, ce_rows

    rows, g, _ = ops.divergence_loss_and_grad(zs, zt, kind=cfg["kind"], row_mask=mask, **loss_kw)
    g = g.float()
    parts = {cfg["kind"]: rows}
    if cfg["ce_weight"] > 0:  # ce_weight > 0 comes with labels, hence a mask
        ce, g_ce = ce_rows(zs, labels.clamp_min(0), need_grad)
        ce = torch.where(mask, ce, 0.0)
        rows = rows + cfg["ce_weight"] * ce
        parts["ce"] = ce
        if need_grad:
            g.add_(g_ce.masked_fill_(~mask.unsqueeze(1), 0.0), alpha=cfg["ce_weight"])
    return ChunkResult(rows, g if need_grad else None, parts)


def _raise_empty(empty_rows: Tensor) -> None:
    n = int(empty_rows)
    if n:
        raise ValueError(
            f"Expected teacher logits with at least one finite entry per token, got {n} "
            "token(s) whose teacher logits are all -inf (no class has probability > 0)"
        )


class _FusedLinear(torch.autograd.Function):
    """``mean`` / ``sum``: gradients in forward, scaled in backward. ``none``: recomputed."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, teacher, labels, valid, cfg):
        N = s_hidden.shape[0]
        per_token = cfg["reduction"] == "none"
        if cfg["reduction"] == "mean":
            count = valid.sum() if valid is not None else torch.tensor(N, device=s_hidden.device)
            scale = 1.0 / count.clamp_min(1).to(torch.float32)  # all ignored: loss and grads 0
        else:
            scale = torch.ones((), device=s_hidden.device, dtype=torch.float32)
        need = ctx.needs_input_grad[:3]
        out = _sweep(
            s_hidden,
            s_weight,
            s_bias,
            teacher,
            labels,
            valid,
            cfg,
            row_scale=None if per_token else scale.expand(N),
            need=need,
            keep_rows=per_token,
        )
        _raise_empty(out["empty_rows"])
        if cfg["parts_out"] is not None:
            cfg["parts_out"].update({k: (v * scale).detach() for k, v in out["parts"].items()})
        ctx.cfg, ctx.teacher = cfg, teacher
        ctx.bias_dtype = s_bias.dtype if s_bias is not None else None
        ctx.used = False
        if per_token:
            ctx.save_for_backward(s_hidden, s_weight, s_bias, labels, valid)
            return out["rows"].to(
                torch.float32 if s_hidden.dtype != torch.float64 else s_hidden.dtype
            )
        ctx.save_for_backward(out["grad_h"], out["grad_w"], out["grad_b"])
        return (out["total"] * scale).to(
            torch.float64 if s_hidden.dtype == torch.float64 else torch.float32
        )

    @staticmethod
    def backward(ctx, grad_output):
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
                "fused_linear_ikl computes its gradients in forward and scales them in place in "
                "backward, so its backward can run only once (no retain_graph through it)"
            )
        ctx.used = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        g = grad_output.detach()
        if grad_h is not None:
            grad_h.mul_(g.to(grad_h.dtype))
        if grad_w is not None:
            grad_w.mul_(g.to(grad_w.dtype))
        if grad_b is not None:
            grad_b = (grad_b * g).to(ctx.bias_dtype)
        return (grad_h, grad_w, grad_b, *nones)


# ------------------------------------------------------------------------------- entry points
def _fused_linear(
    kind: str,
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_head_weight: Tensor | None,
    *,
    teacher_topk: tuple[Tensor, Tensor] | None,
    topk_tail: str,
    alpha: float,
    beta: float,
    temperature: float,
    weight_temperature: float,
    chunk_size: int,
    labels: Tensor | None,
    ignore_index: int,
    ce_weight: float,
    reduction: str,
    student_bias: Tensor | None,
    teacher_bias: Tensor | None,
    student_logit_scale: float,
    teacher_logit_scale: float,
    student_softcap: float | None,
    teacher_softcap: float | None,
    return_parts: bool,
    impl: str,
):
    hs = _flatten_tokens(student_hidden, "student_hidden")
    token_shape = student_hidden.shape[:-1]
    N = hs.shape[0]
    _check_linear(student_head_weight, student_bias, hs.shape[1], "student")
    V = student_head_weight.shape[0]
    if V < 2:
        raise ValueError(f"Expected a vocabulary of at least 2 entries, got {V}")
    if student_head_weight.device != hs.device:
        raise ValueError(
            f"Expected student_head_weight on {hs.device} (the student's device), "
            f"got {student_head_weight.device}"
        )
    cfg = {
        "kind": kind,
        "alpha": _check_weight("alpha", alpha, positive=False),
        "beta": _check_weight("beta", beta, positive=False),
        "temperature": _check_weight("temperature", temperature, positive=True),
        "weight_temperature": _check_weight(
            "weight_temperature", weight_temperature, positive=True
        ),
        "ce_weight": _check_weight("ce_weight", ce_weight, positive=False),
        "student_transform": LogitTransform(float(student_logit_scale), student_softcap),
        "chunk_size": chunk_size,
        "reduction": reduction,
        "impl": impl,
        "parts_out": {} if return_parts else None,
    }
    teacher_tf = LogitTransform(float(teacher_logit_scale), teacher_softcap)
    if teacher_topk is not None:
        if teacher_hidden is not None or teacher_head_weight is not None:
            raise ValueError(
                "Expected either teacher_hidden + teacher_head_weight or teacher_topk, got both"
            )
        teacher = _topk_teacher(teacher_topk, topk_tail, token_shape, V, hs.device, teacher_tf)
    else:
        if teacher_hidden is None or teacher_head_weight is None:
            raise ValueError(
                "Expected teacher_hidden and teacher_head_weight (or teacher_topk=(indices, "
                "values)), got neither"
            )
        teacher = _dense_teacher(
            teacher_hidden, teacher_head_weight, teacher_bias, token_shape, V, hs.device, teacher_tf
        )
    valid = None
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.shape != token_shape:
            got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"Expected labels of shape {tuple(token_shape)}, got {got}")
        labels = labels.reshape(-1).to(hs.device)
        valid = valid_token_mask(labels, ignore_index)
    if cfg["ce_weight"] > 0:
        if labels is None:
            raise ValueError(f"ce_weight = {ce_weight} > 0 needs labels for the hard-label CE")
        if N and bool(((labels < 0) | (labels >= V))[valid].any()):
            raise ValueError(
                f"Expected labels in [0, {V}) or equal to ignore_index = {ignore_index}, got "
                f"values in [{int(labels[valid].min())}, {int(labels[valid].max())}]"
            )
    if reduction not in REDUCTIONS:
        raise ValueError(f"Unknown reduction {reduction!r}: expected one of {REDUCTIONS}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"Expected chunk_size a positive int, got {chunk_size!r}")
    if impl not in IMPLS:
        raise ValueError(f"Unknown impl {impl!r}: expected one of {IMPLS}")
    loss = _FusedLinear.apply(hs, student_head_weight, student_bias, teacher, labels, valid, cfg)
    if reduction == "none":
        loss = loss.reshape(token_shape)
    return (loss, cfg["parts_out"]) if return_parts else loss


def _dense_teacher(hidden, weight, bias, token_shape, V, device, tf) -> _DenseTeacher:
    ht = _flatten_tokens(hidden, "teacher_hidden")
    if hidden.shape[:-1] != token_shape:
        raise ValueError(
            f"Expected teacher_hidden with the student's token shape {tuple(token_shape)}, "
            f"got {tuple(hidden.shape[:-1])}"
        )
    _check_linear(weight, bias, ht.shape[1], "teacher")
    Vt = weight.shape[0]
    if Vt < V:
        raise ValueError(
            f"Expected a teacher vocabulary at least as large as the student's ({V}), got {Vt}: "
            "the teacher's logits are cut to the student's first V entries, never padded"
        )
    for name, x in (("teacher_hidden", ht), ("teacher_head_weight", weight)):
        if x.device != device:
            raise ValueError(f"Expected {name} on {device} (the student's device), got {x.device}")
    return _DenseTeacher(ht, weight, bias, V, tf)


def _topk_teacher(topk, tail, token_shape, V, device, tf) -> _TopKTeacher:
    if not (isinstance(topk, tuple | list) and len(topk) == 2):
        raise TypeError(f"Expected teacher_topk=(indices, values), got {type(topk).__name__}")
    indices, values = topk
    if tail not in TAILS:
        raise ValueError(f"Unknown topk_tail {tail!r}: expected one of {TAILS}")
    if not tf.identity:
        raise ValueError(
            "teacher_logit_scale / teacher_softcap apply to a teacher head; top-k teacher values "
            "are taken as they are (transform them before caching)"
        )
    shape = (*token_shape, indices.shape[-1] if isinstance(indices, Tensor) else -1)
    for name, x in (("indices", indices), ("values", values)):
        if not isinstance(x, Tensor) or tuple(x.shape) != shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Expected teacher_topk {name} of shape (..., k) = {shape}, got {got}")
        if x.device != device:
            raise ValueError(f"Expected teacher_topk {name} on {device}, got {x.device}")
    if indices.is_floating_point() or not values.is_floating_point():
        raise TypeError(
            f"Expected integer top-k indices and floating values, got {indices.dtype} and "
            f"{values.dtype}"
        )
    k = shape[-1]
    if k < 1:
        raise ValueError(f"Expected at least one top-k entry per token, got k = {k}")
    if indices.numel() and bool((indices < 0).any()):
        raise ValueError(f"Expected non-negative top-k indices, got {int(indices.min())}")
    flat_values = values.reshape(-1, k)
    if tail == "uniform" and flat_values.numel():
        excess = float(torch.logsumexp(flat_values.float(), dim=1).max())
        if excess > 1e-3:
            raise ValueError(
                "topk_tail='uniform' needs log-probabilities of the full distribution (each "
                f"token's exp(values) summing to <= 1), got a sum of {math.exp(excess):.4g}; pass "
                "log_softmax outputs, or use topk_tail='renormalize' for logits"
            )
    return _TopKTeacher(indices.reshape(-1, k), flat_values, V, tail)


_SHARED_ARGS_DOC = """
        chunk_size: tokens per chunk (memory ~ ``chunk_size * V`` logits); the result does not
            depend on it beyond rounding.
        labels: optional integer ``(N,)`` / ``(...)`` next-token labels; tokens equal to
            ``ignore_index`` are left out of the loss and of the normalisation.
        ce_weight: weight of the hard-label cross-entropy (0 = none).
        reduction: ``"mean"`` (over valid tokens), ``"sum"``, or ``"none"`` (per-token losses of
            the token shape, 0 for ignored tokens; its backward recomputes the chunks).
        student_bias, teacher_bias: optional ``(V,)`` / ``(Vt,)`` head biases.
        teacher_topk: ``(indices, values)``, each ``(..., k)``, instead of the teacher's hidden
            states and head: its top-k logits or log-probabilities (see ``topk_tail``).
        topk_tail: ``"renormalize"`` (classes outside the top-k get probability 0) or
            ``"uniform"`` (``values`` are full log-probabilities; the missing mass is spread
            evenly over the other classes). Indices ``>= V`` (a larger teacher vocabulary) are
            dropped, as the vocabulary rule cuts the teacher to the student's ``V`` classes.
        student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap: logit
            transforms applied inside each chunk, ``z -> c tanh(s z / c)`` (``s z`` without a cap):
            Gemma-2's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's
            ``1 / logits_scaling``. The loss is that of the transformed logits, and the gradients
            go through the transform.
        return_parts: also return a dict of the unweighted parts, reduced like the loss
            (``wmse``, ``sce`` / ``kl``, and ``ce``), detached, for logging.
        impl: divergence per chunk: ``"auto"`` (fused kernel on CUDA when available, else
            torch), ``"torch"`` or ``"triton"``."""


def fused_linear_ikl(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_head_weight: Tensor | None = None,
    *,
    alpha: float,
    beta: float,
    temperature: float,
    weight_temperature: float,
    chunk_size: int = 1024,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    ce_weight: float = 0.0,
    reduction: str = "mean",
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    topk_tail: str = "renormalize",
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    return_parts: bool = False,
    impl: str = "auto",
):
    r"""IKL between a student's and a teacher's next-token distributions, chunked over tokens.

    With :math:`z_s = h_s W_s^\top + b_s` and :math:`z_t = h_t W_t^\top + b_t` per token,

    .. math::

        \mathcal{L} = \frac{1}{|\mathcal{V}|} \sum_{i \in \mathcal{V}} \Big(
            \mathrm{IKL}(z_{s,i}, z_{t,i}; \alpha, \beta, T, T_2)
            + \lambda_{\mathrm{ce}}\, \mathrm{CE}(z_{s,i}, y_i) \Big)

    over the valid tokens :math:`\mathcal{V}` (``labels != ignore_index``; all tokens without
    ``labels``); ``reduction="sum"`` drops the division. IKL is :func:`dkl.ikl_loss` (wMSE on raw
    logits with weights :math:`\sigma(z_t/T_2)`, plus :math:`\alpha` times the soft-label CE at
    :math:`T`; no :math:`T^2` factor). The hard-label CE enters only when ``ce_weight > 0``, and
    then needs ``labels``. The full ``(N, V)`` logits are never held: each chunk of
    ``chunk_size`` tokens is turned into gradients of the student's hidden states, head weight and
    bias right away (the teacher gets none). With no valid token (or no token) the loss and
    gradients are 0.

    A teacher vocabulary ``Vt`` larger than the student's ``V`` is cut to its first ``V`` entries
    (the student's vocabulary is taken to be a prefix of the teacher's); ``Vt < V`` raises.
    ``alpha``, ``beta`` and ``ce_weight`` must be finite and >= 0, the temperatures > 0.

    Args:
        student_hidden: ``(N, Hs)`` or ``(..., Hs)`` last hidden states of the student.
        student_head_weight: ``(V, Hs)`` output-head (``lm_head``) weight of the student.
        teacher_hidden: ``(N, Ht)`` or ``(..., Ht)``, same leading shape as ``student_hidden``.
        teacher_head_weight: ``(Vt, Ht)`` with ``Vt >= V``.
        alpha, beta, temperature, weight_temperature: as in :func:`dkl.ikl_loss`.
    """
    return _fused_linear(
        "ikl",
        student_hidden,
        student_head_weight,
        teacher_hidden,
        teacher_head_weight,
        **_kw(locals()),
    )


def fused_linear_kl(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_head_weight: Tensor | None = None,
    *,
    temperature: float,
    chunk_size: int = 1024,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    ce_weight: float = 0.0,
    reduction: str = "mean",
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    topk_tail: str = "renormalize",
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    return_parts: bool = False,
    impl: str = "auto",
):
    r"""Forward KL :math:`\mathrm{KL}(\sigma(z_t/T) \,\|\, \sigma(z_s/T))` per token, chunked.

    The same walk over tokens as :func:`fused_linear_ikl` (same arguments, same rules) with the
    per-token loss of :func:`dkl.kl_loss` (no :math:`T^2` factor) instead of IKL.

    Example:
        >>> import dkl
        >>> _ = torch.manual_seed(0)
        >>> hs = torch.randn(6, 4, requires_grad=True)
        >>> ws, ht, wt = torch.randn(20, 4), torch.randn(6, 5), torch.randn(20, 5)
        >>> loss = fused_linear_kl(hs, ws, ht, wt, temperature=1.0, chunk_size=4)
        >>> ref = dkl.kl_loss(hs @ ws.T, ht @ wt.T)
        >>> bool(torch.allclose(loss, ref))
        True
    """
    return _fused_linear(
        "kl",
        student_hidden,
        student_head_weight,
        teacher_hidden,
        teacher_head_weight,
        alpha=1.0,
        beta=1.0,
        weight_temperature=1.0,
        **_kw(locals()),
    )


def _kw(args: dict) -> dict:
    skip = {"student_hidden", "student_head_weight", "teacher_hidden", "teacher_head_weight"}
    return {k: v for k, v in args.items() if k not in skip}


fused_linear_ikl.__doc__ += (
    _SHARED_ARGS_DOC
    + r"""

    Returns:
        A float32 scalar (float64 for float64 inputs), or ``(..., )`` per-token losses for
        ``reduction="none"``; with ``return_parts=True`` a ``(loss, parts)`` pair. For ``"mean"``
        and ``"sum"`` the backward runs once (gradients are scaled in place).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> hs = torch.randn(10, 8, requires_grad=True)
        >>> ws = torch.randn(50, 8, requires_grad=True)
        >>> ht, wt = torch.randn(10, 16), torch.randn(64, 16)  # teacher vocab 64 >= 50
        >>> labels = torch.tensor([1, 2, 3, -100, 4, 5, 6, 7, -100, 9])
        >>> loss = fused_linear_ikl(hs, ws, ht, wt, alpha=1.0, beta=1.0, temperature=2.0,
        ...                         weight_temperature=1.0, chunk_size=4, labels=labels)
        >>> loss.backward()
        >>> hs.grad.shape, ws.grad.shape, bool(hs.grad[3].abs().sum() == 0)
        (torch.Size([10, 8]), torch.Size([50, 8]), True)
    """
)
fused_linear_kl.__doc__ += "\n    Args:" + _SHARED_ARGS_DOC + "\n"


class FusedLinearIKLLoss(nn.Module):
    """Module form of :func:`fused_linear_ikl` (hyper-parameters here, tensors in ``forward``).

    Example:
        >>> crit = FusedLinearIKLLoss(alpha=1.0, beta=1.0, temperature=1.0, weight_temperature=1.0)
        >>> hs, ws = torch.randn(6, 4, requires_grad=True), torch.randn(20, 4)
        >>> crit(hs, ws, torch.randn(6, 5), torch.randn(20, 5)).backward()
    """

    def __init__(
        self,
        *,
        alpha: float,
        beta: float,
        temperature: float,
        weight_temperature: float,
        chunk_size: int = 1024,
        ignore_index: int = -100,
        ce_weight: float = 0.0,
        reduction: str = "mean",
        impl: str = "auto",
    ) -> None:
        super().__init__()
        for name, v, pos in (
            ("alpha", alpha, False),
            ("beta", beta, False),
            ("temperature", temperature, True),
            ("weight_temperature", weight_temperature, True),
            ("ce_weight", ce_weight, False),
        ):
            _check_weight(name, v, positive=pos)
        self.alpha, self.beta = alpha, beta
        self.temperature, self.weight_temperature = temperature, weight_temperature
        self.chunk_size, self.ignore_index, self.ce_weight = chunk_size, ignore_index, ce_weight
        self.reduction, self.impl = reduction, impl

    def forward(
        self,
        student_hidden: Tensor,
        student_head_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_head_weight: Tensor,
        labels: Tensor | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
    ) -> Tensor:
        return fused_linear_ikl(
            student_hidden,
            student_head_weight,
            teacher_hidden,
            teacher_head_weight,
            alpha=self.alpha,
            beta=self.beta,
            temperature=self.temperature,
            weight_temperature=self.weight_temperature,
            chunk_size=self.chunk_size,
            labels=labels,
            ignore_index=self.ignore_index,
            ce_weight=self.ce_weight,
            reduction=self.reduction,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, "
            f"weight_temperature={self.weight_temperature}, chunk_size={self.chunk_size}, "
            f"ce_weight={self.ce_weight}, reduction={self.reduction!r}"
        )
