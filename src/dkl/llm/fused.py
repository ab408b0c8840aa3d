r"""Token-level distillation for language models without materialising the (N, V) logits.

:func:`fused_linear_ikl`, :func:`fused_linear_kl`, :func:`fused_linear_reverse_kl` and
:func:`fused_linear_jsd` (or :func:`fused_linear_divergence` with the kind's name, one of
:data:`DIVERGENCES`) take the last hidden states and the output-head weights of a student, and a
teacher given either the same way (hidden states + head) or as its top-k logits / log-probabilities
(``teacher_topk=(indices, values)``). They walk over the tokens in chunks: per chunk they compute
both logits, the loss (and, when asked, a hard-label cross-entropy) and the gradient with respect to
the student's chunk of logits, then turn that gradient into the gradients of the student's hidden
states, head weight and bias at once. Only one chunk of logits lives at a time; with
``reduction="mean"`` / ``"sum"`` the backward pass merely scales the stored gradients.
``reduction="none"`` returns per-token losses and recomputes the chunks in backward (the per-token
upstream gradients are known only then).

Per chunk the loss is computed in closed form in float32 (float64 for float64 inputs); on CUDA
the fused Triton kernel of :mod:`dkl.ops` can serve the divergence part of IKL and KL (``impl``).

Vocabulary rule: the teacher's vocabulary may be larger than the student's. The teacher's logits
are then cut to the student's first ``V`` columns (its first ``V`` head rows), which is right when
the student's vocabulary is a prefix of the teacher's (the same tokenizer with a head padded to a
multiple of 64 or 128, or extra special tokens appended at the end). A teacher vocabulary smaller
than the student's is an error. Different hidden sizes are fine.

Zero-probability classes: ``-inf`` teacher logits (a ``-inf`` teacher bias masking padded
vocabulary entries, or the classes outside a top-k teacher) contribute 0 to the KL and have weight
0 in the wMSE, never ``0 · inf = NaN``; the JSD's mixture keeps both of its terms finite. The
reverse KL is ``+inf`` where the teacher gives a class probability 0 that the student does not, so
such tokens are an error for it (and for the JSD with ``beta = 1``), as is a token whose teacher
logits are all ``-inf`` for every divergence.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dkl.llm._checks import (
    IMPLS,
    REDUCTIONS,
    _check_linear,
    _check_mixture,
    _check_weight,
    _flatten_tokens,
    refuse_functorch,
    valid_token_mask,
)
from dkl.llm._chunk import DIVERGENCES, KERNEL_KINDS, LogitTransform, effective_kind
from dkl.llm._sweep import _FusedLinear
from dkl.llm._teachers import _dense_teacher, _topk_teacher

__all__ = [
    "DIVERGENCES",
    "DIVERGENCE_HYPERPARAMETERS",
    "FusedLinearIKLLoss",
    "fused_linear_divergence",
    "fused_linear_ikl",
    "fused_linear_jsd",
    "fused_linear_kl",
    "fused_linear_reverse_kl",
    "valid_token_mask",
]

DIVERGENCE_HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "ikl": ("alpha", "beta", "temperature", "weight_temperature"),
    "kl": ("temperature",),
    "reverse_kl": ("temperature",),
    "jsd": ("beta", "temperature"),
}
"""The hyper-parameters each divergence takes (the other arguments are shared). ``beta`` is IKL's
wMSE weight for ``"ikl"`` and the mixture weight for ``"jsd"``."""


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
    _check_linear(student_head_weight, student_bias, hs, "student")
    V = student_head_weight.shape[0]
    if V < 2:
        raise ValueError(f"Expected a vocabulary of at least 2 entries, got {V}")
    if student_head_weight.device != hs.device:
        raise ValueError(
            f"Expected student_head_weight on {hs.device} (the student's device), "
            f"got {student_head_weight.device}"
        )
    _check_options(chunk_size, reduction, impl)
    if impl == "triton" and kind not in KERNEL_KINDS:
        raise ValueError(
            f"impl='triton' computes {' and '.join(KERNEL_KINDS)} only, got kind {kind!r}: use "
            "impl='torch' or 'auto' (which runs torch for it)"
        )
    # beta: the JSD's mixture weight in [0, 1], IKL's wMSE weight (>= 0) otherwise
    beta = _check_mixture(beta) if kind == "jsd" else _check_weight("beta", beta, positive=False)
    cfg = {
        "kind": kind,
        "alpha": _check_weight("alpha", alpha, positive=False),
        "beta": beta,
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
    valid = None
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.shape != token_shape:
            got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"Expected labels of shape {tuple(token_shape)}, got {got}")
        valid = valid_token_mask(labels.reshape(-1).to(hs.device), ignore_index)
        labels = labels.reshape(-1).to(hs.device, torch.long)  # int8 / int16 / uint8 too
    teacher_tf = LogitTransform(float(teacher_logit_scale), teacher_softcap)
    if teacher_topk is not None:
        if teacher_hidden is not None or teacher_head_weight is not None:
            raise ValueError(
                "Expected either teacher_hidden + teacher_head_weight or teacher_topk, got both"
            )
        teacher = _topk_teacher(
            teacher_topk, topk_tail, token_shape, V, hs.device, teacher_tf, valid
        )
        k = teacher.indices.shape[1]
        if (
            effective_kind(kind, cfg["beta"]) == "reverse_kl"
            and topk_tail == "renormalize"
            and k < V
        ):
            raise ValueError(
                f"Expected topk_tail='uniform' for the reverse KL (jsd with beta = 1), got "
                f"'renormalize' with k = {k} < V = {V}: the classes outside the top-k get "
                "probability 0, where the reverse KL is +inf; or use jsd with beta < 1"
            )
    else:
        if teacher_hidden is None or teacher_head_weight is None:
            raise ValueError(
                "Expected teacher_hidden and teacher_head_weight (or teacher_topk=(indices, "
                "values)), got neither"
            )
        teacher = _dense_teacher(
            teacher_hidden, teacher_head_weight, teacher_bias, token_shape, V, hs.device, teacher_tf
        )
    if cfg["ce_weight"] > 0:
        if labels is None:
            raise ValueError(f"ce_weight = {ce_weight} > 0 needs labels for the hard-label CE")
        if N and bool(((labels < 0) | (labels >= V))[valid].any()):
            raise ValueError(
                f"Expected labels in [0, {V}) or equal to ignore_index = {ignore_index}, got "
                f"values in [{int(labels[valid].min())}, {int(labels[valid].max())}]"
            )
    refuse_functorch("The chunked dkl.llm loss")
    loss = _FusedLinear.apply(hs, student_head_weight, student_bias, teacher, labels, valid, cfg)
    if reduction == "none":
        loss = loss.reshape(token_shape)
        if return_parts:  # per token, as the loss
            parts = cfg["parts_out"]
            parts.update({k: v.to(loss.dtype).reshape(token_shape) for k, v in parts.items()})
    return (loss, cfg["parts_out"]) if return_parts else loss


def _check_options(chunk_size: Any, reduction: Any, impl: Any) -> None:
    if impl not in IMPLS:
        raise ValueError(f"Unknown impl {impl!r}: expected one of {IMPLS}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"Unknown reduction {reduction!r}: expected one of {REDUCTIONS}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"Expected chunk_size a positive int, got {chunk_size!r}")


_SHARED_ARGS_DOC = """
        chunk_size: tokens per chunk (memory ~ ``chunk_size * V`` logits); the result does not
            depend on it beyond rounding. A bfloat16 / float16 head's weight gradient is summed
            over the chunks in the head's own dtype (no float32 copy of the head, as Liger-Kernel
            does), which rounds once per chunk: at 4,096 tokens in bfloat16, 0.5 % relative
            error with 16 chunks against 0.24 % for one matmul. Fewer, larger chunks, or a
            float32 head (mixed precision), keep it at one matmul's.
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
            (``wmse`` and ``sce``, or ``kl`` / ``rkl`` / ``jsd``; and ``ce``), detached, for
            logging.
        impl: divergence per chunk: ``"auto"`` (fused kernel on CUDA when available, else
            torch), ``"torch"`` or ``"triton"`` (IKL and KL only)."""


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
        >>> import dkl, torch
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


def fused_linear_reverse_kl(
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
    r"""Reverse KL :math:`\mathrm{KL}(q \,\|\, p)` per token, chunked, with
    :math:`q = \sigma(z_s/T)`, :math:`p = \sigma(z_t/T)` (MiniLLM's divergence; no :math:`T^2`).

    .. math::

        \mathrm{RKL}(z_s, z_t) = \sum_j q_j (\log q_j - \log p_j), \qquad
        \frac{\partial\, \mathrm{RKL}}{\partial z_s} = \tfrac1T\, q \odot (d - \mathrm{RKL}),
        \quad d = \log q - \log p.

    The same walk over tokens as :func:`fused_linear_ikl` (same arguments, same rules). The
    reverse KL is :math:`+\infty` where the teacher gives a class probability 0 and the student
    does not, so a ``-inf`` teacher logit (with a finite student one) on a counted token raises,
    and so does a top-k teacher with ``topk_tail="renormalize"`` and ``k < V``; use
    ``topk_tail="uniform"`` (top-k log-probabilities, the missing mass spread over the other
    classes), or :func:`fused_linear_jsd` with ``beta < 1``, which stays finite. Parts: ``rkl``
    (and ``ce``). ``impl="triton"`` is refused (the kernel computes IKL and KL only).

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> hs = torch.randn(6, 4, requires_grad=True)
        >>> ws, ht, wt = torch.randn(20, 4), torch.randn(6, 5), torch.randn(20, 5)
        >>> loss = fused_linear_reverse_kl(hs, ws, ht, wt, temperature=1.0, chunk_size=4)
        >>> log_q, log_p = (hs @ ws.T).log_softmax(1), (ht @ wt.T).log_softmax(1)
        >>> ref = (log_q.exp() * (log_q - log_p)).sum(1).mean()
        >>> bool(torch.allclose(loss, ref))
        True
    """
    return _fused_linear(
        "reverse_kl",
        student_hidden,
        student_head_weight,
        teacher_hidden,
        teacher_head_weight,
        alpha=1.0,
        beta=1.0,
        weight_temperature=1.0,
        **_kw(locals()),
    )


def fused_linear_jsd(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_head_weight: Tensor | None = None,
    *,
    beta: float = 0.5,
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
    r"""Generalised Jensen-Shannon divergence per token, chunked, as TRL's ``GKDTrainer`` defines
    it (Agarwal et al. 2024, "On-Policy Distillation of Language Models", eq. 1).

    With :math:`p = \sigma(z_t/T)` (teacher), :math:`q = \sigma(z_s/T)` (student) and the mixture
    :math:`m = \beta p + (1 - \beta) q`,

    .. math::

        \mathrm{JSD}_\beta = \beta\, \mathrm{KL}(p \,\|\, m) + (1 - \beta)\,
        \mathrm{KL}(q \,\|\, m), \qquad
        \frac{\partial\, \mathrm{JSD}_\beta}{\partial z_s} = \tfrac{1 - \beta}{T}\,
        q \odot \big(r - \mathrm{KL}(q \,\|\, m)\big), \quad r = \log q - \log m,

    for :math:`0 < \beta < 1` (no :math:`T^2` factor). The formula tends to 0 at both ends
    (:math:`\mathrm{JSD}_\beta \approx \beta\,\mathrm{KL}(p\|q)` for small :math:`\beta`), so, as in
    TRL, ``beta = 0`` is the forward KL :math:`\mathrm{KL}(p\|q)` and ``beta = 1`` the reverse
    KL :math:`\mathrm{KL}(q\|p)` exactly (:func:`fused_linear_kl`,
    :func:`fused_linear_reverse_kl`): the loss jumps there. ``beta`` must lie in ``[0, 1]``.

    The same walk over tokens as :func:`fused_linear_ikl` (same arguments, same rules). For
    ``beta < 1`` the mixture gives every class the student or the teacher gives mass to a
    probability > 0, so ``-inf`` teacher logits and top-k teachers with either tail are fine;
    ``beta = 1`` has the reverse KL's rules. Parts: ``jsd`` (and ``ce``). ``impl="triton"`` is
    refused (the kernel computes IKL and KL only).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> _ = torch.manual_seed(0)
        >>> hs = torch.randn(6, 4, requires_grad=True)
        >>> ws, ht, wt = torch.randn(20, 4), torch.randn(6, 5), torch.randn(20, 5)
        >>> loss = fused_linear_jsd(hs, ws, ht, wt, beta=0.5, temperature=1.0, chunk_size=4)
        >>> q, p = (hs @ ws.T).softmax(1), (ht @ wt.T).softmax(1)
        >>> m = 0.5 * p + 0.5 * q
        >>> ref = 0.5 * (p * (p / m).log()).sum(1) + 0.5 * (q * (q / m).log()).sum(1)
        >>> bool(torch.allclose(loss, ref.mean()))
        True
        >>> loss.backward()
    """
    return _fused_linear(
        "jsd",
        student_hidden,
        student_head_weight,
        teacher_hidden,
        teacher_head_weight,
        alpha=1.0,
        weight_temperature=1.0,
        **_kw(locals()),
    )


_BY_KIND = {
    "ikl": fused_linear_ikl,
    "kl": fused_linear_kl,
    "reverse_kl": fused_linear_reverse_kl,
    "jsd": fused_linear_jsd,
}
_SHARED = (
    "chunk_size",
    "labels",
    "ignore_index",
    "ce_weight",
    "reduction",
    "student_bias",
    "teacher_bias",
    "teacher_topk",
    "topk_tail",
    "student_logit_scale",
    "teacher_logit_scale",
    "student_softcap",
    "teacher_softcap",
    "return_parts",
    "impl",
)


def fused_linear_divergence(
    kind: str,
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_head_weight: Tensor | None = None,
    **kwargs,
):
    """The chunked loss named ``kind``, one of :data:`DIVERGENCES`: ``"ikl"``, ``"kl"``,
    ``"reverse_kl"``, ``"jsd"`` (:func:`fused_linear_ikl`, :func:`fused_linear_kl`,
    :func:`fused_linear_reverse_kl`, :func:`fused_linear_jsd`).

    ``kwargs`` are the kind's hyper-parameters (:data:`DIVERGENCE_HYPERPARAMETERS`) and the shared
    arguments of :func:`fused_linear_ikl`; any other key raises. ``beta`` is IKL's wMSE weight
    for ``"ikl"`` and the mixture weight for ``"jsd"``.

    Example:
        >>> import torch
        >>> hs, ws = torch.randn(6, 4), torch.randn(20, 4)
        >>> ht, wt = torch.randn(6, 5), torch.randn(20, 5)
        >>> a = fused_linear_divergence("jsd", hs, ws, ht, wt, beta=0.0, temperature=2.0)
        >>> bool(torch.allclose(a, fused_linear_kl(hs, ws, ht, wt, temperature=2.0)))
        True
    """
    if not isinstance(kind, str) or kind not in _BY_KIND:
        raise ValueError(f"Unknown divergence {kind!r}: expected one of {DIVERGENCES}")
    allowed = DIVERGENCE_HYPERPARAMETERS[kind]
    unknown = sorted(k for k in kwargs if k not in allowed and k not in _SHARED)
    if unknown:
        raise TypeError(
            f"Unexpected argument(s) {unknown} for divergence {kind!r}: its hyper-parameters are "
            f"{allowed}, the shared arguments {_SHARED}"
        )
    return _BY_KIND[kind](
        student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, **kwargs
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
        >>> import torch
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
for _fn in (fused_linear_kl, fused_linear_reverse_kl, fused_linear_jsd):
    _fn.__doc__ += "\n    Args:" + _SHARED_ARGS_DOC + "\n"


class FusedLinearIKLLoss(nn.Module):
    """Module form of :func:`fused_linear_ikl` (hyper-parameters here, tensors in ``forward``).

    Example:
        >>> import torch
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
        _check_options(chunk_size, reduction, impl)
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
