"""Loading weight files safely (``torch.load(weights_only=True)``) with readable errors."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from dkl._files import load_torch_file

from .normalize import NormalizedModel

__all__ = ["extract_state_dict", "load_weights"]

_CONTAINER_KEYS = ("model", "state_dict", "net")
_SHOW = 5  # keys listed in an error message


def extract_state_dict(obj: object, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state_dict inside ``obj``: ``{"model": sd}``, ``{"state_dict": sd}``, ``{"net": sd}``
    or ``sd`` itself, with a ``module.`` prefix (DataParallel/DDP) stripped when every key has it.

    >>> sd = {"module.fc.weight": torch.zeros(2, 3)}
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
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _listing(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def load_weights(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load the weight file ``path`` into ``model`` in place and return ``model``.

    The file is read with ``torch.load(weights_only=True, map_location="cpu")`` (it cannot run
    code) and may be a raw state_dict or hold one under ``"model"`` (mdistiller), ``"state_dict"``
    or ``"net"``; a ``module.`` prefix is stripped. A :class:`NormalizedModel` given a bare-model
    checkpoint (no ``model.`` keys) loads it into its inner ``.model``.

    Errors: ``FileNotFoundError`` for a missing file; ``ValueError`` naming a few missing or
    unexpected keys (``strict=True``) and, always, every shape mismatch with expected vs got.
    With ``strict=False`` missing and unexpected keys are skipped. A missing BatchNorm
    ``num_batches_tracked`` (old checkpoints) is never an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weight file not found: {path}")
    # one-line errors for an empty, truncated, damaged (content hash) or foreign file
    obj = load_torch_file(path, what="weight file")
    sd = extract_state_dict(obj, source=str(path))

    target = model
    if isinstance(model, NormalizedModel) and not any(k.startswith("model.") for k in sd):
        target = model.model

    own = target.state_dict()
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
    if problems:
        raise ValueError(
            f"Cannot load {path} into {type(target).__name__}: " + " | ".join(problems)
        )
    target.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return model
