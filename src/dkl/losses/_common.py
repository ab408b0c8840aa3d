"""What every loss shares: argument checks, the compute dtype, the one reduction, the kernel
dispatch and the module base class."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch import Tensor, nn

from dkl._checks import (
    KERNEL_MIN_TEMPERATURE,
    check_logits,
    check_non_negative_scalar,
    check_positive,
    check_row_mask,
    in_transform,
    is_compiling,
    values_unreadable,
)

REDUCTIONS = ("none", "mean", "sum")
IMPLS = ("auto", "torch", "triton")
_HALF = (torch.float16, torch.bfloat16)
# 1/T must be finite in float32: temperatures below the smallest normal float32 are refused.
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


# --------------------------------------------------------------------------- argument checks
def check_reduction(reduction: Any) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"Unknown reduction {reduction!r}: expected one of {REDUCTIONS}")
    return reduction


def check_impl(impl: Any) -> str:
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"Unknown impl {impl!r}: expected one of {IMPLS}")
    return impl


def check_hyperparameters(**values: Any) -> dict[str, float]:
    """The one validator of the losses' numbers, for functions and modules alike: every name
    ending in ``temperature`` must be a finite number >= the smallest normal float32 (so that
    ``1 / T`` is finite), the others (``alpha``, ``beta``, ``gamma``) finite numbers >= 0.
    Returns them as Python floats (a shared dict: read it, do not change it).

    Plain Python floats and ints that passed once are remembered (a training loop passes the
    same few numbers on every step); anything else is checked every time."""
    types = tuple(map(type, values.values()))
    key = (tuple(values.items()), types)
    try:
        found = _CHECKED.get(key)
    except TypeError:  # an unhashable value (an array): checked below, never remembered
        found = None
    if found is not None:
        return found
    checked = {
        name: (
            check_positive(name, value, MIN_TEMPERATURE)
            if name.endswith("temperature")
            else check_non_negative_scalar(name, value)
        )
        for name, value in values.items()
    }
    if len(_CHECKED) < 4096 and all(kind is float or kind is int for kind in types):
        _CHECKED[key] = checked
    return checked


_CHECKED: dict[tuple, dict[str, float]] = {}


def check_call(
    input: Any, target: Any, reduction: str, mask: Tensor | None, **hyper: Any
) -> dict[str, float]:
    """The checks every loss function runs on its arguments; returns the numbers as floats."""
    check_logits(input, target)
    values = check_hyperparameters(**hyper)
    check_reduction(reduction)
    check_row_mask(mask, input)
    return values


# --------------------------------------------------------------------------- dtypes and rows
def compute_dtype(*xs: Tensor) -> torch.dtype:
    """The wider of the inputs' float dtypes (float32 vs float64 -> float64, exact), and float32
    for half inputs (float16, bfloat16, or both)."""
    dtype = xs[0].dtype
    if len(xs) == 2 and xs[1].dtype is dtype and dtype not in _HALF:
        return dtype  # the usual case
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return torch.float32 if dtype in _HALF else dtype


def as_dtype(x: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return x if x is None or x.dtype == dtype else x.to(dtype)


def weights_as(name: str, weights: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Detached weights in the compute dtype. Weights are constants and do not widen the
    computation; ones that do not fit the narrower dtype (1e300 in float64 for float32 logits)
    are refused instead of turning into inf."""
    if weights is None:
        return None
    w = weights.detach().to(dtype)
    narrowed = torch.finfo(dtype).max < torch.finfo(weights.dtype).max
    if narrowed and w.numel() and not is_compiling() and not bool(torch.isfinite(w.amax())):
        raise ValueError(
            f"Expected {name} that fit {dtype} (the logits' dtype), got entries up to "
            f"{weights.max().item():.3g} in {weights.dtype}"
        )
    return w


def nan_where_invalid(
    out: Tensor, weights: Tensor | None, reduction: str = "none", mask: Tensor | None = None
) -> Tensor:
    """Under ``torch.compile`` and ``torch.func`` transforms the weights' values are not read (a
    graph has no host sync to raise from): the loss of a row with a negative, NaN or infinite
    weight is NaN instead, and so is a reduced loss over it, where eager mode raises. Elsewhere
    ``out`` as it is."""
    if weights is None or not values_unreadable(weights):
        return out
    bad = ~(torch.isfinite(weights) & (weights >= 0)).all(dim=1)
    if mask is not None:
        bad = bad & mask
    if reduction != "none":
        bad = bad.any()
    return torch.where(bad, out.new_full((), float("nan")), out)


def no_autocast(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for the loss's own arithmetic on ``x``'s device (entered only when it is on:
    the context manager costs a few microseconds per call, and so does ``x.device``)."""
    kind = "cpu" if x.is_cpu else "cuda" if x.is_cuda else x.device.type
    if _autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return _NOTHING


_NOTHING = contextlib.nullcontext()  # reusable: it holds no state
_autocast_available = functools.lru_cache(maxsize=None)(torch.amp.is_autocast_available)


def read_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """The rows of ``x`` the loss reads: all, or those in ``mask`` (the rest may hold anything)."""
    return x if mask is None else x[mask]


def valid_rows(mask: Tensor | None, *xs: Tensor | None) -> tuple[Tensor | None, ...]:
    """Rows outside ``mask`` replaced by zeros: nothing they hold (-inf, NaN) reaches the loss or
    its gradient, as in the fused kernel, which never reads them."""
    if mask is None:
        return xs
    drop = ~mask.unsqueeze(1)
    return tuple(None if x is None else torch.where(drop, x.new_zeros(()), x) for x in xs)


def reduce(per_row: Tensor, reduction: str, mask: Tensor | None = None) -> Tensor:
    """The one reduction: rows outside ``mask`` count as absent, not as zero-loss samples; with
    no row to average (empty batch, all-False mask) the mean is 0."""
    if mask is not None:
        per_row = torch.where(mask, per_row, per_row.new_zeros(()))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if mask is None:
        return per_row.mean() if per_row.shape[0] else per_row.sum()
    return per_row.sum() / mask.sum().clamp_min(1)


# --------------------------------------------------------------------------- the fused kernel
def use_triton(
    impl: str,
    input: Tensor,
    target: Tensor,
    temperatures: tuple[float, ...] = (),
    weights_summable: bool = True,
) -> bool:
    """Whether the fused kernel computes the loss. ``"auto"`` leaves to the torch path what the
    kernel does not take: temperatures below 1e-6 and class weights whose sum overflows
    (``impl="triton"`` gets the kernel's error for them)."""
    check_impl(impl)
    if impl == "torch":
        return False
    transformed = not is_compiling() and in_transform(input, target)
    if impl == "triton" and transformed:
        raise RuntimeError(
            "impl='triton' cannot run under torch.func transforms (grad, vmap, hessian, jvp) or "
            "forward-mode AD: the fused kernel has no rule for them. Use impl='torch' or 'auto'"
        )
    if impl == "auto" and (
        not input.is_cuda
        or input.dtype == torch.float64
        or is_compiling()
        or transformed
        or min(temperatures, default=1.0) < KERNEL_MIN_TEMPERATURE
        or not weights_summable
    ):
        return False  # the torch path serves CPU, float64, compiled graphs and the extremes
    from dkl import ops  # lazy: triton is optional

    reason = ops.triton_unavailable_reason(input, target)
    if impl == "triton" and reason is not None:
        raise RuntimeError(f"impl='triton' cannot run: {reason}. Use impl='torch' or 'auto'.")
    return reason is None


def fused(
    kind: str, input: Tensor, target: Tensor, reduction: str, mask: Tensor | None, **kw
) -> Tensor:
    from dkl.ops import fused_divergence

    per_row = fused_divergence(input, target, kind=kind, row_mask=mask, **kw)
    return reduce(per_row, reduction, mask)


# --------------------------------------------------------------------------- modules
class Loss(nn.Module):
    """Base of the loss modules: the hyper-parameters go through the same validator as the
    functions' arguments when the module is built, and are stored as floats."""

    def __init__(self, reduction: str, **hyper: Any) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)
        for name, value in check_hyperparameters(**hyper).items():
            setattr(self, name, value)
        self._hyper = tuple(hyper)

    def extra_repr(self) -> str:
        values = ", ".join(f"{name}={getattr(self, name)}" for name in self._hyper)
        return f"{values}, reduction={self.reduction!r}"
