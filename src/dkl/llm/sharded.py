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

A student head under ZeRO-3 needs more than a gather: its gradient arrives in backward, after the
gather block has re-partitioned the weight. :func:`call_output_head` therefore runs the loss *as
the head's forward* (the head module is called with its ``forward`` swapped for the loss), so
DeepSpeed's own module hooks gather the weight for forward, gather it again before the loss's
backward, and reduce-scatter its gradient into the partitioned parameter, as for any layer.

Teachers: :func:`deepspeed_inference_engine` wraps a frozen teacher for ZeRO-3 inference
(partitioned like the student, no optimizer), and :func:`fully_shard_teacher` shards one with FSDP2
the way the student is sharded (each decoder layer, then the root).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dkl.llm._chunk import LogitTransform

__all__ = [
    "call_output_head",
    "deepspeed_inference_engine",
    "fully_shard_teacher",
    "gathered_output_head",
    "is_zero3_parameter",
    "last_hidden_state",
    "logit_transform",
    "output_head",
    "output_head_shape",
    "unwrap_model",
]


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


def output_head_shape(model: nn.Module) -> tuple[int, int]:
    """The output head's full ``(V, H)``, also while ZeRO-3 holds only a partition of it."""
    weight = output_head(model).weight
    return tuple(weight.ds_shape if is_zero3_parameter(weight) else weight.shape)  # type: ignore[return-value]


def is_zero3_parameter(p: Any) -> bool:
    """Whether ``p`` is a parameter partitioned by DeepSpeed ZeRO-3 (it carries a ``ds_id``)."""
    return hasattr(p, "ds_id")


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


ZERO3_HEAD_LORA = (
    "A LoRA adapter on the output head under DeepSpeed ZeRO-3 is not supported by the fused "
    "loss; leave lm_head out of target_modules (or use modules_to_save=['lm_head'])"
)


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

    A PEFT LoRA adapter on the head is part of the yielded weight (``W + s B A``, see
    :func:`lora_adapters`), so the gradient reaches ``A`` and ``B``; that costs one ``(V, H)``
    weight more while the block lasts.

    Example:
        >>> head = nn.Linear(4, 10, bias=False)
        >>> with gathered_output_head(head) as (w, b):
        ...     print(tuple(w.shape), b)
        (10, 4) None
    """
    head = output_head(model)
    adapters = lora_adapters(head)
    if adapters and any(is_zero3_parameter(p) for p in head.parameters()):
        raise NotImplementedError(ZERO3_HEAD_LORA)
    with _gathered_base(model, head, grad) as (weight, bias):
        for adapter in adapters:  # W + s B A (and the adapter's bias s b_B), differentiable
            weight = weight + head.get_delta_weight(adapter).to(weight.dtype)
            lora_bias = getattr(head.lora_B[adapter], "bias", None)
            if lora_bias is not None:
                lora_bias = (lora_bias * head.scaling[adapter]).to(weight.dtype)
                bias = lora_bias if bias is None else bias + lora_bias
        yield weight, bias


def lora_adapters(head: nn.Module) -> list[str]:
    """The active PEFT LoRA adapters of an output head whose weight and bias they change: the
    fused loss, which reads the head's weight rather than calling it, adds ``s B A`` to it.
    Empty for a plain head, a merged or disabled adapter. Refused with one line where the
    adapter is not a linear change of the weight: DoRA and other variants, and dropout on the
    adapter's input in training."""
    if not (hasattr(head, "base_layer") and hasattr(head, "lora_A") and hasattr(head, "scaling")):
        return []
    if getattr(head, "merged", False) or getattr(head, "disable_adapters", False):
        return []
    active = [a for a in getattr(head, "active_adapters", ()) if a in head.lora_A]
    for adapter in active:
        if adapter in getattr(head, "lora_variant", {}) or getattr(head, "use_dora", {}).get(
            adapter, False
        ):
            raise NotImplementedError(
                f"LoRA adapter {adapter!r} on the output head is a variant (e.g. DoRA) that the "
                "fused loss cannot fold into the head's weight; leave lm_head out of "
                "target_modules, or merge the adapter"
            )
        p = getattr(head.lora_dropout[adapter], "p", 0.0)
        if head.training and p > 0:
            raise ValueError(
                f"Expected lora_dropout = 0 for LoRA adapter {adapter!r} on the output head, got "
                f"{p}: dropout on the adapter's input cannot be folded into the head's weight, "
                "which the fused loss reads; set lora_dropout=0 or leave lm_head out of "
                "target_modules"
            )
    return active


@contextlib.contextmanager
def _gathered_base(
    model: nn.Module, head: nn.Module, grad: bool
) -> Iterator[tuple[Tensor, Tensor | None]]:
    weight, bias = head.weight, getattr(head, "bias", None)
    params = [p for p in (weight, bias) if p is not None]
    if any(is_zero3_parameter(p) for p in params):
        if grad:
            raise RuntimeError(
                "A ZeRO-3 student head's gradient arrives after a gather block has re-partitioned "
                "its weight; compute the loss with call_output_head(model, fn, ...) instead"
            )
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


def call_output_head(model: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(weight, bias, *args)`` with the output head's full weight, gradients included.

    Under DeepSpeed ZeRO-3 the head module itself is called, with ``fn`` as its forward for this
    one call: the engine's hooks gather the weight for forward and again for backward, and turn
    the gradient ``fn``'s backward gives the weight into the partitioned parameter's. Elsewhere
    this is ``fn`` inside :func:`gathered_output_head` (``grad=True``).

    Example:
        >>> import torch
        >>> head = nn.Linear(3, 5, bias=False)
        >>> call_output_head(head, lambda w, b, x: (x @ w.T).sum(), torch.ones(2, 3)).shape
        torch.Size([])
    """
    head = output_head(model)
    if not any(is_zero3_parameter(p) for p in head.parameters(recurse=False)):
        with gathered_output_head(model, grad=True) as (weight, bias):
            return fn(weight, bias, *args)

    def forward(*inputs: Any) -> Any:
        return fn(head.weight, getattr(head, "bias", None), *inputs)

    with _forward_swapped(head, forward):
        return head(*args)


@contextlib.contextmanager
def _forward_swapped(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """``module``'s forward replaced by ``forward`` for the block (its hooks still run: the module
    is called as usual); a forward set on the instance before (a wrapper's) is put back."""
    own = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def _resolve_auto(config: dict, hidden: int) -> dict:
    """A DeepSpeed config for a frozen model: no optimizer or scheduler, and the ``"auto"`` values
    that depend on the model filled in from its hidden size (the rest left to DeepSpeed)."""
    config = copy.deepcopy(config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    filled = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_param_persistence_threshold": 10 * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
    }
    for key, value in filled.items():
        if zero.get(key) == "auto":
            zero[key] = value

    def drop_auto(d: dict) -> dict:
        return {k: drop_auto(v) if isinstance(v, dict) else v for k, v in d.items() if v != "auto"}

    return drop_auto(config)


def deepspeed_inference_engine(teacher: nn.Module, config: Mapping[str, Any]) -> nn.Module:
    """A frozen teacher ready for DeepSpeed: a ZeRO-3 inference engine (partitioned, no optimizer)
    when ``config`` is stage 3, else the module itself (ZeRO-1/2 keep parameters whole).

    A teacher loaded with ``from_pretrained`` once ``TrainingArguments(deepspeed=...)`` exists is
    already partitioned by ``zero.Init`` and cannot run its forward until an engine owns it.
    ``config`` is the student's DeepSpeed config; its optimizer and scheduler are dropped.
    """
    teacher.eval().requires_grad_(False)
    if int(config.get("zero_optimization", {}).get("stage", 0)) != 3:
        return teacher
    import deepspeed

    inner = unwrap_model(teacher)
    cfg = getattr(inner, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    hidden = getattr(cfg, "hidden_size", None) or output_head_shape(inner)[1]
    engine, *_ = deepspeed.initialize(model=teacher, config=_resolve_auto(dict(config), hidden))
    engine.eval()
    return engine


def fully_shard_teacher(
    teacher: nn.Module,
    *,
    mesh: Any = None,
    layer_classes: Iterable[str] | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard a frozen teacher with FSDP2 (``fully_shard``): each decoder layer, then the root.

    ``layer_classes`` are the class names sharded one by one (default: the model's
    ``_no_split_modules``, the decoder layers of a Hugging Face model). Parameters move to the
    mesh's device shard by shard, so a teacher larger than one device fits once sharded; its
    forward gathers one layer at a time, and :func:`gathered_output_head` gives its full head.
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    teacher.eval().requires_grad_(False)
    names = set(layer_classes or getattr(teacher, "_no_split_modules", None) or ())
    for module in teacher.modules():
        if module is not teacher and type(module).__name__ in names:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return teacher


def _wrapped_models(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` and the models it wraps: ``.module`` (DDP, DeepSpeed), ``get_base_model()``
    (PEFT); outermost first."""
    seen: set[int] = set()
    while isinstance(model, nn.Module) and id(model) not in seen:
        seen.add(id(model))
        yield model
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            get_base = getattr(model, "get_base_model", None)
            inner = get_base() if callable(get_base) else None
        model = inner


@functools.lru_cache(maxsize=64)
def _signature(cls: type) -> tuple[frozenset, bool]:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return frozenset(), True
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return frozenset(params), var_kw


def _forward_kwargs(model: nn.Module) -> dict:
    """Keyword arguments that make a Hugging Face causal LM skip the (N, V) logits and caches:
    read from the innermost causal LM's forward, passed only if every wrapper on the way forwards
    them (names them or takes ``**kwargs``, as PEFT's ``PeftModelForCausalLM`` does)."""
    chain = list(_wrapped_models(model))
    for depth, m in enumerate(chain):
        names, _ = _signature(type(m))
        kw: dict[str, Any] = {}
        if "logits_to_keep" in names:  # transformers >= 4.50
            kw["logits_to_keep"] = 1
        elif "num_logits_to_keep" in names:  # 4.45 - 4.49
            kw["num_logits_to_keep"] = 1
        if not kw:
            continue
        if "use_cache" in names:
            kw["use_cache"] = False
        outer = chain[:depth]
        if all(_signature(type(w))[1] or set(kw) <= _signature(type(w))[0] for w in outer):
            return kw
        return {}
    return {}


@contextlib.contextmanager
def _last_position_logits(model: nn.Module, raw: list[Tensor]) -> Iterator[None]:
    """The output head applied to the last position only, whatever the wrappers pass on: the
    (N, V) logits of a forward run for its hidden states are never formed. Each output the head
    gives is appended to ``raw`` (detached)."""
    try:
        head = output_head(model)
    except TypeError:
        yield
        return
    original = head.forward

    def forward(hidden: Tensor, *args: Any, **kwargs: Any) -> Any:
        out = original(hidden[..., -1:, :], *args, **kwargs)
        if isinstance(out, Tensor):
            raw.append(out.detach())
        return out

    with _forward_swapped(head, forward):
        yield


# How Hugging Face causal LMs turn the output head's values into their logits, as their forwards
# do it: (config key, how it is applied, the model types whose forward applies it; None: all).
_SCALES = (
    ("logit_scale", "times", ("cohere",)),  # Cohere, Cohere2: logits * logit_scale
    ("logits_scaling", "times", ("hyperclovax",)),  # HyperCLOVA X multiplies by it
    ("logits_scaling", "divided by", None),  # Granite, MiniCPM3 divide by it
    ("lm_head_multiplier", "times", ("falcon_h1",)),
    ("output_multiplier", "times", ("muse_",)),  # before the soft cap
)
_SOFTCAPS = (
    ("final_logit_softcapping", None),  # Gemma 2 / 3 / 4 and others
    ("logits_soft_cap", ("recurrent_gemma",)),
)


def _config_value(configs: list[Any], key: str) -> Any:
    for cfg in configs:
        value = getattr(cfg, key, None)
        if value is not None:
            return value
    return None


def logit_transform(model: nn.Module) -> dict[str, float | None]:
    """``{"logit_scale", "softcap"}`` of a Hugging Face model's final logits, from its config
    (and its text config in a multimodal model): the scale and soft cap its forward applies to the
    output head's values.

    >>> from types import SimpleNamespace
    >>> logit_transform(SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=30.0)))
    {'logit_scale': 1.0, 'softcap': 30.0}
    """
    cfg = getattr(unwrap_model(model), "config", None)
    configs = [cfg]
    get_text = getattr(cfg, "get_text_config", None)
    if callable(get_text):
        text = get_text(decoder=True)
        if text is not None and text is not cfg:
            configs.append(text)
    types = tuple(str(getattr(c, "model_type", "") or "") for c in configs)

    def applies(owners: tuple[str, ...] | None) -> bool:
        return owners is None or any(t.startswith(o) for t in types for o in owners)

    scale, used = 1.0, set()
    for key, how, owners in _SCALES:
        value = _config_value(configs, key)
        if value is None or key in used or not applies(owners):
            continue
        used.add(key)
        scale = scale * float(value) if how == "times" else scale / float(value)
    softcap = None
    for key, owners in _SOFTCAPS:
        value = _config_value(configs, key)
        if value and applies(owners):
            softcap = float(value)
            break
    return {"logit_scale": scale, "softcap": softcap}


def _check_transform(model: nn.Module, raw: list[Tensor], out: Any, tf: LogitTransform) -> None:
    """Refuse a model whose own last-position logits are not ``tf`` of its output head's
    values: the losses form logits from the head with that transform, and would leave out the
    architecture's own (a scale or cap under another config key)."""
    logits = getattr(out, "logits", None) if not isinstance(out, Mapping) else out.get("logits")
    if len(raw) != 1 or not isinstance(logits, Tensor) or logits.shape != raw[0].shape:
        return  # no single head call to compare (a wrapper's head, extra heads): nothing to check
    softcap = tf.softcap
    with torch.no_grad():
        got = logits.detach().float()
        expected = tf(raw[0].float())[0]
        both = torch.isfinite(got) & torch.isfinite(expected)
        if not bool(both.any()):
            return
        size = torch.maximum(got[both].abs().amax(), expected[both].abs().amax())
        error = (got - expected)[both].abs().amax()
        if not bool(error > 1e-2 * size):
            return
    name = type(unwrap_model(model)).__name__
    described = f"times {tf.scale:g}" + (f", soft-capped at {softcap:g}" if softcap else "")
    raise ValueError(
        f"{name}'s logits are not its output head's values {described} (the transform dkl read "
        f"from its config): they differ by up to {float(error):.3g} at the last position, where "
        f"the logits reach {float(size):.3g}. dkl reads final_logit_softcapping, "
        "logits_soft_cap (RecurrentGemma), logit_scale (Cohere), logits_scaling (Granite, "
        "MiniCPM3: divided; HyperCLOVA X: multiplied), lm_head_multiplier (Falcon-H1) and "
        "output_multiplier (MuseSpark); this architecture applies another transform, which "
        "the losses would leave out. Pass the scale and cap yourself where the API takes them "
        "(student_logit_scale / student_softcap, teacher_logit_scale / teacher_softcap, "
        "TopKCache.build(logit_scale=, softcap=))"
    )


# batch keys a distillation batch carries for the loss, never for the model's forward
NOT_MODEL_INPUTS = frozenset(
    {"labels", "shift_labels", "teacher_topk_indices", "teacher_topk_values"}
)


def last_hidden_state(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    transform: LogitTransform | Mapping[str, Any] | None = None,
) -> Tensor:
    """The hidden states the output head reads, ``(B, L, H)``, from one forward of ``model``.

    The model is called as a whole (so sharding wrappers gather what they must) with
    ``output_hidden_states=True``. Only the last position's logits are formed: ``logits_to_keep=1``
    where the forward (or the model a PEFT / DDP / DeepSpeed wrapper holds) accepts it, and the
    head is applied to the last position in any case. The last entry of ``hidden_states`` is the
    final normalised state in Hugging Face decoders. The loss's own keys (:data:`NOT_MODEL_INPUTS`)
    are not passed on.

    The model's own last-position logits are checked to be ``transform`` (a ``LogitTransform``
    or :func:`logit_transform`'s ``{"logit_scale", "softcap"}``; default: that of the model) of
    its output head's values, so
    an architecture with a final-logit transform dkl does not know is refused, not distilled
    without it.
    """
    kwargs = {k: v for k, v in inputs.items() if k not in NOT_MODEL_INPUTS}
    kwargs.update(output_hidden_states=True, **_forward_kwargs(model))
    names, var_kw = _signature(type(model))
    if var_kw or "return_dict" in names:  # a batch's or config's return_dict=False: a tuple
        kwargs["return_dict"] = True
    raw: list[Tensor] = []
    with _last_position_logits(model, raw):
        out = model(**kwargs)
    if isinstance(out, tuple):
        raise TypeError(
            f"Expected {type(unwrap_model(model)).__name__} to return a ModelOutput with "
            "hidden_states, got a tuple: set model.config.return_dict = True"
        )
    if not isinstance(transform, LogitTransform):
        found = logit_transform(model) if transform is None else transform
        scale = found.get("logit_scale")
        transform = LogitTransform(1.0 if scale is None else float(scale), found.get("softcap"))
    _check_transform(model, raw, out, transform)
    hidden = out.hidden_states if hasattr(out, "hidden_states") else out["hidden_states"]
    if not hidden:
        raise RuntimeError(f"{type(unwrap_model(model)).__name__} returned no hidden states")
    return hidden[-1]
