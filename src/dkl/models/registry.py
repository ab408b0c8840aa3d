"""Model registry: one name -> one constructor, looked up by :func:`create_model`.

Name rule (case-sensitive, exact):

* A name registered here wins. The CIFAR names keep mdistiller's spelling
  (``resnet8x4``, ``wrn_40_2``, ``vgg13``, ``ResNet50``, ``MobileNetV2``, ``ShuffleV1`` ...),
  so ``ResNet50`` is the CIFAR bottleneck ResNet-50 and ``resnet50`` is torchvision's ImageNet one.
* ``tv:<name>`` always builds ``torchvision.models.<name>`` (ImageNet layout, random init).
  The plain ImageNet names ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``,
  ``resnet152`` and ``mobilenet_v2`` are registered aliases of their ``tv:`` form because no
  CIFAR model uses those exact spellings.
* ``timm:<name>`` builds ``timm.create_model(<name>, pretrained=False)`` when timm is importable.

Nothing is ever downloaded: pretrained weights come from local files through ``checkpoint=``
(see :func:`dkl.models.load_weights`).
"""

from __future__ import annotations

import collections.abc
import difflib
import fnmatch
import inspect
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .weights import load_weights

__all__ = [
    "ModelEntry",
    "adapt_input_channels",
    "create_model",
    "list_models",
    "model_entry",
    "register_model",
    "register_prefix",
]

ModelFn = Callable[..., nn.Module]
PrefixFn = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """A registered constructor. ``family`` groups names (built in: cifar, imagenet, digits,
    robust; any other non-empty string is allowed)."""

    name: str
    fn: ModelFn
    family: str


_REGISTRY: dict[str, ModelEntry] = {}
_PREFIXES: dict[str, PrefixFn] = {}


def register_model(
    name: str | None = None, *, family: str = "cifar"
) -> Callable[[ModelFn], ModelFn]:
    """Decorator registering ``fn(num_classes, **kwargs) -> nn.Module`` under ``name``.

    ``name`` defaults to the function's ``__name__``. Registering a taken name is an error.

    >>> @register_model("doc_tiny", family="digits")
    ... def doc_tiny(num_classes: int) -> nn.Module:
    ...     return nn.Linear(4, num_classes)
    >>> create_model("doc_tiny", 3).out_features
    3
    >>> _ = _REGISTRY.pop("doc_tiny")  # keep the doctest out of the real registry
    """
    if not isinstance(family, str) or not family:
        raise ValueError(f"Expected family to be a non-empty str, got {family!r}")

    def decorator(fn: ModelFn) -> ModelFn:
        key = name or fn.__name__
        if ":" in key:
            raise ValueError(
                f"Model names may not contain ':' (reserved for tv:/timm:), got {key!r}"
            )
        if key in _REGISTRY:
            raise ValueError(f"Model name {key!r} is already registered")
        _REGISTRY[key] = ModelEntry(key, fn, family)
        return fn

    return decorator


def register_prefix(prefix: str, fn: PrefixFn) -> None:
    """Route ``create_model("<prefix>:<name>", num_classes, **kwargs)`` to ``fn(name, ...)``.

    How ``tv:`` and ``timm:`` reach torchvision and timm (:mod:`dkl.models.imagenet` registers
    them), so the registry never imports a model library itself.
    """
    if not prefix or ":" in prefix:
        raise ValueError(f"Expected a non-empty prefix without ':', got {prefix!r}")
    if prefix in _PREFIXES:
        raise ValueError(f"Model prefix {prefix!r} is already registered")
    _PREFIXES[prefix] = fn


def list_models(pattern: str | None = None, *, family: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a glob ``pattern`` and a ``family``.

    >>> list_models("resnet8*")
    ['resnet8', 'resnet8x4']
    """
    names = [
        n
        for n, e in _REGISTRY.items()
        if (family is None or e.family == family)
        and (pattern is None or fnmatch.fnmatchcase(n, pattern))
    ]
    return sorted(names, key=lambda n: (n.lower(), n))


def model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name`` (no prefixes); unknown names raise ``ValueError``."""
    if name not in _REGISTRY:
        raise ValueError(_unknown_message(name, list(_REGISTRY)))
    return _REGISTRY[name]


def _unknown_message(name: str, known: list[str], what: str = "model") -> str:
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6)
    hint = ", ".join(repr(by_lower[c]) for c in close) if close else "none"
    return (
        f"Unknown {what} {name!r}; close matches: {hint}. "
        "See dkl.models.list_models() (or use the tv:<name> / timm:<name> prefixes)."
    )


def create_model(
    name: str,
    num_classes: int,
    *,
    input_shape: Sequence[int] | None = None,
    checkpoint: str | Path | None = None,
    strict: bool = True,
    replace_classifier: bool = False,
    **kwargs,
) -> nn.Module:
    """Build model ``name`` with a ``num_classes``-way head; forward returns logits ``(B, C)``.

    Args:
        name: a registered name, ``tv:<torchvision name>`` or ``timm:<timm name>``.
        num_classes: size of the classifier output.
        input_shape: the ``(C, H, W)`` of one input, when the model must fit it: a constructor
            that takes ``in_channels`` / ``in_chans`` gets ``C`` and one that takes
            ``in_features`` gets ``C * H * W`` (unless given in ``kwargs``, which must then
            agree); any other model whose first convolution expects another channel count has
            it replaced by :func:`adapt_input_channels`.
        checkpoint: optional local weight file, loaded with :func:`dkl.models.load_weights`.
            In a config: ``model.kwargs.checkpoint`` (``model.checkpoint`` loads after the model
            is built, always strictly).
        strict: passed to ``load_weights``.
        replace_classifier: passed to ``load_weights``: a file whose classifier has another
            class count (an ImageNet file for a 10-class model) loads everything else and the
            model keeps its new classifier, with a one-line logged warning.
        **kwargs: constructor options (e.g. ``hidden=(64,)`` for ``mlp``, ``width=8`` for
            ``digits_cnn``); an option the constructor does not take is a ``TypeError``.

    >>> import torch
    >>> m = create_model("resnet8", 100)
    >>> m(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 100])
    >>> create_model("resnet8", 10, input_shape=(1, 28, 28))(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"Expected num_classes to be a positive int, got {num_classes!r}")
    if not isinstance(name, str):
        raise TypeError(f"Expected the model name as a str, got {type(name).__name__}")
    prefix, sep, rest = name.partition(":")
    if sep and prefix in _PREFIXES:
        fn = _PREFIXES[prefix]
        fits = _fit_input(fn, kwargs, input_shape)
        model = fn(rest, num_classes, **kwargs)
    else:
        entry = model_entry(name)
        _check_option_types(name, entry.fn, kwargs)
        fits = _fit_input(entry.fn, kwargs, input_shape)
        try:
            model = entry.fn(num_classes, **kwargs)
        except TypeError as err:
            if "unexpected keyword" in str(err):
                raise TypeError(f"Model {name!r} got an unknown option: {err}") from None
            raise
    if input_shape is not None and not fits:
        adapt_input_channels(model, int(input_shape[0]))
    if checkpoint is not None:
        load_weights(model, checkpoint, strict=strict, replace_classifier=replace_classifier)
    elif replace_classifier:
        raise ValueError("replace_classifier=True needs a checkpoint= weight file to load")
    return model


_INPUT_OPTIONS = ("in_channels", "in_chans", "in_features")


def _check_option_types(name: str, fn: Callable, kwargs: dict) -> None:
    """Options against the constructor's annotations where they are plain (int, float, bool,
    a sequence of ints): ``hidden=[16.5]`` or ``width=true`` would otherwise build another
    model than the one asked for, without a word."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001  (annotations that do not resolve: nothing to check)
        return

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key, value in kwargs.items():
        tp = hints.get(key)
        if tp is int:
            ok, want = is_int(value), "an int"
        elif tp is float:
            ok, want = is_int(value) or isinstance(value, float), "a number"
        elif tp is bool:
            ok, want = isinstance(value, bool), "true or false"
        elif typing.get_origin(tp) in (collections.abc.Sequence, tuple, list) and (
            typing.get_args(tp)[:1] == (int,)
        ):
            ok = isinstance(value, list | tuple) and all(is_int(v) for v in value)
            want = "a list of ints"
        else:
            continue
        if not ok:
            raise ValueError(f"Model {name!r} option {key}: expected {want}, got {value!r}")


def _fit_input(fn: Callable, kwargs: dict, input_shape: Sequence[int] | None) -> bool:
    """Set the input options ``fn`` declares from ``input_shape`` (in place in ``kwargs``);
    ``True`` when it declares one."""
    if input_shape is None:
        return False
    shape = tuple(int(v) for v in input_shape)
    if len(shape) < 1 or min(shape) < 1:
        raise ValueError(f"Expected input_shape (C, H, W) of positive sizes, got {input_shape!r}")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    wanted = {"in_channels": shape[0], "in_chans": shape[0], "in_features": math.prod(shape)}
    declared = [k for k in _INPUT_OPTIONS if k in params]
    for key in declared:
        if key in kwargs and kwargs[key] != wanted[key]:
            raise ValueError(
                f"model option {key}={kwargs[key]!r} does not fit inputs of shape {shape} "
                f"({key}={wanted[key]}); leave it out to have it set from the data"
            )
        kwargs[key] = wanted[key]
    return bool(declared)


def adapt_input_channels(model: nn.Module, channels: int) -> nn.Module:
    """Make the model's first ``Conv2d`` take ``channels`` input channels (in place).

    The new filters are the old ones summed over their input channels for one channel, so the
    adapted model on a grey image equals the original on that image repeated over its channels;
    for other counts they are the old ones repeated and scaled by ``old / channels`` (timm's
    ``adapt_input_conv`` rule). A model without a convolution, or whose first one already takes
    ``channels``, is left as it is.

    >>> import torch
    >>> net = adapt_input_channels(create_model("resnet8", 10), 1)
    >>> net.conv1.in_channels
    1
    """
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or first[1].in_channels == channels:
        return model
    path, conv = first
    if conv.groups != 1:
        raise ValueError(f"cannot adapt the grouped input convolution {path!r} to {channels}")
    old = conv.weight.detach()
    if channels == 1:
        weight = old.sum(1, keepdim=True)
    else:
        reps = -(-channels // old.shape[1])
        weight = old.repeat(1, reps, 1, 1)[:, :channels] * (old.shape[1] / channels)
    new = nn.Conv2d(
        channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, 1, conv.bias is not None, conv.padding_mode,
        device=old.device, dtype=old.dtype,
    )  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)
    return model
