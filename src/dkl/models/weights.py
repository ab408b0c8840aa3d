"""Loading weight files safely (``torch.load(weights_only=True)``) with readable errors."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from dkl._files import CheckpointError, load_torch_file

from .normalize import NormalizedModel

__all__ = ["extract_state_dict", "load_weights", "output_layer"]

_CONTAINER_KEYS = ("model", "state_dict", "net")
#: prefixes of wrapped models, stripped while every key has one: DataParallel / DDP's
#: ``module.``, torch.compile's ``_orig_mod.`` (in either order: a compiled DDP model)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_log = logging.getLogger(__name__)  # without a logging setup, Python prints a warning as one line
_SHOW = 5  # keys listed in an error message


def extract_state_dict(obj: object, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state_dict inside ``obj``: ``{"model": sd}``, ``{"state_dict": sd}``, ``{"net": sd}``
    or ``sd`` itself, with the prefixes of wrapped models stripped while every key has one:
    ``module.`` (DataParallel / DDP) and ``_orig_mod.`` (torch.compile), in any order.

    >>> sd = {"module._orig_mod.fc.weight": torch.zeros(2, 3)}
    >>> list(extract_state_dict({"model": sd}))
    ['fc.weight']
    """
    if not isinstance(obj, Mapping):
        raise TypeError(f"Expected a dict in {source}, got {type(obj).__name__}")
    sd: Mapping = obj
    for key in _CONTAINER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            sd = inner
            break
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors or len(tensors) != len(sd):
        others = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)][:_SHOW]
        raise ValueError(
            f"Expected a state_dict of tensors in {source} (raw, or under one of "
            f"{list(_CONTAINER_KEYS)}); top-level keys: {list(obj)[:10]}"
            + (f"; non-tensor entries: {others}" if others else "")
        )
    while prefix := next(
        (p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in tensors)), None
    ):
        tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def _shared_prefix(keys: list[str]) -> str:
    """The dotted prefix every key starts with (``"model."``), ``""`` when they share none."""
    if not keys:
        return ""
    common = os.path.commonprefix(keys)
    return common[: common.rfind(".") + 1]


def _listing(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def output_layer(model: nn.Module) -> str | None:
    """The name of ``model``'s classifier: its last module with parameters of its own, when that
    is a ``Linear`` or a 1×1 ``Conv2d`` (``fc`` of a ResNet, ``classifier.1`` of a MobileNet-V2,
    ``head`` of a timm ViT); ``None`` otherwise.

    >>> output_layer(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 10)))
    '2'
    """
    last: tuple[str, nn.Module] | None = None
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is not None:
            last = (name, module)
    if last is None:
        return None
    name, module = last
    is_1x1 = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
    return name if isinstance(module, nn.Linear) or is_1x1 else None


def _classifier_to_replace(
    own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], head: str | None
) -> list[str] | None:
    """The keys of the classifier ``head`` when they are all that keeps ``sd`` from loading: the
    file's classifier has another class count (only the first dimension differs) or is absent.
    ``None`` when anything else differs too."""
    if head is None:
        return None
    keys = [k for k in own if k.startswith(head + ".") and "." not in k[len(head) + 1 :]]
    if not keys:
        return None
    for k in own:
        if k in keys or k.endswith("num_batches_tracked"):
            continue
        if k not in sd or sd[k].shape != own[k].shape:
            return None  # another layer is missing or differs
    if any(k not in own for k in sd):
        return None  # the file has layers the model lacks
    present = [k for k in keys if k in sd]
    if present and len(present) != len(keys):
        return None
    for k in present:
        a, b = own[k].shape, sd[k].shape
        if len(a) != len(b) or a[1:] != b[1:] or a[0] == b[0]:
            return None
    return keys


def _read_safetensors(path: Path) -> dict:
    """A ``.safetensors`` file's tensors (the format timm and the Hugging Face hub publish)."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError(
            f"'{path}' is a safetensors file: pip install safetensors to read it"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        text = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load weight file '{path}': {text}") from None


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    replace_classifier: bool = False,
) -> nn.Module:
    """Load the weight file ``path`` into ``model`` in place and return ``model``.

    The file is read with ``torch.load(weights_only=True, map_location="cpu")`` (it cannot run
    code), or as safetensors when its name ends in ``.safetensors``, and may be a raw state_dict
    or hold one under ``"model"`` (mdistiller), ``"state_dict"`` or ``"net"``; a ``module.``
    prefix is stripped. A :class:`NormalizedModel` given a bare-model
    checkpoint (no ``model.`` keys) loads it into its inner ``.model``.

    ``replace_classifier=True`` starts a model for new classes from a file trained on others (a
    torchvision or timm ImageNet file into a 10-class model): when the classifier
    (:func:`output_layer`) is the only layer that does not fit, because the file's has another
    class count or none, every other weight is loaded, the model keeps its new classifier, and a
    one-line warning (logger ``dkl.models.weights``) says so. It is off by default: a teacher or a model to evaluate must
    load whole.

    Errors: ``FileNotFoundError`` for a missing file; ``ValueError`` naming a few missing or
    unexpected keys (``strict=True``) and, always, every shape mismatch with expected vs got.
    With ``strict=False`` missing and unexpected keys are skipped. A missing BatchNorm
    ``num_batches_tracked`` (old checkpoints) is never an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weight file not found: {path}")
    # one-line errors for an empty, truncated, damaged (content hash) or foreign file
    if path.suffix == ".safetensors":
        obj = _read_safetensors(path)
    else:
        obj = load_torch_file(path, what="weight file")
    sd = extract_state_dict(obj, source=str(path))

    target = model
    if isinstance(model, NormalizedModel) and not any(k.startswith("model.") for k in sd):
        target = model.model

    own = target.state_dict()
    if replace_classifier:
        head = output_layer(target)
        keys = _classifier_to_replace(own, sd, head)
        if keys:
            got = next((tuple(sd[k].shape) for k in keys if k.endswith("weight") and k in sd), None)
            want = tuple(own[f"{head}.weight"].shape)
            what = f"has {got[0]} outputs" if got else "is not in the file"
            _log.warning(
                "%s: its classifier '%s' %s, the model's %d: loaded every other weight and kept "
                "the model's new '%s'",
                path, head, what, want[0], head,
            )  # fmt: skip
            sd = {k: v for k, v in sd.items() if k not in keys}
            target.load_state_dict(sd, strict=False)
            return model
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k}: expected {tuple(own[k].shape)}, got {tuple(sd[k].shape)}"
        for k in sd
        if k in own and own[k].shape != sd[k].shape
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched[:_SHOW]))
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        prefix = _shared_prefix(unexpected)
        if prefix and {k[len(prefix) :] for k in unexpected} & set(missing):
            problems.append(
                f"every unexpected key starts with '{prefix}', and without it they are the "
                f"model's keys (a wrapper's prefix): strip '{prefix}' from the keys, or save the "
                f"inner model's state_dict"
            )
    if problems:
        head = output_layer(target)
        hint = ""
        if not replace_classifier and _classifier_to_replace(own, sd, head):
            hint = (
                f" | only the classifier '{head}' differs: to start from the other weights with "
                "a new classifier, pass replace_classifier=True (in a config: "
                "model.replace_classifier: true next to model.checkpoint)"
            )
        raise ValueError(
            f"Cannot load {path} into {type(target).__name__}: " + " | ".join(problems) + hint
        )
    target.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return model
