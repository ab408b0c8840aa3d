"""Where the teacher's logits of a chunk come from: its hidden states and head, or its top-k."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from dkl.llm._checks import _check_linear, _flatten_tokens
from dkl.llm._chunk import TAILS, dense_from_topk
from dkl.ops.divergence import SUPPORTED_DTYPES


class _DenseTeacher:
    """Teacher logits per chunk from hidden states and a head (cut to the student's V rows)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, vocab: int, tf):
        self.hidden = hidden.detach()
        self.weight = weight.detach()[:vocab]  # a view, no copy
        self.bias = bias.detach()[:vocab] if bias is not None else None
        self.transform = tf

    def logits(self, start: int, end: int, dtype: torch.dtype | None) -> Tensor:
        """The chunk's logits in ``dtype``; ``None``: as the head gives them when it gives a
        dtype the fused kernel reads and no transform is to be applied (else float32)."""
        z = F.linear(self.hidden[start:end], self.weight, self.bias)
        if dtype is None:
            dtype = (
                z.dtype
                if z.dtype in SUPPORTED_DTYPES and self.transform.identity
                else torch.float32
            )
        return self.transform(z.to(dtype))[0]


class _TopKTeacher:
    """Teacher logits per chunk from its top-k (indices, values)."""

    def __init__(self, indices: Tensor, values: Tensor, vocab: int, tail: str):
        self.indices, self.values = indices.detach(), values.detach()
        self.vocab, self.tail = vocab, tail

    def logits(self, start: int, end: int, dtype: torch.dtype | None) -> Tensor:
        """The chunk's dense logits in ``dtype``; ``None``: the values' dtype when the fused
        kernel reads it and the tail adds no value of its own (else float32: the uniform tail's
        log-probability is computed, and is kept in float32)."""
        if dtype is None:
            keep = self.values.dtype in SUPPORTED_DTYPES and self.tail == "renormalize"
            dtype = self.values.dtype if keep else torch.float32
        return dense_from_topk(
            self.indices[start:end], self.values[start:end], self.vocab, self.tail, dtype
        )


def _dense_teacher(hidden, weight, bias, token_shape, V, device, tf) -> _DenseTeacher:
    ht = _flatten_tokens(hidden, "teacher_hidden")
    if hidden.shape[:-1] != token_shape:
        raise ValueError(
            f"Expected teacher_hidden with the student's token shape {tuple(token_shape)}, "
            f"got {tuple(hidden.shape[:-1])}"
        )
    _check_linear(weight, bias, ht, "teacher")
    Vt = weight.shape[0]
    if Vt < V:
        raise ValueError(
            f"Expected a teacher vocabulary at least as large as the student's ({V}), got {Vt}: "
            "the teacher's logits are cut to the student's first V entries, never padded"
        )
    for name, x in (("teacher_hidden", ht), ("teacher_head_weight", weight)):
        if x.device != device:
            raise ValueError(f"Expected {name} on {device} (the student's device), got {x.device}")
    # a teacher's hidden states computed with a graph: their owner expects the teacher to
    # learn (its head's parameters alone require grad whenever the model is not frozen)
    if torch.is_grad_enabled() and hidden.requires_grad:
        warnings.warn(
            "teacher_hidden requires grad, but the fused dkl.llm losses treat the teacher as a "
            "fixed target and give it no gradient; compute the teacher under torch.no_grad(), or "
            "train it through dkl.ikl_loss on materialised logits",
            stacklevel=4,
        )
    return _DenseTeacher(ht, weight, bias, V, tf)


def _topk_teacher(topk, tail, token_shape, V, device, tf, valid=None) -> _TopKTeacher:
    """The checked top-k teacher; ``valid`` (N,) marks the tokens that count: only those are
    held to the tail's and the indices' rules (padding may hold anything non-negative)."""
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
    k = shape[-1]
    flat_indices, flat_values = indices.reshape(-1, k), values.reshape(-1, k)
    check_topk_entries(flat_indices, flat_values, V, tail, valid)
    return _TopKTeacher(flat_indices, flat_values, V, tail)


def check_topk_entries(
    indices: Tensor, values: Tensor, V: int, tail: str, valid: Tensor | None = None
) -> None:
    """The rules of ``(N, k)`` top-k entries, on the tokens ``valid`` marks (all without it):
    integer indices, at least one entry, non-negative and distinct indices, at least one index
    in the vocabulary, no NaN or ``+inf`` value, and for ``tail="uniform"`` log-probabilities
    whose exponentials sum to at most 1. Padding tokens may hold anything non-negative."""
    if indices.is_floating_point() or indices.dtype == torch.bool or not values.is_floating_point():
        raise TypeError(
            f"Expected integer top-k indices and floating values, got {indices.dtype} and "
            f"{values.dtype}"
        )
    k = indices.shape[-1]
    if k < 1:
        raise ValueError(f"Expected at least one top-k entry per token, got k = {k}")
    if indices.numel() and bool((indices < 0).any()):
        raise ValueError(f"Expected non-negative top-k indices, got {int(indices.min())}")
    counted_values = values if valid is None else values[valid]
    counted_indices = indices if valid is None else indices[valid]
    if not counted_indices.numel():
        return
    bad = torch.isnan(counted_values) | torch.isposinf(counted_values)
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0])
        raise ValueError(
            f"Expected top-k values that are finite or -inf, got NaN or +inf in counted token {row}"
        )
    outside = (counted_indices >= V).all(1)
    if bool(outside.any()):
        row = int(outside.nonzero()[0])
        raise ValueError(
            f"Expected at least one top-k index below the vocabulary size {V} per token, got "
            f"none in counted token {row}"
        )
    if k > 1:
        ordered = counted_indices.sort(dim=1).values
        dup = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] < V)
        if bool(dup.any()):
            row = int(dup.any(1).nonzero()[0])
            raise ValueError(
                f"Expected distinct top-k indices per token, got index "
                f"{int(ordered[row, 1:][dup[row]][0])} twice in counted token {row}"
            )
    if tail == "uniform" and counted_values.numel():
        excess = float(torch.logsumexp(counted_values.float(), dim=1).max())
        if excess > 1e-3:
            raise ValueError(
                "topk_tail='uniform' needs log-probabilities of the full distribution (each "
                f"token's exp(values) summing to <= 1), got a sum of {math.exp(excess):.4g}; pass "
                "log_softmax outputs, or use topk_tail='renormalize' for logits"
            )
