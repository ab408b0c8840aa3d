"""Argument checks shared by the losses, the fused kernel's entry points and the recipes.

Each raises with a message that names what was expected and what came; none of them changes
its inputs. One copy here, so the torch path and the kernel path refuse the same inputs with
the same words.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad


def is_compiling() -> bool:
    """True while ``torch.compile`` traces (data-dependent checks are skipped then)."""
    return torch.compiler.is_compiling()


_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def values_unreadable(t: Tensor) -> bool:
    """Whether ``t``'s values cannot be read into Python: while ``torch.compile`` traces, or
    inside a ``torch.func`` transform (``vmap``, ``grad``) that wraps it."""
    return is_compiling() or _wrapped(t)


def in_transform(*xs: Tensor) -> bool:
    """Whether forward-mode AD is on or a ``torch.func`` transform wraps one of ``xs`` (not to be
    asked while ``torch.compile`` traces: Dynamo cannot trace the look)."""
    return forward_ad._current_level >= 0 or any(map(_wrapped, xs))


def savable(*xs: Any) -> tuple[Any, ...]:
    """``xs`` as a custom autograd function may save them for backward: an inference tensor
    (made under ``torch.inference_mode``, as a teacher's logits often are) is copied, as autograd
    refuses to save one; other values pass unchanged."""
    if torch.is_inference_mode_enabled():
        return xs
    return tuple(x.clone() if isinstance(x, Tensor) and x.is_inference() else x for x in xs)


def as_number(name: str, value: Any, what: str) -> float:
    """``value`` as a float if it is a real number: a Python or NumPy int / float (also a 0-d
    NumPy array), or a 0-d tensor without a gradient; anything else (a string, None, a bool, a
    tensor or array with several entries, a tensor that requires grad) is a TypeError that names
    the parameter. An int too large for a float is a ValueError."""
    if type(value) is float or type(value) is int:  # the usual case, without the ABC lookup
        return _to_float(name, value, what)
    if isinstance(value, Tensor):
        if value.dim() == 0 and not value.requires_grad and not value.is_complex():
            return float(value)
        shown = f"a tensor of shape {tuple(value.shape)}" + (
            " that requires grad" if value.requires_grad else ""
        )
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        return _to_float(name, value, what)
    elif getattr(value, "ndim", None) == 0 and getattr(value, "dtype", None) is not None:
        kind = getattr(value.dtype, "kind", "")
        if kind in ("i", "u", "f"):  # a 0-d NumPy array of ints or floats
            return _to_float(name, value, what)
        shown = f"{value!r} ({type(value).__name__} of {value.dtype})"
    else:
        shown = f"{value!r} ({type(value).__name__})"
    raise TypeError(f"Expected {name} {what}, got {shown}")


def _to_float(name: str, value: Any, what: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"Expected {name} {what}, got an int too large for a float") from None


# The smallest temperature the fused kernel takes: below it, logits over T square past float32's
# range in its running sums. The torch path takes any temperature down to float32's tiny.
KERNEL_MIN_TEMPERATURE = 1e-6


def check_positive(name: str, value: Any, minimum: float = 0.0) -> float:
    """A finite ``value > 0`` (temperatures), returned as a float. ``minimum`` is an extra lower
    bound (the losses use the smallest normal float32, so that ``1 / value`` stays finite)."""
    x = as_number(name, value, "a positive finite number")
    value = x if isinstance(value, Tensor) else value
    if not x > 0:
        raise ValueError(f"Expected {name} > 0, got {value}")
    if not -math.inf < x < math.inf:  # (not math.isfinite: torch.compile traces this)
        raise ValueError(f"Expected a finite {name} > 0, got {value}")
    if x < minimum:
        raise ValueError(
            f"Expected {name} >= {minimum:.3g} (smaller values make 1/{name} overflow float32), "
            f"got {value}"
        )
    return x


def check_non_negative_scalar(name: str, value: Any) -> float:
    """A finite ``value >= 0`` (loss weights such as alpha and beta), returned as a float."""
    x = as_number(name, value, "a non-negative finite number")
    value = x if isinstance(value, Tensor) else value
    if not x >= 0:
        raise ValueError(f"Expected {name} >= 0, got {value}")
    if not -math.inf < x < math.inf:
        raise ValueError(f"Expected a finite {name} >= 0, got {value}")
    return x


def check_logits(input: Any, target: Any) -> None:
    """Two floating-point (B, C) tensors of the same shape, on one device, with C >= 2."""
    if (  # the usual case in one expression: the losses run it on every call
        isinstance(input, Tensor)
        and isinstance(target, Tensor)
        and input.dim() == 2
        and input.shape == target.shape
        and input.shape[1] >= 2
        and input.is_floating_point()
        and target.is_floating_point()
        and input.layout == torch.strided
        and target.layout == torch.strided
        # x.device builds a new object: compare the cheap flags first
        and ((input.is_cpu and target.is_cpu) or input.device == target.device)
    ):
        return
    for name, t in (("input", input), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"Expected {name} to be a torch.Tensor of logits, got {type(t).__name__}"
            )
        if t.dim() != 2:
            raise ValueError(f"Expected {name} of shape (B, C), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"Expected floating-point {name} logits, got {t.dtype}")
        if t.layout != torch.strided:
            raise TypeError(f"Expected dense (strided) {name} logits, got layout {t.layout}")
    if input.shape != target.shape:
        raise ValueError(
            f"Expected target of shape (B, C) = {tuple(input.shape)} like input, "
            f"got {tuple(target.shape)}"
        )
    if input.device != target.device:
        raise ValueError(
            f"Expected input and target on the same device, got {input.device} and {target.device}"
        )
    if input.shape[1] < 2:
        raise ValueError(f"Expected at least 2 classes (C >= 2), got C = {input.shape[1]}")


def check_row_mask(mask: Any, input: Tensor, name: str = "mask") -> None:
    """``None`` or a bool (B,) tensor on the input's device."""
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"Expected {name} to be a bool tensor of shape (B,), got {got}")
    if mask.shape != input.shape[:1]:
        raise ValueError(
            f"Expected {name} of shape (B,) = ({input.shape[0]},), got {tuple(mask.shape)}"
        )
    if mask.device != input.device:
        raise ValueError(f"Expected {name} on {input.device}, got {mask.device}")


def check_class_weights(class_weights: Any, input: Tensor) -> None:
    """Floating-point, the input's shape and device (no host sync; the values are
    :func:`check_weight_values`'s)."""
    if not isinstance(class_weights, Tensor) or not class_weights.is_floating_point():
        got = class_weights.dtype if isinstance(class_weights, Tensor) else type(class_weights)
        raise TypeError(f"Expected floating-point class_weights of shape (B, C), got {got}")
    if class_weights.shape != input.shape:
        raise ValueError(
            f"Expected class_weights of shape (B, C) = {tuple(input.shape)}, "
            f"got {tuple(class_weights.shape)}"
        )
    if class_weights.device != input.device:
        raise ValueError(f"Expected class_weights on {input.device}, got {class_weights.device}")


def check_weight_values(name: str, t: Tensor) -> bool:
    """Every entry finite and non-negative; returns whether their sum is finite too (the fused
    kernel needs it). It reads the values (one host sync on CUDA), so each loss call runs it
    once; skipped while compiling and under ``torch.func`` transforms. Two reductions decide the
    usual case (a NaN makes the minimum NaN, an inf the sum); the element-wise look is only on
    the way to an error."""
    if values_unreadable(t) or t.numel() == 0:
        return True
    if bool((t.amin() >= 0) & torch.isfinite(t.sum())):
        return True
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"Expected finite {name}, got NaN or inf entries")
    if bool((t < 0).any()):
        raise ValueError(f"Expected non-negative {name}, got negative entries")
    return False  # finite, non-negative entries whose sum overflowed: valid
