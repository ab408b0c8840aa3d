"""Argument checks of the vocabulary-scale losses: one line naming the argument, what was expected
and what came."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dkl import ops
from dkl._checks import KERNEL_MIN_TEMPERATURE

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "torch", "triton")


def valid_token_mask(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Bool mask of the tokens that count: ``labels != ignore_index`` (the row mask of the losses).

    >>> import torch
    >>> valid_token_mask(torch.tensor([3, -100, 7]))
    tensor([ True, False,  True])
    """
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"Expected integer labels, got {labels.dtype}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"Expected ignore_index an int, got {ignore_index!r}")
    return labels != ignore_index


# keys of a packed batch (several sequences in one row), as flash-attention collators name them
PACKED_KEYS = ("seq_lengths", "cu_seq_lens_q", "cu_seqlens", "packed_seq_lens")


def packed_batch(batch: Any) -> str | None:
    """What shows that ``batch`` packs several sequences into a row (a packed-sequence key, or
    ``position_ids`` that restart between two attended tokens of a row, as
    ``DataCollatorWithFlattening`` gives; left padding's positions restart after the padding
    only), or ``None``."""
    if not isinstance(batch, Mapping):
        return None
    for key in PACKED_KEYS:
        if key in batch:
            return f"it carries {key!r}"
    pos, mask = batch.get("position_ids"), batch.get("attention_mask")
    if not isinstance(pos, Tensor) or pos.dim() < 1 or pos.shape[-1] < 2:
        return None
    restart = pos[..., 1:] <= pos[..., :-1]
    if isinstance(mask, Tensor) and mask.shape == pos.shape:
        restart &= (mask[..., 1:] != 0) & (mask[..., :-1] != 0)
    return "its position_ids restart inside a row" if bool(restart.any()) else None


def _flatten_tokens(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"Expected {name} a floating tensor of shape (N, H) or (..., H), got {got}"
        )
    return x.reshape(-1, x.shape[-1])


def _check_linear(weight: Any, bias: Tensor | None, hidden: Tensor, name: str) -> None:
    """The head of ``hidden`` (N, H): weight (V, H), bias (V,), and outside autocast the hidden
    states' dtype (else the head's matmul fails deep inside with a message naming neither)."""
    H = hidden.shape[1]
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != H:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"Expected {name}_head_weight of shape (V, H) with H = {H}, got {got}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(
            f"Expected {name}_bias of shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    kind = hidden.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return
    for what, x in ((f"{name}_head_weight", weight), (f"{name}_bias", bias)):
        if x is not None and x.dtype != hidden.dtype:
            raise ValueError(
                f"Expected {what} of the {name}'s hidden-state dtype {hidden.dtype}, got "
                f"{x.dtype} (cast one of them, or run the loss under torch.autocast)"
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


def _check_mixture(value: Any) -> float:
    """The JSD's mixture weight: a float in [0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"Expected beta a number, got {type(value).__name__}") from None
    if not 0.0 <= v <= 1.0:  # NaN fails too
        raise ValueError(
            f"Expected beta in [0, 1] (the JSD's mixture weight: 0 = forward KL, 1 = reverse KL), "
            f"got {value}"
        )
    return v


def _use_kernel(impl: str, logits: Tensor, temperatures: tuple[float, ...] = ()) -> bool:
    if impl == "torch":
        return False
    if impl == "auto":  # temperatures below the kernel's range take the torch route
        return (
            logits.is_cuda
            and min(temperatures, default=1.0) >= KERNEL_MIN_TEMPERATURE
            and ops.triton_unavailable_reason(logits) is None
        )
    reason = ops.triton_unavailable_reason(logits)
    if reason is not None:
        raise RuntimeError(f"impl='triton' cannot run: {reason}. Use impl='torch' or 'auto'.")
    return True


def refuse_functorch(what: str) -> None:
    """One line instead of torch's own error about ``setup_context``: the chunked losses are
    autograd functions with closed-form gradients, which ``torch.func`` transforms (``grad``,
    ``vmap``, ``jacrev``) cannot trace."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(
            f"{what} computes its gradient in closed form and does not run under torch.func "
            "transforms (grad, vmap, jacrev); materialise the logits and use dkl.ikl_loss / "
            "dkl.kl_loss, which do"
        )


def refuse_double_backward(what: str) -> None:
    """One line instead of a silently wrong second derivative: called at the start of a backward
    written in closed form (grad mode is on there exactly under ``create_graph=True``)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{what} computes its gradient in closed form and has no second derivative (backward "
            "ran with create_graph=True); for a gradient penalty, meta-learning or any double "
            "backward, materialise the logits and use dkl.ikl_loss / dkl.kl_loss, which are "
            "exact to the second order"
        )
