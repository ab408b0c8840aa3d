"""The last hidden states and the output head of a causal LM, also when its parameters are sharded.

A fused loss reads ``lm_head.weight`` outside the model's forward. Under DeepSpeed ZeRO-3 that
parameter is an empty placeholder once the forward is over, and under FSDP it may be a shard.
:func:`gathered_output_head` yields the full weight (and bias) for the duration of a ``with`` block:

- DeepSpeed ZeRO-3 (the parameter has a ``ds_id``): ``deepspeed.zero.GatheredParameters``.
- FSDP2 (``torch.distributed.fsdp.fully_shard``; the parameter is a ``DTensor``): for the student
  (``grad=True``) the owning module is unsharded, so the gradient reaches the unsharded parameter
  and FSDP reduce-scatters it as usual; for the teacher (``grad=False``) a full copy is gathered.
  A root module keeps its parameters unsharded after forward, so usually nothing is gathered.
- FSDP1 (``FullyShardedDataParallel``): ``summon_full_params`` for a teacher; a student head under
  FSDP1 cannot receive a gradient from outside its forward, which is an error (use FSDP2).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["gathered_output_head", "last_hidden_state", "output_head", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DeepSpeed / FSDP1 wrappers (``.module`` chains)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def output_head(model: nn.Module) -> nn.Module:
    """``model.get_output_embeddings()`` (Hugging Face), or ``model`` itself when it is the head."""
    inner = unwrap_model(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else inner
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise TypeError(
            f"Expected a causal LM with get_output_embeddings() or a linear head, got "
            f"{type(inner).__name__}"
        )
    return head


def _is_dtensor(x: Any) -> bool:
    return callable(getattr(x, "full_tensor", None)) and hasattr(x, "placements")


def _fsdp2_owner(model: nn.Module, head: nn.Module) -> nn.Module:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule
    owner = None
    for m in model.modules():
        if isinstance(m, FSDPModule) and any(x is head for x in m.modules()):
            owner = m  # modules() is pre-order: the last match is the innermost
    if owner is None:
        raise RuntimeError("The output head's weight is a DTensor, but no FSDP module owns it")
    return owner


def _fsdp1_owner(model: nn.Module, head: nn.Module) -> nn.Module | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return None
    owner = None
    for m in model.modules():
        if isinstance(m, FullyShardedDataParallel) and any(x is head for x in m.modules()):
            owner = m
    return owner


@contextlib.contextmanager
def gathered_output_head(
    model: nn.Module, *, grad: bool = True
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """``with gathered_output_head(model) as (weight, bias):`` the head's full ``(V, H)`` weight.

    Args:
        model: a causal LM (``get_output_embeddings()``) or the head module itself, possibly
            sharded by DeepSpeed ZeRO-3, FSDP2 or FSDP1, or wrapped by DDP.
        grad: ``True`` for the student (the yielded weight is the parameter the gradient must
            reach), ``False`` for a frozen teacher (any full copy will do).

    Example:
        >>> head = nn.Linear(4, 10, bias=False)
        >>> with gathered_output_head(head) as (w, b):
        ...     print(tuple(w.shape), b)
        (10, 4) None
    """
    head = output_head(model)
    weight, bias = head.weight, getattr(head, "bias", None)
    params = [p for p in (weight, bias) if p is not None]
    if any(hasattr(p, "ds_id") for p in params):  # a DeepSpeed ZeRO-3 parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield head.weight, getattr(head, "bias", None)
        return
    if _is_dtensor(weight):
        if grad:
            _fsdp2_owner(model, head).unshard()
            weight, bias = head.weight, getattr(head, "bias", None)
            if _is_dtensor(weight):
                raise RuntimeError("FSDP unshard() left the output head's weight sharded")
        else:
            weight = weight.full_tensor()
            bias = bias.full_tensor() if _is_dtensor(bias) else bias
        yield weight, bias
        return
    if weight.numel() == 0:  # FSDP1 after forward: a view into a freed flat parameter
        owner = _fsdp1_owner(model, head)
        if owner is None:
            raise RuntimeError(
                "The output head's weight is empty and no known sharding wrapper owns it"
            )
        if grad:
            raise RuntimeError(
                "A student under FSDP1 (FullyShardedDataParallel) cannot take the output head's "
                "gradient outside its forward; shard it with torch.distributed.fsdp.fully_shard "
                "(FSDP2; accelerate: fsdp_version: 2) instead"
            )
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(owner, writeback=False):
            yield head.weight, getattr(head, "bias", None)
        return
    yield weight, bias


@functools.lru_cache(maxsize=64)
def _forward_kwargs(cls: type) -> dict:
    """Keyword arguments that make a Hugging Face causal LM skip the (N, V) logits and caches."""
    try:
        names = set(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return {}
    kw: dict[str, Any] = {}
    if "logits_to_keep" in names:  # transformers >= 4.50
        kw["logits_to_keep"] = 1
    elif "num_logits_to_keep" in names:  # 4.45 - 4.49
        kw["num_logits_to_keep"] = 1
    if "use_cache" in names:
        kw["use_cache"] = False
    return kw


def last_hidden_state(model: nn.Module, inputs: Mapping[str, Any]) -> Tensor:
    """The hidden states the output head reads, ``(B, L, H)``, from one forward of ``model``.

    The model is called as a whole (so sharding wrappers gather what they must) with
    ``output_hidden_states=True`` and, where the forward accepts it, ``logits_to_keep=1``, so only
    the last position's logits are formed. The last entry of ``hidden_states`` is the final
    normalised state in Hugging Face decoders.
    """
    kw = _forward_kwargs(type(unwrap_model(model)))
    out = model(**inputs, output_hidden_states=True, **kw)
    hidden = out.hidden_states if hasattr(out, "hidden_states") else out["hidden_states"]
    if not hidden:
        raise RuntimeError(f"{type(unwrap_model(model)).__name__} returned no hidden states")
    return hidden[-1]
