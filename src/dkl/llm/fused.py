r"""Token-level IKL distillation for language models without materialising the (N, V) logits.

:func:`fused_linear_ikl` takes the last hidden states and the output-head weights of a student and
a teacher, and walks over the tokens in chunks: for each chunk it computes both logits, the IKL
loss (and, when asked, a hard-label cross-entropy) and the gradient with respect to the student's
chunk of logits, then immediately turns that gradient into the gradients of the student's hidden
states, head weight and bias. Only one chunk of logits lives at a time; the backward pass merely
scales the stored gradients by the upstream gradient.

Per chunk the loss is :func:`dkl.ikl_loss` with ``reduction="none"`` (the torch path, under
autograd on the detached chunk) or, on CUDA, the fused Triton kernel, which gives loss and gradient
in one launch.

Vocabulary rule: the teacher's vocabulary may be larger than the student's. The teacher's logits
are then cut to the student's first ``V`` columns (its first ``V`` head rows), which is right when
the student's vocabulary is a prefix of the teacher's (the same tokenizer with a head padded to a
multiple of 64 or 128, or extra special tokens appended at the end). A teacher vocabulary smaller
than the student's is an error. Different hidden sizes are fine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dkl import ops
from dkl._checks import check_positive
from dkl.losses import ikl_loss

__all__ = ["FusedLinearIKLLoss", "fused_linear_ikl", "valid_token_mask"]

REDUCTIONS = ("mean", "sum")
IMPLS = ("auto", "torch", "triton")


def valid_token_mask(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Bool mask of the tokens that count: ``labels != ignore_index`` (the row mask of the losses).

    >>> valid_token_mask(torch.tensor([3, -100, 7]))
    tensor([ True, False,  True])
    """
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"Expected integer labels, got {labels.dtype}")
    return labels != ignore_index


def _flatten_tokens(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"Expected {name} a floating tensor of shape (N, H) or (..., H), got {got}"
        )
    return x.reshape(-1, x.shape[-1])


def _check_linear(weight: Tensor, bias: Tensor | None, hidden: int, name: str) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(
            f"Expected {name}_head_weight of shape (V, H) with H = {hidden}, got {got}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(
            f"Expected {name}_bias of shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
        )


def _use_kernel(impl: str, logits: Tensor) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"Unknown impl {impl!r}: expected one of {IMPLS}")
    if impl == "torch":
        return False
    if impl == "auto":
        return logits.is_cuda and ops.triton_unavailable_reason(logits) is None
    reason = ops.triton_unavailable_reason(logits)
    if reason is not None:
        raise RuntimeError(f"impl='triton' cannot run: {reason}. Use impl='torch' or 'auto'.")
    return True


class _FusedLinearIKL(torch.autograd.Function):
    """Gradients are computed chunk by chunk in forward; backward scales them."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, cfg):
        N = s_hidden.shape[0]
        V = s_weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(s_hidden) if need_h else None
        # Accumulated in the weight's dtype, like one matmul over all tokens (rounded per chunk).
        grad_w = torch.zeros_like(s_weight) if need_w else None
        grad_b = torch.zeros(V, device=s_weight.device, dtype=torch.float32) if need_b else None

        # the teacher's first V head rows (documented vocabulary rule); a view, no copy
        t_weight = t_weight[:V]
        t_bias = t_bias[:V] if t_bias is not None else None
        valid = valid_token_mask(labels, cfg["ignore_index"]) if labels is not None else None
        if cfg["reduction"] == "mean":
            count = valid.sum() if valid is not None else torch.tensor(N, device=s_hidden.device)
            scale = 1.0 / count.clamp_min(1).to(torch.float32)  # all-ignored: loss and grads 0
        else:
            scale = torch.ones((), device=s_hidden.device, dtype=torch.float32)
        total = torch.zeros((), device=s_hidden.device, dtype=torch.float32)
        loss_kw = {
            "alpha": cfg["alpha"],
            "beta": cfg["beta"],
            "temperature": cfg["temperature"],
            "weight_temperature": cfg["weight_temperature"],
        }
        ce_weight = cfg["ce_weight"]
        use_kernel = None
        for start in range(0, N, cfg["chunk_size"]):
            end = min(start + cfg["chunk_size"], N)
            h = s_hidden[start:end]
            logits_s = F.linear(h, s_weight, s_bias)  # (n, V)
            logits_t = F.linear(t_hidden[start:end], t_weight, t_bias)  # (n, V), no grad
            mask = valid[start:end] if valid is not None else None
            if use_kernel is None:
                use_kernel = _use_kernel(cfg["impl"], logits_s)
            if use_kernel:
                rows = torch.full((end - start,), 1.0, device=h.device) * scale
                loss_rows, g, _ = ops.divergence_loss_and_grad(
                    logits_s, logits_t, kind="ikl", row_mask=mask, grad_scale=rows, **loss_kw
                )
                chunk = loss_rows.sum() * scale
                if ce_weight > 0:
                    with torch.enable_grad():
                        ls = logits_s.detach().float().requires_grad_(True)
                        ce = F.cross_entropy(
                            ls, labels[start:end], ignore_index=cfg["ignore_index"], reduction="sum"
                        )
                        (g_ce,) = torch.autograd.grad(ce * (ce_weight * scale), ls)
                    chunk = chunk + ce.detach() * (ce_weight * scale)
                    g = (g.float() + g_ce).to(logits_s.dtype)
            else:
                with torch.enable_grad():
                    ls = logits_s.detach().float().requires_grad_(True)
                    per_row = ikl_loss(
                        ls, logits_t.float(), reduction="none", mask=mask, impl="torch", **loss_kw
                    )
                    chunk = per_row.sum()
                    if ce_weight > 0:
                        chunk = chunk + ce_weight * F.cross_entropy(
                            ls, labels[start:end], ignore_index=cfg["ignore_index"], reduction="sum"
                        )
                    chunk = chunk * scale
                    (g,) = torch.autograd.grad(chunk, ls)
                chunk = chunk.detach()
                g = g.to(logits_s.dtype)
            total += chunk
            del logits_s, logits_t
            if need_h:
                grad_h[start:end] = g @ s_weight
            if need_w:
                grad_w.addmm_(g.t(), h)
            if need_b:
                grad_b += g.float().sum(0)
            del g
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.bias_dtype = s_bias.dtype if s_bias is not None else None
        ctx.used = False
        return total

    @staticmethod
    def backward(ctx, grad_output):
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
        return grad_h, grad_w, grad_b, None, None, None, None, None


def fused_linear_ikl(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_head_weight: Tensor,
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
    impl: str = "auto",
) -> Tensor:
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
    bias right away (the teacher gets none). With no valid token the loss and gradients are 0.

    A teacher vocabulary ``Vt`` larger than the student's ``V`` is cut to its first ``V`` entries
    (the student's vocabulary is taken to be a prefix of the teacher's); ``Vt < V`` raises.

    Args:
        student_hidden: ``(N, Hs)`` or ``(..., Hs)`` last hidden states of the student.
        student_head_weight: ``(V, Hs)`` output-head (``lm_head``) weight of the student.
        teacher_hidden: ``(N, Ht)`` or ``(..., Ht)``, same leading shape as ``student_hidden``.
        teacher_head_weight: ``(Vt, Ht)`` with ``Vt >= V``.
        alpha, beta, temperature, weight_temperature: as in :func:`dkl.ikl_loss`.
        chunk_size: tokens per chunk (memory ~ ``chunk_size * V`` logits); the result does not
            depend on it beyond rounding.
        labels: optional integer ``(N,)`` / ``(...)`` next-token labels; tokens equal to
            ``ignore_index`` are left out of the loss and of the normalisation.
        ce_weight: weight of the hard-label cross-entropy (0 = none).
        reduction: ``"mean"`` (over valid tokens) or ``"sum"``. Gradients are computed in forward,
            so a per-token ``"none"`` is not offered.
        student_bias, teacher_bias: optional ``(V,)`` / ``(Vt,)`` head biases.
        impl: per-chunk loss: ``"auto"`` (fused kernel on CUDA when available, else torch),
            ``"torch"`` or ``"triton"``.

    Returns:
        A float32 scalar. Its backward runs once (gradients are scaled in place).

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
    hs = _flatten_tokens(student_hidden, "student_hidden")
    ht = _flatten_tokens(teacher_hidden, "teacher_hidden")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            "Expected teacher_hidden with the student's token shape "
            f"{tuple(student_hidden.shape[:-1])}, got {tuple(teacher_hidden.shape[:-1])}"
        )
    _check_linear(student_head_weight, student_bias, hs.shape[1], "student")
    _check_linear(teacher_head_weight, teacher_bias, ht.shape[1], "teacher")
    V, Vt = student_head_weight.shape[0], teacher_head_weight.shape[0]
    if Vt < V:
        raise ValueError(
            f"Expected a teacher vocabulary at least as large as the student's ({V}), got {Vt}: "
            "the teacher's logits are cut to the student's first V entries, never padded"
        )
    if V < 2:
        raise ValueError(f"Expected a vocabulary of at least 2 entries, got {V}")
    for name, x in (
        ("student_head_weight", student_head_weight),
        ("teacher_hidden", ht),
        ("teacher_head_weight", teacher_head_weight),
    ):
        if x.device != hs.device:
            raise ValueError(
                f"Expected {name} on {hs.device} (the student's device), got {x.device}"
            )
    if labels is not None:
        if labels.shape != student_hidden.shape[:-1]:
            raise ValueError(
                f"Expected labels of shape {tuple(student_hidden.shape[:-1])}, got "
                f"{tuple(labels.shape)}"
            )
        labels = labels.reshape(-1).to(hs.device)
        valid_token_mask(labels, ignore_index)  # type check
    if not ce_weight >= 0:
        raise ValueError(f"Expected ce_weight >= 0, got {ce_weight}")
    if ce_weight > 0 and labels is None:
        raise ValueError(f"ce_weight = {ce_weight} > 0 needs labels for the hard-label CE")
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"Unknown reduction {reduction!r}: expected one of {REDUCTIONS} (gradients are "
            "computed in forward, so per-token losses are not returned)"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"Expected chunk_size a positive int, got {chunk_size!r}")
    check_positive("temperature", temperature)
    check_positive("weight_temperature", weight_temperature)
    if impl not in IMPLS:
        raise ValueError(f"Unknown impl {impl!r}: expected one of {IMPLS}")
    cfg = {
        "alpha": float(alpha),
        "beta": float(beta),
        "temperature": float(temperature),
        "weight_temperature": float(weight_temperature),
        "chunk_size": chunk_size,
        "ignore_index": ignore_index,
        "ce_weight": float(ce_weight),
        "reduction": reduction,
        "impl": impl,
    }
    return _FusedLinearIKL.apply(
        hs,
        student_head_weight,
        student_bias,
        ht.detach(),  # the teacher never gets a graph
        teacher_head_weight.detach(),
        teacher_bias.detach() if teacher_bias is not None else None,
        labels,
        cfg,
    )


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
