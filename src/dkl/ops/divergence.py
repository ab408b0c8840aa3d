"""Fused row-wise KL / DKL / IKL on top of the Triton kernel in :mod:`dkl.ops._kernel`.

Two entry points:

- :func:`fused_divergence`: an autograd-aware per-row loss ``(B,)``. Its forward runs the kernel's
  statistics pass (reads each input once, writes ``(B,)`` loss and ``(B, 4)`` statistics); its
  backward runs the gradient pass once, already scaled by ``grad_output`` (reads each input once,
  writes each needed gradient once). No ``(B, C)`` tensor is created besides the gradients, none is
  held between forward and backward, and ``backward`` may run more than once (``retain_graph``).
- :func:`divergence_loss_and_grad`: loss and gradients in a single launch for a known per-row
  scale (no autograd); the chunked LLM path uses it.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
from torch import Tensor

from dkl._checks import (
    KERNEL_MIN_TEMPERATURE,
    check_class_weights,
    check_logits,
    check_non_negative_scalar,
    check_positive,
    check_row_mask,
    check_weight_values,
    savable,
)

__all__ = [
    "divergence_loss_and_grad",
    "fused_divergence",
    "triton_available",
    "triton_unavailable_reason",
]

KINDS = ("kl", "dkl", "ikl")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Launch configuration: columns per loop step and warps per row. Chosen by a sweep on an H100
# (benchmarks/kernel_configs.py): 2048 × 4 warps was the fastest of BLOCK 2048 / 4096 / 8192 ×
# 4 / 8 / 16 warps at 4096 × 32,000 and 8192 × 128,000, float32 and bfloat16 (7.8 ms against
# 9.1 ms for the earlier 4096 × 8 at 8192 × 128,000 float32).
MAX_BLOCK = 2048
NUM_WARPS = 4


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    try:
        import triton.language  # noqa: F401
    except Exception as exc:  # noqa: BLE001  (a broken install may raise more than ImportError)
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_unavailable_reason(*tensors: Tensor | None) -> str | None:
    """Why the fused Triton kernel cannot run here (``None`` when it can).

    Without arguments it checks the environment: triton importable, and a CUDA device present or
    ``TRITON_INTERPRET=1`` (Triton's CPU interpreter: exact but slow, meant for tests). Given
    tensors it also checks that each one lives where the kernel can read it and has a supported
    dtype (float32, bfloat16, float16).

    >>> reason = triton_unavailable_reason()
    >>> reason is None or isinstance(reason, str)
    True
    """
    err = _triton_import_error()
    if err is not None:
        return f"the fused kernel needs triton, which failed to import ({err})"
    interpret = _interpret_requested()
    if not interpret and not torch.cuda.is_available():
        return (
            "the fused kernel needs a CUDA device and none is available (set TRITON_INTERPRET=1 "
            "before the first call to run it in Triton's slow CPU interpreter)"
        )
    for x in tensors:
        if x is None:
            continue
        if not (x.device.type == "cuda" or (x.device.type == "cpu" and interpret)):
            where = "CUDA" + (" or CPU (TRITON_INTERPRET=1)" if interpret else "")
            return f"the fused kernel reads tensors on {where}, got a tensor on {x.device}"
        if x.dtype not in SUPPORTED_DTYPES:
            return f"the fused kernel supports float32, bfloat16 and float16 logits, got {x.dtype}"
    return None


def triton_available() -> bool:
    """True when triton imports and either CUDA is available or ``TRITON_INTERPRET=1``.

    >>> isinstance(triton_available(), bool)
    True
    """
    return triton_unavailable_reason() is None


@functools.lru_cache(maxsize=1)
def _kernel_module() -> ModuleType:
    from dkl.ops import _kernel

    return _kernel


def _kernel_for(device: torch.device) -> ModuleType:
    mod = _kernel_module()
    if device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(mod._divergence_kernel, InterpretedFunction):
            raise RuntimeError(
                "dkl's Triton kernel was compiled for the GPU before TRITON_INTERPRET=1 was set, "
                "so it cannot run on CPU tensors in this process; set TRITON_INTERPRET=1 before "
                "the first call to the kernel"
            )
    return mod


def _launch_config(C: int, block: int | None) -> tuple[int, int]:
    import triton

    if block is None:
        block = min(MAX_BLOCK, max(16, triton.next_power_of_2(C)))
    return block, NUM_WARPS


def _check_inputs(
    input: Tensor,
    target: Tensor,
    kind: str,
    alpha: float,
    beta: float,
    temperature: float,
    weight_temperature: float,
    class_weights: Tensor | None,
    row_mask: Tensor | None,
    weights_checked: bool = False,
) -> None:
    if kind not in KINDS:
        raise ValueError(f"Expected kind in {KINDS}, got {kind!r}")
    check_logits(input, target)
    reason = triton_unavailable_reason(input, target)
    if reason is not None:
        raise RuntimeError(f"the fused kernel cannot run: {reason}")
    check_non_negative_scalar("alpha", alpha)
    check_non_negative_scalar("beta", beta)
    for name, value in (("temperature", temperature), ("weight_temperature", weight_temperature)):
        if check_positive(name, value) < KERNEL_MIN_TEMPERATURE:
            raise ValueError(
                f"Expected {name} >= {KERNEL_MIN_TEMPERATURE:g} on the fused kernel (smaller ones "
                f"overflow its float32 sums), got {value}; impl='torch' computes it"
            )
    if class_weights is not None:
        if kind != "ikl":
            raise ValueError(f"class_weights apply to kind='ikl' only, got kind={kind!r}")
        check_class_weights(class_weights, input)
        # the one host sync of a call (the losses check first, to choose the path, and skip it)
        if not weights_checked and not check_weight_values("class_weights", class_weights):
            raise ValueError(
                "Expected class_weights whose sum stays within float32 on the fused kernel, got "
                "entries summing past it; impl='torch' computes these"
            )
    check_row_mask(row_mask, input, "row_mask")


def _rows_contiguous(x: Tensor) -> Tensor:
    # the kernel takes any row stride but needs unit column stride
    return x if x.stride(-1) == 1 else x.contiguous()


def _prepared(
    input: Tensor,
    target: Tensor,
    kind: str,
    alpha: float,
    beta: float,
    temperature: float,
    weight_temperature: float,
    class_weights: Tensor | None,
    row_mask: Tensor | None,
    weights_checked: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Checked arguments in the layout the kernel reads (class weights detached)."""
    _check_inputs(
        input,
        target,
        kind,
        alpha,
        beta,
        temperature,
        weight_temperature,
        class_weights,
        row_mask,
        weights_checked,
    )
    if class_weights is not None:
        class_weights = _rows_contiguous(class_weights.detach())
    return _rows_contiguous(input), _rows_contiguous(target), class_weights


def _launch(
    input: Tensor,
    target: Tensor,
    *,
    kind: str,
    alpha: float,
    beta: float,
    temperature: float,
    weight_temperature: float,
    class_weights: Tensor | None,
    row_mask: Tensor | None,
    pass1: bool,
    pass2: bool,
    stats: Tensor | None = None,
    scale: Tensor | None = None,
    grad_input: bool = True,
    grad_target: bool = False,
    block: int | None = None,
    labels: Tensor | None = None,
    ce_weight: float = 0.0,
    ce_out: Tensor | None = None,
    grad_input_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Run the kernel; returns (loss (B,), stats (B, 4), grad_input, grad_target).

    ``labels`` (B,) int64 in ``[0, C)``: add ``ce_weight`` times the hard-label CE of the input
    (one launch only), its unweighted rows written to ``ce_out``. ``grad_input_out``: the buffer
    the input's gradient is written to, which may be ``input`` itself (written over).
    """
    mod = _kernel_for(input.device)
    B, C = input.shape
    dev = input.device
    kind_id = KINDS.index(kind)
    if class_weights is not None:
        wmode = mod.WMODE_CLASS_WEIGHTS
    elif kind == "ikl" and float(weight_temperature) != float(temperature):
        wmode = mod.WMODE_WEIGHT_SOFTMAX
    else:
        wmode = mod.WMODE_TARGET_SOFTMAX

    loss = torch.empty(B, device=dev, dtype=torch.float32) if pass1 else input.new_empty(0)
    if stats is None:
        stats = torch.empty(B, mod.N_STATS, device=dev, dtype=torch.float32)
    if pass2 and grad_input:
        gs = grad_input_out if grad_input_out is not None else torch.empty_like(input)
    else:
        gs = None
    has_ce = labels is not None
    if has_ce and not (pass1 and pass2 and ce_out is not None):
        raise ValueError("the hard-label CE is computed in one launch (both passes), into ce_out")
    gt = torch.empty_like(target) if (pass2 and grad_target) else None
    cw = class_weights if class_weights is not None else input  # dummy pointer when unused
    mask = row_mask.view(torch.uint8) if row_mask is not None else stats  # dummy when unused
    sc = scale if scale is not None else stats  # dummy when unused
    block, num_warps = _launch_config(C, block)
    if B == 0:
        return loss, stats, gs, gt
    mod._divergence_kernel[(B,)](
        input,
        target,
        cw,
        mask,
        labels if has_ce else stats,  # dummy when unused
        ce_out if has_ce else stats,
        sc,
        loss,
        stats,
        gs if gs is not None else input,
        gt if gt is not None else target,
        C,
        input.stride(0),
        target.stride(0),
        cw.stride(0),
        gs.stride(0) if gs is not None else 0,
        gt.stride(0) if gt is not None else 0,
        sc.stride(0) if scale is not None else 0,
        1.0 / float(temperature),
        1.0 / float(weight_temperature),
        float(alpha),
        float(beta),
        float(ce_weight),
        KIND=kind_id,
        WMODE=wmode,
        HAS_MASK=row_mask is not None,
        HAS_SCALE=scale is not None,
        HAS_CE=has_ce,
        CE_AT_T=has_ce and float(temperature) == 1.0,
        PASS1=pass1,
        PASS2=pass2,
        GRAD_S=gs is not None,
        GRAD_T=gt is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
    return loss, stats, gs, gt


class _FusedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, class_weights, row_mask, params, block):
        loss, stats, _, _ = _launch(
            input,
            target,
            class_weights=class_weights,
            row_mask=row_mask,
            pass1=True,
            pass2=False,
            block=block,
            **params,
        )
        ctx.save_for_backward(*savable(input, target, class_weights, row_mask), stats)
        ctx.params = params
        ctx.block = block
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: this gradient is not differentiable
            raise RuntimeError(
                "dkl's fused Triton kernel has no second derivative (backward ran with "
                "create_graph=True): pass impl='torch' to the loss for gradient penalties, "
                "meta-learning or any double backward"
            )
        input, target, class_weights, row_mask, stats = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_s or need_t):
            return None, None, None, None, None, None
        scale = grad_output.to(torch.float32)
        _, _, gs, gt = _launch(
            input,
            target,
            class_weights=class_weights,
            row_mask=row_mask,
            pass1=False,
            pass2=True,
            stats=stats,
            scale=scale,
            grad_input=need_s,
            grad_target=need_t,
            block=ctx.block,
            **ctx.params,
        )
        return gs, gt, None, None, None, None


def fused_divergence(
    input: Tensor,
    target: Tensor,
    *,
    kind: str,
    alpha: float = 1.0,
    beta: float = 1.0,
    temperature: float = 1.0,
    weight_temperature: float = 1.0,
    class_weights: Tensor | None = None,
    row_mask: Tensor | None = None,
    _block: int | None = None,
    _weights_checked: bool = False,
) -> Tensor:
    r"""Per-row KL / DKL / IKL ``(B,)`` in float32 from the fused Triton kernel.

    With :math:`u = z/T`, :math:`p = \sigma(u_t)`, :math:`e = z_t - z_s` (IKL) or
    :math:`u_t - u_s` (KL, DKL) and :math:`\mathrm{wMSE} = \tfrac12 W \sum_j w_j (e_j - \bar e)^2`:

    - ``"kl"``: :math:`\sum_j p_j (\log p_j - \log\sigma(u_s)_j)` (``alpha``, ``beta`` and
      ``weight_temperature`` are not used);
    - ``"dkl"``: :math:`\beta\,\mathrm{wMSE}(u_t, \mathrm{sg}(u_s); \mathrm{sg}(p)) +
      \alpha\,\mathrm{sCE}_T`; the target's gradient comes from the wMSE only, the input's from
      the sCE only (Theorem 1);
    - ``"ikl"``: :math:`\beta\,\mathrm{wMSE}(z_t, z_s; w) + \alpha\,\mathrm{sCE}_T` on raw logits,
      :math:`w = \mathrm{sg}\,\sigma(z_t / T_2)` or ``class_weights``; both sides get the wMSE
      gradient, only the input gets the sCE one.

    No :math:`T^2` factor. Rows where ``row_mask`` is False are not read and give 0 loss and 0
    gradient. The gradient w.r.t. ``target`` is computed only when ``target.requires_grad``;
    gradients come back in each tensor's dtype. Accumulation is in float32.

    Non-finite logits as in :mod:`dkl.losses`: a ``-inf`` target logit rules its class out (0
    probability, 0 weight, 0 gradient; the input still gets its softmax share); a ``-inf`` input
    logit on a class the target keeps gives ``+inf``; a row of ``-inf`` targets gives NaN.
    ``alpha`` and ``beta`` must be finite and ``>= 0``, ``class_weights`` finite and ``>= 0``
    with a finite sum (checked here: one host sync per call when they are given), the
    temperatures at least 1e-6 (the losses take smaller ones on their torch path).

    Shape:
        - input, target: (B, C), float32 / bfloat16 / float16, on CUDA (or CPU with
          ``TRITON_INTERPRET=1``)
        - class_weights: (B, C), detached; row_mask: (B,) bool
        - output: (B,) float32
    """
    input, target, class_weights = _prepared(
        input,
        target,
        kind,
        alpha,
        beta,
        temperature,
        weight_temperature,
        class_weights,
        row_mask,
        _weights_checked,
    )
    params = {
        "kind": kind,
        "alpha": float(alpha),
        "beta": float(beta),
        "temperature": float(temperature),
        "weight_temperature": float(weight_temperature),
    }
    return _FusedDivergence.apply(input, target, class_weights, row_mask, params, _block)


def divergence_loss_and_grad(
    input: Tensor,
    target: Tensor,
    *,
    kind: str,
    alpha: float = 1.0,
    beta: float = 1.0,
    temperature: float = 1.0,
    weight_temperature: float = 1.0,
    class_weights: Tensor | None = None,
    row_mask: Tensor | None = None,
    grad_scale: Tensor | None = None,
    grad_target: bool = False,
    _block: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-row loss ``(B,)`` and the gradient(s) of ``sum(grad_scale * loss)`` in one launch.

    No autograd: for callers that know the upstream per-row scale in advance (the chunked
    fused-linear path). ``grad_scale`` is (B,) (``None`` means ones). Returns
    ``(loss, grad_input, grad_target)``; ``grad_target`` is ``None`` unless asked for.
    """
    loss, gs, gt, _ = loss_and_grad_one_launch(
        input,
        target,
        kind=kind,
        alpha=alpha,
        beta=beta,
        temperature=temperature,
        weight_temperature=weight_temperature,
        class_weights=class_weights,
        row_mask=row_mask,
        grad_scale=grad_scale,
        grad_target=grad_target,
        _block=_block,
    )
    return loss, gs, gt


def loss_and_grad_one_launch(
    input: Tensor,
    target: Tensor,
    *,
    kind: str,
    alpha: float = 1.0,
    beta: float = 1.0,
    temperature: float = 1.0,
    weight_temperature: float = 1.0,
    class_weights: Tensor | None = None,
    row_mask: Tensor | None = None,
    grad_scale: Tensor | None = None,
    grad_target: bool = False,
    labels: Tensor | None = None,
    ce_weight: float = 0.0,
    overwrite_input: bool = False,
    _block: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """:func:`divergence_loss_and_grad` with two more things the chunked LLM path uses.

    ``labels`` (B,) integers in ``[0, C)`` (ignored rows: any valid index, they are masked) add
    ``ce_weight`` times the hard-label cross-entropy of ``input`` to each row's loss and its
    gradient ``softmax(input) - onehot(labels)`` to ``grad_input``. ``overwrite_input=True``
    writes the input's gradient over ``input`` itself (no second ``(B, C)`` buffer; ``input``
    must have contiguous rows and is not usable as logits afterwards). Returns ``(loss,
    grad_input, grad_target, ce)``; ``ce`` holds the unweighted CE rows (``None`` without labels).
    """
    prepared, target, class_weights = _prepared(
        input, target, kind, alpha, beta, temperature, weight_temperature, class_weights, row_mask
    )
    if overwrite_input and prepared is not input:
        raise ValueError("overwrite_input needs input logits with contiguous rows")
    input, target = prepared.detach(), target.detach()
    B = input.shape[0]
    if grad_scale is not None and grad_scale.shape != (B,):
        raise ValueError(
            f"Expected grad_scale of shape (B,) = ({B},), got {tuple(grad_scale.shape)}"
        )
    scale = (
        grad_scale.detach().to(device=input.device, dtype=torch.float32)
        if grad_scale is not None
        else None
    )
    ce = None
    if labels is not None:
        if labels.shape != (B,) or labels.is_floating_point():
            raise ValueError(
                f"Expected integer labels of shape (B,) = ({B},), got {labels.dtype} "
                f"{tuple(labels.shape)}"
            )
        labels = labels.to(device=input.device, dtype=torch.int64).contiguous()
        ce = torch.empty(B, device=input.device, dtype=torch.float32)
    loss, _, gs, gt = _launch(
        input,
        target,
        kind=kind,
        alpha=alpha,
        beta=beta,
        temperature=temperature,
        weight_temperature=weight_temperature,
        class_weights=class_weights,
        row_mask=row_mask,
        pass1=True,
        pass2=True,
        scale=scale,
        grad_input=True,
        grad_target=grad_target,
        block=_block,
        labels=labels,
        ce_weight=float(ce_weight),
        ce_out=ce,
        grad_input_out=input if overwrite_input else None,
    )
    return loss, gs, gt, ce
